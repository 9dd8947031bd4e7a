"""Every way text gets into training, offline: built-in corpus, local files, tfds, mixtures.

Each source is a `grain.MapDataset` of documents - dicts {"text": str, "source": str} (plus
"lang" when one is known) - with random access (`ds[i]`, `len(ds)`), so grain can shuffle,
shard and checkpoint it by index; `pipeline.pretrain_dataset` accepts any of them as is.

    builtin_source(split, lang)          the corpus shipped in geb_jax/data/builtin
    local_documents(pattern, ...)        .txt / .jsonl / .jsonl.gz / .parquet files by glob
    tfds_documents(name, data_dir, ...)  a tensorflow-datasets dataset already prepared on disk
                                         (array_record or parquet; never downloads; no
                                         TensorFlow needed). tfds_builder.build_local_tfds
                                         prepares one from local files.
    documents_from_config(config.data, split)   dispatch on config.data.source, including
                                         "mixture" (-> `Mixture`, the arguments of
                                         pipeline.mixture); texts_source_from_config also
                                         applies the mixture.

Local files (`local_documents`)
-------------------------------
Files are indexed once, at construction; a document is then read from disk on each access:
* .txt: one document per file (txt_unit="file", the file's exact text), or one per paragraph
  (txt_unit="paragraph": maximal runs of non-blank lines; the text is the lines as written,
  without the final line break). Index: byte offsets of the paragraphs.
* .jsonl: one JSON object per non-blank line, the text in `field`. Index: byte offset, length
  and line number of each record (24 bytes a document); a record is read with one seek.
* .jsonl.gz: the same, but the file is decompressed into memory at construction and kept
  there (gzip has no random access): the decompressed .jsonl.gz files must fit in memory. For
  larger corpora decompress them, or convert them once with tfds_builder.build_local_tfds.
* .parquet: the string column `field` (via pyarrow); a row is read by loading its row group's
  column, and the last few row groups are cached. Reading in index order is cheap; a shuffled
  pass over large Parquet files reads a whole row group per document - convert big ones with
  build_local_tfds (array_record: true random access).
validate=True (default) parses every record at construction, so malformed input fails before
training starts (one pass over the data); validate=False only indexes, and a bad record then
fails when it is read. Either way the error names the file and line (JSONL), row (Parquet) or
the available columns.

Train / validation for local files: a separate glob (`valid_path`), or a deterministic split
by a hash of the text (`split_of`, like the built-in corpus: identical texts always land in the
same split, so duplicates cannot leak). build_local_tfds uses the same hash, so a tfds dataset
built from files has the same train/validation documents as the "local" source of those files.
"""
from __future__ import annotations

import collections
import glob
import gzip
import hashlib
import io
import json
import os
import re
import threading
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import grain
import numpy as np

SOURCES = ("builtin", "local", "tfds", "mixture")
SPLITS = ("train", "valid")
TXT_UNITS = ("file", "paragraph")
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
PARQUET_CACHE_ROW_GROUPS = 4  # decoded row groups kept per Parquet file

# The config.data fields this module reads, with their defaults (see geb_jax/config_base.py).
# A missing field falls back to its default here; entries of `mixture` take the same keys
# (except source="mixture") plus "weight" (required) and "name" (optional).
DATA_DEFAULTS: dict[str, Any] = dict(
    source="builtin",          # builtin | local | tfds | mixture
    path="",                   # local: glob of .txt / .jsonl / .jsonl.gz / .parquet files
    valid_path="",             # local: glob of the validation files; "" = hash split of path
    valid_fraction=0.05,       # local without valid_path: share of documents held out
    field="text",              # local / tfds: the field (JSON key, column, feature) of the text
    txt_unit="file",           # local .txt: "file" or "paragraph" (blank-line separated)
    lang="",                   # builtin: keep only this language ("en", "zh", "code",
                               # comma-separated); local / tfds: tag documents with it
    validate=True,             # local: parse every record when the source is built
    tfds_name="",              # tfds: name[/config][:version], e.g. "geb_local_text"
    tfds_data_dir="",          # tfds: the folder it was prepared in ("" = $TFDS_DATA_DIR or
                               # ~/tensorflow_datasets)
    tfds_train_split="train",  # tfds split read for split="train"
    tfds_valid_split="validation",  # tfds split read for split="valid"
    mixture=(),                # mixture: [{"source": ..., "weight": w, ...}, ...]
)
_ENTRY_KEYS = (set(DATA_DEFAULTS) - {"mixture"}) | {"weight", "name"}


