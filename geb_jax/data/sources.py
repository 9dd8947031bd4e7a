"""Every way text gets into training, offline: built-in corpus, local files, tfds, mixtures.

Each source is a `grain.MapDataset` of documents - dicts {"text": str, "source": str} (plus
"lang" when one is known) - with random access (`ds[i]`, `len(ds)`), so grain can shuffle,
shard and checkpoint it by index; `pretrain_pipeline.pretrain_dataset` accepts any as is.

    builtin_source(split, lang)          the corpus shipped in geb_jax/data/builtin
    local_documents(pattern, ...)        .txt / .jsonl / .jsonl.gz / .parquet files by glob
    tfds_documents(name, data_dir, ...)  a tensorflow-datasets dataset already prepared on disk
                                         (data/tfds_source.py: array_record or parquet; never
                                         downloads; no TensorFlow needed).
                                         tfds_builder.build_local_tfds prepares one from local
                                         files.
    documents_from_config(config.data, split)   dispatch on config.data.source, including
                                         "mixture" (-> `Mixture`, the arguments of
                                         pipeline.mixture); texts_source_from_config also
                                         applies the mixture.

    pretokenized_documents(path, split, tokenizer)   token ids written by
                                         geb_jax.data.pretokenize (array_record), read by
                                         data/pretokenized.py and checked against the run's
                                         tokenizer (data.source="pretokenized")

Local files (`local_documents`): see geb_jax/data/local_files.py for the formats, the index,
memory limits and bad input. In short: malformed records (empty files, invalid UTF-8, records
over data.max_record_bytes, JSON lines without the text field or with a non-string one, Parquet
files whose column is missing or not text, nulls) are skipped and counted in
`LocalSource.skipped` (logged once when the source is built), never raised mid-run; a source
with nothing usable is one SourceError naming its files; data.bad_records="error" raises at the
first bad record instead. .jsonl.gz files are decompressed into memory, and a shuffled pass
over big Parquet files reads a whole row group per document: convert large corpora once with
tfds_builder.build_local_tfds or pre-tokenize them (geb_jax.data.pretokenize).

SFT / DPO records (`conversations_source_from_config`, `pairs_source_from_config`): the same
sources read whole records instead of a text field - JSON objects of .jsonl / .jsonl.gz lines,
Parquet rows, tfds examples - each turned into the canonical conversation / preference pair by
data/chat_records.py (layout detected per record, or forced by data.format). A record that does
not fit (no assistant turn, empty reply, unknown role, chosen == rejected, ...) is a bad record
like the above: skipped and counted under its reason code ("missing_field", "empty_reply", ...)
with file:line, or with data.bad_records="error" a SourceError naming file:line and the reason.
data.source="builtin" is the built-in demo conversations / pairs (data/demo_tasks.py).
`skip_reports(dataset)` finds the SkipReports under any of these datasets.

Train / validation for local files: a separate glob (`valid_path`), or a deterministic split
by a hash of the text (`split_of`, like the built-in corpus: identical texts always land in the
same split, so duplicates cannot leak). build_local_tfds uses the same hash, so a tfds dataset
built from files has the same train/validation documents as the "local" source of those files.
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import grain
import numpy as np

from geb_jax.data import chat_records
from geb_jax.data.bad_input import DEFAULT_MAX_RECORD_BYTES, SkipReport, SourceError
from geb_jax.data.corpus import builtin_documents
from geb_jax.data.demo_tasks import builtin_dpo_pairs, builtin_sft_conversations
from geb_jax.data.local_files import BAD_RECORDS, SUFFIXES, TXT_UNITS, LocalSource
from geb_jax.data.pipeline import mixture
from geb_jax.data.pretokenized import pretokenized_documents
from geb_jax.data.tfds_source import TfdsRecords, tfds_data_source, tfds_documents

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
    format="auto",             # sft / dpo records: a layout of data/chat_records.py, or "auto"
)
_ENTRY_KEYS = (set(DATA_DEFAULTS) - {"mixture"}) | {"weight", "name"}

log = logging.getLogger(__name__)




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


def _doc_text(doc) -> str:
    return doc["text"]


def hash_split_indices(source, valid_fraction: float, text_of=None) -> dict[str, np.ndarray]:
    """{"train": indices, "valid": indices} of a source's documents by `split_of` (one pass).

    `text_of(doc)` is the text hashed (default doc["text"]; for chat records the canonical
    record, chat_records.canonical_text). A None document (an unvalidated bad record) is "train".
    """
    valid_fraction = _check_fraction(valid_fraction)
    text_of = text_of or _doc_text

    def is_valid(i: int) -> bool:
        doc = source[i]
        return doc is not None and split_of(text_of(doc), valid_fraction) == "valid"

    is_valid = np.fromiter((is_valid(i) for i in range(len(source))), bool, count=len(source))
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
    if isinstance(lang, str):
        lang = tuple(x.strip() for x in lang.split(",") if x.strip()) or None
    return grain.MapDataset.source(list(builtin_documents(split, lang)))


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


def _local_from_config(config: Any, split: str, what: str, convert=None) -> grain.MapDataset:
    """Local documents of `split`; with `convert` (chat records) whole records, converted."""
    path, valid_path = _get(config, "path"), _get(config, "valid_path")
    if not path and not (split == "valid" and valid_path):
        kinds = ".jsonl / .jsonl.gz / .parquet" if convert else \
            ".txt / .jsonl / .jsonl.gz / .parquet"
        raise SourceError(f"{what}.path is empty: set it to a glob of {kinds} files, e.g. "
                          f"'data/*.jsonl'")
    common = dict(field=_get(config, "field"), lang=_get(config, "lang") or None,
                  txt_unit=_get(config, "txt_unit"), validate=bool(_get(config, "validate")),
                  bad_records=_get(config, "bad_records"),
                  max_record_bytes=_get(config, "max_record_bytes"))
    if convert is not None:
        common["convert"] = convert
    if valid_path:  # separate validation files: each split is all of its files
        return grain.MapDataset.source(LocalSource(valid_path if split == "valid" else path,
                                                   **common))
    valid_fraction = _check_fraction(_get(config, "valid_fraction"))
    if valid_fraction == 0:
        if split == "valid":
            raise SourceError(f"{what} has no validation documents: set {what}.valid_path to "
                              f"a glob, or {what}.valid_fraction > 0 to hold out a share of "
                              f"{what}.path")
        return grain.MapDataset.source(LocalSource(path, **common))
    source = LocalSource(path, **common)
    text_of = chat_records.canonical_text if convert is not None else None
    indices = hash_split_indices(source, valid_fraction, text_of)[split]
    if len(indices) == 0:
        raise SourceError(f"the {split!r} split of {path!r} is empty ({len(source)} documents, "
                          f"valid_fraction={valid_fraction})")
    return grain.MapDataset.source(_Subset(source, indices, f"{path}:{split}"))


def _single_from_config(config: Any, split: str, what: str, tokenizer=None
                        ) -> grain.MapDataset:
    source = _get(config, "source")
    if source == "pretokenized":
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
    return _mixture_from_config(
        data_config, lambda entry, what: _single_from_config(entry, split, what, tokenizer))


def _mixture_from_config(data_config: Any, build) -> Mixture:
    """data.mixture checked entry by entry; build(entry, what) makes each dataset."""
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
        datasets[name] = build(entry, what)
        weights[name] = float(weight)
    return Mixture(datasets, weights)


def texts_source_from_config(data_config: Any, split: str, *, seed: int,
                             tokenizer=None) -> grain.MapDataset:
    """documents_from_config, with a Mixture turned into pipeline.mixture(..., seed).

    Elements are documents {"text": ...}, or {"tokens": int32 ids} from pre-tokenized sources
    (pretrain_pipeline.pretrain_dataset takes both).
    """
    docs = documents_from_config(data_config, split, tokenizer)
    if isinstance(docs, Mixture):
        return mixture(docs.datasets, docs.weights, seed)
    return docs


# ----------------------------------------------------------------------------- SFT / DPO
RECORD_SOURCES = ("builtin", "local", "tfds", "mixture")


def _builtin_records(stage: str, split: str) -> list[dict]:
    return builtin_sft_conversations(split) if stage == "sft" else builtin_dpo_pairs(split)


def _records_single(config: Any, split: str, what: str, stage: str) -> grain.MapDataset | list:
    source = _get(config, "source")
    if source == "builtin":
        return _builtin_records(stage, split)
    try:
        convert = chat_records.normalizer(stage, _get(config, "format"))
    except ValueError as e:
        raise SourceError(f"{what}: {e}") from None
    if source == "local":
        return _local_from_config(config, split, what, convert=convert)
    if source == "tfds":
        name = _get(config, "tfds_name")
        if not name:
            raise SourceError(f"{what}.tfds_name is empty: set it to a prepared dataset")
        tfds_split = _get(config, "tfds_train_split" if split == "train"
                          else "tfds_valid_split")
        bad_records = _get(config, "bad_records")
        if bad_records not in BAD_RECORDS:
            raise SourceError(f"{what}.bad_records must be one of {BAD_RECORDS}, got "
                              f"{bad_records!r}")
        data, full = tfds_data_source(name, _get(config, "tfds_data_dir") or None, tfds_split)
        return grain.MapDataset.source(TfdsRecords(
            data, f"tfds {full} {tfds_split}", convert, lang=_get(config, "lang") or None,
            validate=bool(_get(config, "validate")), strict=bad_records == "error"))
    if source == "mixture":
        raise SourceError(f"{what}: a mixture entry cannot itself be a mixture")
    if source == "pretokenized":
        raise SourceError(f"{what}.source='pretokenized' holds token ids without roles; the "
                          f"{stage} stage reads {RECORD_SOURCES}")
    raise SourceError(f"unknown {what}.source {source!r}; the {stage} stage reads one of "
                      f"{RECORD_SOURCES}")


def records_source_from_config(data_config: Any, split: str, *, stage: str, seed: int):
    """The SFT conversations ({"messages": [...]}) or DPO pairs ({"prompt", "chosen",
    "rejected"}) of `split` that config.data describes, for stage "sft" / "dpo".

    data.source: "builtin" (the demo sets, a list), "local" (.jsonl / .jsonl.gz / .parquet by
    glob; file:line known), "tfds" (a prepared dataset) or "mixture" of those (pipeline.mixture
    with `seed`). Records go through data/chat_records.py with data.format. Train / valid split
    as for pretraining: data.valid_path, or a hash of the canonical record (data.valid_fraction).
    """
    if stage not in ("sft", "dpo"):
        raise SourceError(f"records are read by the sft and dpo stages, not {stage!r}")
    _check_split(split)
    if _get(data_config, "source") != "mixture":
        return _records_single(data_config, split, "data", stage)
    mix = _mixture_from_config(data_config, lambda entry, what: _as_map(
        _records_single(entry, split, what, stage)))
    return mixture(mix.datasets, mix.weights, seed)


def _as_map(records):
    return records if isinstance(records, grain.MapDataset) else grain.MapDataset.source(records)


def conversations_source_from_config(data_config: Any, split: str, *, seed: int):
    """SFT conversations {"messages": [...]} for chat_pipeline.sft_dataset (records_source_...)."""
    return records_source_from_config(data_config, split, stage="sft", seed=seed)


def pairs_source_from_config(data_config: Any, split: str, *, seed: int):
    """DPO pairs {"prompt", "chosen", "rejected"} for chat_pipeline.dpo_dataset."""
    return records_source_from_config(data_config, split, stage="dpo", seed=seed)


def skip_reports(dataset) -> dict[str, SkipReport]:
    """{source description: SkipReport} of every local / tfds source under a dataset (a
    MapDataset, a mixture, a pipeline's IterDataset): what was skipped as bad input."""
    found: dict[str, SkipReport] = {}
    seen: set[int] = set()
    stack = [dataset]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        source = getattr(node, "_source", None)
        if isinstance(source, _Subset):
            source = source.source
        if isinstance(source, (LocalSource, TfdsRecords)):
            name = str(source.pattern if isinstance(source, LocalSource) else source.where)
            key, k = name, 1
            while key in found:  # the same files in two mixture entries
                k += 1
                key = f"{name} ({k})"
            found[key] = source.skipped
        stack.extend(getattr(node, "parents", ()) or ())
    return found


__all__ = [
    "SOURCES", "SPLITS", "TXT_UNITS", "SUFFIXES", "BAD_RECORDS", "DATA_DEFAULTS",
    "SourceError", "SkipReport", "LocalSource", "local_source",
    "Mixture", "local_documents", "builtin_source", "documents_from_config",
    "texts_source_from_config", "split_of", "text_hash", "hash_split_indices", "RECORD_SOURCES",
    "records_source_from_config", "conversations_source_from_config",
    "pairs_source_from_config", "skip_reports",
]
