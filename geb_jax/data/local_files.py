"""Random-access documents of local .txt / .jsonl / .jsonl.gz / .parquet files (`LocalSource`).

Files are indexed once, at construction; a document is then read from disk on each access:
* .txt: one document per file (txt_unit="file", the file's exact text), or one per paragraph
  (txt_unit="paragraph": maximal runs of non-blank lines; the text is the lines as written,
  without the final line break). Index: byte offsets of the paragraphs.
* .jsonl: one JSON object per non-blank line, the text in `field`. Index: byte offset, length
  and line number of each record (24 bytes a document); a record is read with one seek.
* .jsonl.gz: the same, but the file is decompressed into memory at construction and kept
  there (gzip has no random access): the decompressed .jsonl.gz files must fit in memory.
* .parquet: the string column `field` (via pyarrow); a row is read by loading its row group's
  column, and the last few row groups are cached.

Bad input (bad_records="skip", the default) is skipped and counted in `LocalSource.skipped`
(a bad_input.SkipReport), never raised in the middle of a run: empty files, invalid UTF-8,
records over `max_record_bytes` (a 50 MB single line), JSON lines that are not JSON, not an
object, without `field` or with a non-string value, Parquet files without the column or with a
non-text column, null values. With validate=True (default) every record is checked at
construction and bad ones leave the index; with validate=False a bad record is found when read
and comes back as an empty document (which the pipelines skip), counted the same way. Only a
source with nothing usable raises, one SourceError naming the files and why. bad_records="error"
raises at the first bad record instead (naming file and line).

Records (`convert` given: the SFT / DPO stages, see data/chat_records.py): a document is a whole
JSON object or Parquet row (every column), passed through `convert(record)` -> canonical dict;
a chat_records.RecordError is a bad record like the above, counted under its reason code
("missing_field", "empty_reply", ...). Such documents are the canonical dict plus "source"
(file:line / file:row N); unvalidated, a bad one reads as None, which grain drops. .txt files
hold no records.
"""
from __future__ import annotations

import collections
import glob
import gzip
import io
import json
import logging
import os
import threading
from typing import Sequence

import numpy as np

from geb_jax.data import bad_input as B
from geb_jax.data.bad_input import MissingInputError, SkipReport, SourceError
from geb_jax.data.chat_records import RecordError

log = logging.getLogger(__name__)

TXT_UNITS = ("file", "paragraph")
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
BAD_RECORDS = ("skip", "error")
PARQUET_CACHE_ROW_GROUPS = 4  # decoded row groups kept per Parquet file


class _Bad(Exception):
    """A bad record: reason (a bad_input constant), where, and a message for strict mode."""

    def __init__(self, reason: str, where: str, message: str, detail: str = ""):
        super().__init__(message)
        self.reason, self.where, self.message, self.detail = reason, where, message, detail


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Bad(B.INVALID_UTF8, where, f"{where}: not valid UTF-8 ({e.reason} at byte "
                                          f"{e.start})") from None


def _kind(path: str) -> str:
    lower = path.lower()
    for suffix in (".jsonl.gz", ".jsonl", ".txt", ".parquet"):
        if lower.endswith(suffix):
            return suffix
    raise SourceError(f"{path}: unsupported file type; local sources read "
                      f"{', '.join(SUFFIXES)} files")