class SourceError(ValueError):
    """A source is misconfigured or its data is malformed (the message says where)."""


# ----------------------------------------------------------------------------- helpers
def text_hash(text: str) -> int:
    """64-bit hash of a text (sha256), as experiments/build_builtin_corpus.py uses."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:16], 16)


def _check_fraction(valid_fraction: float) -> float:
    if not isinstance(valid_fraction, (int, float)) or not 0 <= valid_fraction < 1:
        raise SourceError(f"valid_fraction must be a number in [0, 1), got {valid_fraction!r}")
    return float(valid_fraction)


def split_of(text: str, valid_fraction: float) -> str:
    """"valid" for about `valid_fraction` of texts (chosen by hash, deterministic), else "train"."""
    return "valid" if text_hash(text) < valid_fraction * 2.0**64 else "train"


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _kind(path: str) -> str:
    lower = path.lower()
    for suffix in (".jsonl.gz", ".jsonl", ".txt", ".parquet"):
        if lower.endswith(suffix):
            return suffix
    raise SourceError(f"{path}: unsupported file type; local sources read "
                      f"{', '.join(SUFFIXES)} files")


def _expand(pattern: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
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
            raise FileNotFoundError(f"no files match the pattern {p!r}{hint}")
        files.update(dict.fromkeys(found))
    return list(files)


# ----------------------------------------------------------------------------- local files
class _TxtFile:
    """A .txt file read as one document."""

    def __init__(self, path: str, validate: bool):
        self.path = path
        self.count = 1
        if validate:
            self.read(0)

    def read(self, k: int) -> tuple[str, str]:
        with open(self.path, "rb") as f:
            return _decode(f.read(), self.path), self.path


class _LineIndexed:
    """Byte ranges (start, end) and first line numbers of the records of a file."""

    path: str
    starts: np.ndarray
    ends: np.ndarray
    lines: np.ndarray
    _buffer: bytes | None = None

    def _set_index(self, starts, ends, lines) -> None:
        self.starts = np.asarray(starts, np.int64)
        self.ends = np.asarray(ends, np.int64)
        self.lines = np.asarray(lines, np.int64)
        self.count = len(self.starts)

    def _bytes(self, k: int) -> bytes:
        start, end = int(self.starts[k]), int(self.ends[k])
        buf = self._memory()
        if buf is not None:
            return buf[start:end]
        with open(self.path, "rb") as f:  # opened per read: thread-safe, no fd kept open
            f.seek(start)
            return f.read(end - start)

    def _memory(self) -> bytes | None:
        return None

    def where(self, k: int) -> str:
        return f"{self.path}:{int(self.lines[k])}"


class _ParagraphFile(_LineIndexed):
    """A .txt file read as blank-line separated paragraphs."""

    def __init__(self, path: str, validate: bool):
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
        self._set_index(*(zip(*spans) if spans else ((), (), ())))
        if validate:
            for k in range(self.count):
                self.read(k)

    def read(self, k: int) -> tuple[str, str]:
        where = self.where(k)
        return _decode(self._bytes(k), where), where


class _JsonlFile(_LineIndexed):
    """A .jsonl (or .jsonl.gz, decompressed into memory) file, one JSON object a line."""

    def __init__(self, path: str, field: str, validate: bool):
        self.path, self.field = path, field
        self.gz = path.lower().endswith(".gz")
        self._lock = threading.Lock()
        starts, ends, lines = [], [], []
        offset = 0
        with self._open() as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    starts.append(offset)
                    ends.append(offset + len(line.rstrip(b"\r\n")))
                    lines.append(lineno)
                    if validate:
                        self._parse(line, lineno)
                offset += len(line)
        self._set_index(starts, ends, lines)

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
            raise SourceError(f"{self.path}: not a readable gzip file ({e})") from None

    def _memory(self) -> bytes | None:
        if not self.gz:
            return None
        with self._lock:
            if self._buffer is None:  # after unpickling: decompress again, once
                self._buffer = self._decompress()
            return self._buffer

    def _parse(self, line: bytes, lineno: int) -> str:
        where = f"{self.path}:{lineno}"
        try:
            obj = json.loads(line)
        except UnicodeDecodeError as e:
            raise SourceError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") \
                from None
        except json.JSONDecodeError as e:
            raise SourceError(f"{where}: not valid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise SourceError(f"{where}: expected a JSON object with a {self.field!r} field, "
                              f"got a {type(obj).__name__}")
        if self.field not in obj:
            raise SourceError(f"{where}: the JSON object has no field {self.field!r} "
                              f"(its fields: {', '.join(map(repr, obj)) or 'none'})")
        text = obj[self.field]
        if not isinstance(text, str):
            raise SourceError(f"{where}: field {self.field!r} is a {type(text).__name__}, "
                              f"not a string")
        return text

    def read(self, k: int) -> tuple[str, str]:
        lineno = int(self.lines[k])
        return self._parse(self._bytes(k), lineno), f"{self.path}:{lineno}"

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_lock"] = None
        if self.gz:
            state["_buffer"] = None  # re-decompressed lazily where it is unpickled
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


class _ParquetFile:
    """A Parquet file's string column `field`, one document a row."""

    def __init__(self, path: str, field: str, validate: bool):
        pq = _pyarrow_parquet()
        self.path, self.field = path, field
        try:
            meta = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid (a ValueError) and others
            raise SourceError(f"{path}: not a readable Parquet file ({e})") from None
        schema = meta.schema_arrow
        if field not in schema.names:
            raise SourceError(f"{path}: Parquet file has no column {field!r} (its columns: "
                              f"{', '.join(map(repr, schema.names)) or 'none'})")
        import pyarrow as pa
        kind = schema.field(field).type
        string_types = (pa.types.is_string(kind) or pa.types.is_large_string(kind)
                        or getattr(pa.types, "is_string_view", lambda t: False)(kind))
        if not string_types:
            raise SourceError(f"{path}: column {field!r} has type {kind}, not a string type")
        sizes = [meta.metadata.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.offsets = np.cumsum([0] + sizes).astype(np.int64)
        self.count = int(self.offsets[-1])
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict = collections.OrderedDict()
        if validate:
            for g in range(len(sizes)):
                column = self._row_group(g)
                if column.null_count:
                    row = int(self.offsets[g]) + int(np.flatnonzero(
                        np.asarray(column.is_null()))[0])
                    raise SourceError(f"{path}: row {row}: column {field!r} is null")

    def _row_group(self, g: int):
        with self._lock:
            if g in self._cache:
                self._cache.move_to_end(g)
                return self._cache[g]
            pq = _pyarrow_parquet()
            column = pq.ParquetFile(self.path).read_row_group(g, columns=[self.field])
            column = column.column(0).combine_chunks()
            self._cache[g] = column
            while len(self._cache) > PARQUET_CACHE_ROW_GROUPS:
                self._cache.popitem(last=False)
            return column

    def read(self, k: int) -> tuple[str, str]:
        g = int(np.searchsorted(self.offsets, k, side="right")) - 1
        value = self._row_group(g)[k - int(self.offsets[g])].as_py()
        where = f"{self.path}:row {k}"
        if value is None:
            raise SourceError(f"{self.path}: row {k}: column {self.field!r} is null")
        return value, where

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_lock"], state["_cache"] = None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._cache = collections.OrderedDict()


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is a dependency
        raise ImportError("reading .parquet files needs pyarrow (pip install pyarrow)") from e
    return pq


class LocalSource:
    """Random-access documents of local files (see the module docstring); picklable.

    Usually used through `local_documents`, which wraps it in a grain.MapDataset.
    """

    def __init__(self, pattern: str | os.PathLike | Sequence[str | os.PathLike], *,
                 field: str = "text", lang: str | None = None, txt_unit: str = "file",
                 validate: bool = True):
        if txt_unit not in TXT_UNITS:
            raise SourceError(f"txt_unit must be one of {TXT_UNITS}, got {txt_unit!r}")
        if not isinstance(field, str) or not field:
            raise SourceError(f"field must be a non-empty string, got {field!r}")
        self.pattern, self.field, self.lang, self.txt_unit = pattern, field, lang or None, \
            txt_unit
        self.paths = _expand(pattern)
        self.files = []
        for path in self.paths:
            kind = _kind(path)
            if kind == ".txt":
                f = (_TxtFile(path, validate) if txt_unit == "file"
                     else _ParagraphFile(path, validate))
            elif kind == ".parquet":
                f = _ParquetFile(path, field, validate)
            else:
                f = _JsonlFile(path, field, validate)
            self.files.append(f)
        self.offsets = np.cumsum([0] + [f.count for f in self.files]).astype(np.int64)
        if self.offsets[-1] == 0:
            raise SourceError(f"the {len(self.paths)} file(s) matching {pattern!r} hold no "
                              f"documents")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"document index {index} out of range for {n} documents")
        i = int(np.searchsorted(self.offsets, index, side="right")) - 1
        text, where = self.files[i].read(index - int(self.offsets[i]))
        doc = {"text": text, "source": where}
        if self.lang:
            doc["lang"] = self.lang
        return doc

    def __repr__(self) -> str:
        return (f"LocalSource(pattern={self.pattern!r}, files={len(self.paths)}, "
                f"documents={len(self)})")


