"""What every grain input pipeline shares: argument checks, document order, row shifting,
batching, exact resume and weighted mixtures. The pipelines themselves live in
pretrain_pipeline.py (packed pretraining) and chat_pipeline.py (packed SFT, unpacked DPO).

Every pipeline is a `grain.IterDataset` of numpy batches in the layouts of
`geb_jax.train.losses` and is a deterministic function of its arguments (seed included):

    documents (grain.MapDataset)            a list/sequence, a MapDataset, or a `mixture`
      -> shuffle(seed), reshuffled each epoch   grain MapDataset.shuffle(seed).repeat(num_epochs)
      -> this host's shard                      ds[shard_index::shard_count]
      -> tokenize                               bos + ids + eos (pretrain) / chat template (SFT)
      -> to_iter_dataset(ReadOptions)           parallel reads, order preserved
      -> pack into rows of seq_len + 1 tokens   pretrain: ConcatThenSplit, SFT: FirstFitPack
      -> shift: inputs = row[:-1], targets = row[1:]
      -> batch(batch_size)                      -> ThreadPrefetchIterDataset (optional)

Batch (pretrain / SFT), all (B, T=seq_len):
    inputs, targets int32; positions int32 (restart at 0 in each packed segment);
    segment_ids int32 (1, 2, ... per segment of the row, 0 = padding);
    loss_mask float32: 1 where targets[b, t] is the next token of the *same* segment, i.e. 0 on
    padding and on the last token of each segment (its target would be the next document's
    first token); for SFT additionally 0 unless the target is an assistant token.
DPO: "chosen_*" and "rejected_*" versions of the same five arrays, one pair per row.

Prefetch uses grain's `ThreadPrefetchIterDataset` (one background thread, output identical to
no prefetch). `multithread_prefetch` was not used: it slices the *pre-packing* stream across
threads, so the packed batches (and checkpoints) would depend on the thread count.

Exact resume: `iterator_state(it)` is `it.get_state()` checked to be plain JSON;
`restore_iterator(dataset, state)` builds a fresh iterator and `set_state`s it, after which it
yields exactly the batches the saved iterator would have.

Sharding: all hosts use the same seed; host i keeps global positions i, i + n, ... of the
shuffled (and repeated) stream, so in every epoch the hosts see disjoint documents whose union is
the whole epoch. For multi-host training use num_epochs=None (an endless stream) and a fixed
number of steps: hosts pack different documents, so finite streams end after different numbers
of batches.
"""
from __future__ import annotations

import collections
import json
import math
import sys
import threading
import zlib
from typing import Any, Iterable, Mapping, Sequence

import grain
import numpy as np

Source = Any  # a Sequence (list of str / dicts), a grain.MapDataset or a grain.IterDataset
DEFAULT_READ_THREADS = 2
DEFAULT_READ_BUFFER = 64
DEFAULT_PREFETCH = 2
MIXTURE_WINDOW = 4096  # window of the seeded window-shuffle applied to an endless (mixed) source

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


# ----------------------------------------------------------------------------- checks
def check_pipeline_args(seq_len: int, batch_size: int, seed: int, shard_index: int,
                        shard_count: int, num_epochs: int | None) -> None:
    """ValueError naming the first argument every pipeline shares that is out of range."""
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2 (rows hold seq_len + 1 tokens, "
                         f"shifted into inputs/targets), got seq_len={seq_len!r}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got batch_size={batch_size!r}")
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got seed={seed!r}")
    if not isinstance(shard_count, (int, np.integer)) or shard_count < 1:
        raise ValueError(f"shard_count must be a positive integer, got {shard_count!r}")
    if not isinstance(shard_index, (int, np.integer)) or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, shard_count={shard_count}), "
                         f"got {shard_index!r}")
    if num_epochs is not None and (not isinstance(num_epochs, (int, np.integer))
                                   or num_epochs < 1):
        raise ValueError(f"num_epochs must be None (endless) or a positive integer, "
                         f"got {num_epochs!r}")


def text_of(doc: Any) -> str:
    """A document is a str or a mapping with a "text" str (e.g. corpus.builtin_documents)."""
    if isinstance(doc, str):
        return doc
    if isinstance(doc, Mapping) and isinstance(doc.get("text"), str):
        return doc["text"]
    raise TypeError(f"a document must be a str or a dict with a 'text' str, got "
                    f"{type(doc).__name__}")


def is_tokens(doc: Any) -> bool:
    """A pre-tokenized document: {"tokens": ids} (geb_jax.data.pretokenize), bos/eos included."""
    return isinstance(doc, Mapping) and "tokens" in doc


