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

    pretokenized_documents(path, split, tokenizer)   token ids written by
                                         geb_jax.data.pretokenize (array_record), checked
                                         against the run's tokenizer (data.source="pretokenized")

Local files (`local_documents`): see geb_jax/data/local_files.py for the formats, the index,
memory limits and bad input. In short: malformed records (empty files, invalid UTF-8, records
over data.max_record_bytes, JSON lines without the text field or with a non-string one, Parquet
files whose column is missing or not text, nulls) are skipped and counted in
`LocalSource.skipped` (logged once when the source is built), never raised mid-run; a source
with nothing usable is one SourceError naming its files; data.bad_records="error" raises at the
first bad record instead. .jsonl.gz files are decompressed into memory, and a shuffled pass
over big Parquet files reads a whole row group per document: convert large corpora once with
tfds_builder.build_local_tfds or pre-tokenize them (geb_jax.data.pretokenize).

Train / validation for local files: a separate glob (`valid_path`), or a deterministic split
by a hash of the text (`split_of`, like the built-in corpus: identical texts always land in the
same split, so duplicates cannot leak). build_local_tfds uses the same hash, so a tfds dataset
built from files has the same train/validation documents as the "local" source of those files.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import grain
import numpy as np

from geb_jax.data.bad_input import DEFAULT_MAX_RECORD_BYTES, SkipReport, SourceError
from geb_jax.data.local_files import BAD_RECORDS, SUFFIXES, TXT_UNITS, LocalSource

SOURCES = ("builtin", "local", "tfds", "pretokenized", "mixture")
SPLITS = ("train", "valid")

# The config.data fields this module reads, with their defaults (see geb_jax/config_base.py).
# A missing field falls back to its default here; entries of `mixture` take the same keys
# (except source="mixture") plus "weight" (required) and "name" (optional).
DATA_DEFAULTS: dict[str, Any] = dict(
    source="builtin",          # builtin | local | tfds | pretokenized | mixture
    path="",                   # local: glob of .txt / .jsonl / .jsonl.gz / .parquet files;
                               # pretokenized: the folder geb_jax.data.pretokenize wrote
    valid_path="",             # local: glob of the validation files; "" = hash split of path
    valid_fraction=0.05,       # local without valid_path: share of documents held out
    field="text",              # local / tfds: the field (JSON key, column, feature) of the text
    txt_unit="file",           # local .txt: "file" or "paragraph" (blank-line separated)
    lang="",                   # builtin: keep only this language ("en", "zh", "code",
                               # comma-separated); local / tfds: tag documents with it
    validate=True,             # local: parse every record when the source is built
    bad_records="skip",        # local: "skip" (count) or "error" on a malformed record
    max_record_bytes=DEFAULT_MAX_RECORD_BYTES,  # local: larger records are skipped
    tfds_name="",              # tfds: name[/config][:version], e.g. "geb_local_text"
    tfds_data_dir="",          # tfds: the folder it was prepared in ("" = $TFDS_DATA_DIR or
                               # ~/tensorflow_datasets)
    tfds_train_split="train",  # tfds split read for split="train"
    tfds_valid_split="validation",  # tfds split read for split="valid"
    mixture=(),                # mixture: [{"source": ..., "weight": w, ...}, ...]
)
_ENTRY_KEYS = (set(DATA_DEFAULTS) - {"mixture"}) | {"weight", "name"}




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


def local_source(dataset: grain.MapDataset) -> LocalSource | None:
    """The LocalSource under a dataset from local_documents (for its `skipped` report)."""
    while dataset is not None:
        source = getattr(dataset, "_source", None)
        if isinstance(source, _Subset):
            source = source.source
        if isinstance(source, LocalSource):
            return source
        parents = getattr(dataset, "parents", ())
        dataset = parents[0] if parents else None
    return None


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


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
                    validate: bool = True, bad_records: str = "skip",
                    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> grain.MapDataset:
    """Documents of the files matching `pattern` (sorted), in file order then record order.

    Elements: {"text": str, "source": "path:line" (JSONL, paragraphs), "path:row N" (Parquet)
    or "path" (whole .txt)} plus {"lang": lang} when `lang` is given (a tag for all of them).
    Bad records are skipped and counted (local_files.py); the LocalSource behind the dataset,
    with its `skipped` report, is `local_source(ds)`.
    """
    return grain.MapDataset.source(LocalSource(
        pattern, field=field, lang=lang, txt_unit=txt_unit, validate=validate,
        bad_records=bad_records, max_record_bytes=max_record_bytes))


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
                  txt_unit=_get(config, "txt_unit"), validate=bool(_get(config, "validate")),
                  bad_records=_get(config, "bad_records"),
                  max_record_bytes=_get(config, "max_record_bytes"))
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


def _single_from_config(config: Any, split: str, what: str, tokenizer=None
                        ) -> grain.MapDataset:
    source = _get(config, "source")
    if source == "pretokenized":
        from geb_jax.data.pretokenize import pretokenized_documents
        if not _get(config, "path"):
            raise SourceError(f"{what}.path is empty: set it to the folder written by "
                              f"python -m geb_jax.data.pretokenize")
        if tokenizer is None:
            raise SourceError(f"{what}.source is 'pretokenized': pass the run's tokenizer "
                              f"(texts_source_from_config(..., tokenizer=tok)) so its hash can "
                              f"be checked against the ids on disk")
        return pretokenized_documents(_get(config, "path"), split, tokenizer)
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


def documents_from_config(data_config: Any, split: str, tokenizer=None
                          ) -> grain.MapDataset | Mixture:
    """The documents of `split` ("train" / "valid") that config.data describes.

    `tokenizer` (the run's) is needed for pre-tokenized sources: their ids must come from it.

    Returns a MapDataset for source builtin / local / tfds, and a `Mixture` (datasets and
    weights for pipeline.mixture) for source "mixture". Fields: DATA_DEFAULTS.
    """
    _check_split(split)
    source = _get(data_config, "source")
    if source not in SOURCES:
        raise SourceError(f"unknown data.source {source!r}; expected one of {SOURCES}")
    if source != "mixture":
        return _single_from_config(data_config, split, "data", tokenizer)
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
        datasets[name] = _single_from_config(entry, split, what, tokenizer)
        weights[name] = float(weight)
    return Mixture(datasets, weights)


def texts_source_from_config(data_config: Any, split: str, *, seed: int,
                             tokenizer=None) -> grain.MapDataset:
    """documents_from_config, with a Mixture turned into pipeline.mixture(..., seed).

    Elements are documents {"text": ...}, or {"tokens": int32 ids} from pre-tokenized sources
    (pipeline.pretrain_dataset takes both).
    """
    docs = documents_from_config(data_config, split, tokenizer)
    if isinstance(docs, Mixture):
        from geb_jax.data import pipeline
        return pipeline.mixture(docs.datasets, docs.weights, seed)
    return docs


__all__ = [
    "SOURCES", "SPLITS", "TXT_UNITS", "SUFFIXES", "BAD_RECORDS", "DATA_DEFAULTS",
    "SourceError", "SkipReport", "LocalSource", "local_source",
    "Mixture", "local_documents", "builtin_source", "tfds_documents", "find_prepared_tfds",
    "documents_from_config", "texts_source_from_config", "split_of", "text_hash",
    "hash_split_indices", "default_tfds_data_dir",
]
