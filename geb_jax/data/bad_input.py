"""Counting bad input instead of crashing on it: one `SkipReport` per source or prepare run.

Real corpora contain empty files, invalid UTF-8, absurd single lines, JSON records without the
text field and Parquet columns of the wrong type. A long run must not die on record 10^8 for
that, so readers skip such records, count them here by reason (with a few examples that name
file and line), and only a source with *nothing* usable is an error.
"""
from __future__ import annotations

import collections
import threading

# Reasons, as they appear in reports.
EMPTY_FILE = "empty file"
UNREADABLE = "unreadable file"
INVALID_UTF8 = "invalid UTF-8"
TOO_LARGE = "record too large"
INVALID_JSON = "invalid JSON"
NOT_OBJECT = "JSON line not an object"
MISSING_FIELD = "text field missing"
NOT_TEXT = "text field not a string"
NULL_TEXT = "text value null"
COLUMN_MISSING = "Parquet column missing"
COLUMN_NOT_TEXT = "Parquet column not text"

DEFAULT_MAX_RECORD_BYTES = 16 * 2**20  # a record (document) larger than this is skipped
MAX_EXAMPLES = 5


class SkipReport:
    """Thread-safe counts of skipped records by reason, plus the first few "where: why"."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: collections.Counter = collections.Counter()
        self.examples: list[str] = []

    def add(self, reason: str, where: str, detail: str = "", n: int = 1) -> None:
        with self._lock:
            self.counts[reason] += n
            if len(self.examples) < MAX_EXAMPLES:
                self.examples.append(f"{where}: {reason}" + (f" ({detail})" if detail else ""))

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def as_dict(self) -> dict:
        with self._lock:
            return {"skipped": dict(sorted(self.counts.items())), "examples": list(self.examples)}

    def summary(self) -> str:
        """One line: "3 skipped (2 invalid JSON, 1 empty file); e.g. a.jsonl:4: invalid JSON"."""
        with self._lock:
            if not self.counts:
                return "nothing skipped"
            parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items()))
            first = f"; e.g. {self.examples[0]}" if self.examples else ""
            return f"{sum(self.counts.values())} skipped ({parts}){first}"

    def __repr__(self) -> str:
        return f"SkipReport({self.summary()})"

    def __getstate__(self):  # picklable (grain worker processes): counts copy, lock renews
        with self._lock:
            return {"counts": collections.Counter(self.counts), "examples": list(self.examples)}

    def __setstate__(self, state):
        self.__init__()
        self.counts.update(state["counts"])
        self.examples.extend(state["examples"])


class SourceError(ValueError):
    """A source is misconfigured or has nothing usable (the message says which file / field)."""


class MissingInputError(SourceError, FileNotFoundError):
    """No file matches a pattern, or a dataset is not prepared: a SourceError (the entry points
    print it as one `error:` line) that is also the FileNotFoundError it is."""
