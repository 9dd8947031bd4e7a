"""Packed pretraining batches from documents (see pipeline.py for the shared steps and the
batch layout), and the built-in corpus' language mixture.

Packing: grain's `ConcatThenSplitIterDataset` (grain.experimental): documents (bos ... eos) are
concatenated and cut into rows of exactly seq_len + 1 tokens, so there is no padding except in
the very last row of a finite stream. A document that does not fit in the rest of a row - in
particular any document longer than a row - is split at the row boundary; each piece is its own
segment in its row, with positions restarting at 0. (So the continuation of a long document
does not attend to its earlier chunks, and the first token of each continuation chunk is never a
target; this is the usual concat-and-split trade-off, and keeps every row self-contained.)
grain writes `tokens_segment_ids` (1.. per piece, 0 = pad) and `tokens_positions`, exactly the
semantics wanted, so no custom packer is needed. ConcatThenSplit stores tuples in its state,
which JSON turns into lists; `_JsonSafePack` converts them back on `set_state`.
"""
from __future__ import annotations

from typing import Any, Mapping

import grain
import numpy as np

from geb_jax.data.corpus import builtin_documents
from geb_jax.data.pipeline import (DEFAULT_PREFETCH, DEFAULT_READ_BUFFER, DEFAULT_READ_THREADS,
                                   PipelineStats, Source, check_has_text, check_pipeline_args,
                                   finish_batches, has_content, is_tokens, lm_example_from_row,
                                   materialize, mixture, ordered_documents, text_of, to_iter)
from geb_jax.data.tokenizer import Tokenizer


# ----------------------------------------------------------------------------- packing
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
    check_pipeline_args(seq_len, batch_size, seed, shard_index, shard_count, num_epochs)
    texts_source = materialize(texts_source)
    check_has_text(texts_source, name)
    docs = ordered_documents(texts_source, seed=seed, shard_index=shard_index,
                             shard_count=shard_count, num_epochs=num_epochs, name=name)
    stats = stats if stats is not None else PipelineStats()

    def tokenize(doc):
        stats.add("documents")
        if is_tokens(doc):
            return {"tokens": np.asarray(doc["tokens"], dtype=np.int32)}
        ids = tokenizer.encode(text_of(doc), add_bos=True, add_eos=True)
        return {"tokens": np.asarray(ids, dtype=np.int32)}

    ds = docs.filter(has_content).map(tokenize)
    ds = _JsonSafePack(to_iter(ds, read_threads, read_buffer), seq_len + 1)
    ds = ds.map(lambda row: lm_example_from_row(row["tokens"], row["tokens_segment_ids"],
                                                row["tokens_positions"]))
    return finish_batches(ds, batch_size, drop_remainder, prefetch)


# ----------------------------------------------------------------------------- mixtures
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


__all__ = ["pretrain_dataset", "document_weights", "GEB_TOKEN_SHARES", "TINYLLAMA_TOKEN_SHARES",
           "builtin_mixture_weights", "builtin_mixture", "builtin_pretrain_dataset"]
