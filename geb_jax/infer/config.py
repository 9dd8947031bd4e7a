"""The model facts inference needs, as a tiny jax-free dataclass.

geb_jax.model.ModelConfig cannot be imported here (geb_jax.model imports jax), so the fields
the forward pass reads are duplicated. `InferConfig.from_dict` accepts a ModelConfig dict as
saved in config.json (training-only fields such as dtype or remat_policy are ignored) and
names any field it does not know; `from_hf` reads a Hugging Face LlamaConfig dict.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

# ModelConfig fields that only matter for training / JAX compilation; accepted and ignored.
TRAINING_ONLY_FIELDS = ("dtype", "scan_layers", "remat_policy", "attention_impl", "init_std")


class InferConfigError(ValueError):
    """A model config that the numpy engine cannot run; the message names the field."""


@dataclasses.dataclass(frozen=True)
class InferConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    norm_position: str = "pre"  # "pre": x + f(norm(x)); "post": norm(x + f(x))

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InferConfigError(f"model.{name} must be a positive integer, got {value!r}.")
        if self.n_heads % self.n_kv_heads:
            raise InferConfigError(f"model.n_heads ({self.n_heads}) must be divisible by "
                                   f"model.n_kv_heads ({self.n_kv_heads}).")
        if self.head_dim % 2:
            raise InferConfigError(f"model.head_dim ({self.head_dim}) must be even (RoPE).")
        if self.norm_position not in ("pre", "post"):
            raise InferConfigError(
                f"model.norm_position={self.norm_position!r} is not one of pre, post.")
        if not self.rope_theta > 0 or not self.norm_eps > 0:
            raise InferConfigError("model.rope_theta and model.norm_eps must be positive.")

    @property
    def q_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | "InferConfig") -> "InferConfig":
        """From a ModelConfig-style dict (or any dataclass with those fields)."""
        if isinstance(values, InferConfig):
            return values
        if dataclasses.is_dataclass(values) and not isinstance(values, type):
            values = dataclasses.asdict(values)
        values = dict(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known - set(TRAINING_ONLY_FIELDS))
        if unknown:
            raise InferConfigError(f"Unknown model config field(s) {unknown}; known fields: "
                                   f"{sorted(known | set(TRAINING_ONLY_FIELDS))}.")
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "InferConfig":
        """From a Hugging Face LlamaConfig dict (config.json); plain RoPE only."""
        for field in ("hidden_size", "num_attention_heads", "num_hidden_layers",
                      "intermediate_size", "vocab_size"):
            if hf.get(field) is None:
                raise InferConfigError(f"HF config field {field!r} is missing.")
        theta = hf.get("rope_theta")
        for field in ("rope_scaling", "rope_parameters"):
            rope = hf.get(field)
            if isinstance(rope, Mapping):
                if rope.get("rope_type", rope.get("type", "default")) != "default":
                    raise InferConfigError(f"HF config field {field!r}={rope!r}: only plain "
                                           f"RoPE (rope_type 'default') is supported.")
                theta = rope.get("rope_theta", theta)
        heads = hf["num_attention_heads"]
        values = dict(
            vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"], n_heads=heads,
            n_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            d_ff=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
            rope_theta=10000.0 if theta is None else float(theta),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
        values.update(overrides)
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "InferConfig":
        return dataclasses.replace(self, **changes)
