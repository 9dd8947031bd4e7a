"""The host side of GEB/PaLM loss-spike handling: which data batches to skip, and injected
faults for stability studies.

The train step itself detects a spike (loss or gradient norm k times its running mean, or a
non-finite value) and, under every policy but "none", leaves parameters and optimizer state
unchanged (train/step.py). What happens next is decided in the loop (train/loop.py):

    skip     the update is dropped; training goes on with the next batch
    replace  the same update is retried on the next batch (at most max_replacements times)
    rewind   the newest checkpoint before the spike is restored and the data window after it is
             skipped (PaLM: ~200-500 batches; GEB: 100-200 iterations)

Batches are numbered from 1 in the order the data iterator yields them; TrainState.step counts
batches drawn (trained, skipped or replaced), so these numbers survive a resume.
"""
from __future__ import annotations

import numpy as np

from geb_jax.model.config import ConfigError

INJECT_KINDS = ("garbage", "nonfinite")


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
