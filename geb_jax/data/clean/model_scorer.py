"""Perplexity from a language model trained with this codebase: the chain's "model:<path>".

    import geb_jax.eval.filter_scorer                  # registers the JAX / numpy-engine backends
    scorer = load_model_scorer("runs/tiny/pretrain")   # a finished stage (JAX, orbax checkpoint)
    scorer = load_model_scorer("runs/tiny/export")     # or an exported numpy model folder
    docs, report = clean(documents, cfg, scorer=scorer_from_callable(scorer))
    # or in the config: data.clean.perplexity_model = "model:runs/tiny/pretrain"

A document's score is the model's summed token negative log-likelihood, in bits, divided by
its UTF-8 bytes (bits per byte: comparable across tokenizers, and what PerplexityFilter's
ceilings are in). Scoring: ids = bos + encode(text); the targets ids[1:] are cut into windows
of at most max_len tokens, each window a separate row whose first input is the token before
it (bos for the first) with positions restarting at 0, so a document longer than the model's
context is scored in context-limited pieces (the usual sliding-window-free approximation).
Rows are batched in fixed shapes (batch_size, max_len), so the JAX function compiles once.

Why a protocol: this module only turns a `RowNll` (rows of ids -> nats) into bits per byte, so
the data package does not import the model, the checkpoints or the serving engine. The
backends that run a model - geb_jax/eval/filter_scorer.py: the JAX model on a training
checkpoint, or geb_jax.infer's numpy engine on an export - register a `ModelLoader` here when
imported; python -m geb_jax.data.prepare imports them. tests/test_model_scorer.py checks both
against a float64 numpy model.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from geb_jax.data.clean._text import nbytes

# rows (list of (inputs ids, target ids), each of length <= max_len) -> nats per row
RowNll = Callable[[Sequence[tuple[list[int], list[int]]]], np.ndarray]


class ModelScorerError(ValueError):
    """The model path is not a finished stage or an exported model (the message says why)."""


def windows(ids: Sequence[int], max_len: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) rows of <= max_len tokens covering targets ids[1:] (ids has bos)."""
    ids = [int(i) for i in ids]
    rows = []
    for k in range(0, len(ids) - 1, max_len):
        n = min(max_len, len(ids) - 1 - k)
        rows.append((ids[k:k + n], ids[k + 1:k + 1 + n]))
    return rows


class ModelScorer:
    """texts -> bits per UTF-8 byte under a language model (a `PerplexityScorer`)."""

    def __init__(self, row_nll: RowNll, tokenizer, max_len: int, name: str = "model"):
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.row_nll, self.tokenizer, self.max_len = row_nll, tokenizer, max_len
        self.__name__ = name

    def nll_nats(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts),) float64: the summed token NLL of each text, in nats."""
        rows, owners = [], []
        for i, ids in enumerate(self.tokenizer.encode_batch(list(texts), add_bos=True)):
            for row in windows(ids, self.max_len):
                rows.append(row)
                owners.append(i)
        total = np.zeros(len(texts), np.float64)
        if rows:
            np.add.at(total, np.asarray(owners), np.asarray(self.row_nll(rows), np.float64))
        return total

    def __call__(self, texts: Sequence[str]) -> list[float]:
        nats = self.nll_nats(texts)
        return [float(n / math.log(2) / max(nbytes(t), 1)) for n, t in zip(nats, texts)]


# ----------------------------------------------------------------------------- backends
# (path, batch_size) -> ModelScorer; raises ModelScorerError for a path it cannot use
ModelLoader = Callable[[str, int], ModelScorer]
_loader: ModelLoader | None = None


def register_model_loader(loader: ModelLoader) -> None:
    """Makes `loader` the backend of load_model_scorer (and of perplexity_model="model:...")."""
    global _loader  # pylint: disable=global-statement
    _loader = loader


def load_model_scorer(path: str, batch_size: int = 8) -> ModelScorer:
    """A ModelScorer for a finished stage directory or an exported model, through the
    registered backend (geb_jax.eval.filter_scorer)."""
    if _loader is None:
        raise ModelScorerError(
            "no model backend is registered for perplexity_model='model:<path>': import "
            "geb_jax.eval.filter_scorer first (python -m geb_jax.data.prepare does), or pass "
            "clean(..., scorer=...)")
    return _loader(path, batch_size)


__all__ = ["RowNll", "ModelScorer", "ModelScorerError", "ModelLoader", "windows",
           "register_model_loader", "load_model_scorer"]
