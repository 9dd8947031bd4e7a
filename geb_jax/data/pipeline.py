"""Grain input pipelines: packed pretraining, packed SFT, unpacked DPO, weighted mixtures.

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

Packing choices
---------------
* Pretraining uses grain's `ConcatThenSplitIterDataset` (grain.experimental): documents
  (bos ... eos) are concatenated and cut into rows of exactly seq_len + 1 tokens, so there is
  no padding except in the very last row of a finite stream. A document that does not fit in
  the rest of a row - in particular any document longer than a row - is split at the row
  boundary; each piece is its own segment in its row, with positions restarting at 0. (So the
  continuation of a long document does not attend to its earlier chunks, and the first token of
  each continuation chunk is never a target; this is the usual concat-and-split trade-off, and
  keeps every row self-contained.) grain writes `tokens_segment_ids` (1.. per piece, 0 = pad)
  and `tokens_positions`, exactly the semantics wanted, so no custom packer is needed.
* SFT uses grain's `FirstFitPackIterDataset`: a conversation is never split across rows (the
  reply must see its prompt); whole conversations are placed first-fit into `num_packing_bins`
  rows and the rest is padding. A conversation longer than seq_len + 1 tokens is truncated to
  its first seq_len + 1 tokens (so its last replies may be cut or lost) and counted in
  `PipelineStats["truncated"]` (and logged once).
* DPO is not packed: each row holds one prompt + reply, padded to seq_len.
* Prefetch uses grain's `ThreadPrefetchIterDataset` (one background thread, output identical to
  no prefetch). `multithread_prefetch` was not used: it slices the *pre-packing* stream across
  threads, so the packed batches (and checkpoints) would depend on the thread count.

Exact resume: `iterator_state(it)` is `it.get_state()` checked to be plain JSON;
`restore_iterator(dataset, state)` builds a fresh iterator and `set_state`s it, after which it
yields exactly the batches the saved iterator would have. ConcatThenSplit stores tuples in its
state, which JSON turns into lists; `_JsonSafePack` converts them back on `set_state`.

Sharding: all hosts use the same seed; host i keeps global positions i, i + n, ... of the
shuffled (and repeated) stream, so in every epoch the hosts see disjoint documents whose union is
the whole epoch. For multi-host training use num_epochs=None (an endless stream) and a fixed
number of steps: hosts pack different documents, so finite streams end after different numbers
of batches.
"""
from __future__ import annotations

import collections
import json
import logging
import math
import sys
import threading
import zlib
from typing import Any, Iterable, Mapping, Sequence

import grain
import numpy as np

from geb_jax.data.chat import chat_prompt, encode_chat, encode_reply, validate_messages
from geb_jax.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Source = Any  # a Sequence (list of str / dicts), a grain.MapDataset or a grain.IterDataset
DEFAULT_READ_THREADS = 2
DEFAULT_READ_BUFFER = 64
DEFAULT_PREFETCH = 2
MIXTURE_WINDOW = 4096  # window of the seeded window-shuffle applied to an endless (mixed) source

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


# ----------------------------------------------------------------------------- checks
def _check_common(seq_len: int, batch_size: int, seed: int, shard_index: int,
                  shard_count: int, num_epochs: int | None) -> None:
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


def _text_of(doc: Any) -> str:
    """A document is a str or a mapping with a "text" str (e.g. corpus.builtin_documents)."""
    if isinstance(doc, str):
        return doc
    if isinstance(doc, Mapping) and isinstance(doc.get("text"), str):
        return doc["text"]
    raise TypeError(f"a document must be a str or a dict with a 'text' str, got "
                    f"{type(doc).__name__}")


def _is_tokens(doc: Any) -> bool:
    """A pre-tokenized document: {"tokens": ids} (geb_jax.data.pretokenize), bos/eos included."""
    return isinstance(doc, Mapping) and "tokens" in doc


def _has_content(doc: Any) -> bool:
    return len(doc["tokens"]) > 0 if _is_tokens(doc) else bool(_text_of(doc))


def _materialize(source: Source) -> Source:
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


