"""Pre-tokenize a corpus to array_record files once, so training never waits on the tokenizer.

    python -m geb_jax.data.pretokenize --config configs/tiny.py --out data/tiny_tokens
    python -m geb_jax.data.pretokenize --config configs/tiny.py --out data/raw_tokens \\
        --config.data.source=local --config.data.path='raw/*.jsonl'
    # then train with --config.data.source=pretokenized --config.data.path=data/tiny_tokens

Layout of --out (written into a temporary sibling folder and renamed into place, so a reader
never sees a half-written corpus and an interrupted run leaves the previous one intact):

    manifest.json                     format, version, tokenizer sha256 + vocab size, per split:
                                      documents, tokens, empty documents, shard files
    train-00000.array_record, ...     one record per document, in source order: its ids
    valid-00000.array_record, ...     (bos + text + eos, little-endian int32; an empty document
                                      is an empty record), a new shard every --shard-mb MB

Why one record per *document* (not packed rows): the pipeline then shuffles, shards and packs
exactly as it does on the fly - the same seed gives exactly the same batches from either path
(tests/test_pretokenize.py checks it), and seq_len / batch size can change without
re-tokenizing. Records are written with group_size 1 for true random access (grain's
ArrayRecordDataSource). The tokenizer's hash is checked when a run opens the folder: ids made
by another tokenizer are an error, never silently wrong training data (data/pretokenized.py
reads the folders back).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Iterable, Sequence

import numpy as np

from geb_jax.atomic_io import atomic_folder
from geb_jax.data import sources
from geb_jax.data.bad_input import SourceError
from geb_jax.data.pipeline import text_of
from geb_jax.data.pretokenized import DTYPE, FORMAT, MANIFEST, VERSION, PretokenizedError
from geb_jax.data.tokenizer import Tokenizer, builtin_tokenizer, fingerprint

DEFAULT_SHARD_MB = 256
ENCODE_CHUNK = 256  # documents per SentencePiece batch call


# ----------------------------------------------------------------------------- writing
def document_ids(tokenizer: Tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """The ids the pretrain pipeline feeds the packer: bos + ids + eos, or none if empty."""
    out: list[np.ndarray] = [np.zeros(0, np.int32)] * len(texts)
    full = [i for i, t in enumerate(texts) if t]
    for i, ids in zip(full, tokenizer.encode_batch([texts[i] for i in full], add_bos=True,
                                                   add_eos=True)):
        out[i] = np.asarray(ids, np.int32)
    return out


def write_split(documents, tokenizer: Tokenizer, folder: str, split: str, *,
                shard_bytes: int = DEFAULT_SHARD_MB * 2**20, progress: bool = True) -> dict:
    """Writes `split`'s documents (a random-access source, read in index order) as shards.

    Returns the split's manifest entry: documents, tokens, empty, shards [{file, documents}].
    """
    import tqdm
    from array_record.python.array_record_module import ArrayRecordWriter

    n = len(documents)
    shards: list[dict] = []
    writer, written, shard_docs = None, 0, 0
    tokens = empty = 0

    def close():
        nonlocal writer
        if writer is not None:
            writer.close()
            shards[-1]["documents"] = shard_docs
            writer = None

    bar = tqdm.tqdm(total=n, unit="doc", desc=f"tokenizing {split}", disable=not progress,
                    dynamic_ncols=True)
    try:
        for start in range(0, n, ENCODE_CHUNK):
            texts = [text_of(documents[i]) for i in range(start, min(start + ENCODE_CHUNK, n))]
            for ids in document_ids(tokenizer, texts):
                if writer is None or written >= shard_bytes:
                    close()
                    name = f"{split}-{len(shards):05d}.array_record"
                    writer = ArrayRecordWriter(os.path.join(folder, name), "group_size:1")
                    shards.append({"file": name})
                    written = shard_docs = 0
                record = ids.astype(DTYPE).tobytes()
                writer.write(record)
                written += len(record)
                shard_docs += 1
                tokens += len(ids)
                empty += len(ids) == 0
            bar.update(len(texts))
        close()
    finally:
        if writer is not None:
            writer.close()
        bar.close()
    return {"documents": n, "tokens": tokens, "empty": empty, "shards": shards}


def manifest_header(tokenizer: Tokenizer, data) -> dict:
    """The manifest before its splits: format, tokenizer fingerprint, the data config."""
    manifest = {"format": FORMAT, "version": VERSION, "dtype": DTYPE, "bos_eos": True,
                "tokenizer": {"sha256": fingerprint(tokenizer),
                              "vocab_size": tokenizer.vocab_size, "path": tokenizer.path},
                "data": data.to_dict() if hasattr(data, "to_dict") else dict(data),
                "splits": {}}
    manifest["data"].pop("clean", None)
    return manifest


def write_documents_tokens(out: str, documents: Sequence, tokenizer: Tokenizer, data,
                           split: str, *, shard_mb: float = DEFAULT_SHARD_MB,
                           progress: bool = True) -> dict:
    """Tokenizes already-cleaned `documents` as `split` of a new folder `out` (atomically).

    What `prepare --tokens` writes after the single-process chain; the Beam pipeline writes
    the same layout (geb_jax/data/beam/writing.py).
    """
    manifest = manifest_header(tokenizer, data)
    start = time.time()
    with atomic_folder(out) as tmp:
        manifest["splits"][split] = write_split(documents, tokenizer, tmp, split,
                                                shard_bytes=int(shard_mb * 2**20),
                                                progress=progress)
        manifest["seconds"] = round(time.time() - start, 3)
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
    return manifest


def run_tokenizer(config) -> Tokenizer:
    """The tokenizer a training run of `config` uses (as train/inputs.stage_tokenizer)."""
    if config.data.get("tokenizer", "builtin") == "builtin":
        return builtin_tokenizer(config.model.vocab_size)
    return Tokenizer.load(config.data.tokenizer)


def pretokenize(config, out: str, splits: Sequence[str] = ("train", "valid"), *,
                shard_mb: float = DEFAULT_SHARD_MB, progress: bool = True,
                tokenizer: Tokenizer | None = None) -> dict:
    """Tokenizes config.data's splits into `out` (atomically); returns the manifest."""
    tokenizer = tokenizer or run_tokenizer(config)
    if config.data.get("source") in ("mixture", "pretokenized"):
        raise PretokenizedError(
            f"data.source={config.data.source!r} cannot be pre-tokenized: pre-tokenize each "
            f"mixture entry into its own folder and list them as data.mixture entries with "
            f"source='pretokenized', path=<folder>")
    if os.path.exists(out) and not os.path.isdir(out):
        raise PretokenizedError(f"--out {out!r} exists and is not a folder")
    manifest = manifest_header(tokenizer, config.data)
    start = time.time()
    with atomic_folder(out) as tmp:
        for split in splits:
            docs = sources.documents_from_config(config.data, split)
            manifest["splits"][split] = write_split(
                docs, tokenizer, tmp, split, shard_bytes=int(shard_mb * 2**20),
                progress=progress)
        manifest["seconds"] = round(time.time() - start, 3)
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
    return manifest


