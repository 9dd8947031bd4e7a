"""Paragraph dedup as a GroupByKey stage, with the chain's ParagraphDeduper deciding.

The stream rule "a paragraph already seen earlier in the stream is removed" becomes: group the
paragraph digests of all documents, the first occurrence is the lowest input index; every later
document gets the digests it is not first for, and a ParagraphDeduper whose `seen` holds exactly
those edits the document (repeats inside one document it removes itself, as in the stream).
A document the step drops still counts as having seen its paragraphs, as in the stream.
"""
from __future__ import annotations

import apache_beam as beam

from geb_jax.data.beam.rules import _Counted
from geb_jax.data.clean import dedup
from geb_jax.data.clean._text import is_natural_language, normalize, split_paragraphs
from geb_jax.data.clean.chain import FunctionStep, _run

NAME = "dedup_paragraphs"


def paragraph_digests(doc: dict, min_chars: int) -> set[bytes]:
    """The digests ParagraphDeduper would look up for this document."""
    if not is_natural_language(doc):
        return set()
    keys = (normalize(para) for para, _ in split_paragraphs(doc["text"]))
    return {dedup._digest(k) for k in keys if len(k) >= min_chars}


def _later_occurrences(item):
    """(digest, indices) -> (index, digest) for each document that is not the first."""
    digest, indices = item
    first = min(indices)
    for index in indices:
        if index != first:
            yield index, digest


class _Edit(_Counted):
    names = (NAME,)

    def __init__(self, min_chars: int, min_doc_words: int):
        self.min_chars, self.min_doc_words = min_chars, min_doc_words

    def process(self, item):
        index, joined = item
        for doc in joined["doc"]:
            deduper = dedup.ParagraphDeduper(min_chars=self.min_chars,
                                             min_doc_words=self.min_doc_words)
            deduper.seen = set(joined["seen"])
            for out in _run([doc], [FunctionStep(NAME, deduper)], self.report):
                yield index, out


class ParagraphDedup(beam.PTransform):
    """(index, doc) -> (index, doc) with paragraphs seen at a lower index removed."""

    def __init__(self, deduper: dedup.ParagraphDeduper):
        super().__init__()
        self.min_chars, self.min_doc_words = deduper.min_chars, deduper.min_doc_words

    def expand(self, docs):
        min_chars = self.min_chars
        seen = (docs
                | "digests" >> beam.FlatMap(lambda kv: ((d, kv[0]) for d in
                                                        paragraph_digests(kv[1], min_chars)))
                | "by digest" >> beam.GroupByKey()
                | "later" >> beam.FlatMap(_later_occurrences))
        return ({"doc": docs, "seen": seen} | "join" >> beam.CoGroupByKey()
                | "edit" >> beam.ParDo(_Edit(self.min_chars, self.min_doc_words)))
