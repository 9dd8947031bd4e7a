"""The training state: everything a step reads and writes, as one pytree that orbax saves.

Built directly sharded: `create_state` runs under jit with the state's out_shardings, so a
7B model's parameters never exist unsharded on one device.

With LoRA (config.lora.rank > 0, model/lora.py) the state is a `LoraTrainState`: `params` is
the frozen base, `lora` the adapters, and the optimizer state belongs to the adapters only (no
moments for the base). Every function here takes `lora=None` (or a disabled LoraConfig) for
the plain `TrainState`, which is then exactly what it was before LoRA existed.
"""
from __future__ import annotations

import functools
import os

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from geb_jax.model import ModelConfig, init_params, param_logical_axes
from geb_jax.model import lora as lora_lib
from geb_jax.model.lora import LoraConfig
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


@flax.struct.dataclass
class LoraTrainState(TrainState):
    """TrainState + adapters: `params` is the frozen base, `opt_state` the adapters' state."""
    lora: dict  # {"layers": {"attn": {"q": {"a": (L, D, r), "b": (L, r, N, H)}, ...}, ...}}


def _enabled(lora: LoraConfig | None) -> bool:
    return lora is not None and lora.enabled


def trainable(state: TrainState):
    """What the optimizer updates: the adapters of a LoraTrainState, else the parameters."""
    return state.lora if isinstance(state, LoraTrainState) else state.params


def model_params(state: TrainState, lora: LoraConfig | None = None):
    """The parameters the model runs with: base merged with the adapters under LoRA."""
    if isinstance(state, LoraTrainState):
        return lora_lib.merge(state.params, state.lora, lora)
    return state.params


def create_state(model_config: ModelConfig, optimizer: optax.GradientTransformation,
                 seed: int, lora: LoraConfig | None = None) -> TrainState:
    init_rng, state_rng = jax.random.split(jax.random.key(seed))
    params = init_params(model_config, init_rng)
    zero_f, zero_i = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
    if _enabled(lora):
        adapters = lora_lib.init_adapters(params, lora, lora_lib.adapter_rng(init_rng))
        return LoraTrainState(step=zero_i, params=params, opt_state=optimizer.init(adapters),
                              rng=jax.random.key_data(state_rng), loss_ema=zero_f,
                              grad_norm_ema=zero_f, ema_count=zero_i, skipped=zero_i,
                              lora=adapters)
    return TrainState(step=zero_i, params=params, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(state_rng), loss_ema=zero_f,
                      grad_norm_ema=zero_f, ema_count=zero_i, skipped=zero_i)


def state_shardings(model_config: ModelConfig, optimizer: optax.GradientTransformation,
                    mesh: Mesh, lora: LoraConfig | None = None) -> TrainState:
    """NamedShardings for every leaf: parameters (and their optimizer moments) by the logical
    rules, scalars and counters replicated. Adapters: a like its base matrix's input axes, b
    like its output axes (model/lora.py adapter_logical_axes), and their moments alike."""
    abstract = abstract_state(model_config, optimizer, lora=lora)
    param_axes = param_logical_axes(model_config)
    param_sh = logical_to_shardings(param_axes, abstract.params, mesh)
    rep = replicated(mesh)
    if _enabled(lora):
        lora_sh = logical_to_shardings(lora_lib.adapter_logical_axes(param_axes, lora),
                                       abstract.lora, mesh)
        opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, abstract.opt_state, lora_sh,
                                       transform_non_params=lambda _: rep)
        return jax.tree.map(lambda _: rep, abstract).replace(params=param_sh, opt_state=opt_sh,
                                                             lora=lora_sh)
    opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, abstract.opt_state, param_sh,
                                   transform_non_params=lambda _: rep)
    return jax.tree.map(lambda _: rep, abstract).replace(params=param_sh, opt_state=opt_sh)


def abstract_state(model_config: ModelConfig, optimizer: optax.GradientTransformation,
                   shardings: TrainState | None = None,
                   lora: LoraConfig | None = None) -> TrainState:
    """ShapeDtypeStructs of the state (with shardings, when given: what orbax restores onto)."""
    shapes = jax.eval_shape(functools.partial(create_state, model_config, optimizer, lora=lora),
                            0)
    if shardings is None:
        return shapes
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


def init_sharded_state(model_config: ModelConfig, optimizer: optax.GradientTransformation,
                       seed: int, shardings: TrainState,
                       lora: LoraConfig | None = None) -> TrainState:
    create = functools.partial(create_state, model_config, optimizer, lora=lora)
    return jax.jit(create, static_argnums=0, out_shardings=shardings)(seed)


def num_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def lora_optimizer_config(opt_config, lora: LoraConfig | None):
    """The optimizer config a stage uses. Under LoRA the embedding is frozen, so the GLM-130B
    embedding-gradient shrink has nothing to act on (and would find no `embedding` leaf in the
    adapters' gradient): it is turned off; everything else is unchanged."""
    if _enabled(lora) and opt_config.embedding_grad_scale != 1.0:
        return opt_config.replace(embedding_grad_scale=1.0)
    return opt_config


# ---- a finished stage's parameters, whatever its LoRA setting --------------------------------
def saved_lora_config(stage_directory: str) -> LoraConfig:
    """config.lora as saved with the stage's newest readable checkpoint (LoRA off when the
    saved config has no lora section, or no checkpoint config can be read: the restore that
    follows then reports the real problem)."""
    from geb_jax.checkpoint.reader import committed_steps  # pylint: disable=import-outside-toplevel
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    from etils import epath  # pylint: disable=import-outside-toplevel

    checkpoints = os.path.join(stage_directory, "checkpoints")
    if not os.path.isdir(checkpoints):
        return LoraConfig()
    for step in reversed(committed_steps(checkpoints)):
        try:
            config = ocp.JsonCheckpointHandler().restore(
                epath.Path(checkpoints) / str(step) / "config", args=ocp.args.JsonRestore())
        except Exception:  # noqa: BLE001  unreadable: try an older step
            continue
        if isinstance(config, dict):
            return LoraConfig.from_dict(config.get("lora") or {})
    return LoraConfig()


def restore_stage_state(stage_directory: str, model_config: ModelConfig,
                        optimizer: optax.GradientTransformation, mesh: Mesh,
                        lora: LoraConfig | None) -> TrainState:
    """The newest good train state of a finished stage, laid out on `mesh`.

    `optimizer` only has to have the stage's structure (the chain is the same for every
    hyperparameter setting, optimizer.py); `lora` must be the stage's (saved_lora_config).
    """
    from geb_jax.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
    from geb_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel

    checkpoints = os.path.join(stage_directory, "checkpoints")
    if not os.path.isdir(checkpoints):
        raise ConfigError(f"{stage_directory!r} holds no checkpoints/: finish that stage first "
                          "or fix config.init_from.")
    shardings = state_shardings(model_config, optimizer, mesh, lora=lora)
    abstract = abstract_state(model_config, optimizer, shardings, lora=lora)
    checkpointer = Checkpointer(checkpoints, save_every=0, keep=None)
    try:
        state, *_ = checkpointer.restore(abstract)
    finally:
        checkpointer.close()
    return state


def merged_params_jit(lora: LoraConfig | None, params_shardings):
    """jit(state -> model_params(state)) with the parameters' shardings on the output."""
    return jax.jit(functools.partial(model_params, lora=lora), out_shardings=params_shardings)
