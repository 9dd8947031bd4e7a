"""Perplexity and bits per byte on held-out text, sliding windows for long documents.

Each document is scored as bos + encode(text): every text token is predicted (the bos only
conditions), with `LanguageModel.loglikelihood_rolling` (see scorer.rolling_windows; stride
None = disjoint windows of the model's length, lm-eval's choice; a smaller stride gives every
token more context at more compute, Hugging Face's perplexity guide).

    perplexity    = exp(total NLL / predicted tokens)       (depends on the tokenizer)
    bits_per_byte = total NLL / (ln 2 * UTF-8 bytes of the texts)   (does not: comparable
                    across vocabularies, the metric of the Pile / lm-eval's wikitext)
"""
from __future__ import annotations

import math
from typing import Iterable

from geb_jax.eval.scorer import LanguageModel


def perplexity(model: LanguageModel, texts: Iterable[str], stride: int | None = None) -> dict:
    """{"perplexity", "bits_per_byte", "nll_per_token", "tokens", "bytes", "documents"}."""
    tok = model.tokenizer
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("perplexity needs at least one non-empty text")
    documents = [[tok.bos_id] + tok.encode(t) for t in texts]
    nll = -sum(model.loglikelihood_rolling(documents, stride))
    tokens = sum(len(d) - 1 for d in documents)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"perplexity": math.exp(nll / tokens), "bits_per_byte": nll / (math.log(2) * n_bytes),
            "nll_per_token": nll / tokens, "tokens": tokens, "bytes": n_bytes,
            "documents": len(texts)}