def expand(pattern: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Sorted files matching a glob (or each of several globs), `**` allowed; no dirs."""
    patterns = ([pattern] if isinstance(pattern, (str, os.PathLike)) else list(pattern))
    if not patterns:
        raise SourceError("no file pattern given (an empty list)")
    files: dict[str, None] = {}
    for p in patterns:
        p = os.path.expanduser(os.fspath(p))
        if not p:
            raise SourceError("the file pattern is empty: set it to a glob such as "
                              "'data/*.jsonl'")
        matches = glob.glob(p, recursive=True)
        found = sorted(m for m in matches if os.path.isfile(m))
        if not found:
            hint = (" (it names only directories: add a file glob, e.g. "
                    f"{os.path.join(p, '*.jsonl')!r})" if matches else "")
            raise MissingInputError(f"no files match the pattern {p!r}{hint}; point data.path "
                                    "(or data.valid_path) at files that exist")
        files.update(dict.fromkeys(found))
    return list(files)


class _Checks:
    """What every file reader needs: the size limit, strictness and the shared SkipReport."""

    def __init__(self, max_record_bytes: int, strict: bool, skipped: SkipReport):
        self.max_record_bytes, self.strict, self.skipped = max_record_bytes, strict, skipped

    def bad(self, e: _Bad) -> None:
        if self.strict:
            raise SourceError(e.message) from None
        self.skipped.add(e.reason, e.where, e.detail)

    def size(self, n: int, where: str) -> None:
        if n > self.max_record_bytes:
            raise _Bad(B.TOO_LARGE, where, f"{where}: record of {n:,} bytes is larger than "
                       f"max_record_bytes={self.max_record_bytes:,}")


# ----------------------------------------------------------------------------- file readers
class _TxtFile:
    """A .txt file read as one document."""

    def __init__(self, path: str, validate: bool, checks: _Checks):
        self.path, self.count = path, 1
        try:
            size = os.path.getsize(path)
            if size == 0:
                raise _Bad(B.EMPTY_FILE, path, f"{path}: empty file")
            checks.size(size, path)
            if validate:
                self.read(0)
        except _Bad as e:
            checks.bad(e)
            self.count = 0

    def read(self, k: int) -> tuple[str, str]:
        with open(self.path, "rb") as f:
            return _decode(f.read(), self.path), self.path


class _LineIndexed:
    """Byte ranges (start, end) and first line numbers of the records of a file."""

    path: str
    _buffer: bytes | None = None

    def _set_index(self, spans) -> None:
        starts, ends, lines = zip(*spans) if spans else ((), (), ())
        self.starts = np.asarray(starts, np.int64)
        self.ends = np.asarray(ends, np.int64)
        self.lines = np.asarray(lines, np.int64)
        self.count = len(self.starts)

    def _range(self, start: int, end: int) -> bytes:
        buf = self._memory()
        if buf is not None:
            return buf[start:end]
        with open(self.path, "rb") as f:  # opened per read: thread-safe, no fd kept open
            f.seek(start)
            return f.read(end - start)

    def _bytes(self, k: int) -> bytes:
        return self._range(int(self.starts[k]), int(self.ends[k]))

    def _memory(self) -> bytes | None:
        return None

    def where(self, k: int) -> str:
        return f"{self.path}:{int(self.lines[k])}"

    @staticmethod
    def _check(record: bytes | None, where: str, checks: _Checks, size: int, parse) -> bool:
        """True when the record is usable: size within the limit, and `parse` passes."""
        try:
            checks.size(size, where)
            if parse is not None:
                parse(record, where)
        except _Bad as e:
            checks.bad(e)
            return False
        return True


class _ParagraphFile(_LineIndexed):
    """A .txt file read as blank-line separated paragraphs."""

    def __init__(self, path: str, validate: bool, checks: _Checks):
        self.path = path
        spans = []  # (start byte, end byte, first line number) of each paragraph
        offset, start, end, first = 0, None, 0, 0
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    if start is None:
                        start, first = offset, lineno
                    end = offset + len(line.rstrip(b"\r\n"))
                elif start is not None:
                    spans.append((start, end, first))
                    start = None
                offset += len(line)
        if start is not None:
            spans.append((start, end, first))
        if not spans:
            checks.bad(_Bad(B.EMPTY_FILE, path, f"{path}: no text (empty file)"))
        self._set_index([(a, b, line) for a, b, line in spans if self._check(
            self._range(a, b) if validate and b - a <= checks.max_record_bytes else None,
            f"{path}:{line}", checks, b - a, _decode if validate else None)])

    def read(self, k: int) -> tuple[str, str]:
        where = self.where(k)
        return _decode(self._bytes(k), where), where


class _JsonlFile(_LineIndexed):
    """A .jsonl (or .jsonl.gz, decompressed into memory) file, one JSON object a line."""

    def __init__(self, path: str, field: str, validate: bool, checks: _Checks, convert=None):
        self.path, self.field, self.convert = path, field, convert
        self.gz = path.lower().endswith(".gz")
        self._lock = threading.Lock()
        spans, seen = [], False
        offset = 0
        try:
            with self._open() as f:
                for lineno, line in enumerate(f, 1):
                    record = line.rstrip(b"\r\n")
                    if line.strip() and self._check(
                            record, f"{path}:{lineno}", checks, len(record),
                            self._parse if validate else None):
                        spans.append((offset, offset + len(record), lineno))
                    seen = seen or bool(line.strip())
                    offset += len(line)
        except _Bad as e:
            checks.bad(e)
            spans = []
        else:
            if not seen:
                checks.bad(_Bad(B.EMPTY_FILE, path, f"{path}: no JSON lines (empty file)"))
        self._set_index(spans)

    def _open(self):
        if not self.gz:
            return open(self.path, "rb")
        self._buffer = self._decompress()
        return io.BytesIO(self._buffer)

    def _decompress(self) -> bytes:
        try:
            with gzip.open(self.path, "rb") as f:
                return f.read()
        except (OSError, EOFError) as e:
            raise _Bad(B.UNREADABLE, self.path, f"{self.path}: not a readable gzip file "
                                                f"({e})") from None

    def _memory(self) -> bytes | None:
        if not self.gz:
            return None
        with self._lock:
            if self._buffer is None:  # after unpickling: decompress again, once
                self._buffer = self._decompress()
            return self._buffer

    def _parse(self, line: bytes, where: str) -> str | dict:
        try:
            obj = json.loads(line)
        except UnicodeDecodeError as e:
            raise _Bad(B.INVALID_UTF8, where, f"{where}: not valid UTF-8 ({e.reason} at byte "
                                              f"{e.start})") from None
        except json.JSONDecodeError as e:
            raise _Bad(B.INVALID_JSON, where, f"{where}: not valid JSON: {e.msg} (column "
                                              f"{e.colno})") from None
        if self.convert is not None:
            if not isinstance(obj, dict):
                raise _Bad(B.NOT_OBJECT, where, f"{where}: expected a JSON object, got a "
                                                f"{type(obj).__name__}")
            return _convert(self.convert, obj, where)
        if not isinstance(obj, dict):
            raise _Bad(B.NOT_OBJECT, where, f"{where}: expected a JSON object with a "
                                            f"{self.field!r} field, got a {type(obj).__name__}")
        if self.field not in obj:
            raise _Bad(B.MISSING_FIELD, where, f"{where}: the JSON object has no field "
                       f"{self.field!r} (its fields: {', '.join(map(repr, obj)) or 'none'})")
        text = obj[self.field]
        if not isinstance(text, str):
            raise _Bad(B.NOT_TEXT, where, f"{where}: field {self.field!r} is a "
                                          f"{type(text).__name__}, not a string")
        return text

    def read(self, k: int) -> tuple[str | dict, str]:
        where = self.where(k)
        return self._parse(self._bytes(k), where), where

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_lock"] = None
        if self.gz:
            state["_buffer"] = None  # re-decompressed lazily where it is unpickled
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _convert(convert, record: dict, where: str) -> dict:
    """convert(record), a chat_records.RecordError becoming a bad record counted by reason."""
    try:
        return convert(record)
    except RecordError as e:
        raise _Bad(e.reason, where, f"{where}: {e.reason}: {e.detail}", e.detail) from None


def _record_bytes(record: dict) -> int:
    """About the size of a Parquet row (its JSON), for max_record_bytes."""
    return len(json.dumps(record, ensure_ascii=False, default=str).encode("utf-8"))


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is a dependency
        raise ImportError("reading .parquet files needs pyarrow (pip install pyarrow)") from e
    return pq


class _ParquetFile:
    """A Parquet file's string column `field`, one document a (non-null) row; with `convert`,
    whole rows (all columns) as records."""

    def __init__(self, path: str, field: str, validate: bool, checks: _Checks, convert=None):
        self.path, self.field, self.convert = path, field, convert
        self.count, self.rows = 0, None
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict = collections.OrderedDict()
        try:
            self._index(validate, checks)
        except _Bad as e:
            checks.bad(e)
            self.count, self.rows = 0, None

    def _index(self, validate: bool, checks: _Checks) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc  # a submodule: `import pyarrow` alone does not load it
        pq = _pyarrow_parquet()
        path, field = self.path, self.field
        try:
            meta = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid (a ValueError) and others
            raise _Bad(B.UNREADABLE, path, f"{path}: not a readable Parquet file ({e})") \
                from None
        if self.convert is not None:
            return self._index_records(meta, validate, checks)
        schema = meta.schema_arrow
        if field not in schema.names:
            raise _Bad(B.COLUMN_MISSING, path, f"{path}: Parquet file has no column {field!r} "
                       f"(its columns: {', '.join(map(repr, schema.names)) or 'none'})")
        kind = schema.field(field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
                or getattr(pa.types, "is_string_view", lambda t: False)(kind)):
            raise _Bad(B.COLUMN_NOT_TEXT, path, f"{path}: column {field!r} has type {kind}, "
                                                f"not a string type")
        sizes = [meta.metadata.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.offsets = np.cumsum([0] + sizes).astype(np.int64)
        self.count = int(self.offsets[-1])
        if self.count == 0:
            raise _Bad(B.EMPTY_FILE, path, f"{path}: Parquet file has no rows")
        if not validate:
            return
        keep = []
        for g in range(len(sizes)):
            column = self._row_group(g)
            lengths = np.asarray(pc.binary_length(column).fill_null(-1))
            for i in np.flatnonzero((lengths < 0) | (lengths > checks.max_record_bytes)):
                row = int(self.offsets[g]) + int(i)
                where = f"{path}:row {row}"
                reason = B.NULL_TEXT if lengths[i] < 0 else B.TOO_LARGE
                checks.bad(_Bad(reason, where, f"{where}: column {field!r} is " + (
                    "null" if lengths[i] < 0 else f"{lengths[i]:,} bytes > max_record_bytes")))
            keep.append(int(self.offsets[g]) + np.flatnonzero(
                (lengths >= 0) & (lengths <= checks.max_record_bytes)))
        rows = np.concatenate(keep).astype(np.int64)
        if len(rows) != self.count:
            self.rows, self.count = rows, len(rows)

    def _index_records(self, meta, validate: bool, checks: _Checks) -> None:
        sizes = [meta.metadata.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.offsets = np.cumsum([0] + sizes).astype(np.int64)
        self.count = int(self.offsets[-1])
        if self.count == 0:
            raise _Bad(B.EMPTY_FILE, self.path, f"{self.path}: Parquet file has no rows")
        if not validate:
            return
        keep = []
        for g in range(len(sizes)):
            for i, record in enumerate(self._row_group(g).to_pylist()):
                row = int(self.offsets[g]) + i
                where = f"{self.path}:row {row}"
                try:
                    checks.size(_record_bytes(record), where)
                    _convert(self.convert, record, where)
                except _Bad as e:
                    checks.bad(e)
                else:
                    keep.append(row)
        if len(keep) != self.count:
            self.rows, self.count = np.asarray(keep, np.int64), len(keep)

    def _row_group(self, g: int):
        """Row group g: its `field` column, or (records) the whole table."""
        with self._lock:
            if g in self._cache:
                self._cache.move_to_end(g)
                return self._cache[g]
            pq = _pyarrow_parquet()
            if self.convert is not None:
                column = pq.ParquetFile(self.path).read_row_group(g)
            else:
                column = pq.ParquetFile(self.path).read_row_group(g, columns=[self.field])
                column = column.column(0).combine_chunks()
            self._cache[g] = column
            while len(self._cache) > PARQUET_CACHE_ROW_GROUPS:
                self._cache.popitem(last=False)
            return column

    def read(self, k: int) -> tuple[str | dict, str]:
        row = int(self.rows[k]) if self.rows is not None else k
        g = int(np.searchsorted(self.offsets, row, side="right")) - 1
        where = f"{self.path}:row {row}"
        if self.convert is not None:
            record = self._row_group(g).slice(row - int(self.offsets[g]), 1).to_pylist()[0]
            return _convert(self.convert, record, where), where
        value = self._row_group(g)[row - int(self.offsets[g])].as_py()
        if value is None:
            raise _Bad(B.NULL_TEXT, where, f"{where}: column {self.field!r} is null")
        return value, where

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_lock"], state["_cache"] = None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._cache = collections.OrderedDict()


# ----------------------------------------------------------------------------- the source
class LocalSource:
    """Random-access documents of local files (see the module docstring); picklable.

    Usually used through `sources.local_documents`, which wraps it in a grain.MapDataset.
    `skipped` (a SkipReport) counts the bad records left out (or, unvalidated, met on read).
    """

    def __init__(self, pattern: str | os.PathLike | Sequence[str | os.PathLike], *,
                 field: str = "text", lang: str | None = None, txt_unit: str = "file",
                 validate: bool = True, max_record_bytes: int = B.DEFAULT_MAX_RECORD_BYTES,
                 bad_records: str = "skip", convert=None):
        if txt_unit not in TXT_UNITS:
            raise SourceError(f"txt_unit must be one of {TXT_UNITS}, got {txt_unit!r}")
        if not isinstance(field, str) or not field:
            raise SourceError(f"field must be a non-empty string, got {field!r}")
        if bad_records not in BAD_RECORDS:
            raise SourceError(f"bad_records must be one of {BAD_RECORDS}, got {bad_records!r}")
        if isinstance(max_record_bytes, bool) or not isinstance(max_record_bytes, int) \
                or max_record_bytes < 1:
            raise SourceError(f"max_record_bytes must be a positive integer, got "
                              f"{max_record_bytes!r}")
        self.pattern, self.field, self.lang, self.txt_unit = pattern, field, lang or None, \
            txt_unit
        self.convert = convert
        self.skipped = SkipReport()
        self._checks = _Checks(max_record_bytes, bad_records == "error", self.skipped)
        self.paths = expand(pattern)
        self.files = [self._open(path, validate) for path in self.paths]
        self.offsets = np.cumsum([0] + [f.count for f in self.files]).astype(np.int64)
        if self.offsets[-1] == 0:
            raise SourceError(
                f"nothing usable in the {len(self.paths)} file(s) matching {pattern!r} "
                f"({', '.join(self.paths[:3])}{', ...' if len(self.paths) > 3 else ''}): they "
                f"hold no documents - {self.skipped.summary()}. Check the files, "
                + (f"data.format and data.max_record_bytes={max_record_bytes} (the sft / dpo "
                   f"stages read chat records, geb_jax/data/chat_records.py; a run that also "
                   f"pretrains gives those stages their own data in "
                   f"config.stage_overrides.<stage>.data)" if convert is not None else
                   f"data.field={field!r} and data.max_record_bytes={max_record_bytes}"))
        if self.skipped.total:
            log.warning("%s: %s (see LocalSource.skipped)", pattern, self.skipped.summary())

    def _open(self, path: str, validate: bool):
        kind, checks = _kind(path), self._checks
        if self.convert is not None:
            if kind == ".txt":
                raise SourceError(f"{path}: a .txt file holds no records; SFT / DPO data is read "
                                  f"from .jsonl, .jsonl.gz or .parquet files")
            if kind == ".parquet":
                return _ParquetFile(path, self.field, validate, checks, self.convert)
            return _JsonlFile(path, self.field, validate, checks, self.convert)
        if kind == ".txt":
            return (_TxtFile(path, validate, checks) if self.txt_unit == "file"
                    else _ParagraphFile(path, validate, checks))
        if kind == ".parquet":
            return _ParquetFile(path, self.field, validate, checks)
        return _JsonlFile(path, self.field, validate, checks)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> dict | None:
        n = len(self)
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"document index {index} out of range for {n} documents")
        i = int(np.searchsorted(self.offsets, index, side="right")) - 1
        try:
            text, where = self.files[i].read(index - int(self.offsets[i]))
        except _Bad as e:  # only without validation: an empty document (no record), counted
            self._checks.bad(e)
            if self.convert is not None:
                return None  # grain drops None elements
            text, where = "", e.where
        if self.convert is not None:
            doc = dict(text, source=where)
            if self.lang:
                doc["lang"] = self.lang
            return doc
        doc = {"text": text, "source": where}
        if self.lang:
            doc["lang"] = self.lang
        return doc

    def __repr__(self) -> str:
        return (f"LocalSource(pattern={self.pattern!r}, files={len(self.paths)}, "
                f"documents={len(self)}, {self.skipped.summary()})")
