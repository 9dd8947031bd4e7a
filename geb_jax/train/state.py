"""The training state: everything a step reads and writes, as one pytree that orbax saves.

Built directly sharded: `create_state` runs under jit with the state's out_shardings, so a
7B model's parameters never exist unsharded on one device.
"""
from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from geb_jax.model import ModelConfig, init_params, param_logical_axes
from geb_jax.parallel.mesh import logical_to_shardings, replicated


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32: train-step calls (skipped and replaced updates included)
    params: dict
    opt_state: optax.OptState
    rng: jax.Array  # uint32 raw key data (orbax saves plain arrays)
    loss_ema: jax.Array  # float32 running average of the loss, for spike detection
    grad_norm_ema: jax.Array
    ema_count: jax.Array  # int32: updates folded into the running averages
    skipped: jax.Array  # int32: updates skipped as spikes or non-finite


def create_state(model_config: ModelConfig, optimizer: optax.GradientTransformation,
                 seed: int) -> TrainState:
    init_rng, state_rng = jax.random.split(jax.random.key(seed))
    params = init_params(model_config, init_rng)
    zero_f, zero_i = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
    return TrainState(step=zero_i, params=params, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(state_rng), loss_ema=zero_f,
                      grad_norm_ema=zero_f, ema_count=zero_i, skipped=zero_i)


def state_shardings(model_config: ModelConfig, optimizer: optax.GradientTransformation,
                    mesh: Mesh) -> TrainState:
    """NamedShardings for every leaf: parameters (and their optimizer moments) by the logical
    rules, scalars and counters replicated."""
    abstract = abstract_state(model_config, optimizer)
    param_sh = logical_to_shardings(param_logical_axes(model_config), abstract.params, mesh)
    rep = replicated(mesh)
    opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, abstract.opt_state, param_sh,
                                   transform_non_params=lambda _: rep)
    return jax.tree.map(lambda _: rep, abstract).replace(params=param_sh, opt_state=opt_sh)


def abstract_state(model_config: ModelConfig, optimizer: optax.GradientTransformation,
                   shardings: TrainState | None = None) -> TrainState:
    """ShapeDtypeStructs of the state (with shardings, when given: what orbax restores onto)."""
    shapes = jax.eval_shape(functools.partial(create_state, model_config, optimizer), 0)
    if shardings is None:
        return shapes
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


def init_sharded_state(model_config: ModelConfig, optimizer: optax.GradientTransformation,
                       seed: int, shardings: TrainState) -> TrainState:
    create = functools.partial(create_state, model_config, optimizer)
    return jax.jit(create, static_argnums=0, out_shardings=shardings)(seed)


def num_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))

