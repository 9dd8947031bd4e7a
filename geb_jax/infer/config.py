"""ModelConfig as the jax-free inference code sees it.

`InferConfig` is geb_jax.model.config.ModelConfig (same fields, same checks; that module and the
lazy geb_jax.model package import no JAX) plus `from_hf`, which reads a Hugging Face
LlamaConfig dict; the shared `from_dict` (geb_jax/config_sections.py) also takes any dataclass
with those fields.
The training-only fields (dtype, scan_layers, remat_policy, attention_impl, init_std) are
carried along and ignored by the numpy engine.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from geb_jax.errors import ConfigError
from geb_jax.model.config import ModelConfig

InferConfigError = ConfigError  # the name inference code and its users catch


class InferConfig(ModelConfig):
    """A ModelConfig built for (and by) the inference side."""

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


def config_dict(config: Any) -> dict:
    """A model config given as a ModelConfig (any dataclass), a ConfigDict or a mapping, as a
    plain dict (what export files store); TypeError for anything else."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
        return dict(config.to_dict())
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"config must be a dataclass, ConfigDict or dict, got {type(config).__name__}")
