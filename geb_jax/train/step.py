"""The train and eval steps: built once from a loss, the optimizer and the mesh; jit-compiled
with explicit in/out shardings (the modern pjit) and the state buffer donated.

Pretrain, SFT and DPO share this code; they differ only in `loss_fn` and the batch.
Spike handling inside the step (GEB/PaLM practice): an update whose loss or gradient norm is
k times its running average, or is not finite, can be skipped here without a host round trip;
replacing the batch or rewinding to a checkpoint are the loop's job (train/spikes.py).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from geb_jax.model import lora as lora_lib
from geb_jax.model.config import ConfigError
from geb_jax.parallel.mesh import batch_sharding, replicated
from geb_jax.train.optimizer import accumulate_gradients
from geb_jax.train.state import LoraTrainState, TrainState

SPIKE_POLICIES = ("none", "skip", "replace", "rewind")


@dataclasses.dataclass(frozen=True)
class SpikeConfig:
    """When is an update a spike, and what happens then (see module docstring)."""
    policy: str = "skip"  # none | skip | replace | rewind
    loss_factor: float = 2.0  # spike if loss > loss_factor x running mean loss
    grad_norm_factor: float = 10.0  # ... or grad norm > grad_norm_factor x its running mean
    warmup_steps: int = 20  # running means need this many updates before thresholds apply
    ema_decay: float = 0.95
    rewind_skip_batches: int = 100  # rewind: batches skipped after restoring (GEB: 100-200)
    max_replacements: int = 3  # replace: retries of one update before it is simply skipped
    max_rewinds: int = 10  # rewind: per run; later spikes are skipped
    inject_batches: str = ""  # studies only: corrupt these batch numbers ("100-120")
    inject_kind: str = "garbage"  # garbage | nonfinite (train/spikes.py)

    def __post_init__(self):
        if self.policy not in SPIKE_POLICIES:
            raise ConfigError(f"train.spike.policy={self.policy!r} is not one of "
                              f"{', '.join(SPIKE_POLICIES)}.")
        if self.loss_factor <= 1 or self.grad_norm_factor <= 1:
            raise ConfigError("train.spike.loss_factor and grad_norm_factor must be above 1.")
        if min(self.rewind_skip_batches, self.max_replacements, self.max_rewinds) < 0:
            raise ConfigError("train.spike.rewind_skip_batches, max_replacements and "
                              "max_rewinds must be >= 0.")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SpikeConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"Unknown train.spike field(s) {unknown}; known: {sorted(known)}.")
        return cls(**dict(values))


def _detect_spike(loss, grad_norm, state: TrainState, spike: SpikeConfig) -> jax.Array:
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    armed = state.ema_count >= spike.warmup_steps
    too_high = (loss > spike.loss_factor * state.loss_ema) | (
        grad_norm > spike.grad_norm_factor * state.grad_norm_ema)
    return ~finite | (armed & too_high)


def _update_emas(state: TrainState, loss, grad_norm, spiked, decay):
    """Running means of loss and gradient norm, fed only by healthy updates (bias-corrected)."""
    count = state.ema_count + jnp.where(spiked, 0, 1)
    mix = lambda old, new: jnp.where(spiked, old, decay * old + (1 - decay) * new)
    raw_loss = mix(state.loss_ema * (1 - decay ** state.ema_count), loss)
    raw_norm = mix(state.grad_norm_ema * (1 - decay ** state.ema_count), grad_norm)
    correction = jnp.maximum(1 - decay ** count, 1e-12)
    return raw_loss / correction, raw_norm / correction, count


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

        spiked = _detect_spike(loss, grad_norm, state, spike)
        skip = spiked if spike.policy != "none" else jnp.zeros((), bool)
        keep_old = lambda old, new: jax.tree.map(lambda o, n: jnp.where(skip, o, n), old, new)
        loss_ema, grad_norm_ema, ema_count = _update_emas(state, loss, grad_norm, spiked,
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
