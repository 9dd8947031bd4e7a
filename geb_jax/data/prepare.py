"""Clean a corpus with the cleaning chain and write it as JSONL.gz plus a report.

    python -m geb_jax.data.prepare --config configs/tiny.py --output data/clean_tiny
    python -m geb_jax.data.prepare --config configs/tiny.py --input 'raw/*.jsonl' \\
        --config.data.clean.perplexity=false --output data/clean_raw

Input: with --input (repeatable; a glob or a path) local files are read: `.jsonl` / `.jsonl.gz`
(one JSON object a line with a string "text" field; "lang" and "source" are kept when present)
and `.txt` / `.txt.gz` (one document a file; its source is the file name, its lang is detected).
Bad input - empty files, invalid UTF-8, records over data.max_record_bytes, lines that are not
JSON objects with a string "text" - is skipped and counted in the report ("input_skipped"),
never a crash mid-run; input with nothing usable is one error naming the files.
Without --input, config.data.source decides; "builtin" reads the built-in corpus (--split
train | valid | all, default train).

Output, in --output DIR: `documents.jsonl.gz` (the kept documents, one JSON object a line,
keys sorted), `report.md` and `report.json` (per-step drops and edits; see
geb_jax.data.clean.chain.Report). Each file is written to a temporary name in DIR and renamed
into place, so a reader never sees a half-written file and an interrupted run leaves the
previous output intact.

Config: the `data.clean` section (defaults: geb_jax.data.clean.chain.default_cleaning_config);
`--config.data.clean.<field>=<value>` overrides a field. A config without a `data.clean`
section gets the defaults.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import sys
from typing import Iterator, Sequence

import ml_collections

from geb_jax.atomic_io import atomic_file
from geb_jax.data import bad_input as B
from geb_jax.data.bad_input import SkipReport
from geb_jax.errors import ConfigError


class PrepareError(ValueError):
    """A user-fixable problem with the input or output (names the path)."""


# ------------------------------------------------------------------------------- input

def resolve_inputs(patterns: Sequence[str]) -> list[str]:
    """Expands globs; each pattern must match at least one file (else one clear error)."""
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                         if os.path.isfile(p))
        if not matches:
            raise PrepareError(f"--input {pattern!r}: " + (
                "no file matches this glob." if glob.has_magic(pattern) else "no such file."))
        for path in matches:
            if not path.endswith((".jsonl", ".jsonl.gz", ".txt", ".txt.gz")):
                raise PrepareError(f"--input file {path!r}: unsupported type; expected .jsonl, "
                                   f".jsonl.gz, .txt or .txt.gz.")
            if path not in files:
                files.append(path)
    return files


def _read_bytes(path: str) -> bytes:
    if path.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def _jsonl_documents(path: str, data: bytes, skipped: SkipReport, max_bytes: int
                     ) -> Iterator[dict]:
    for lineno, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        if len(line) > max_bytes:
            skipped.add(B.TOO_LARGE, where, f"{len(line):,} bytes")
            continue
        try:
            doc = json.loads(line)
        except UnicodeDecodeError:
            skipped.add(B.INVALID_UTF8, where)
            continue
        except json.JSONDecodeError as e:
            skipped.add(B.INVALID_JSON, where, e.msg)
            continue
        if not isinstance(doc, dict):
            skipped.add(B.NOT_OBJECT, where)
        elif "text" not in doc:
            skipped.add(B.MISSING_FIELD, where)
        elif not isinstance(doc["text"], str):
            skipped.add(B.NOT_TEXT, where, type(doc["text"]).__name__)
        else:
            doc.setdefault("source", os.path.basename(path).split(".")[0])
            yield doc


def read_files(paths: Sequence[str], skipped: SkipReport | None = None,
               max_record_bytes: int = B.DEFAULT_MAX_RECORD_BYTES) -> Iterator[dict]:
    """Documents of local .jsonl[.gz] / .txt[.gz] files, in the given order.

    Bad input (empty or unreadable files, invalid UTF-8, records over max_record_bytes, lines
    that are not JSON objects with a string "text") is skipped and counted in `skipped`; if
    nothing at all is usable, PrepareError names the files once the input is exhausted.
    """
    skipped = skipped if skipped is not None else SkipReport()
    produced = 0
    for path in paths:
        try:
            data = _read_bytes(path)
        except (OSError, EOFError) as e:
            skipped.add(B.UNREADABLE, path, str(e))
            continue
        if not data.strip():
            skipped.add(B.EMPTY_FILE, path)
            continue
        if path.endswith((".txt", ".txt.gz")):
            if len(data) > max_record_bytes:
                skipped.add(B.TOO_LARGE, path, f"{len(data):,} bytes")
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                skipped.add(B.INVALID_UTF8, path, f"byte {e.start}")
                continue
            produced += 1
            yield {"text": text, "source": os.path.basename(path).split(".")[0]}
            continue
        for doc in _jsonl_documents(path, data, skipped, max_record_bytes):
            produced += 1
            yield doc
    if not produced:
        raise PrepareError(f"nothing usable in --input ({', '.join(paths[:3])}"
                           f"{', ...' if len(paths) > 3 else ''}): {skipped.summary()}.")


def builtin_input(split: str) -> Iterator[dict]:
    from geb_jax.data.corpus import SPLITS, builtin_documents
    splits = SPLITS if split == "all" else (split,)
    for s in splits:
        yield from builtin_documents(s)


def count_builtin(split: str) -> int:
    from geb_jax.data.corpus import SPLITS, builtin_stats
    stats = builtin_stats()
    splits = SPLITS if split == "all" else (split,)
    return sum(v["documents"] for s in splits for v in stats[s].values())


# ------------------------------------------------------------------------------ output

def write_documents(path: str, documents) -> int:
    """Writes documents as gzip'd JSONL (fixed mtime, sorted keys); returns how many."""
    count = 0

    with atomic_file(path) as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as gz:
        for doc in documents:
            gz.write(json.dumps(doc, ensure_ascii=False, sort_keys=True).encode("utf-8"))
            gz.write(b"\n")
            count += 1
    return count


