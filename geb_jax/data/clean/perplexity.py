"""Perplexity filtering (CCNet / GEB style): keep the low-perplexity head and middle.

A `PerplexityScorer` is any callable `texts -> per-document bits per UTF-8 byte` (lower = more
like the reference text). Two are provided:
  * `CharNgramScorer`: a character n-gram model with Witten-Bell interpolation, trained in a
    few seconds on any texts (by default the built-in corpus' train split). It is the fallback
    that needs no trained network.
  * `scorer_from_callable(fn)`: wraps any function with the same contract, e.g. a JAX language
    model trained with this codebase: fn(texts) should return, per text, the sum of the
    model's token negative log-likelihoods in bits divided by len(text.encode("utf-8")).
    Bits per byte does not depend on the tokenizer, so scores from different models compare.

Decisions are per language ("en", "zh", "code" have very different bits per byte):
  * `max_bpb[lang]`: an absolute ceiling (a document scoring above it is dropped);
  * `drop_fraction`: additionally drop the worst `drop_fraction` of each language, with the
    cutoff taken as the (1 - drop_fraction) quantile of the first `window` documents of that
    language (those documents wait until the window is full, later ones are decided at once).

`perplexity_filter(doc, ...)` is the pure per-document form (absolute ceiling only);
`PerplexityFilter` is the batched, stateful step the chain runs (scores `batch_size`
documents per scorer call, so a JAX model sees full batches).
"""
from __future__ import annotations

import collections
import functools
import math
from typing import Callable, Iterable, Mapping, Protocol, Sequence, runtime_checkable

from geb_jax.data.clean._text import nbytes

_BOS = "\x02"


@runtime_checkable
class PerplexityScorer(Protocol):
    def __call__(self, texts: Sequence[str]) -> Sequence[float]:
        """Bits per UTF-8 byte of each text (lower is more fluent / more in-domain)."""


class CharNgramScorer:
    """Character n-gram LM, Witten-Bell interpolated down to a byte-uniform base distribution.

    P(c | h) = (C(h c) + T(h) P(c | h')) / (C(h) + T(h)), with T(h) the number of distinct
    characters seen after h and h' the history without its first character. The base of the
    recursion gives an unseen character 2^(-8 * its UTF-8 length), so any text has a finite
    score and text in an unseen script costs about 8 bits a byte.
    """

    def __init__(self, order: int = 3):
        if order < 1:
            raise ValueError(f"n-gram order must be >= 1, got {order}")
        self.order = order
        self.counts: dict[str, int] = {}        # n-gram (length 1..order) -> count
        self.context_total: dict[str, int] = {}  # history -> sum of counts after it
        self.context_types: dict[str, int] = {}  # history -> distinct next characters

    def fit(self, texts: Iterable[str]) -> "CharNgramScorer":
        counter: collections.Counter = collections.Counter()
        pad = _BOS * (self.order - 1)
        for text in texts:
            padded = pad + text
            for n in range(1, self.order + 1):
                start = self.order - n  # every n-gram ends on a real character
                counter.update(padded[i:i + n] for i in range(start, len(padded) - n + 1))
        total, types = collections.Counter(), collections.Counter()
        for gram, c in counter.items():
            total[gram[:-1]] += c
            types[gram[:-1]] += 1
        self.counts = dict(counter)
        self.context_total, self.context_types = dict(total), dict(types)
        return self

    def _prob(self, history: str, ch: str) -> float:
        p = 2.0 ** (-8 * len(ch.encode("utf-8")))
        counts, totals, types = self.counts, self.context_total, self.context_types
        for k in range(len(history) + 1):
            h = history[len(history) - k:] if k else ""
            t = totals.get(h)
            if not t:
                break
            u = types[h]
            p = (counts.get(h + ch, 0) + u * p) / (t + u)
        return p

    def bits(self, text: str) -> float:
        """Total bits of `text` under the model."""
        padded = _BOS * (self.order - 1) + text
        total = 0.0
        for i in range(self.order - 1, len(padded)):
            total -= math.log2(self._prob(padded[i - self.order + 1:i], padded[i]))
        return total

    def __call__(self, texts: Sequence[str]) -> list[float]:
        if not self.counts:
            raise ValueError("CharNgramScorer is not trained: call fit(texts) first")
        return [self.bits(t) / max(nbytes(t), 1) for t in texts]