def _check_has_text(source: Source, name: str) -> None:
    """ValueError naming the source when a (materialised) source has no text at all.

    Checked eagerly for plain sequences (cheap: a non-empty string always tokenizes to at least
    one piece thanks to byte fallback); for a MapDataset only its length is checked here and
    empty documents are skipped lazily.
    """
    if isinstance(source, (grain.MapDataset, grain.IterDataset)):
        if isinstance(source, grain.MapDataset) and len(source) == 0:
            raise ValueError(f"source {name!r} is empty: it has no documents")
        return
    docs = source if isinstance(source, Sequence) else list(source)
    if len(docs) == 0:
        raise ValueError(f"source {name!r} is empty: it has no documents")
    if not any(_has_content(d) for d in docs):
        raise ValueError(f"source {name!r} has no text: all {len(docs)} documents are empty, "
                         f"so nothing is left after tokenization")


def _ordered_documents(source: Source, *, seed: int, shard_index: int, shard_count: int,
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


def _to_iter(ds, read_threads: int, read_buffer: int):
    if isinstance(ds, grain.MapDataset):
        return ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                    prefetch_buffer_size=read_buffer))
    return ds


def _finish(ds, batch_size: int, drop_remainder: bool, prefetch: int):
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


def _tuple_slices(state: dict) -> dict:
    state = dict(state)
    state["remainder_slices"] = {k: tuple(int(x) for x in v)
                                 for k, v in state["remainder_slices"].items()}
    return state


class _JsonSafePackIterator(grain.DatasetIterator):
    """Delegates to a ConcatThenSplit iterator; `set_state` accepts its JSON round trip."""

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)

    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(_tuple_slices(state))


class _JsonSafePack(grain.IterDataset):
    """`ConcatThenSplitIterDataset` over {"tokens": ids} whose state survives json.dumps/loads.

    grain compares the restored `remainder_slices` with the tuple (-1, -1); after JSON they are
    lists and would compare unequal (a silently wrong resume), so they are made tuples again.
    """

    def __init__(self, parent: grain.IterDataset, row_len: int):
        packed = grain.experimental.ConcatThenSplitIterDataset(
            parent, length_struct={"tokens": row_len})
        super().__init__(packed)

    def __iter__(self) -> grain.DatasetIterator:
        return _JsonSafePackIterator(self._parent.__iter__())


# ----------------------------------------------------------------------------- pretraining
def pretrain_dataset(texts_source: Source, tokenizer: Tokenizer, *, seq_len: int,
                     batch_size: int, seed: int, shard_index: int = 0, shard_count: int = 1,
                     num_epochs: int | None = None, drop_remainder: bool = True,
                     read_threads: int = DEFAULT_READ_THREADS,
                     read_buffer: int = DEFAULT_READ_BUFFER, prefetch: int = DEFAULT_PREFETCH,
                     stats: PipelineStats | None = None,
                     name: str = "texts_source") -> grain.IterDataset:
    """Packed next-token batches from documents (str or {"text": ...}); see the module doc.

    `texts_source`: a list/sequence (or iterable) of documents, a grain.MapDataset of them, or a
    `mixture(...)`. A document may also be pre-tokenized, {"tokens": bos + ids + eos} (from
    geb_jax.data.pretokenize): it is packed as is, and gives exactly the batches its text would.
    Empty documents are skipped. drop_remainder=True drops a final partial batch
    of a finite stream (num_epochs set) so every batch has shape (batch_size, seq_len).
    """
    _check_common(seq_len, batch_size, seed, shard_index, shard_count, num_epochs)
    texts_source = _materialize(texts_source)
    _check_has_text(texts_source, name)
    docs = _ordered_documents(texts_source, seed=seed, shard_index=shard_index,
                              shard_count=shard_count, num_epochs=num_epochs, name=name)
    stats = stats if stats is not None else PipelineStats()

    def tokenize(doc):
        stats.add("documents")
        if _is_tokens(doc):
            return {"tokens": np.asarray(doc["tokens"], dtype=np.int32)}
        ids = tokenizer.encode(_text_of(doc), add_bos=True, add_eos=True)
        return {"tokens": np.asarray(ids, dtype=np.int32)}

    ds = docs.filter(_has_content).map(tokenize)
    ds = _JsonSafePack(_to_iter(ds, read_threads, read_buffer), seq_len + 1)
    ds = ds.map(lambda row: lm_example_from_row(row["tokens"], row["tokens_segment_ids"],
                                                row["tokens_positions"]))
    return _finish(ds, batch_size, drop_remainder, prefetch)


