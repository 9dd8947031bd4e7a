"""Input: the built-in corpus or local shards, each document keyed by its input index.

The index is (file number << 40) | position in the file, so sorting by it gives exactly the
single-process reading order and `index >> 40` names the input shard (the output group).
Each shard is read by prepare_io.read_file, the single-process reader: bad records are skipped
and counted the same way, here as counters (and a few examples in the temp folder).
"""
from __future__ import annotations

import apache_beam as beam

from geb_jax.data.bad_input import SkipReport
from geb_jax.data.beam import counters

INDEX_BITS = 40


def doc_index(file_index: int, position: int) -> int:
    return (file_index << INDEX_BITS) | position


def group_of(index: int) -> int:
    return index >> INDEX_BITS


class ReadShard(beam.DoFn):
    """(file number, path) -> (index, document) for each usable record of the file."""

    def __init__(self, max_record_bytes: int, temp_root: str):
        self.max_record_bytes, self.temp_root = max_record_bytes, temp_root

    def process(self, item):
        from geb_jax.data.prepare_io import read_file
        file_index, path = item
        skipped = SkipReport()
        for position, doc in enumerate(read_file(path, skipped, self.max_record_bytes)):
            yield doc_index(file_index, position), doc
        counters.publish_skipped(skipped, file_index, self.temp_root)


class ReadInput(beam.PTransform):
    """Local files (`paths`, in order) or, with paths=None, the built-in corpus `split`."""

    def __init__(self, paths, split: str, max_record_bytes: int, temp_root: str):
        super().__init__()
        self.paths, self.split, self.max_record_bytes = paths, split, max_record_bytes
        self.temp_root = temp_root

    def expand(self, pbegin):
        if self.paths is None:
            from geb_jax.data.prepare_io import builtin_input
            docs = pbegin | beam.Create(list(enumerate(builtin_input(self.split))),
                                        reshuffle=False)
        else:
            read = ReadShard(self.max_record_bytes, self.temp_root)
            docs = (pbegin | beam.Create(list(enumerate(self.paths)))
                    | beam.Reshuffle() | beam.ParDo(read))
        return docs | "spread" >> beam.Reshuffle()