class _Subset:
    """Documents `indices` of a random-access source, in that order."""

    def __init__(self, source, indices: Sequence[int], name: str):
        self.source, self.indices, self.name = source, np.asarray(indices, np.int64), name

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.source[int(self.indices[index])]

    def __repr__(self) -> str:
        return f"_Subset({self.name}, {len(self)} of {len(self.source)})"


def hash_split_indices(source, valid_fraction: float) -> dict[str, np.ndarray]:
    """{"train": indices, "valid": indices} of a source's documents by `split_of` (one pass)."""
    valid_fraction = _check_fraction(valid_fraction)
    is_valid = np.fromiter((split_of(source[i]["text"], valid_fraction) == "valid"
                            for i in range(len(source))), bool, count=len(source))
    return {"train": np.flatnonzero(~is_valid), "valid": np.flatnonzero(is_valid)}


def local_documents(pattern: str | os.PathLike | Sequence[str | os.PathLike], *,
                    field: str = "text", lang: str | None = None, txt_unit: str = "file",
                    validate: bool = True) -> grain.MapDataset:
    """Documents of the files matching `pattern` (sorted), in file order then record order.

    Elements: {"text": str, "source": "path:line" (JSONL, paragraphs), "path:row N" (Parquet)
    or "path" (whole .txt)} plus {"lang": lang} when `lang` is given (a tag for all of them).
    See the module docstring for the formats, the index and the memory limits.
    """
    return grain.MapDataset.source(LocalSource(pattern, field=field, lang=lang,
                                               txt_unit=txt_unit, validate=validate))