def scorer_from_callable(fn: Callable[[Sequence[str]], Iterable[float]]) -> PerplexityScorer:
    """Adapts `fn(texts) -> bits per byte` and checks its answers (count, finite, >= 0)."""

    def scorer(texts: Sequence[str]) -> list[float]:
        texts = list(texts)
        scores = [float(s) for s in fn(texts)]
        if len(scores) != len(texts):
            raise ValueError(f"perplexity scorer returned {len(scores)} scores for "
                             f"{len(texts)} texts")
        for s in scores:
            if not (math.isfinite(s) and s >= 0):
                raise ValueError(f"perplexity scorer returned {s!r}; expected finite bits per "
                                 f"byte >= 0")
        return scores

    scorer.__name__ = getattr(fn, "__name__", "scorer")
    return scorer


@functools.lru_cache(maxsize=4)
def builtin_ngram_scorer(order: int = 3, split: str = "train") -> CharNgramScorer:
    """The fallback scorer: a character n-gram trained on the built-in corpus (cached)."""
    from geb_jax.data.corpus import builtin_texts
    return CharNgramScorer(order).fit(builtin_texts(split))


def _ceiling(max_bpb: float | Mapping[str, float], lang: str | None) -> float:
    if isinstance(max_bpb, Mapping):
        return max_bpb.get(lang or "", math.inf)
    return max_bpb


def perplexity_filter(doc: dict, *, scorer: PerplexityScorer,
                      max_bpb: float | Mapping[str, float]) -> dict | None:
    """Drops the document when its bits per byte exceed the ceiling for its language."""
    score = scorer([doc["text"]])[0]
    return None if score > _ceiling(max_bpb, doc.get("lang")) else doc


def _quantile(values: Sequence[float], q: float) -> float:
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class PerplexityFilter:
    """The chain's batched perplexity step; state: pending batch, windows, cutoffs, scores.

    `process(doc)` and `flush()` return [(input_doc, output_doc_or_None)] for the documents
    decided so far (possibly none, possibly several): the chain runner counts them.
    """

    def __init__(self, scorer: PerplexityScorer, *, max_bpb: float | Mapping[str, float],
                 drop_fraction: float = 0.0, window: int = 1000, batch_size: int = 64,
                 min_window: int = 20):
        if not 0.0 <= drop_fraction < 1.0:
            raise ValueError(f"drop_fraction must be in [0, 1), got {drop_fraction}")
        self.scorer, self.max_bpb = scorer, max_bpb
        self.drop_fraction, self.window = drop_fraction, window
        self.batch_size, self.min_window = batch_size, min_window
        self.pending: list[dict] = []
        self.windows: dict[str, list[tuple[dict, float]]] = collections.defaultdict(list)
        self.cutoffs: dict[str, float] = {}
        self.scores: dict[str, list[float]] = collections.defaultdict(list)  # every score seen

    def _decide(self, doc: dict, score: float, cutoff: float) -> tuple[dict, dict | None]:
        lang = doc.get("lang")
        keep = score <= _ceiling(self.max_bpb, lang) and score <= cutoff
        return doc, (doc if keep else None)

    def _score_pending(self) -> list[tuple[dict, dict | None]]:
        docs, self.pending = self.pending, []
        if not docs:
            return []
        scores = list(self.scorer([d["text"] for d in docs]))
        if len(scores) != len(docs):
            raise ValueError(f"perplexity scorer returned {len(scores)} scores for {len(docs)}")
        out = []
        for doc, score in zip(docs, scores):
            lang = doc.get("lang") or ""
            self.scores[lang].append(score)
            if self.drop_fraction <= 0.0:
                out.append(self._decide(doc, score, math.inf))
            elif lang in self.cutoffs:
                out.append(self._decide(doc, score, self.cutoffs[lang]))
            else:
                self.windows[lang].append((doc, score))
                if len(self.windows[lang]) >= self.window:
                    out += self._close_window(lang)
        return out

    def _close_window(self, lang: str) -> list[tuple[dict, dict | None]]:
        held = self.windows.pop(lang, [])
        if len(held) >= self.min_window:
            self.cutoffs[lang] = _quantile([s for _, s in held], 1.0 - self.drop_fraction)
        cutoff = self.cutoffs.get(lang, math.inf)  # too few documents: no percentile cut
        return [self._decide(doc, score, cutoff) for doc, score in held]

    def process(self, doc: dict) -> list[tuple[dict, dict | None]]:
        self.pending.append(doc)
        return self._score_pending() if len(self.pending) >= self.batch_size else []

    def flush(self) -> list[tuple[dict, dict | None]]:
        out = self._score_pending()
        for lang in list(self.windows):
            out += self._close_window(lang)
        return out
