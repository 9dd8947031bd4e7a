"""The decoder-only transformer and the pure functions the rest of geb_jax calls.

Read this first: `init_params(config, rng)` makes float32 parameters; `make_apply(config)`
returns the pure `apply(params, tokens, positions, segment_ids) -> logits`. Layers are stored
stacked on a leading `layers` axis whether or not the forward pass scans over them
(`scan_layers=False` fully unrolls the same scan), so checkpoints do not depend on that switch.

The returned `apply` also carries what a loss needs to run the lm head itself, chunk by chunk
(train/losses.py, `model.loss_chunk_size`), without the (B, T, V) logits:
    apply.hidden_states(params, tokens, positions, segment_ids) -> (B, T, D) final-norm output
                                                                   in the compute dtype
    apply.lm_head(params) -> (D, V) in the compute dtype: `lm_head`, or the tied embedding
                             transposed
    apply.config          -> the ModelConfig
so that apply(...) == einsum("BTD,DV->BTV", apply.hidden_states(...), apply.lm_head(params)).
"""
from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from geb_jax.model.config import ModelConfig
from geb_jax.model.layers import RMSNorm, Attention, SwiGLU, rope_tables

Array = jax.Array
Params = dict

_REMAT_POLICIES = {
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute everything in the backward pass
}
_ACT_AXES = ("batch", "length", "embed")  # logical names of the residual stream


class Block(nn.Module):
    """One Llama block. Pre-norm: x + f(norm(x)). Post-norm (ablation): norm(x + f(x))."""
    config: ModelConfig

    @nn.compact
    def __call__(self, x_btd: Array, cos: Array, sin: Array, segment_ids_bt: Array):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        out_std = c.init_std / (2 * c.n_layers) ** 0.5  # GPT-2 style scaling of residual outputs
        attn = Attention(c.n_heads, c.n_kv_heads, c.head_dim, c.init_std, out_std,
                         c.attention_impl, dtype, name="attn")
        mlp = SwiGLU(c.d_ff, c.init_std, out_std, dtype, name="mlp")
        attn_norm = RMSNorm(c.norm_eps, dtype, name="attn_norm")
        mlp_norm = RMSNorm(c.norm_eps, dtype, name="mlp_norm")
        if c.norm_position == "pre":
            h_btd = x_btd + attn(attn_norm(x_btd), cos, sin, segment_ids_bt)
            out_btd = h_btd + mlp(mlp_norm(h_btd))
        else:
            h_btd = attn_norm(x_btd + attn(x_btd, cos, sin, segment_ids_bt))
            out_btd = mlp_norm(h_btd + mlp(h_btd))
        return nn.with_logical_constraint(out_btd, _ACT_AXES), None


class Transformer(nn.Module):
    """Embedding -> L blocks (scanned, stacked parameters) -> final RMSNorm -> lm head."""
    config: ModelConfig

    @nn.compact
    def __call__(self, tokens_bt: Array, positions_bt: Array, segment_ids_bt: Array,
                 return_hidden: bool = False) -> Array:
        """Logits (B, T, V); with return_hidden=True the final norm's output (B, T, D) instead,
        in the compute dtype (the lm head is then left to the caller: `lm_head_weight`)."""
        c = self.config
        dtype = jnp.dtype(c.dtype)
        embedding_vd = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(c.init_std), ("vocab", "embed")),
            (c.vocab_size, c.d_model), jnp.float32)
        x_btd = jnp.take(embedding_vd, tokens_bt, axis=0).astype(dtype)
        x_btd = nn.with_logical_constraint(x_btd, _ACT_AXES)
        cos, sin = rope_tables(positions_bt, c.head_dim, c.rope_theta)

        block = Block
        if c.remat_policy != "none":
            block = nn.remat(Block, policy=_REMAT_POLICIES[c.remat_policy], prevent_cse=False)
        stack = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.n_layers,
            unroll=1 if c.scan_layers else c.n_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x_btd, _ = stack(c, name="layers")(x_btd, cos, sin, segment_ids_bt)
        x_btd = RMSNorm(c.norm_eps, dtype, name="final_norm")(x_btd)
        if return_hidden:
            return nn.with_logical_constraint(x_btd, _ACT_AXES)

        if c.tie_embeddings:
            logits_btv = jnp.einsum("BTD,VD->BTV", x_btd, embedding_vd.astype(dtype))
        else:
            head_dv = self.param(
                "lm_head",
                nn.with_logical_partitioning(nn.initializers.normal(c.init_std), ("embed", "vocab")),
                (c.d_model, c.vocab_size), jnp.float32)
            logits_btv = jnp.einsum("BTD,DV->BTV", x_btd, head_dv.astype(dtype))
        return nn.with_logical_constraint(logits_btv, ("batch", "length", "vocab"))