# ----------------------------------------------------------------------------- builtin
def builtin_source(split: str, lang: str | Iterable[str] | None = None) -> grain.MapDataset:
    """The built-in corpus (corpus.builtin_documents) as a MapDataset; `lang` filters."""
    from geb_jax.data.corpus import builtin_documents

    if isinstance(lang, str):
        lang = tuple(x.strip() for x in lang.split(",") if x.strip()) or None
    return grain.MapDataset.source(list(builtin_documents(split, lang)))


# ----------------------------------------------------------------------------- tfds
_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def _prepared_versions(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted((v for v in os.listdir(folder) if _VERSION_RE.match(v)
                   and os.path.isfile(os.path.join(folder, v, "dataset_info.json"))),
                  key=_version_key)


def default_tfds_data_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"),
                                                            "tensorflow_datasets")


def find_prepared_tfds(name: str, data_dir: str) -> tuple[str, str]:
    """(name/config:version, its folder) of a dataset prepared under data_dir; never downloads.

    `name` is "dataset[/config][:version]"; without a version the newest prepared one is used,
    without a config the dataset's only prepared config (or none). FileNotFoundError (naming
    the dataset and data_dir, and how to prepare it) when nothing is there.
    """
    base_config, _, version = name.partition(":")
    base, _, config = base_config.partition("/")
    if not base:
        raise SourceError(f"empty tfds dataset name {name!r}")
    root = os.path.join(data_dir, base)
    if not config and not _prepared_versions(root) and os.path.isdir(root):
        configs = sorted(c for c in os.listdir(root)
                         if not _VERSION_RE.match(c) and _prepared_versions(os.path.join(root, c)))
        if len(configs) > 1:
            raise SourceError(f"tfds dataset {base!r} has several configs prepared under "
                              f"{data_dir!r} ({', '.join(configs)}): name one, e.g. "
                              f"'{base}/{configs[0]}'")
        if configs:
            config = configs[0]
    folder = os.path.join(root, config) if config else root
    versions = _prepared_versions(folder)
    if version and version not in versions:
        versions = []
    if not versions:
        raise FileNotFoundError(
            f"tfds dataset {name!r} is not prepared under data_dir {data_dir!r} (no "
            f"{os.path.join(folder, version or '<version>', 'dataset_info.json')}). "
            f"tfds_documents never downloads: prepare it first - for local files with "
            f"geb_jax.data.tfds_builder.build_local_tfds(pattern, {data_dir!r}) (read back as "
            f"'geb_local_text'), for a tfds catalog dataset with tfds.builder({base!r}, "
            f"data_dir=..., file_format='array_record').download_and_prepare() on a machine "
            f"with network access, then copy its folder under this data_dir")
    version = version or versions[-1]
    full = f"{base}/{config}:{version}" if config else f"{base}:{version}"
    return full, os.path.join(folder, version)


