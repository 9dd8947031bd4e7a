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
  * `NearDuplicateDeduper`: stateful; MinHash signatures (`num_perm` values, lsh.py, equal to
    datasketch's) over shingles - word `ngram`-grams for en/code/other, character
    `ngram`-grams (whitespace removed) for zh - and an LSH index of band keys, the band layout
    chosen on the S-curve (lsh.choose_bands). A document is dropped when an earlier kept
    document (any source) shares a band key and its estimated Jaccard similarity is at least
    `threshold`; otherwise it is indexed. State: the band index and the kept signatures
    (num_perm * 4 bytes a kept document).
"""
from __future__ import annotations

import hashlib

import numpy as np

from geb_jax.data.clean import lsh
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
    """MinHash-LSH near-duplicate removal across the whole stream (keeps the first).

    The band layout is `lsh.choose_bands(num_perm, threshold)` unless `bands` and `rows` are
    given; candidates (a shared band key with a kept document) are confirmed by the estimated
    Jaccard >= `threshold` over all `num_perm` values. Signatures and band keys come from
    geb_jax/data/clean/lsh.py, as in the Beam pipeline, so both index the same keys; the index
    is a dict of band key -> kept documents (datasketch's MinHashLSH holds the same buckets but
    does not expose the keys a GroupByKey needs).
    """

    def __init__(self, *, threshold: float = 0.8, num_perm: int = 256, ngram: int = 5,
                 seed: int = 1, bands: int = 0, rows: int = 0):
        self.threshold, self.num_perm, self.ngram = threshold, num_perm, ngram
        if bands and rows:
            if bands * rows > num_perm:
                raise ValueError(f"bands*rows = {bands * rows} > num_perm = {num_perm}")
            self.bands, self.rows = bands, rows
        else:
            self.bands, self.rows = lsh.choose_bands(num_perm, threshold)
        self._perms = lsh.permutations(num_perm, seed)
        self.buckets: dict[bytes, list[int]] = {}
        self.signatures: list[np.ndarray] = []  # of kept documents, uint32 (values < 2^32)

    def signature(self, text: str, lang: str | None) -> np.ndarray:
        return lsh.signature(shingles(text, lang, self.ngram), self.num_perm,
                             perms=self._perms)

    def __call__(self, doc: dict) -> dict | None:
        lang = doc.get("lang")
        if lang is None:  # a document the language step did not label: guess the script
            from geb_jax.data.clean.lang import detect_language
            lang = detect_language(doc["text"]).lang
        sig = self.signature(doc["text"], lang).astype(np.uint32)
        keys = lsh.band_keys(sig, self.bands, self.rows)
        checked: set[int] = set()
        for key in keys:
            for kept in self.buckets.get(key, ()):
                if kept not in checked:
                    checked.add(kept)
                    if lsh.estimated_jaccard(self.signatures[kept], sig) >= self.threshold:
                        return None
        index = len(self.signatures)
        self.signatures.append(sig)
        for key in keys:
            self.buckets.setdefault(key, []).append(index)
        return doc
