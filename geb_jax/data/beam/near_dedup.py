"""Near-duplicate removal as MinHash-LSH connected components (datatrove / RedPajama style).

    signature (lsh.signature over dedup.shingles)
    -> exact groups: equal signatures (identical shingle sets) -> GroupByKey; every member is
       an edge to the group's lowest index, and only that representative goes on
    -> band keys (lsh.band_keys) -> GroupByKey -> candidate pairs, each checked once (in the
       first band the two share) -> kept when lsh.estimated_jaccard >= threshold
    -> connected components of all edges (lsh.clusters, on ONE worker: the edge list is two
       integers per edge; datatrove's cluster step is one task too)
    -> every document whose component has a lower index is dropped.

Difference from the streaming chain, by design: the stream drops a document similar to an
earlier *kept* one, so in a chain A~B, B~C with A not ~ C it keeps A and C (B was dropped, C is
never compared with it); components keep only A. Components are order-free and what datatrove
and RedPajama do; tests/test_beam_pipeline.py checks both behaviours.
"""
from __future__ import annotations

import apache_beam as beam
import numpy as np

from geb_jax.data.beam.rules import _Counted
from geb_jax.data.clean import lsh
from geb_jax.data.clean.chain import FunctionStep, _run
from geb_jax.data.clean.dedup import shingles

NAME = "near_dedup"


class _Signature(beam.DoFn):
    def __init__(self, num_perm: int, ngram: int, seed: int):
        self.num_perm, self.ngram, self.seed = num_perm, ngram, seed

    def setup(self):
        self.perms = lsh.permutations(self.num_perm, self.seed)

    def process(self, item):
        index, doc = item
        lang = doc.get("lang")
        if lang is None:  # as NearDuplicateDeduper: a document without lang gets its script
            from geb_jax.data.clean.lang import detect_language
            lang = detect_language(doc["text"]).lang
        sig = lsh.signature(shingles(doc["text"], lang, self.ngram), self.num_perm,
                            perms=self.perms)
        yield sig.tobytes(), index


def _exact_group(item):
    """(signature bytes, indices) -> ("edge", (first, other)) ... and (first, signature)."""
    key, indices = item
    indices = sorted(indices)
    for other in indices[1:]:
        yield beam.pvalue.TaggedOutput("edge", (indices[0], other))
    yield indices[0], key  # bytes, not an array: the coders' fast path (and no pickling)


def _sig(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.uint64)


def _band_members(item, bands: int, rows: int):
    for key in lsh.band_keys(_sig(item[1]), bands, rows):
        yield key, item


class _Bucket(beam.DoFn):
    """One band bucket -> its verified pairs (a pair is checked only in its first shared band)."""

    def __init__(self, threshold: float, bands: int, rows: int):
        self.threshold, self.bands, self.rows = threshold, bands, rows

    def process(self, item):
        key, members = item
        members = sorted(members, key=lambda m: m[0])
        if len(members) < 2:
            return
        band = int.from_bytes(key[:2], "little")
        sigs = [_sig(raw) for _, raw in members]
        keys = [lsh.band_keys(sig, self.bands, self.rows)[:band] for sig in sigs]
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                if any(x == y for x, y in zip(keys[a], keys[b])):
                    continue  # an earlier band's bucket checks this pair
                if lsh.estimated_jaccard(sigs[a], sigs[b]) >= self.threshold:
                    yield members[a][0], members[b][0]


def _dropped(edges):
    """All edges -> (index, root) for each document that is not its component's root."""
    for index, root in lsh.clusters(edges).items():
        if index != root:
            yield index, root


def _drop(doc):
    return None


class _Apply(_Counted):
    names = (NAME,)

    def process(self, item):
        index, joined = item
        for doc in joined["doc"]:
            if joined["root"]:
                for _ in _run([doc], [FunctionStep(NAME, _drop)], self.report):
                    pass  # counts the drop
            else:
                yield index, doc


class NearDedup(beam.PTransform):
    """(index, doc) -> (index, doc) keeping the lowest index of each near-duplicate cluster."""

    def __init__(self, *, threshold: float, num_perm: int, ngram: int, bands: int, rows: int,
                 seed: int = 1):
        super().__init__()
        self.threshold, self.num_perm, self.ngram, self.seed = threshold, num_perm, ngram, seed
        self.bands, self.rows = bands, rows

    def expand(self, docs):
        groups = (docs | "signature" >> beam.ParDo(_Signature(self.num_perm, self.ngram,
                                                              self.seed))
                  | "exact groups" >> beam.GroupByKey()
                  | "representatives" >> beam.FlatMap(_exact_group).with_outputs(
                      "edge", main="rep"))
        bands, rows = self.bands, self.rows
        near = (groups.rep
                | "band keys" >> beam.FlatMap(_band_members, bands, rows)
                | "buckets" >> beam.GroupByKey()
                | "pairs" >> beam.ParDo(_Bucket(self.threshold, bands, rows)))
        roots = ((groups.edge, near) | "edges" >> beam.Flatten()
                 | "all edges" >> beam.combiners.ToList()
                 | "components" >> beam.FlatMap(_dropped))
        return ({"doc": docs, "root": roots} | "join" >> beam.CoGroupByKey()
                | "drop" >> beam.ParDo(_Apply()))
