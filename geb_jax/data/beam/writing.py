"""Output: each input shard's kept documents, in input order, as a documents part and
array_record token shards; the driver then commits them into the single-process layout.

Workers write only under the run's temp folder, with names fixed by the input shard number,
each file or folder by atomic rename: a retried bundle replaces its own part, never adds one.
The driver (commit_*) renames the token shards into train-00000.array_record, ... with the
manifest pretokenize writes, and joins the documents parts (gzip members) into
documents.jsonl.gz. array_record's own Beam sink (array_record.beam) names shards
prefix-SSSSS-of-NNNNN in bundle order, with no manifest and no size cut, so it is not used.
"""
from __future__ import annotations

import glob
import json
import os
import shutil

import apache_beam as beam

from geb_jax.atomic_io import atomic_file, atomic_folder
from geb_jax.data import pretokenize
from geb_jax.data.beam.reading import group_of

DOCS = "documents-{:05d}.jsonl.gz"
TOKENS = "tokens-{:05d}"
ENTRY = "entry.json"


def by_group(item):
    return group_of(item[0]), item


class WriteGroup(beam.DoFn):
    """(input shard, [(index, doc)]) -> its documents part and, optionally, its token shards."""

    def __init__(self, config, temp_root: str, split: str, shard_bytes: int, tokens: bool):
        self.config, self.temp_root, self.split = config, temp_root, split
        self.shard_bytes, self.tokens = shard_bytes, tokens

    def setup(self):
        self.tokenizer = pretokenize.run_tokenizer(self.config) if self.tokens else None

    def process(self, item):
        from geb_jax.data.prepare_io import write_documents
        group, members = item
        docs = [doc for _, doc in sorted(members, key=lambda m: m[0])]
        write_documents(os.path.join(self.temp_root, DOCS.format(group)), docs)
        if self.tokenizer is not None:
            with atomic_folder(os.path.join(self.temp_root, TOKENS.format(group))) as tmp:
                entry = pretokenize.write_split(docs, self.tokenizer, tmp, self.split,
                                                shard_bytes=self.shard_bytes, progress=False)
                with open(os.path.join(tmp, ENTRY), "w", encoding="utf-8") as f:
                    json.dump(entry, f)
        yield group


def commit_documents(temp_root: str, path: str) -> None:
    """Joins the documents parts in input order (a gzip file may hold several members)."""
    from geb_jax.data.prepare_io import write_documents
    parts = sorted(glob.glob(os.path.join(temp_root, DOCS.format(0).replace("00000", "*"))))
    if not parts:
        write_documents(path, [])
        return
    with atomic_file(path) as out:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out)


def commit_tokens(temp_root: str, out: str, tokenizer, data, split: str,
                  seconds: float) -> dict:
    """Renames the token shards, in input order, into `out` with its manifest (atomically)."""
    manifest = pretokenize.manifest_header(tokenizer, data)
    entry = {"documents": 0, "tokens": 0, "empty": 0, "shards": []}
    folders = sorted(glob.glob(os.path.join(temp_root, TOKENS.format(0).replace("00000", "*"))))
    with atomic_folder(out) as tmp:
        for folder in folders:
            with open(os.path.join(folder, ENTRY), encoding="utf-8") as f:
                part = json.load(f)
            for key in ("documents", "tokens", "empty"):
                entry[key] += part[key]
            for shard in part["shards"]:
                name = f"{split}-{len(entry['shards']):05d}.array_record"
                os.replace(os.path.join(folder, shard["file"]), os.path.join(tmp, name))
                entry["shards"].append({"file": name, "documents": shard["documents"]})
        manifest["splits"][split] = entry
        manifest["seconds"] = round(seconds, 3)
        with open(os.path.join(tmp, pretokenize.MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
    return manifest