def default_positions_and_segments(tokens_bt: Array) -> tuple[Array, Array]:
    """One unpacked document per row: positions 0..T-1, every segment id 1."""
    b, t = tokens_bt.shape
    return (jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
            jnp.ones((b, t), dtype=jnp.int32))


def _init_boxed(config: ModelConfig, rng: Array) -> Params:
    """Initialised on one token, through the XLA attention: the parameters do not depend on the
    attention kernel, and a kernel that tiles T would refuse T = 1."""
    tokens = jnp.zeros((1, 1), dtype=jnp.int32)
    positions, segments = default_positions_and_segments(tokens)
    model = Transformer(config.replace(attention_impl="xla"))
    return model.init(rng, tokens, positions, segments)["params"]


def init_params(config: ModelConfig, rng: Array) -> Params:
    """Float32 parameters, stacked over layers, without the logical-axis boxes."""
    return nn.unbox(_init_boxed(config, rng))


def abstract_params(config: ModelConfig) -> Params:
    """Shapes and dtypes of the parameters without allocating them (jax.eval_shape)."""
    return jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))


def param_logical_axes(config: ModelConfig) -> Params:
    """Tree of PartitionSpecs of logical axis names, one per parameter."""
    boxed = jax.eval_shape(functools.partial(_init_boxed, config), jax.random.key(0))
    return nn.get_partition_spec(boxed)


def lm_head_weight(config: ModelConfig, params: Params) -> Array:
    """The lm head as (D, V) in the compute dtype, exactly the weight the model's last einsum
    uses: the untied `lm_head` parameter, or the tied embedding table transposed."""
    dtype = jnp.dtype(config.dtype)
    if config.tie_embeddings:
        return jnp.asarray(params["embedding"]).astype(dtype).T
    return jnp.asarray(params["lm_head"]).astype(dtype)


def make_apply(config: ModelConfig) -> Callable[[Params, Array, Array, Array], Array]:
    """Returns the pure `apply(params, tokens, positions, segment_ids) -> logits (B, T, V)`,
    with the attributes `hidden_states`, `lm_head` and `config` (see the module docstring)."""
    module = Transformer(config)

    def forward(params, tokens_bt, positions_bt, segment_ids_bt, return_hidden):
        if positions_bt is None or segment_ids_bt is None:
            default_pos, default_seg = default_positions_and_segments(tokens_bt)
            positions_bt = default_pos if positions_bt is None else positions_bt
            segment_ids_bt = default_seg if segment_ids_bt is None else segment_ids_bt
        return module.apply({"params": params}, tokens_bt, positions_bt, segment_ids_bt,
                            return_hidden)

    def apply(params: Params, tokens_bt: Array, positions_bt: Array | None = None,
              segment_ids_bt: Array | None = None) -> Array:
        return forward(params, tokens_bt, positions_bt, segment_ids_bt, False)

    def hidden_states(params: Params, tokens_bt: Array, positions_bt: Array | None = None,
                      segment_ids_bt: Array | None = None) -> Array:
        """(B, T, D): the final norm's output, the lm head's input, in the compute dtype."""
        return forward(params, tokens_bt, positions_bt, segment_ids_bt, True)

    apply.hidden_states = hidden_states
    apply.lm_head = functools.partial(lm_head_weight, config)
    apply.config = config
    return apply