class _DecodeTfds:
    """tfds example -> document: `field` decoded into "text", other UTF-8 bytes decoded."""

    def __init__(self, field: str, lang: str | None, where: str):
        self.field, self.lang, self.where = field, lang or None, where

    def __call__(self, example: Mapping[str, Any]) -> dict:
        doc = {}
        for k, v in example.items():
            if isinstance(v, bytes):
                try:
                    v = v.decode("utf-8")
                except UnicodeDecodeError:
                    pass
            doc[k] = v
        text = example[self.field]
        if isinstance(text, bytes):
            text = _decode(text, f"{self.where} field {self.field!r}")
        if not isinstance(text, str):
            raise SourceError(f"{self.where}: feature {self.field!r} is a "
                              f"{type(text).__name__}, not text")
        doc["text"] = text
        if self.lang:
            doc["lang"] = self.lang
        return doc


def tfds_documents(name: str, *, data_dir: str | os.PathLike | None, split: str,
                   field: str = "text", lang: str | None = None) -> grain.MapDataset:
    """A tfds dataset prepared under `data_dir` (array_record or parquet), read offline.

    Uses `tfds.data_source(..., download=False)`: random access, no TensorFlow. `name` is
    "dataset[/config][:version]"; `split` a tfds split ("train", "validation", "train[:10%]").
    Elements: the example's features with bytes decoded to str, and "text" = feature `field`.
    data_dir None means tfds' default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
    """
    import tensorflow_datasets as tfds

    data_dir = os.path.expanduser(os.fspath(data_dir)) if data_dir else default_tfds_data_dir()
    full, folder = find_prepared_tfds(name, data_dir)
    with open(os.path.join(folder, "dataset_info.json"), encoding="utf-8") as f:
        info = json.load(f)
    splits = [s.get("name") for s in info.get("splits", [])]
    if re.fullmatch(r"[\w\-]+", split) and split not in splits:
        raise SourceError(f"tfds dataset {full!r} in {data_dir!r} has no split {split!r}; its "
                          f"splits: {', '.join(map(repr, splits)) or 'none'}")
    try:
        data = tfds.data_source(full, data_dir=data_dir, split=split, download=False)
    except NotImplementedError as e:
        raise SourceError(
            f"tfds dataset {full!r} in {data_dir!r} was prepared as "
            f"{info.get('fileFormat', 'tfrecord')!r}, which has no random access (and needs "
            f"TensorFlow): prepare it again with file_format='array_record'") from e
    features = getattr(getattr(data, "dataset_info", None), "features", None)
    if features is not None and hasattr(features, "keys") and field not in features.keys():
        raise SourceError(f"tfds dataset {full!r} has no feature {field!r} (its features: "
                          f"{', '.join(map(repr, sorted(features.keys())))})")
    return grain.MapDataset.source(data).map(_DecodeTfds(field, lang, f"tfds {full} {split}"))


