"""The frozen model config: built once from the ConfigDict, owns derived facts, validates itself.

Layers never read the ConfigDict; they take explicit arguments from this dataclass.
Dimension alphabet used across geb_jax: B batch, T time, S key time, D d_model, N query heads,
K KV heads, H head dim, F FFN width, V vocab, L layers.
"""
from __future__ import annotations

import dataclasses

from geb_jax.config_sections import Section
from geb_jax.errors import ConfigError

REMAT_POLICIES = ("none", "save_dots", "full")
NORM_POSITIONS = ("pre", "post")
DTYPES = ("float32", "bfloat16", "float16")
# auto: the fastest kernel that runs here (model/attention.py resolve_attention_impl); xla: the
# dense-mask reference; cudnn: cuDNN flash (Hopper+, bf16/fp16); pallas_gpu: the Pallas Triton
# kernel; pallas_tpu: splash attention. All are causal within packed documents.
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas_gpu", "pallas_tpu")


@dataclasses.dataclass(frozen=True)
class ModelConfig(Section):
    SECTION = "model"

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
    norm_position: str = "pre"  # "pre": Llama blocks; "post": norm after the residual add.
    dtype: str = "float32"  # compute dtype; parameters stay float32.
    scan_layers: bool = True  # lax.scan over layers (fast compile) vs fully unrolled.
    remat_policy: str = "none"
    attention_impl: str = "auto"  # one of ATTENTION_IMPLS (model/attention.py).
    init_std: float = 0.02
    # Cross-entropy without (B, T, V) logits (train/losses.py): the loss runs the lm head,
    # log-softmax and target gather over chunks of this many sequence positions, recomputing each
    # chunk's float32 (B, C, V) logits in the backward pass; 0 = one dense (B, T, V) pass.
    loss_chunk_size: int = 512

    def __post_init__(self):
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                    "d_ff", "max_seq_len")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}.")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads "
                f"({self.n_kv_heads}): grouped-query attention shares each KV head among an equal "
                f"number of query heads. Pick n_kv_heads from the divisors of {self.n_heads}.")
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim ({self.head_dim}) must be even for rotary embeddings.")
        for name, allowed in (("norm_position", NORM_POSITIONS), ("dtype", DTYPES),
                              ("remat_policy", REMAT_POLICIES),
                              ("attention_impl", ATTENTION_IMPLS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"model.{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}.")
        if (isinstance(self.loss_chunk_size, bool) or not isinstance(self.loss_chunk_size, int)
                or self.loss_chunk_size < 0):
            raise ConfigError(f"model.loss_chunk_size must be an integer >= 0 (0: dense loss), "
                              f"got {self.loss_chunk_size!r}.")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ConfigError("model.rope_theta and model.norm_eps must be positive.")

    # ---- derived facts -------------------------------------------------------------------
    @property
    def q_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads

    def params_per_layer(self) -> int:
        d, n, k, h, f = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.d_ff
        attention = d * n * h + 2 * d * k * h + n * h * d  # q, k and v, o
        mlp = 3 * d * f  # gate, up, down
        norms = 2 * d
        return attention + mlp + norms

    def num_params(self, include_embeddings: bool = True) -> int:
        embeddings = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
        body = self.n_layers * self.params_per_layer() + self.d_model  # + final norm
        return body + (embeddings if include_embeddings else 0)

    def num_non_embedding_params(self) -> int:
        """Parameters excluding the input embedding table (the lm head counts: it is a matmul)."""
        lm_head = 0 if self.tie_embeddings else self.vocab_size * self.d_model
        return self.n_layers * self.params_per_layer() + self.d_model + lm_head

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x non-embedding params + 12 x L x (N x H) x T for attention.

        The PaLM / Chinchilla accounting (forward + backward = 3 x forward), counting the causal
        attention as dense, which is how MFU figures are usually quoted.
        """
        matmul_params = self.num_non_embedding_params()
        if self.tie_embeddings:
            matmul_params += self.vocab_size * self.d_model  # the tied table is also the lm head
        return 6.0 * matmul_params + 12.0 * self.n_layers * self.n_heads * self.head_dim * seq_len