# ----------------------------------------------------------------------------- SFT
def _messages_of(conv: Any) -> Any:
    """A conversation is a list of messages or a dict with a "messages" list."""
    if isinstance(conv, Mapping) and "messages" in conv:
        return conv["messages"]
    return conv


def _check_conversations(source: Source, name: str) -> None:
    if isinstance(source, (grain.MapDataset, grain.IterDataset)):
        if isinstance(source, grain.MapDataset) and len(source) == 0:
            raise ValueError(f"source {name!r} is empty: it has no conversations")
        return
    convs = source if isinstance(source, Sequence) else list(source)
    if len(convs) == 0:
        raise ValueError(f"source {name!r} is empty: it has no conversations")
    has_reply = False
    for i, conv in enumerate(convs):
        msgs = validate_messages(_messages_of(conv), what=f"{name}[{i}]")
        has_reply = has_reply or any(m["role"] == "assistant" and m["content"] for m in msgs)
    if not has_reply:
        raise ValueError(f"source {name!r} has no assistant text: SFT would train on nothing")


def sft_dataset(conversations_source: Source, tokenizer: Tokenizer, *, seq_len: int,
                batch_size: int, seed: int, shard_index: int = 0, shard_count: int = 1,
                num_epochs: int | None = None, num_packing_bins: int | None = None,
                drop_remainder: bool = True, read_threads: int = DEFAULT_READ_THREADS,
                read_buffer: int = DEFAULT_READ_BUFFER, prefetch: int = DEFAULT_PREFETCH,
                stats: PipelineStats | None = None,
                name: str = "conversations_source") -> grain.IterDataset:
    """Packed SFT batches: loss only where the target is an assistant token (chat.encode_chat).

    Conversations (lists of messages, or {"messages": [...]}) are packed whole, first-fit, into
    `num_packing_bins` rows (default: batch_size) of seq_len + 1 tokens; one longer than that is
    truncated to its first seq_len + 1 tokens and counted in `stats["truncated"]`.
    """
    _check_common(seq_len, batch_size, seed, shard_index, shard_count, num_epochs)
    conversations_source = _materialize(conversations_source)
    _check_conversations(conversations_source, name)
    docs = _ordered_documents(conversations_source, seed=seed, shard_index=shard_index,
                              shard_count=shard_count, num_epochs=num_epochs, name=name)
    row_len = seq_len + 1
    stats = stats if stats is not None else PipelineStats()
    warned = threading.Event()

    def encode(conv):
        ids, mask = encode_chat(tokenizer, _messages_of(conv))
        stats.add("conversations")
        if len(ids) > row_len:
            stats.add("truncated")
            if not warned.is_set():
                warned.set()
                log.warning("%s: a conversation of %d tokens was truncated to seq_len + 1 = %d "
                            "(counted in PipelineStats['truncated'])", name, len(ids), row_len)
            ids, mask = ids[:row_len], mask[:row_len]
        return {"tokens": np.asarray(ids, np.int32), "weights": np.asarray(mask, np.int32)}

    ds = _to_iter(docs.map(encode), read_threads, read_buffer)
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct={"tokens": row_len, "weights": row_len},
        num_packing_bins=int(num_packing_bins or batch_size), seed=int(seed), shuffle_bins=True)
    ds = ds.map(lambda row: lm_example_from_row(row["tokens"], row["tokens_segment_ids"],
                                                row["tokens_positions"], row["weights"]))
    return _finish(ds, batch_size, drop_remainder, prefetch)


# ----------------------------------------------------------------------------- DPO
def _prompt_messages(prompt: Any, what: str) -> list:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return validate_messages(prompt, what=f"{what} prompt")


def _check_pair(pair: Any, what: str) -> None:
    if not isinstance(pair, Mapping):
        raise ValueError(f"{what} must be a dict with 'prompt', 'chosen', 'rejected', got "
                         f"{type(pair).__name__}")
    for key in ("prompt", "chosen", "rejected"):
        if key not in pair:
            raise ValueError(f"{what} has no {key!r}")
    _prompt_messages(pair["prompt"], what)
    for key in ("chosen", "rejected"):
        if not isinstance(pair[key], str):
            raise ValueError(f"{what} {key!r} must be a str, got {type(pair[key]).__name__}")


