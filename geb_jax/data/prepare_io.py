"""The raw input of `prepare` and its cleaned output, shared by the single-process chain
(data/prepare.py) and the Beam pipeline (data/beam/): one reader, so bad records are skipped
and counted the same way on both paths, and one writer of documents.jsonl.gz and the report.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from typing import Iterator, Sequence

from geb_jax.atomic_io import atomic_file
from geb_jax.data import bad_input as B
from geb_jax.data.bad_input import SkipReport


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


def read_file(path: str, skipped: SkipReport,
              max_record_bytes: int = B.DEFAULT_MAX_RECORD_BYTES) -> Iterator[dict]:
    """Documents of one local .jsonl[.gz] / .txt[.gz] file; bad input is counted in `skipped`.

    One file at a time, so the Beam pipeline (geb_jax/data/beam/) reads its input shards in
    parallel with exactly the single-process reader.
    """
    try:
        data = _read_bytes(path)
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: a corrupt gzip stream
        skipped.add(B.UNREADABLE, path, str(e))
        return
    if not data.strip():
        skipped.add(B.EMPTY_FILE, path)
        return
    if path.endswith((".txt", ".txt.gz")):
        if len(data) > max_record_bytes:
            skipped.add(B.TOO_LARGE, path, f"{len(data):,} bytes")
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            skipped.add(B.INVALID_UTF8, path, f"byte {e.start}")
            return
        yield {"text": text, "source": os.path.basename(path).split(".")[0]}
        return
    yield from _jsonl_documents(path, data, skipped, max_record_bytes)


def nothing_usable(paths: Sequence[str], skipped: SkipReport) -> PrepareError:
    """The one error for input with no usable document (names the files and why)."""
    return PrepareError(f"nothing usable in --input ({', '.join(paths[:3])}"
                        f"{', ...' if len(paths) > 3 else ''}): {skipped.summary()}.")


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
        for doc in read_file(path, skipped, max_record_bytes):
            produced += 1
            yield doc
    if not produced:
        raise nothing_usable(paths, skipped)


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


def write_reports(output: str, report) -> None:
    with atomic_file(os.path.join(output, "report.json"), "w", encoding="utf-8") as f:
        f.write(report.to_json() + "\n")
    with atomic_file(os.path.join(output, "report.md"), "w", encoding="utf-8") as f:
        f.write(report.to_markdown())