# ----------------------------------------------------------------------------- config
class Mixture(NamedTuple):
    """The arguments of pipeline.mixture: `pipeline.mixture(m.datasets, m.weights, seed)`."""
    datasets: dict[str, grain.MapDataset]
    weights: dict[str, float]


def _as_dict(spec: Any) -> dict:
    if isinstance(spec, Mapping):
        return dict(spec)
    if hasattr(spec, "to_dict"):  # ml_collections.ConfigDict
        return spec.to_dict()
    raise SourceError(f"a data source spec must be a dict or ConfigDict, got "
                      f"{type(spec).__name__}")


def _get(config: Any, key: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, DATA_DEFAULTS[key])
    if hasattr(config, "get"):  # ConfigDict
        return config.get(key, DATA_DEFAULTS[key])
    return getattr(config, key, DATA_DEFAULTS[key])


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise SourceError(f"unknown split {split!r}; expected one of {SPLITS}")
    return split


def _local_from_config(config: Any, split: str, what: str) -> grain.MapDataset:
    path, valid_path = _get(config, "path"), _get(config, "valid_path")
    if not path and not (split == "valid" and valid_path):
        raise SourceError(f"{what}.path is empty: set it to a glob of .txt / .jsonl / "
                          f".jsonl.gz / .parquet files, e.g. 'data/*.jsonl'")
    common = dict(field=_get(config, "field"), lang=_get(config, "lang") or None,
                  txt_unit=_get(config, "txt_unit"), validate=bool(_get(config, "validate")))
    if valid_path:  # separate validation files: each split is all of its files
        return local_documents(valid_path if split == "valid" else path, **common)
    valid_fraction = _check_fraction(_get(config, "valid_fraction"))
    if valid_fraction == 0:
        if split == "valid":
            raise SourceError(f"{what} has no validation documents: set {what}.valid_path to "
                              f"a glob, or {what}.valid_fraction > 0 to hold out a share of "
                              f"{what}.path")
        return local_documents(path, **common)
    source = LocalSource(path, **common)
    indices = hash_split_indices(source, valid_fraction)[split]
    if len(indices) == 0:
        raise SourceError(f"the {split!r} split of {path!r} is empty ({len(source)} documents, "
                          f"valid_fraction={valid_fraction})")
    return grain.MapDataset.source(_Subset(source, indices, f"{path}:{split}"))


