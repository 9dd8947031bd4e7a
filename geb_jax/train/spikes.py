"""GEB/PaLM loss-spike handling, all of it: the config, the in-step detection and skip, the
loop's replace / rewind, which data batches to skip, and injected faults for stability studies.

The train step detects a spike (loss or gradient norm k times its running mean, or a non-finite
value) and, under every policy but "none", leaves parameters and optimizer state unchanged
(`detect_spike`, `update_running_means`, called from train/step.py without a host round trip).
What happens next is `SpikeResponse.after_step`'s decision, which the loop carries out:

    skip     the update is dropped; training goes on with the next batch
    replace  the same update is retried on the next batch (at most max_replacements times)
    rewind   the newest checkpoint before the spike is restored and the data window after it is
             skipped (PaLM: ~200-500 batches; GEB: 100-200 iterations)

Batches are numbered from 1 in the order the data iterator yields them; TrainState.step counts
batches drawn (trained, skipped or replaced), so these numbers survive a resume.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from geb_jax.config_sections import Section
from geb_jax.errors import ConfigError

INJECT_KINDS = ("garbage", "nonfinite")
SPIKE_POLICIES = ("none", "skip", "replace", "rewind")


@dataclasses.dataclass(frozen=True)
class SpikeConfig(Section):
    """When is an update a spike, and what happens then (see module docstring)."""
    SECTION = "train.spike"

    policy: str = "skip"  # none | skip | replace | rewind
    loss_factor: float = 2.0  # spike if loss > loss_factor x running mean loss
    grad_norm_factor: float = 10.0  # ... or grad norm > grad_norm_factor x its running mean
    warmup_steps: int = 20  # running means need this many updates before thresholds apply
    ema_decay: float = 0.95
    rewind_skip_batches: int = 100  # rewind: batches skipped after restoring (GEB: 100-200)
    max_replacements: int = 3  # replace: retries of one update before it is simply skipped
    max_rewinds: int = 10  # rewind: per run; later spikes are skipped
    inject_batches: str = ""  # studies only: corrupt these batch numbers ("100-120")
    inject_kind: str = "garbage"  # garbage | nonfinite (inject_fault)

    def __post_init__(self):
        if self.policy not in SPIKE_POLICIES:
            raise ConfigError(f"train.spike.policy={self.policy!r} is not one of "
                              f"{', '.join(SPIKE_POLICIES)}.")
        if self.loss_factor <= 1 or self.grad_norm_factor <= 1:
            raise ConfigError("train.spike.loss_factor and grad_norm_factor must be above 1.")
        if min(self.rewind_skip_batches, self.max_replacements, self.max_rewinds) < 0:
            raise ConfigError("train.spike.rewind_skip_batches, max_replacements and "
                              "max_rewinds must be >= 0.")

# ------------------------------------------------------------------- inside the step (jit)

def detect_spike(loss, grad_norm, state, spike: SpikeConfig) -> jax.Array:
    """True for a non-finite loss or gradient norm, or (once the running means are warm) one
    above its factor times its running mean."""
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    armed = state.ema_count >= spike.warmup_steps
    too_high = (loss > spike.loss_factor * state.loss_ema) | (
        grad_norm > spike.grad_norm_factor * state.grad_norm_ema)
    return ~finite | (armed & too_high)


def update_running_means(state, loss, grad_norm, spiked, decay):
    """Running means of loss and gradient norm, fed only by healthy updates (bias-corrected)."""
    count = state.ema_count + jnp.where(spiked, 0, 1)
    mix = lambda old, new: jnp.where(spiked, old, decay * old + (1 - decay) * new)
    raw_loss = mix(state.loss_ema * (1 - decay ** state.ema_count), loss)
    raw_norm = mix(state.grad_norm_ema * (1 - decay ** state.ema_count), grad_norm)
    correction = jnp.maximum(1 - decay ** count, 1e-12)
    return raw_loss / correction, raw_norm / correction, count


# ------------------------------------------------------------------- in the loop (host)

class SpikeResponse:
    """The loop's side of the policy: after each update, "keep" (the step already skipped a
    spike, or there was none), "replace" or "rewind"; counts what it did in `events`."""

    def __init__(self, spike: SpikeConfig):
        self.spike = spike
        self.watching = spike.policy in ("replace", "rewind")  # one host sync per step
        self.events = {"replaced": 0, "rewound": 0}
        self._retries = 0

    def after_step(self, metrics, latest_good_step: Callable[[], int | None]) -> str:
        if not (self.watching and float(metrics["spike"])):
            self._retries = 0
            return "keep"
        if self.spike.policy == "replace" and self._retries < self.spike.max_replacements:
            self._retries += 1
            self.events["replaced"] += 1
            return "replace"
        self._retries = 0
        if (self.spike.policy == "rewind" and self.events["rewound"] < self.spike.max_rewinds
                and latest_good_step() is not None):
            self.events["rewound"] += 1
            return "rewind"
        return "keep"


def parse_batch_numbers(spec: str, field: str) -> frozenset[int]:
    """ "5-8,20" -> {5, 6, 7, 8, 20}; "" -> empty. Batch numbers start at 1."""
    numbers: set[int] = set()
    for part in filter(None, (p.strip() for p in str(spec or "").split(","))):
        first, dash, last = part.partition("-")
        try:
            lo, hi = int(first), int(last if dash else first)
        except ValueError:
            raise ConfigError(f"{field}={spec!r}: use batch numbers and ranges like "
                              "\"100-120,350\".") from None
        if lo < 1 or hi < lo:
            raise ConfigError(f"{field}={spec!r}: ranges must be ascending and start at 1 "
                              f"(got {part!r}).")
        numbers.update(range(lo, hi + 1))
    return frozenset(numbers)


def inject_fault(batch: dict, kind: str, vocab_size: int, batch_number: int) -> dict:
    """A corrupted copy of `batch`, for studying the spike policies.

    garbage: every input/target token replaced by a short random pattern repeated (the kind of
      junk a bad shard holds; a model that trains on it gets worse on real text).
    nonfinite: NaN loss weights, standing in for a numerical blow-up (always detected).
    """
    if kind not in INJECT_KINDS:
        raise ConfigError(f"train.spike.inject_kind={kind!r} is not one of "
                          f"{', '.join(INJECT_KINDS)}.")
    corrupted = dict(batch)
    if kind == "nonfinite":
        for key, value in batch.items():
            if key.endswith("loss_mask"):
                corrupted[key] = np.full_like(value, np.nan)
        return corrupted
    rng = np.random.default_rng(batch_number)
    pattern = rng.integers(0, vocab_size, size=7)
    for key, value in batch.items():
        if key.endswith("inputs") or key.endswith("targets"):
            offset = 1 if key.endswith("targets") else 0
            row = pattern[(np.arange(value.shape[-1]) + offset) % pattern.size]
            corrupted[key] = np.broadcast_to(row, value.shape).astype(value.dtype)
    return corrupted


def rewind_window(restored_batches: int, spike_batch: int, skip_batches: int) -> range:
    """Batch numbers to skip after rewinding to a checkpoint that had drawn `restored_batches`:
    at least up to the spike's batch, and at least `skip_batches` of them."""
    return range(restored_batches + 1,
                 max(spike_batch, restored_batches + skip_batches) + 1)


class NumberedBatches:
    """The data iterator, numbering the batches it yields and leaving out the skipped ones.

    `drawn` is the number of batches taken from the iterator so far (TrainState.step after the
    update that used the latest one); skipped batches are drawn but never returned.
    """

    def __init__(self, iterator, drawn: int, skip: frozenset[int], inject: frozenset[int],
                 inject_kind: str, vocab_size: int):
        self.iterator, self.drawn = iterator, drawn
        self.skip, self.inject = set(skip), inject
        self.inject_kind, self.vocab_size = inject_kind, vocab_size

    def __next__(self) -> dict:
        while True:
            batch = next(self.iterator)
            self.drawn += 1
            if self.drawn not in self.skip:
                break
        if self.drawn in self.inject:
            batch = inject_fault(batch, self.inject_kind, self.vocab_size, self.drawn)
        return batch

    def skip_later(self, numbers: range) -> None:
        self.skip.update(numbers)
