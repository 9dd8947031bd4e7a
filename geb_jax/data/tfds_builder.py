"""A tensorflow-datasets builder of our own: local text files -> an array_record tfds dataset.

    name = build_local_tfds("corpus/*.jsonl", "/data/tfds", valid_fraction=0.05)
    docs = tfds_source.tfds_documents(name, data_dir="/data/tfds", split="train")

`GebLocalText` ("geb_local_text") reads the files with `sources.LocalSource` (so every format
of `sources.local_documents`: .txt, .jsonl, .jsonl.gz, .parquet) and writes the features
{"text": Text, "source": Text ("path:line")} into splits "train" and "validation", split by
`sources.split_of` (a hash of the text: deterministic, duplicates stay together, and the same
documents as data.source="local" with the same valid_fraction). A split that would be empty
is not written (tfds cannot write empty splits).

No TensorFlow is needed (checked with tfds 4.9.10, TensorFlow not installed): with
file_format="array_record" (or "parquet") tfds writes through the array_record (pyarrow)
writer and its pure-Python shuffler; only the default "tfrecord" format imports TensorFlow
(it fails with "No module named 'tensorflow'"). The data lands in
data_dir/geb_local_text[/<config>]/1.0.0/; `config` names a dataset so several can share a
data_dir ("geb_local_text/en", "geb_local_text/zh").

Nothing is downloaded: the builder ignores tfds' download manager (its download folder is a
temporary directory that is deleted afterwards). tfds shuffles examples by a hash of their key
(the document's index), so a split's order is fixed but is not the files' order.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Sequence

import tensorflow_datasets as tfds
from etils import epath

from geb_jax.data.local_files import expand as _expand
from geb_jax.data.sources import LocalSource, SourceError, _check_fraction, hash_split_indices

log = logging.getLogger(__name__)

NAME = "geb_local_text"
TFDS_SPLITS = {"train": "train", "valid": "validation"}


class GebLocalText(tfds.core.GeneratorBasedBuilder):
    """Documents of local text files (sources.local_documents) as a tfds dataset."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Local files: text and source, hash-split train/validation."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds 4.9.10 resolves the code path of a builder defined in a package through the
        # `importlib_resources` backport, which it only installs on Python < 3.9, so
        # download_and_prepare fails with "No module named 'importlib_resources'" on 3.11.
        # This file is the code path (tfds uses it only to look for a checksums.tsv: none).
        return epath.Path(__file__)

    def __init__(self, *, pattern: str | Sequence[str] | None = None, field: str = "text",
                 valid_fraction: float = 0.05, txt_unit: str = "file", **kwargs):
        """pattern / field / txt_unit as in sources.local_documents; pattern=None to read."""
        self._pattern = pattern
        self._field = field
        self._valid_fraction = _check_fraction(valid_fraction)
        self._txt_unit = txt_unit
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Documents of local text files (geb_jax.data.tfds_builder).",
            features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(),
                "source": tfds.features.Text(),
            }),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        if not self._pattern:
            raise SourceError("GebLocalText needs pattern= (a glob of local files) to "
                              "generate the dataset")
        source = LocalSource(self._pattern, field=self._field, txt_unit=self._txt_unit,
                             validate=True)
        parts = hash_split_indices(source, self._valid_fraction)
        if len(parts["train"]) == 0:
            raise SourceError(f"all {len(source)} documents of {self._pattern!r} fell into the "
                              f"validation split (valid_fraction={self._valid_fraction}): "
                              f"lower valid_fraction or add documents")
        if len(parts["valid"]) == 0 and self._valid_fraction > 0:
            log.warning("%s: none of the %d documents fell into the validation split "
                        "(valid_fraction=%s); only 'train' is written", self._pattern,
                        len(source), self._valid_fraction)
        self.info.metadata.update(input_fingerprint(
            self._pattern, field=self._field, valid_fraction=self._valid_fraction,
            txt_unit=self._txt_unit))
        return {TFDS_SPLITS[k]: self._generate_examples(source, idx)
                for k, idx in parts.items() if len(idx)}

    def _generate_examples(self, source: LocalSource, indices):
        for i in indices:
            doc = source[int(i)]
            yield int(i), {"text": doc["text"], "source": doc["source"]}


def input_fingerprint(pattern, *, field: str, valid_fraction: float, txt_unit: str) -> dict:
    """What a build read: the arguments and each file's path, size and mtime, plus a hash."""
    files = [[os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns]
             for p in _expand(pattern)]
    inputs = {"pattern": pattern if isinstance(pattern, str) else list(map(str, pattern)),
              "field": field, "valid_fraction": float(valid_fraction), "txt_unit": txt_unit,
              "files": files}
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return {"inputs": inputs, "fingerprint": digest}


def build_local_tfds(pattern: str | Sequence[str], data_dir: str | os.PathLike, *,
                     field: str = "text", valid_fraction: float = 0.05,
                     txt_unit: str = "file", config: str | None = None,
                     overwrite: bool = False) -> str:
    """Prepare the "geb_local_text" tfds dataset (array_record) of local files; offline.

    Returns the name to give tfds_source.tfds_documents ("geb_local_text" or
    "geb_local_text/<config>"). If the dataset is already prepared from the same inputs
    (arguments, file paths, sizes and mtimes) it is reused; if it was prepared from other
    inputs, FileExistsError unless overwrite=True (then it is rebuilt).
    """
    data_dir = os.path.expanduser(os.fspath(data_dir))
    builder = GebLocalText(
        pattern=pattern, field=field, valid_fraction=valid_fraction, txt_unit=txt_unit,
        data_dir=data_dir, file_format="array_record",
        config=tfds.core.BuilderConfig(name=config) if config else None)
    name = f"{NAME}/{config}" if config else NAME
    mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    folder = os.fspath(builder.data_path)
    if os.path.isfile(os.path.join(folder, "dataset_info.json")):
        wanted = input_fingerprint(pattern, field=field, valid_fraction=valid_fraction,
                                   txt_unit=txt_unit)
        try:
            with open(os.path.join(folder, "metadata.json"), encoding="utf-8") as f:
                found = json.load(f).get("fingerprint")
        except (OSError, ValueError):
            found = None
        if found == wanted["fingerprint"]:
            return name
        if not overwrite:
            raise FileExistsError(
                f"{folder} already holds a {name!r} dataset built from other inputs (or "
                f"files changed since); pass overwrite=True to rebuild it, or choose another "
                f"data_dir or config")
        mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS  # regenerate
    with tempfile.TemporaryDirectory(prefix="geb_tfds_downloads_") as downloads:
        builder.download_and_prepare(
            download_dir=downloads,
            download_config=tfds.download.DownloadConfig(download_mode=mode,
                                                         try_download_gcs=False))
    return name


__all__ = ["GebLocalText", "build_local_tfds", "input_fingerprint", "NAME", "TFDS_SPLITS"]