def has_content(doc: Any) -> bool:
    return len(doc["tokens"]) > 0 if is_tokens(doc) else bool(text_of(doc))


def materialize(source: Source) -> Source:
    """Grain datasets and sequences pass through; any other iterable (a generator) -> list."""
    if isinstance(source, (str, bytes)):
        raise TypeError(f"a source must be a sequence of documents, not a single "
                        f"{type(source).__name__}")
    if isinstance(source, (grain.MapDataset, grain.IterDataset, Sequence)):
        return source
    return list(source)


def _as_dataset(source: Source, name: str):
    """A list/sequence/iterable -> MapDataset; MapDataset / IterDataset pass through."""
    if isinstance(source, (grain.MapDataset, grain.IterDataset)):
        return source
    if isinstance(source, (str, bytes)):
        raise TypeError(f"source {name!r} must be a sequence of documents, not a single "
                        f"{type(source).__name__}")
    if not isinstance(source, Sequence):
        source = list(source)
    if len(source) == 0:
        raise ValueError(f"source {name!r} is empty: it has no documents")
    return grain.MapDataset.source(source)


def listed(source: Source, name: str, what: str = "documents") -> Sequence | None:
    """A plain source's items, to check eagerly (None for a grain dataset: checked lazily);
    ValueError naming the source when it has no items at all."""
    if isinstance(source, grain.IterDataset):
        return None
    items = source if isinstance(source, (grain.MapDataset, Sequence)) else list(source)
    if len(items) == 0:
        raise ValueError(f"source {name!r} is empty: it has no {what}")
    return None if isinstance(items, grain.MapDataset) else items


def check_has_text(source: Source, name: str) -> None:
    """ValueError naming the source when a (materialised) source has no text at all.

    Checked eagerly for plain sequences (cheap: a non-empty string always tokenizes to at least
    one piece thanks to byte fallback); for a MapDataset only its length is checked here and
    empty documents are skipped lazily.
    """
    docs = listed(source, name)
    if docs is not None and not any(has_content(d) for d in docs):
        raise ValueError(f"source {name!r} has no text: all {len(docs)} documents are empty, "
                         f"so nothing is left after tokenization")


def ordered_documents(source: Source, *, seed: int, shard_index: int, shard_count: int,
                       num_epochs: int | None, name: str):
    """Shuffle (per epoch), repeat and shard a document source; see the module docstring."""
    ds = _as_dataset(source, name)
    if isinstance(ds, grain.IterDataset):
        if shard_count != 1 or num_epochs is not None:
            raise ValueError(
                f"source {name!r} is a grain.IterDataset, which is used as is: shard, shuffle "
                f"and repeat it upstream (e.g. on a MapDataset) and pass shard_count=1, "
                f"num_epochs=None (got shard_count={shard_count}, num_epochs={num_epochs})")
        return ds
    n = len(ds)
    if n == 0:
        raise ValueError(f"source {name!r} is empty: it has no documents")
    if n >= sys.maxsize:  # endless, e.g. a `mixture` whose components are already shuffled
        if num_epochs is not None:
            raise ValueError(f"source {name!r} is endless (e.g. a mixture); num_epochs must be "
                             f"None, got {num_epochs}")
        # Shuffle within windows: makes the seed matter and breaks the mixture's fixed
        # interleaving pattern while keeping its proportions within every window. (grain adds
        # the window index to the seed and needs the sum < 2**32: keep the seed below 2**31.)
        ds = grain.experimental.WindowShuffleMapDataset(
            ds, window_size=MIXTURE_WINDOW, seed=_derive_seed(seed, "window") % 2**31)
    else:
        ds = ds.shuffle(seed=int(seed)).repeat(num_epochs)
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    return ds


def to_iter(ds, read_threads: int, read_buffer: int):
    if isinstance(ds, grain.MapDataset):
        return ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                    prefetch_buffer_size=read_buffer))
    return ds


def finish_batches(ds, batch_size: int, drop_remainder: bool, prefetch: int):
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if prefetch:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds


# ----------------------------------------------------------------------------- stats
class PipelineStats:
    """Thread-safe counters a pipeline updates as it encodes examples.

    Counts are per encoding, so they include read-ahead and are counted again when an
    iterator is restored and re-reads; they are for logging, not for exact bookkeeping.
    Keys: "documents" / "conversations" / "pairs" (encoded), "truncated" (SFT conversations
    cut to seq_len + 1), "prompt_truncated" / "reply_truncated" (DPO).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: collections.Counter = collections.Counter()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def __getitem__(self, key: str) -> int:
        with self._lock:
            return self._counts[key]

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def __repr__(self) -> str:
        return f"PipelineStats({self.as_dict()})"


# ----------------------------------------------------------------------------- packed rows
def lm_example_from_row(tokens: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray,
                        target_weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """One packed row of seq_len + 1 tokens -> the shifted (seq_len,) training arrays.

    loss_mask[t] = 1 iff token t + 1 is in the same (non-padding) segment as token t, and,
    when `target_weights` is given (SFT: the assistant mask of the row), target_weights[t + 1].
    """
    tokens = np.asarray(tokens)
    seg = np.asarray(segment_ids)
    same = (seg[:-1] == seg[1:]) & (seg[:-1] != 0)
    if target_weights is not None:
        same &= np.asarray(target_weights)[1:] != 0
    return {
        "inputs": tokens[:-1].astype(np.int32),
        "targets": tokens[1:].astype(np.int32),
        "positions": np.asarray(positions)[:-1].astype(np.int32),
        "segment_ids": seg[:-1].astype(np.int32),
        "loss_mask": same.astype(np.float32),
    }


# ----------------------------------------------------------------------------- resume
def iterator_state(it: grain.DatasetIterator) -> dict:
    """The iterator's grain state as plain JSON data (a deep copy; TypeError if impossible)."""
    state = it.get_state()
    try:
        text = json.dumps(state)
    except TypeError as e:
        raise TypeError(f"iterator state is not JSON-serialisable: {e}") from e
    return json.loads(text)


def restore_iterator(dataset: grain.IterDataset, state: Mapping[str, Any]
                     ) -> grain.DatasetIterator:
    """A fresh iterator of `dataset` positioned at `state` (from `iterator_state`).

    `dataset` must be built with the same arguments as the one that produced the state.
    """
    it = iter(dataset)
    it.set_state(json.loads(json.dumps(state)))
    return it


# ----------------------------------------------------------------------------- mixtures
def _derive_seed(seed: int, name: str) -> int:
    return zlib.crc32(f"{int(seed)}:{name}".encode()) % 2**32


def mixture(datasets: Mapping[str, Source], weights: Mapping[str, float], seed: int):
    """Document-level weighted mixture of named sources (grain's mix), before packing.

    Each component that is a list or finite MapDataset is shuffled with its own seed (derived
    from `seed` and its name) and repeated endlessly (reshuffled each epoch), then grain's
    `MapDataset.mix` interleaves them so that, among any run of documents, component k supplies
    the fraction weights[k] / sum(weights) (grain's mix is a deterministic proportional
    interleave). The result is an endless MapDataset to pass to `pretrain_dataset`, which
    window-shuffles it with its own seed and shards it. If some component is a grain.IterDataset
    the mix is `grain.IterDataset.mix` over a dict (its state is keyed by component name) and
    the caller must shard the components.

    Weights are fractions of *documents*; to hit token fractions divide by the mean document
    length in tokens (`document_weights`).
    """
    if set(datasets) != set(weights):
        raise ValueError(f"mixture datasets and weights must have the same names: "
                         f"{sorted(datasets)} vs {sorted(weights)}")
    if not datasets:
        raise ValueError("mixture needs at least one dataset")
    for k, w in weights.items():
        if not (isinstance(w, (int, float, np.floating, np.integer)) and math.isfinite(w)
                and w > 0):
            raise ValueError(f"mixture weight {k!r} must be a positive finite number, got {w!r}")
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got seed={seed!r}")
    names = list(datasets)
    comps = {}
    for k in names:
        src = materialize(datasets[k])
        check_has_text(src, k)
        ds = _as_dataset(src, k)
        if isinstance(ds, grain.MapDataset) and len(ds) < sys.maxsize:
            ds = ds.shuffle(seed=_derive_seed(seed, k)).repeat()
        comps[k] = ds
    total = float(sum(weights.values()))
    props = [weights[k] / total for k in names]
    if all(isinstance(comps[k], grain.MapDataset) for k in names):
        return grain.MapDataset.mix([comps[k] for k in names], props)
    iters = {k: to_iter(comps[k], DEFAULT_READ_THREADS, DEFAULT_READ_BUFFER) for k in names}
    return grain.IterDataset.mix(iters, dict(zip(names, props)))



def take(it: Iterable, n: int) -> list:
    """The next n elements of an iterator (fewer if it ends)."""
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


__all__ = [
    "PipelineStats", "lm_example_from_row", "iterator_state", "restore_iterator", "mixture",
    "take", "BATCH_KEYS", "text_of", "check_pipeline_args", "materialize", "listed",
    "check_has_text", "ordered_documents", "to_iter", "finish_batches",
]
