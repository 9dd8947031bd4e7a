"""Text and chat records from a tensorflow-datasets dataset already prepared on disk
(array_record or parquet), read offline: never downloads, no TensorFlow needed.

    tfds_documents(name, data_dir, split)   documents {"text", ...} (sources.py's "tfds" source)
    TfdsRecords(data, where, convert)       SFT / DPO records of a split, via chat_records
    find_prepared_tfds(name, data_dir)      which prepared version / config a name means

tfds_builder.build_local_tfds prepares one from local files.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Mapping

import grain
import numpy as np

from geb_jax.data import chat_records
from geb_jax.data.bad_input import MissingInputError, SkipReport, SourceError

log = logging.getLogger(__name__)


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


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
        raise MissingInputError(
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
    data, full = tfds_data_source(name, data_dir, split)
    features = getattr(getattr(data, "dataset_info", None), "features", None)
    if features is not None and hasattr(features, "keys") and field not in features.keys():
        raise SourceError(f"tfds dataset {full!r} has no feature {field!r} (its features: "
                          f"{', '.join(map(repr, sorted(features.keys())))})")
    return grain.MapDataset.source(data).map(_DecodeTfds(field, lang, f"tfds {full} {split}"))


def tfds_data_source(name: str, data_dir, split: str):
    """(tfds.data_source of a prepared dataset's split, its full name); never downloads."""
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
    return data, full


def plain(value: Any) -> Any:
    """A tfds example as plain Python: UTF-8 bytes -> str, numpy arrays / scalars -> lists /
    numbers, recursively (so chat_records sees what a JSON line would hold)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()] if value.ndim else plain(value.item())
    if isinstance(value, np.generic):
        return plain(value.item())
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


class TfdsRecords:
    """Random-access chat records of a tfds split: plain(example) -> convert -> canonical.

    validate=True checks every example once here (bad ones leave the index, counted in
    `skipped`); otherwise a bad example reads as None (grain drops it), counted when read.
    strict (bad_records="error") raises a SourceError naming the example and the reason.
    """

    def __init__(self, data, where: str, convert, *, lang: str | None = None,
                 validate: bool = True, strict: bool = False):
        self.data, self.where, self.convert = data, where, convert
        self.lang, self.strict = lang or None, strict
        self.skipped = SkipReport()
        self.indices = None
        if validate:
            good = [i for i in range(len(data)) if self._record(i) is not None]
            if not good:
                raise SourceError(f"nothing usable in {where}: {len(data)} examples - "
                                  f"{self.skipped.summary()}")
            if len(good) != len(data):
                self.indices = np.asarray(good, np.int64)
        if self.skipped.total:
            log.warning("%s: %s (see TfdsRecords.skipped)", where, self.skipped.summary())

    def _record(self, i: int) -> dict | None:
        where = f"{self.where}[{i}]"
        try:
            record = self.convert(plain(self.data[i]))
        except chat_records.RecordError as e:
            if self.strict:
                raise SourceError(f"{where}: {e.reason}: {e.detail}") from None
            self.skipped.add(e.reason, where, e.detail)
            return None
        record["source"] = where
        if self.lang:
            record["lang"] = self.lang
        return record

    def __len__(self) -> int:
        return len(self.data) if self.indices is None else len(self.indices)

    def __getitem__(self, index: int) -> dict | None:
        return self._record(int(index) if self.indices is None else int(self.indices[index]))

    def __repr__(self) -> str:
        return f"TfdsRecords({self.where}, {len(self)} records, {self.skipped.summary()})"



__all__ = ["tfds_documents", "tfds_data_source", "find_prepared_tfds", "default_tfds_data_dir",
           "TfdsRecords", "plain"]
