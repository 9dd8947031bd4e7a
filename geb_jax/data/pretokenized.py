"""Read a corpus pre-tokenized by geb_jax.data.pretokenize (the folder layout is described
there): the manifest, the tokenizer check, and the documents as {"tokens": ids}.

Kept apart from the writer so that data/sources.py (which reads these folders) and
pretokenize.py (which writes them from sources) do not import each other.
"""
from __future__ import annotations

import json
import os

import grain
import numpy as np

from geb_jax.data.bad_input import SourceError
from geb_jax.data.tokenizer import Tokenizer, fingerprint

FORMAT = "geb_jax.pretokenized"
VERSION = 1
MANIFEST = "manifest.json"
DTYPE = "<i4"  # little-endian int32 on disk, whatever the machine


class PretokenizedError(SourceError):
    """A pre-tokenized folder that is missing, malformed or made by another tokenizer."""


def read_manifest(path: str) -> dict:
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        raise PretokenizedError(f"{path!r} is not a pre-tokenized folder (no {MANIFEST}): "
                                f"write one with python -m geb_jax.data.pretokenize --config "
                                f"... --out {path}")
    try:
        with open(file, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise PretokenizedError(f"{file}: unreadable manifest ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise PretokenizedError(f"{file}: format {manifest.get('format')!r} version "
                                f"{manifest.get('version')!r}; expected {FORMAT!r} {VERSION}")
    return manifest


def check_tokenizer(manifest: dict, tokenizer: Tokenizer, path: str) -> None:
    """PretokenizedError unless `tokenizer` is the one that made the ids in `path`."""
    made_by = manifest["tokenizer"]
    if made_by["sha256"] != fingerprint(tokenizer):
        raise PretokenizedError(
            f"{path!r} was tokenized by another tokenizer: its manifest says sha256 "
            f"{made_by['sha256'][:16]}... (vocab {made_by['vocab_size']}, {made_by['path']}), "
            f"this run's tokenizer is sha256 {fingerprint(tokenizer)[:16]}... (vocab "
            f"{tokenizer.vocab_size}, {tokenizer.path}). Pre-tokenize again with this run's "
            f"config, or set data.tokenizer to the tokenizer it was made with.")


class _DecodeTokens:
    """array_record bytes -> {"tokens": int32 ids} (picklable, for grain workers)."""

    def __call__(self, record: bytes) -> dict:
        return {"tokens": np.frombuffer(record, DTYPE).astype(np.int32)}


def pretokenized_documents(path: str, split: str, tokenizer: Tokenizer) -> grain.MapDataset:
    """The split's documents as {"tokens": ids} (random access), checked against `tokenizer`."""
    path = os.path.expanduser(os.fspath(path))
    manifest = read_manifest(path)
    check_tokenizer(manifest, tokenizer, path)
    entry = manifest["splits"].get(split)
    if entry is None:
        raise PretokenizedError(f"{path!r} has no {split!r} split (it has "
                                f"{', '.join(manifest['splits']) or 'none'}): pre-tokenize with "
                                f"--splits {','.join([*manifest['splits'], split])}")
    files = [os.path.join(path, s["file"]) for s in entry["shards"]]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing or not files:
        raise PretokenizedError(f"{path!r}: {split} shard(s) missing: "
                                f"{', '.join(missing) or 'none listed'}")
    source = grain.sources.ArrayRecordDataSource(files)
    if len(source) != entry["documents"]:
        raise PretokenizedError(f"{path!r}: the {split} shards hold {len(source)} records but "
                                f"the manifest says {entry['documents']}")
    return grain.MapDataset.source(source).map(_DecodeTokens())


__all__ = ["FORMAT", "VERSION", "MANIFEST", "DTYPE", "PretokenizedError", "read_manifest",
           "check_tokenizer", "pretokenized_documents"]