def _single_from_config(config: Any, split: str, what: str) -> grain.MapDataset:
    source = _get(config, "source")
    if source == "builtin":
        return builtin_source(split, _get(config, "lang") or None)
    if source == "local":
        return _local_from_config(config, split, what)
    if source == "tfds":
        name = _get(config, "tfds_name")
        if not name:
            raise SourceError(f"{what}.tfds_name is empty: set it to a prepared dataset, e.g. "
                              f"'geb_local_text' (see tfds_builder.build_local_tfds)")
        tfds_split = _get(config, "tfds_train_split" if split == "train"
                          else "tfds_valid_split")
        return tfds_documents(name, data_dir=_get(config, "tfds_data_dir") or None,
                              split=tfds_split, field=_get(config, "field"),
                              lang=_get(config, "lang") or None)
    if source == "mixture":
        raise SourceError(f"{what}: a mixture entry cannot itself be a mixture")
    raise SourceError(f"unknown {what}.source {source!r}; expected one of {SOURCES}")


def documents_from_config(data_config: Any, split: str) -> grain.MapDataset | Mixture:
    """The documents of `split` ("train" / "valid") that config.data describes.

    Returns a MapDataset for source builtin / local / tfds, and a `Mixture` (datasets and
    weights for pipeline.mixture) for source "mixture". Fields: DATA_DEFAULTS.
    """
    _check_split(split)
    source = _get(data_config, "source")
    if source not in SOURCES:
        raise SourceError(f"unknown data.source {source!r}; expected one of {SOURCES}")
    if source != "mixture":
        return _single_from_config(data_config, split, "data")
    entries = list(_get(data_config, "mixture") or ())
    if not entries:
        raise SourceError("data.source is 'mixture' but data.mixture is empty: give a list "
                          "of {'source': ..., 'weight': ..., ...} entries")
    datasets: dict[str, grain.MapDataset] = {}
    weights: dict[str, float] = {}
    for i, entry in enumerate(entries):
        entry = _as_dict(entry)
        what = f"data.mixture[{i}]"
        unknown = set(entry) - _ENTRY_KEYS
        if unknown:
            raise SourceError(f"{what} has unknown key(s) {sorted(unknown)}; valid keys: "
                              f"{sorted(_ENTRY_KEYS)}")
        if "source" not in entry:
            raise SourceError(f"{what} has no 'source' (one of {SOURCES[:-1]})")
        weight = entry.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise SourceError(f"{what} needs a positive 'weight', got {weight!r}")
        name = str(entry.get("name") or f"{i}_{entry['source']}")
        if name in datasets:
            raise SourceError(f"{what}: duplicate mixture name {name!r}")
        datasets[name] = _single_from_config(entry, split, what)
        weights[name] = float(weight)
    return Mixture(datasets, weights)


def texts_source_from_config(data_config: Any, split: str, *, seed: int) -> grain.MapDataset:
    """documents_from_config, with a Mixture turned into pipeline.mixture(..., seed)."""
    docs = documents_from_config(data_config, split)
    if isinstance(docs, Mixture):
        from geb_jax.data import pipeline
        return pipeline.mixture(docs.datasets, docs.weights, seed)
    return docs


__all__ = [
    "SOURCES", "SPLITS", "TXT_UNITS", "DATA_DEFAULTS", "SourceError", "LocalSource",
    "Mixture", "local_documents", "builtin_source", "tfds_documents", "find_prepared_tfds",
    "documents_from_config", "texts_source_from_config", "split_of", "text_hash",
    "hash_split_indices", "default_tfds_data_dir",
]
