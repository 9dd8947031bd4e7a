"""Published pretraining mixtures as `data.mixture` lists: GEB-1.3B's table, TinyLlama's 7:3.

Each function returns the list for `config.data.mixture` (with `config.data.source =
"mixture"`); paths are placeholders you point at your local copies (JSONL / Parquet / txt
globs, or a folder from geb_jax.data.pretokenize with source="pretokenized"):

    from configs.data_mixtures import geb_mixture
    c.data.source = "mixture"
    c.data.mixture = geb_mixture(c4="data/c4/*.jsonl", wudao="data/wudao/*.parquet", ...)

or as a preset: `--config configs/data_mixtures.py:mixture=geb` is configs/geb_1_3b.py
training on GEB's table (`mixture=tinyllama`: configs/tinyllama_1_1b.py on TinyLlama's), with
each path given on the command line, e.g. `--config.data.mixture.0.path='data/c4/*.jsonl'`.

Weights are the papers' shares of the training data. `pipeline.mixture` mixes *documents* by
weight; when documents of the sources have very different lengths, convert token shares to
document weights with `pretrain_pipeline.document_weights(shares, mean_tokens_per_document)`.
"""

import os

from geb_jax.config_base import parse_arg
from geb_jax.config_loader import load_config
from geb_jax.data.pretrain_pipeline import GEB_TOKEN_SHARES, TINYLLAMA_TOKEN_SHARES

# GEB-1.3B (Wu et al., 2024): share of the pretraining data per source.
GEB_SHARES = GEB_TOKEN_SHARES
GEB_LANGS = {"c4": "en", "github_stackexchange": "code", "chinese_commoncrawl": "zh",
             "wudao": "zh", "skypile": "zh"}

# TinyLlama (Zhang et al., 2024): SlimPajama natural language : StarCoder code = 7 : 3.
TINYLLAMA_SHARES = TINYLLAMA_TOKEN_SHARES
TINYLLAMA_LANGS = {"text": "en", "code": "code"}


def _entries(shares: dict, langs: dict, paths: dict, source: str) -> list[dict]:
    unknown = set(paths) - set(shares)
    if unknown:
        raise ValueError(f"unknown mixture component(s) {sorted(unknown)}; expected "
                         f"{sorted(shares)}")
    return [dict(name=name, source=source, weight=weight, lang=langs[name],
                 path=paths.get(name) or f"<path to {name}>")
            for name, weight in shares.items()]


def geb_mixture(source: str = "local", **paths: str) -> list[dict]:
    """GEB-1.3B's five sources; keyword arguments = the path of each (see GEB_SHARES)."""
    return _entries(GEB_SHARES, GEB_LANGS, paths, source)


def tinyllama_mixture(source: str = "local", **paths: str) -> list[dict]:
    """TinyLlama's text:code = 7:3; keyword arguments text=..., code=..."""
    return _entries(TINYLLAMA_SHARES, TINYLLAMA_LANGS, paths, source)


def get_config(arg=None):
    """The model preset of the mixture's paper, reading that paper's mixture."""
    arg = parse_arg(arg, mixture="geb")
    presets = {"geb": ("geb_1_3b.py", geb_mixture), "tinyllama": ("tinyllama_1_1b.py",
                                                               tinyllama_mixture)}
    if arg.mixture not in presets:
        raise ValueError(f"mixture={arg.mixture!r}: use one of {sorted(presets)}.")
    preset, mixture = presets[arg.mixture]
    config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), preset))
    config.data.source = "mixture"
    config.data.mixture = mixture()
    return config
