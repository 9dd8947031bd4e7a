"""The train and eval steps: built once from a loss, the optimizer and the mesh; jit-compiled
with explicit in/out shardings (the modern pjit) and the state buffer donated.

Pretrain, SFT and DPO share this code; they differ only in `loss_fn` and the batch.
An update train/spikes.py calls a spike (loss or gradient norm k times its running mean, or
not finite) is skipped here, without a host round trip; replacing the batch or rewinding to a
checkpoint are the loop's (train/spikes.py SpikeResponse).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from geb_jax.model import lora as lora_lib
from geb_jax.parallel.mesh import batch_sharding, replicated
from geb_jax.train.optimizer import accumulate_gradients
from geb_jax.train.spikes import SpikeConfig, detect_spike, update_running_means
from geb_jax.train.state import LoraTrainState, TrainState

def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, *,
                    microbatches: int = 1, weight_key: str | None = "tokens",
                    spike: SpikeConfig = SpikeConfig(),
                    lora: lora_lib.LoraConfig | None = None) -> Callable:
    """Returns `train_step(state, batch, reference_params) -> (state, metrics)`.

    loss_fn(params, batch, reference_params=...) -> (loss, metrics), with the model's apply and
    hyperparameters already bound. weight_key weighs micro-batches (None for per-pair losses).
    With `lora` enabled the state is a LoraTrainState: the gradient, the optimizer and the
    spike skip act on the adapters only, and loss_fn sees the merged parameters
    (model/lora.py merge); the base parameters pass through unchanged.
    """
    use_lora = lora is not None and lora.enabled

    def train_step(state: TrainState, batch, reference_params=None):
        if use_lora:
            if not isinstance(state, LoraTrainState):
                raise TypeError("make_train_step(lora=...) needs a LoraTrainState "
                                "(train/state.py create_state(..., lora=...)).")
            trainable = state.lora
            grad_fn = jax.value_and_grad(
                lambda adapters, b: loss_fn(lora_lib.merge(state.params, adapters, lora), b,
                                            reference_params=reference_params), has_aux=True)
        else:
            trainable = state.params
            grad_fn = jax.value_and_grad(
                lambda p, b: loss_fn(p, b, reference_params=reference_params), has_aux=True)
        loss, metrics, grads = accumulate_gradients(grad_fn, trainable, batch, microbatches,
                                                    weight_key)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = optimizer.update(grads, state.opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)

        spiked = detect_spike(loss, grad_norm, state, spike)
        skip = spiked if spike.policy != "none" else jnp.zeros((), bool)
        keep_old = lambda old, new: jax.tree.map(lambda o, n: jnp.where(skip, o, n), old, new)
        loss_ema, grad_norm_ema, ema_count = update_running_means(state, loss, grad_norm, spiked,
                                                                  spike.ema_decay)
        new_state = state.replace(
            step=state.step + 1,
            **{"lora" if use_lora else "params": keep_old(trainable, new_trainable)},
            opt_state=keep_old(state.opt_state, new_opt_state),
            loss_ema=loss_ema, grad_norm_ema=grad_norm_ema, ema_count=ema_count,
            skipped=state.skipped + skip.astype(jnp.int32))
        metrics = dict(metrics, objective=loss, grad_norm=grad_norm,
                       spike=spiked.astype(jnp.float32), skipped=skip.astype(jnp.float32))
        return new_state, metrics

    return train_step


def make_eval_step(loss_fn: Callable) -> Callable:
    def eval_step(params, batch, reference_params=None):
        _, metrics = loss_fn(params, batch, reference_params=reference_params)
        return metrics
    return eval_step


def batch_shardings(batch_like: Any, mesh: Mesh) -> Any:
    """Every batch array shards its leading (batch) axis over data x fsdp."""
    return jax.tree.map(lambda _: batch_sharding(mesh), batch_like)


def jit_train_step(train_step: Callable, mesh: Mesh, state_sh: TrainState, batch_sh: Any,
                   reference_sh: Any = None) -> Callable:
    """The modern pjit: explicit shardings in and out, the old state's buffers donated."""
    return jax.jit(train_step, in_shardings=(state_sh, batch_sh, reference_sh),
                   out_shardings=(state_sh, replicated(mesh)), donate_argnums=(0,))


def jit_eval_step(eval_step: Callable, mesh: Mesh, params_sh: Any, batch_sh: Any,
                  reference_sh: Any = None) -> Callable:
    return jax.jit(eval_step, in_shardings=(params_sh, batch_sh, reference_sh),
                   out_shardings=replicated(mesh))


def global_batch(host_batch: Mapping[str, Any], shardings: Mapping[str, NamedSharding]):
    """This host's rows -> global jax.Arrays laid out over the mesh (multi-host safe)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], v)
            for k, v in host_batch.items()}