# -------------------------------------------------------------------------------- main

def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates --config.a.b=v (or --config.a.b v) overrides from the other arguments."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            if "=" in arg:
                overrides.append(arg[len("--config."):])
            elif i + 1 < len(argv):
                overrides.append(arg[len("--config."):] + "=" + argv[i + 1])
                i += 1
            else:
                raise ConfigError(f"{arg} needs a value (--config.a.b=value).")
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def load_prepare_config(spec: str, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Loads the preset, adds default data.clean if missing, applies the overrides."""
    from geb_jax.config_loader import apply_overrides, load_config
    from geb_jax.data.clean.chain import default_cleaning_config
    config = load_config(spec)
    if "data" not in config:
        config.data = ml_collections.ConfigDict(dict(source="builtin"))
    if "clean" not in config.data:
        config.data.clean = ml_collections.ConfigDict(default_cleaning_config())
    return apply_overrides(config, list(overrides)) if overrides else config


def parse_args(argv: Sequence[str]):
    parser = argparse.ArgumentParser(
        prog="python -m geb_jax.data.prepare",
        description="Clean a corpus (GEB/LLaMA-style chain) and write documents.jsonl.gz, "
                    "report.md and report.json. Override config fields with "
                    "--config.data.clean.<field>=<value>.")
    parser.add_argument("--config", required=True, help="configs/<preset>.py[:arg]")
    parser.add_argument("--input", action="append", default=[],
                        help="a .jsonl[.gz] / .txt[.gz] file or glob (repeatable); default: "
                             "config.data.source")
    parser.add_argument("--split", default="train", choices=("train", "valid", "all"),
                        help="built-in corpus split (data.source=builtin, no --input)")
    parser.add_argument("--output", required=True, help="output directory (created)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    rest, overrides = _split_overrides(argv)
    return parser.parse_args(rest), overrides


def prepare(config: ml_collections.ConfigDict, output: str, inputs: Sequence[str] = (),
            split: str = "train", progress: bool = True):
    """Runs the chain and writes the outputs; returns the Report."""
    import tqdm

    from geb_jax.data.clean import clean
    # registers the scorers of data.clean.perplexity_model="model:<path>"
    from geb_jax.eval import filter_scorer  # pylint: disable=unused-import

    skipped = SkipReport()
    if inputs:
        paths = resolve_inputs(inputs)
        max_bytes = config.data.get("max_record_bytes", B.DEFAULT_MAX_RECORD_BYTES)
        documents, total = read_files(paths, skipped, max_bytes), None
    else:
        source = config.data.get("source", "builtin")
        if source != "builtin":
            raise PrepareError(f"config.data.source={source!r} is not readable by prepare; "
                               f"use data.source='builtin' or pass --input GLOB.")
        documents, total = builtin_input(split), count_builtin(split)
    if os.path.exists(output) and not os.path.isdir(output):
        raise PrepareError(f"--output {output!r} exists and is not a directory.")
    os.makedirs(output, exist_ok=True)

    bar = None

    def counted():  # the bar counts documents read (the chain's input)
        for doc in documents:
            yield doc
            bar.update(1)

    docs, report = clean(counted(), config.data.clean)  # config errors raise here
    bar = tqdm.tqdm(total=total, unit="doc", desc="cleaning", disable=not progress,
                    dynamic_ncols=True)  # created after the perplexity model is trained
    try:
        write_documents(os.path.join(output, "documents.jsonl.gz"), docs)
    finally:
        bar.close()
    report.input_skipped = skipped.as_dict()
    with atomic_file(os.path.join(output, "report.json"), "w", encoding="utf-8") as f:
        f.write(report.to_json() + "\n")
    with atomic_file(os.path.join(output, "report.md"), "w", encoding="utf-8") as f:
        f.write(report.to_markdown())
    return report


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, overrides = parse_args(argv)
        config = load_prepare_config(args.config, overrides)
        report = prepare(config, args.output, args.input, args.split,
                         progress=not args.no_progress)
    except (ConfigError, PrepareError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.to_markdown())
    print(f"kept {report.documents_out:,} of {report.documents_in:,} documents "
          f"({report.bytes_out:,} of {report.bytes_in:,} bytes) -> "
          f"{os.path.join(args.output, 'documents.jsonl.gz')}; report: "
          f"{os.path.join(args.output, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