# ----------------------------------------------------------------------------- CLI
def main(argv: Iterable[str] | None = None) -> int:
    from geb_jax.config_loader import apply_overrides, load_config, split_overrides
    from geb_jax.errors import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m geb_jax.data.pretokenize",
        description="Tokenize config.data's documents into array_record shards + manifest. "
                    "Override fields with --config.data.<field>=<value>.")
    parser.add_argument("--config", required=True, help="configs/<preset>.py[:arg]")
    parser.add_argument("--out", required=True, help="output folder (replaced atomically)")
    parser.add_argument("--splits", default="train,valid", help="comma-separated splits")
    parser.add_argument("--shard-mb", type=float, default=DEFAULT_SHARD_MB,
                        help="start a new shard after this many MB of ids")
    parser.add_argument("--no-progress", action="store_true")
    try:
        rest, overrides = split_overrides(argv)
        args = parser.parse_args(rest)
        config = load_config(args.config)
        if overrides:
            config = apply_overrides(config, overrides)
        splits = [s.strip() for s in args.splits.split(",") if s.strip()]
        manifest = pretokenize(config, args.out, splits, shard_mb=args.shard_mb,
                               progress=not args.no_progress)
    except (ConfigError, SourceError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, entry in manifest["splits"].items():
        print(f"{split}: {entry['documents']:,} documents, {entry['tokens']:,} tokens, "
              f"{len(entry['shards'])} shard(s)")
    print(f"wrote {args.out} in {manifest['seconds']:.1f}s (tokenizer sha256 "
          f"{manifest['tokenizer']['sha256'][:16]}..., vocab "
          f"{manifest['tokenizer']['vocab_size']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
