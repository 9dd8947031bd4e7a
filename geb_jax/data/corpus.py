"""The built-in bilingual (English + Chinese + Python) corpus shipped inside the package.

About 3 MB of public-domain / freely licensed text lives in geb_jax/data/builtin/ as gzip'd
JSONL (one document per line: {"text", "source", "lang"}), so the tokenizer and a tiny model can
be trained and tested with no network and no download. Provenance and licences: docs/data.md
and geb_jax/data/builtin/LICENSES.txt; experiments/build_builtin_corpus.py regenerates it.

The files are read through importlib.resources, so this works the same from a source checkout,
an editable install, or a wheel (no paths relative to the repository are assumed).
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
from importlib import resources
from typing import Iterable, Iterator

SPLITS = ("train", "valid")
LANGS = ("en", "zh", "code")
_FILES = {"train": "train.jsonl.gz", "valid": "valid.jsonl.gz"}


def _resource(name: str):
    return resources.files("geb_jax").joinpath("data", "builtin", name)


def _check_split(split: str) -> str:
    if split not in _FILES:
        raise ValueError(f"unknown built-in corpus split {split!r}; expected one of {SPLITS}")
    return split


def _check_langs(langs: Iterable[str] | str | None) -> frozenset[str] | None:
    if langs is None:
        return None
    if isinstance(langs, str):  # builtin_documents("train", "zh") means langs=("zh",)
        langs = (langs,)
    chosen = frozenset(langs)
    unknown = chosen - set(LANGS)
    if unknown:
        raise ValueError(f"unknown language(s) {sorted(unknown)}; expected a subset of {LANGS}")
    return chosen


@functools.lru_cache(maxsize=None)
def _raw(split: str) -> bytes:
    """Compressed bytes of one split (~1 MB at most): cached so repeated passes are cheap."""
    resource = _resource(_FILES[_check_split(split)])
    try:
        return resource.read_bytes()
    except FileNotFoundError as e:  # a broken install: package_data was not shipped
        raise FileNotFoundError(
            f"built-in corpus file {resource} is missing; the geb_jax install lacks its "
            f"package data (setup.py package_data 'data/builtin/*')") from e


def builtin_documents(split: str, langs: Iterable[str] | str | None = None) -> Iterator[dict]:
    """Yield the documents of `split` ("train" or "valid") as dicts with text, source, lang.

    `langs` restricts to a subset of ("en", "zh", "code"); None yields all of them. The order
    is fixed (the order of the file), so iterating twice gives the same sequence.
    """
    _check_split(split)
    wanted = _check_langs(langs)
    with gzip.open(io.BytesIO(_raw(split)), "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            if wanted is None or doc["lang"] in wanted:
                yield doc


def builtin_texts(split: str, langs: Iterable[str] | str | None = None) -> Iterator[str]:
    """Just the text of each document (what a tokenizer trainer or a packer consumes)."""
    for doc in builtin_documents(split, langs):
        yield doc["text"]


@functools.lru_cache(maxsize=None)
def corpus_version() -> str:
    """A short content hash of all splits: changes whenever the shipped data changes.

    Used as a cache key (e.g. for tokenizers trained on the corpus) so a stale artefact is never
    reused after the corpus is regenerated.
    """
    h = hashlib.sha256()
    for split in SPLITS:
        h.update(hashlib.sha256(_raw(split)).digest())
    return h.hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def _stats() -> dict:
    out: dict = {}
    for split in SPLITS:
        per_lang = {lang: {"documents": 0, "bytes": 0, "characters": 0} for lang in LANGS}
        for doc in builtin_documents(split):
            s = per_lang[doc["lang"]]
            s["documents"] += 1
            s["bytes"] += len(doc["text"].encode("utf-8"))
            s["characters"] += len(doc["text"])
        out[split] = per_lang
    return out


def builtin_stats() -> dict:
    """{split: {lang: {"documents", "bytes", "characters"}}} computed from the shipped files.

    Bytes are UTF-8 bytes of the text (Chinese is ~3 bytes a character, so bytes and characters
    differ a lot between languages; tokenizer compression is quoted in characters per token).
    """
    return json.loads(json.dumps(_stats()))  # a copy: callers may mutate it