def _row_arrays(ids: list[int], reply_start: int, seq_len: int, pad_id: int
                ) -> dict[str, np.ndarray]:
    """prompt + reply ids (<= seq_len + 1) -> shifted, padded (seq_len,) arrays."""
    row_len = seq_len + 1
    tokens = np.full(row_len, pad_id, np.int32)
    tokens[:len(ids)] = ids
    real = np.zeros(row_len, bool)
    real[:len(ids)] = True
    reply = np.zeros(row_len, bool)
    reply[reply_start:len(ids)] = True
    return {
        "inputs": tokens[:-1],
        "targets": tokens[1:].copy(),
        "positions": np.arange(seq_len, dtype=np.int32),
        "segment_ids": real[:-1].astype(np.int32),
        "loss_mask": reply[1:].astype(np.float32),
    }


def dpo_example(tokenizer: Tokenizer, pair: Mapping[str, Any], seq_len: int,
                stats: PipelineStats | None = None) -> dict[str, np.ndarray]:
    """One preference pair -> "chosen_*" and "rejected_*" (seq_len,) arrays, unpacked.

    Row = chat_prompt(prompt) + reply + <|end|>, padded to seq_len + 1 and shifted; loss_mask is
    1 where the target is a reply token (content and <|end|>). When prompt + the longer reply
    exceed seq_len + 1 tokens, the prompt is left-truncated (bos kept, its latest tokens kept,
    the same for chosen and rejected, so the two prompts stay identical); replies are only
    right-truncated when even a 2-token prompt (bos, <|assistant|>) would not leave room.
    """
    messages = _prompt_messages(pair["prompt"], "pair")
    prompt = chat_prompt(tokenizer, messages)
    chosen = encode_reply(tokenizer, pair["chosen"], messages)
    rejected = encode_reply(tokenizer, pair["rejected"], messages)
    row_len = seq_len + 1
    if len(prompt) + max(len(chosen), len(rejected)) > row_len:
        min_prompt = min(len(prompt), 2)
        max_reply = row_len - min_prompt
        if max(len(chosen), len(rejected)) > max_reply:
            chosen, rejected = chosen[:max_reply], rejected[:max_reply]
            if stats is not None:
                stats.add("reply_truncated")
        keep = row_len - max(len(chosen), len(rejected))
        if keep < len(prompt):
            prompt = [prompt[0]] + prompt[len(prompt) - keep + 1:] if keep >= 2 else \
                prompt[len(prompt) - keep:]
            if stats is not None:
                stats.add("prompt_truncated")
    out = {}
    for prefix, reply in (("chosen_", chosen), ("rejected_", rejected)):
        for k, v in _row_arrays(prompt + reply, len(prompt), seq_len,
                                tokenizer.pad_id).items():
            out[prefix + k] = v
    return out


def dpo_dataset(pairs_source: Source, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                seed: int, shard_index: int = 0, shard_count: int = 1,
                num_epochs: int | None = None, drop_remainder: bool = True,
                read_threads: int = DEFAULT_READ_THREADS,
                read_buffer: int = DEFAULT_READ_BUFFER, prefetch: int = DEFAULT_PREFETCH,
                stats: PipelineStats | None = None,
                name: str = "pairs_source") -> grain.IterDataset:
    """Unpacked DPO batches of {"prompt": str | messages, "chosen": str, "rejected": str}."""
    _check_common(seq_len, batch_size, seed, shard_index, shard_count, num_epochs)
    pairs_source = _materialize(pairs_source)
    if not isinstance(pairs_source, (grain.MapDataset, grain.IterDataset)):
        pairs = pairs_source
        if len(pairs) == 0:
            raise ValueError(f"source {name!r} is empty: it has no pairs")
        for i, pair in enumerate(pairs):
            _check_pair(pair, f"{name}[{i}]")
        pairs_source = pairs
    docs = _ordered_documents(pairs_source, seed=seed, shard_index=shard_index,
                              shard_count=shard_count, num_epochs=num_epochs, name=name)
    stats = stats if stats is not None else PipelineStats()

    def encode(pair):
        stats.add("pairs")
        return dpo_example(tokenizer, pair, seq_len, stats)

    ds = _to_iter(docs.map(encode), read_threads, read_buffer)
    return _finish(ds, batch_size, drop_remainder, prefetch)


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
        src = _materialize(datasets[k])
        _check_has_text(src, k)
        ds = _as_dataset(src, k)
        if isinstance(ds, grain.MapDataset) and len(ds) < sys.maxsize:
            ds = ds.shuffle(seed=_derive_seed(seed, k)).repeat()
        comps[k] = ds
    total = float(sum(weights.values()))
    props = [weights[k] / total for k in names]
    if all(isinstance(comps[k], grain.MapDataset) for k in names):
        return grain.MapDataset.mix([comps[k] for k in names], props)
    iters = {k: _to_iter(comps[k], DEFAULT_READ_THREADS, DEFAULT_READ_BUFFER) for k in names}
    return grain.IterDataset.mix(iters, dict(zip(names, props)))


