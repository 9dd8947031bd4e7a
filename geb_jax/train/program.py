"""The compiled update step of a stage, built in one place.

train/loop.py trains with it; experiments/bench_train.py times the same object and compiles it
ahead of time on abstract shapes. One builder means the benchmark cannot measure another
program than the loop runs: same loss binding, optimizer chain, LoRA split, shardings, buffer
donation, and -- through `step_context` -- the same mesh and logical-axis rules at trace time
(the activations' sharding constraints only mean something inside them).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from geb_jax.model import ModelConfig, abstract_params, make_apply, param_logical_axes
from geb_jax.model.lora import LoraConfig
from geb_jax.parallel.mesh import LOGICAL_AXIS_RULES, logical_to_shardings
from geb_jax.run_config import RunConfig, TrainConfig, run_config
from geb_jax.train.losses import cross_entropy_loss, dpo_loss
from geb_jax.train.optimizer import PAIRS_KEY, TOKENS_KEY, OptimizerConfig, make_optimizer
from geb_jax.train.state import (TrainState, abstract_state, lora_optimizer_config,
                                 merged_params_jit, state_shardings)
from geb_jax.train.step import (batch_shardings, jit_eval_step, jit_train_step, make_eval_step,
                                make_train_step)


def bind_loss(stage: str, apply, train_config: TrainConfig):
    """The stage's loss with the model and hyperparameters bound: (params, batch, ref) -> ..."""
    if stage == "dpo":
        return lambda params, batch, reference_params: dpo_loss(
            params, batch, apply, reference_params=reference_params,
            beta=train_config.dpo_beta, loss_type=train_config.dpo_loss_type,
            label_smoothing=train_config.dpo_label_smoothing,
            sft_weight=train_config.dpo_sft_weight)
    return lambda params, batch, reference_params=None: cross_entropy_loss(
        params, batch, apply, z_loss_weight=train_config.z_loss_weight)


def check_mesh_fits(model_config: ModelConfig, mesh: Mesh) -> None:
    """The ConfigError naming every parameter dimension a mesh axis does not divide, raised
    when the mesh is built (before any input work), not when the step is."""
    logical_to_shardings(param_logical_axes(model_config), abstract_params(model_config), mesh)


@dataclasses.dataclass(frozen=True)
class StepProgram:
    """Everything a stage's update needs, built from the config and one batch's structure."""
    model_config: ModelConfig
    opt_config: OptimizerConfig
    lora: LoraConfig
    mesh: Mesh
    optimizer: optax.GradientTransformation
    apply: Callable
    state_sh: TrainState            # NamedShardings of the train state
    abstract: TrainState            # its ShapeDtypeStructs, carrying those shardings
    batch_sh: Any                   # NamedShardings of a batch
    reference_sh: Any               # DPO's reference parameters' shardings, else None
    train_step: Callable            # jitted (state, batch, reference) -> (state, metrics)
    eval_step: Callable             # jitted (params, batch, reference) -> metrics
    model_params: Callable          # jitted state -> the parameters eval runs (LoRA merged)


def build_step_program(config: ml_collections.ConfigDict | RunConfig, stage: str, mesh: Mesh,
                       batch_like: Any) -> StepProgram:
    """The stage's step on `mesh`; `batch_like` (arrays or ShapeDtypeStructs) gives the batch
    structure. DPO steps take reference parameters sharded like the policy's."""
    config = run_config(config)
    model_config, opt_config = config.model, config.optimizer
    lora = config.lora  # rank 0 (off): plain TrainState
    optimizer = make_optimizer(lora_optimizer_config(opt_config, lora))
    apply = make_apply(model_config)
    loss_fn = bind_loss(stage, apply, config.train)
    state_sh = state_shardings(model_config, optimizer, mesh, lora=lora)
    batch_sh = batch_shardings(batch_like, mesh)
    reference_sh = state_sh.params if stage == "dpo" else None
    weight_key = PAIRS_KEY if stage == "dpo" else TOKENS_KEY  # what each loss averages over
    train_step = jit_train_step(
        make_train_step(loss_fn, optimizer, microbatches=opt_config.microbatches,
                        weight_key=weight_key, spike=config.train.spike,
                        lora=lora),
        mesh, state_sh, batch_sh, reference_sh)
    return StepProgram(
        model_config=model_config, opt_config=opt_config, lora=lora, mesh=mesh,
        optimizer=optimizer, apply=apply, state_sh=state_sh,
        abstract=abstract_state(model_config, optimizer, state_sh, lora=lora),
        batch_sh=batch_sh, reference_sh=reference_sh, train_step=train_step,
        eval_step=jit_eval_step(make_eval_step(loss_fn), mesh, state_sh.params, batch_sh,
                                reference_sh),
        model_params=merged_params_jit(lora, state_sh.params))


@contextlib.contextmanager
def step_context(mesh: Mesh) -> Iterator[None]:
    """The mesh and logical-axis rules every step is traced and run under."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield


def abstract_batch(batch_like: Any, batch_sh: Any) -> Any:
    """ShapeDtypeStructs of a batch, with its shardings (nothing allocated)."""
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x),
                                                           sharding=sh), batch_like, batch_sh)


def compile_ahead(program: StepProgram, batch_like: Any) -> tuple[Any, dict]:
    """The train step compiled on abstract shapes (no weight or batch allocated): (compiled,
    memory in bytes from XLA's memory_analysis: temp, argument, output, alias, and peak =
    argument + output + temp - alias, the donated state counted once)."""
    reference = program.abstract.params if program.reference_sh is not None else None
    with step_context(program.mesh):
        lowered = program.train_step.lower(program.abstract,
                                           abstract_batch(batch_like, program.batch_sh),
                                           reference)
        compiled = lowered.compile()
    stats = compiled.memory_analysis()
    if stats is None:
        return compiled, {}
    memory = {"temp_bytes": int(stats.temp_size_in_bytes),
              "argument_bytes": int(stats.argument_size_in_bytes),
              "output_bytes": int(stats.output_size_in_bytes),
              "alias_bytes": int(stats.alias_size_in_bytes)}
    memory["peak_bytes"] = (memory["argument_bytes"] + memory["output_bytes"]
                            + memory["temp_bytes"] - memory["alias_bytes"])
    return compiled, memory
