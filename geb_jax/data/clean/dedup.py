"""Deduplication: repeated sentences, exact repeated paragraphs, near-duplicate documents.

  * `collapse_repeated_sentences(doc)`: pure; inside one document, a sentence identical
    (after normalisation) to the sentence just before it is removed ("Buy now. Buy now.").
    English sentences end at . ! ? before a space, Chinese ones at 。！？… ; a newline also
    ends a sentence. Sentences shorter than `min_chars` normalised characters are never
    removed ("What! what!" is style, not spam). Natural language only.
  * `ParagraphDeduper`: stateful over the stream; a paragraph (a block between blank lines)
    whose normalised text was already seen anywhere earlier in the stream is removed, the first
    occurrence is kept (CCNet-style boilerplate removal). Normalisation: NFKC, lowercase,
    punctuation/symbols removed, whitespace collapsed. Paragraphs shorter than `min_chars`
    normalised characters are never removed (headings like "Warning" repeat legitimately).
    State: `seen`, a set of 8-byte BLAKE2b digests (8 bytes a paragraph).
  * `NearDuplicateDeduper`: stateful; MinHash (datasketch, `num_perm` permutations) over
    shingles - word `ngram`-grams for en/code/other, character `ngram`-grams (whitespace
    removed) for zh - and a MinHashLSH index at Jaccard `threshold`. A document is dropped when
    an earlier document (any source) is a candidate and its estimated Jaccard similarity is at
    least `threshold`; otherwise it is indexed. State: the LSH index and the kept signatures.
"""
from __future__ import annotations

import hashlib

import numpy as np

from geb_jax.data.clean._text import (count_words, is_natural_language, normalize,
                                      split_paragraphs, split_sentences)


# ----------------------------------------------------------------- consecutive sentences

def collapse_repeated_sentences(doc: dict, *, min_chars: int = 10) -> dict | None:
    """Removes a sentence equal to the one before it (normalised, >= `min_chars` chars)."""
    if not is_natural_language(doc):
        return doc
    text = doc["text"]
    pieces = split_sentences(text)
    if len(pieces) < 2:
        return doc
    out: list[str] = []
    previous = None
    changed = False
    for piece in pieces:
        key = normalize(piece)
        if key and key == previous and len(key) >= min_chars:
            changed = True
            # keep the separator of the removed sentence when it holds a line break
            trailing = piece[len(piece.rstrip()):]
            if "\n" in trailing:
                out[-1] = out[-1].rstrip() + trailing
            continue
        out.append(piece)
        if key:
            previous = key
    if not changed:
        return doc
    return {**doc, "text": "".join(out)}


# ------------------------------------------------------------------ repeated paragraphs

def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


class ParagraphDeduper:
    """Exact dedup of normalised paragraphs across the stream (keeps the first occurrence)."""

    def __init__(self, *, min_chars: int = 20, min_doc_words: int = 0):
        self.min_chars = min_chars
        self.min_doc_words = min_doc_words
        self.seen: set[bytes] = set()

    def __call__(self, doc: dict) -> dict | None:
        if not is_natural_language(doc):
            return doc
        parts = split_paragraphs(doc["text"])
        kept: list[tuple[str, str]] = []
        removed = False
        new_keys = []
        for para, sep in parts:
            key = normalize(para)
            if len(key) < self.min_chars:
                kept.append((para, sep))
                continue
            digest = _digest(key)
            if digest in self.seen or digest in new_keys:
                removed = True
                continue
            new_keys.append(digest)
            kept.append((para, sep))
        self.seen.update(new_keys)
        if not removed:
            return doc
        if not any(normalize(p) for p, _ in kept):
            return None
        text = "".join(p + s for p, s in kept).lstrip("\n").rstrip()
        if count_words(text) < self.min_doc_words:
            return None
        return {**doc, "text": text}


# ----------------------------------------------------------------------- near duplicates

def shingles(text: str, lang: str | None, n: int = 5) -> set[bytes]:
    """Word n-grams (en, code, other) or character n-grams without whitespace (zh)."""
    norm = normalize(text)
    if lang == "zh":
        units = list(norm.replace(" ", ""))
        join = ""
    else:
        units = norm.split()
        join = " "
    if len(units) < n:
        return {join.join(units).encode("utf-8")} if units else set()
    return {join.join(units[i:i + n]).encode("utf-8") for i in range(len(units) - n + 1)}


class NearDuplicateDeduper:
    """MinHash-LSH near-duplicate removal across the whole stream (keeps the first)."""

    def __init__(self, *, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5,
                 seed: int = 1):
        from datasketch import MinHash, MinHashLSH  # imported here: only this step needs it
        self._MinHash = MinHash
        self.threshold, self.num_perm, self.ngram = threshold, num_perm, ngram
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        template = MinHash(num_perm=num_perm, seed=seed)
        self._permutations = template.permutations
        self._scheme = template.scheme
        self.signatures: dict[str, np.ndarray] = {}
        self.indexed = 0

    def minhash(self, text: str, lang: str | None):
        m = self._MinHash(num_perm=self.num_perm, permutations=self._permutations,
                          scheme=self._scheme)
        m.update_batch(list(shingles(text, lang, self.ngram)))
        return m

    def __call__(self, doc: dict) -> dict | None:
        lang = doc.get("lang")
        if lang is None:  # a document the language step did not label: guess the script
            from geb_jax.data.clean.lang import detect_language
            lang = detect_language(doc["text"]).lang
        m = self.minhash(doc["text"], lang)
        for key in self.lsh.query(m):
            if float(np.mean(self.signatures[key] == m.hashvalues)) >= self.threshold:
                return None
        key = str(self.indexed)
        self.indexed += 1
        self.lsh.insert(key, m)
        self.signatures[key] = m.hashvalues
        return doc