def document_weights(token_shares: Mapping[str, float],
                     mean_tokens_per_document: Mapping[str, float]) -> dict[str, float]:
    """Document-level mixture weights that give the wanted token shares (normalised to 1)."""
    raw = {k: token_shares[k] / mean_tokens_per_document[k] for k in token_shares}
    total = sum(raw.values())
    return {k: v / total for k, v in raw.items()}


# GEB-1.3B's reported pretraining mix and TinyLlama's 7:3 text:code ratio, as shares of the
# training data; turn them into document weights with `document_weights` for real corpora
# (or pass them to `mixture` directly to mix by documents).
GEB_TOKEN_SHARES = {"c4": 0.331, "github_stackexchange": 0.147, "chinese_commoncrawl": 0.284,
                    "wudao": 0.089, "skypile": 0.149}
TINYLLAMA_TOKEN_SHARES = {"text": 0.7, "code": 0.3}

# Default document weights for the built-in corpus (split by corpus "lang"), chosen so that the
# token shares come out near en 40% / zh 40% / code 20% (a small GEB-like bilingual mix with a
# TinyLlama-like code share). Built-in train documents average about 607 (en), 350 (zh) and
# 1026 (code) tokens with the 4096-piece built-in tokenizer (474 / 274 / 844 at 16384: the
# ratios barely move with the vocabulary), and document_weights({"en": .4, "zh": .4,
# "code": .2}, those means) gives these, rounded. (Unweighted, the corpus is ~42/38/19.)
builtin_mixture_weights = {"en": 0.33, "zh": 0.57, "code": 0.10}


def builtin_mixture(split: str = "train", weights: Mapping[str, float] | None = None,
                    seed: int = 0):
    """`mixture` of the built-in corpus' en / zh / code documents (texts) by `weights`."""
    from geb_jax.data.corpus import builtin_documents

    weights = dict(weights or builtin_mixture_weights)
    parts: dict[str, list[str]] = {k: [] for k in weights}
    for doc in builtin_documents(split):
        if doc["lang"] in parts:
            parts[doc["lang"]].append(doc["text"])
    return mixture(parts, weights, seed)


def builtin_pretrain_dataset(tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                             seed: int, split: str = "train", shard_index: int = 0,
                             shard_count: int = 1, **kwargs) -> grain.IterDataset:
    """Endless packed batches of the built-in corpus mixed by `builtin_mixture_weights`."""
    return pretrain_dataset(builtin_mixture(split, seed=seed), tokenizer, seq_len=seq_len,
                            batch_size=batch_size, seed=seed, shard_index=shard_index,
                            shard_count=shard_count, name=f"builtin:{split}", **kwargs)


def take(it: Iterable, n: int) -> list:
    """The next n elements of an iterator (fewer if it ends)."""
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


# Built-in demo data for SFT / DPO lives in demo_tasks.py; re-exported here for convenience.
def builtin_sft_conversations(split: str = "train") -> list[dict]:
    from geb_jax.data.demo_tasks import builtin_sft_conversations as f
    return f(split)


def builtin_dpo_pairs(split: str = "train") -> list[dict]:
    from geb_jax.data.demo_tasks import builtin_dpo_pairs as f
    return f(split)


__all__ = [
    "PipelineStats", "lm_example_from_row", "pretrain_dataset", "sft_dataset", "dpo_dataset",
    "dpo_example", "iterator_state", "restore_iterator", "mixture", "document_weights",
    "builtin_mixture_weights", "builtin_mixture", "builtin_pretrain_dataset", "take",
    "builtin_sft_conversations", "builtin_dpo_pairs", "GEB_TOKEN_SHARES",
    "TINYLLAMA_TOKEN_SHARES", "BATCH_KEYS",
]
