"""The Llama block's parts: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP.

Each module takes explicit sizes (never the whole config). Parameters are float32 and carry
logical axis names (embed, heads, kv_heads, head_dim, mlp, vocab) for the sharding rules; they
are cast to the compute dtype at use. Shapes use the alphabet of model/config.py.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from geb_jax.model.attention import attend, attention_mask  # noqa: F401 (re-exported)

Array = jax.Array


def _param(module: nn.Module, name: str, shape, names, std: float):
    init = nn.with_logical_partitioning(nn.initializers.normal(stddev=std), names)
    return module.param(name, init, shape, jnp.float32)


class RMSNorm(nn.Module):
    """RMSNorm with float32 statistics whatever the compute dtype (as Llama/GEB do)."""
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btd: Array) -> Array:
        d = x_btd.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (d,), jnp.float32)
        x32 = x_btd.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (normed * scale).astype(self.dtype)


def rope_tables(positions_bt: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos/sin tables (B, T, H/2), always float32.

    Positions and angles stay float32 even in bfloat16 training: bfloat16 has 8 mantissa bits,
    so positions above 256 would collide (the GEB paper's reason for float32 RoPE).
    """
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / head_dim))  # (H/2,)
    angles = positions_bt.astype(jnp.float32)[..., None] * inv_freq  # (B, T, H/2)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_btnh: Array, cos_bth: Array, sin_bth: Array) -> Array:
    """Rotates halves (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin): the Hugging Face layout."""
    x32 = x_btnh.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)  # (B, T, N, H/2) each
    cos, sin = cos_bth[:, :, None, :], sin_bth[:, :, None, :]  # (B, T, 1, H/2)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_btnh.dtype)


class Attention(nn.Module):
    """Grouped-query attention (N query heads share K KV heads; MHA: K = N, MQA: K = 1), causal
    within each packed document. `implementation` is a model.attention_impl (model/attention.py);
    only the "xla" impl builds a dense (B, 1, T, T) mask, the kernels take the segment ids."""
    n_heads: int
    n_kv_heads: int
    head_dim: int
    init_std: float
    out_std: float
    implementation: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btd: Array, cos: Array, sin: Array, segment_ids_bt: Array) -> Array:
        d, n, k, h = x_btd.shape[-1], self.n_heads, self.n_kv_heads, self.head_dim
        w_q = _param(self, "q", (d, n, h), ("embed", "heads", "head_dim"), self.init_std)
        w_k = _param(self, "k", (d, k, h), ("embed", "kv_heads", "head_dim"), self.init_std)
        w_v = _param(self, "v", (d, k, h), ("embed", "kv_heads", "head_dim"), self.init_std)
        w_o = _param(self, "o", (n, h, d), ("heads", "head_dim", "embed"), self.out_std)
        x = x_btd.astype(self.dtype)
        q_btnh = jnp.einsum("BTD,DNH->BTNH", x, w_q.astype(self.dtype))
        k_btkh = jnp.einsum("BTD,DKH->BTKH", x, w_k.astype(self.dtype))
        v_btkh = jnp.einsum("BTD,DKH->BTKH", x, w_v.astype(self.dtype))
        q_btnh, k_btkh = apply_rope(q_btnh, cos, sin), apply_rope(k_btkh, cos, sin)
        out_btnh = attend(q_btnh, k_btkh, v_btkh, segment_ids_bt, self.implementation)
        return jnp.einsum("BTNH,NHD->BTD", out_btnh, w_o.astype(self.dtype))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases."""
    d_ff: int
    init_std: float
    out_std: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btd: Array) -> Array:
        d, f = x_btd.shape[-1], self.d_ff
        w_gate = _param(self, "gate", (d, f), ("embed", "mlp"), self.init_std)
        w_up = _param(self, "up", (d, f), ("embed", "mlp"), self.init_std)
        w_down = _param(self, "down", (f, d), ("mlp", "embed"), self.out_std)
        x = x_btd.astype(self.dtype)
        gate_btf = jnp.einsum("BTD,DF->BTF", x, w_gate.astype(self.dtype))
        up_btf = jnp.einsum("BTD,DF->BTF", x, w_up.astype(self.dtype))
        return jnp.einsum("BTF,FD->BTD", nn.silu(gate_btf) * up_btf, w_down.astype(self.dtype))
