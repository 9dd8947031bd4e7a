"""A sweep file -> a list of named runs, each a dict of config overrides, checked up front.

A sweep file is Python (like configs/): `get_sweep()` returns a list of override dicts, most
often built with `product`, `zip_` and `chain` below; optional `get_sweep_meta()` returns
{"fixed": {overrides for every run}, "x": field to plot against, "metric": column to compare,
"config": default --config, "power_law": {...}, "title": ...}.

Run names come from the overrides ("norm_position=post,n_kv_heads=1"), so a run's directory
is the same every time the sweep is expanded: that is what makes resuming work.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import itertools
import json
import os
import re
from typing import Any, Mapping, Sequence

import ml_collections

from geb_jax.config_loader import apply_overrides, field_names
from geb_jax.model import ModelConfig
from geb_jax.errors import ConfigError

MAX_NAME_CHARS = 120
DERIVED_COLUMNS = ("params", "tokens", "train_flops")  # report columns computed from the config
META_KEYS = ("fixed", "x", "metric", "config", "power_law", "title", "description")


class SweepError(ConfigError):
    """A sweep file or sweep directory the runner cannot use; the message names the fix."""


# ---- Building blocks for get_sweep() -------------------------------------------------------
def _axes(positional: Sequence[Mapping[str, Sequence[Any]]], named: Mapping[str, Sequence[Any]]
          ) -> dict[str, list]:
    axes: dict[str, list] = {}
    for mapping in (*positional, named):
        for name, values in mapping.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
                raise SweepError(f"Sweep axis {name!r} must be a list of values, got {values!r}.")
            axes[name] = list(values)
    return axes


def product(*axes: Mapping[str, Sequence[Any]], **named: Sequence[Any]) -> list[dict]:
    """Every combination; the last axis varies fastest (itertools.product order).

    product(**{"model.norm_position": ["pre", "post"], "model.n_kv_heads": [1, 2]})
    """
    merged = _axes(axes, named)
    return [dict(zip(merged, values)) for values in itertools.product(*merged.values())]


def zip_(*axes: Mapping[str, Sequence[Any]], **named: Sequence[Any]) -> list[dict]:
    """Axes varied together: the i-th run takes the i-th value of every axis."""
    merged = _axes(axes, named)
    lengths = {name: len(values) for name, values in merged.items()}
    if len(set(lengths.values())) > 1:
        raise SweepError(f"zip_ needs axes of equal length, got {lengths}.")
    return [dict(zip(merged, values)) for values in zip(*merged.values())]


def chain(*sweeps: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Runs of several sweeps one after another."""
    return [dict(run) for sweep in sweeps for run in sweep]


def cross(*sweeps: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Every combination of runs of several sweeps (e.g. zip_ of sizes x product of budgets)."""
    return [{k: v for run in runs for k, v in run.items()} for runs in itertools.product(*sweeps)]


# ---- Naming ---------------------------------------------------------------------------------
def short_field_names(known: Sequence[str]) -> dict[str, str]:
    """Each dotted field -> its shortest suffix of which it is the one shallowest owner.

    "model.norm_position" -> "norm_position"; "train.steps" -> "steps" although
    "stage_overrides.sft.train.steps" ends alike (deeper); "train.spike.warmup_steps" ->
    "spike.warmup_steps" because "optimizer.warmup_steps" owns "warmup_steps". Distinct fields
    always get distinct short names.
    """
    short = {}
    for name in known:
        parts = name.split(".")
        short[name] = name
        for i in range(len(parts) - 1, -1, -1):
            suffix = ".".join(parts[i:])
            sharing = [o for o in known if o == suffix or o.endswith("." + suffix)]
            depth = min(o.count(".") for o in sharing)
            shallowest = [o for o in sharing if o.count(".") == depth]
            if shallowest == [name]:
                short[name] = suffix
                break
    return short


def format_value(value: Any) -> str:
    """The override value as `--config.x=` text: true/false, repr of numbers, JSON of lists."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) or value is None:
        return repr(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def run_name(overrides: Mapping[str, Any], short: Mapping[str, str]) -> str:
    """"norm_position=post,n_kv_heads=1": filesystem safe, stable; long names end in a hash."""
    if not overrides:
        return "baseline"
    text = ",".join(f"{short.get(k, k)}={format_value(v)}" for k, v in overrides.items())
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)
    if safe != text or len(safe) > MAX_NAME_CHARS:  # keep distinct runs distinct after cleaning
        safe = f"{safe[:MAX_NAME_CHARS - 9]}-{_digest(overrides)}"
    return safe


def _digest(overrides: Mapping[str, Any]) -> str:
    text = json.dumps({k: format_value(v) for k, v in overrides.items()}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


# ---- Loading and checking ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Run:
    index: int
    name: str
    overrides: dict  # the swept values only (what the name says)
    all_overrides: dict  # fixed + swept, as passed to geb_jax.main
    config: ml_collections.ConfigDict  # the config with all_overrides applied (workdir unset)


@dataclasses.dataclass(frozen=True)
class Sweep:
    path: str
    runs: list[Run]
    meta: dict

    def swept_fields(self) -> list[str]:
        """Fields that take more than one value across runs, in first-seen order."""
        fields = dict.fromkeys(k for run in self.runs for k in run.overrides)
        return [f for f in fields
                if len({format_value(r.overrides.get(f)) for r in self.runs}) > 1]


def read_sweep_file(path: str) -> tuple[list[dict], dict]:
    """Runs the sweep file's get_sweep() / get_sweep_meta(); checks their shapes."""
    if not os.path.isfile(path):
        raise SweepError(f"Sweep file {path!r} does not exist (see experiments/sweeps/).")
    module_spec = importlib.util.spec_from_file_location("geb_jax_user_sweep", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise SweepError(f"Sweep file {path!r} defines no get_sweep().")
    runs = module.get_sweep()
    if not isinstance(runs, Sequence) or not all(isinstance(r, Mapping) for r in runs):
        raise SweepError(f"{path}: get_sweep() must return a list of override dicts "
                         "(use product/zip_/chain from geb_jax.sweep).")
    if not runs:
        raise SweepError(f"{path}: get_sweep() returned no runs.")
    meta = dict(module.get_sweep_meta()) if hasattr(module, "get_sweep_meta") else {}
    unknown = sorted(set(meta) - set(META_KEYS))
    if unknown:
        raise SweepError(f"{path}: get_sweep_meta() has unknown key(s) {unknown}; "
                         f"known: {', '.join(META_KEYS)}.")
    return [dict(r) for r in runs], meta


def _check_run(config: ml_collections.ConfigDict, overrides: dict, where: str
               ) -> ml_collections.ConfigDict:
    known = field_names(config)
    for name in overrides:
        if name == "workdir":
            raise SweepError(f"{where}: do not override workdir; each run gets "
                             "<sweep workdir>/<run name> (pass --workdir to the sweep).")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; nearest: {', '.join(close)}" if close else ""
            raise SweepError(f"{where}: unknown config field {name!r}{hint}.")
    try:
        merged = apply_overrides(config, overrides)
        ModelConfig.from_dict(merged.model)  # shape rules (e.g. n_heads % n_kv_heads)
    except ConfigError as e:
        raise SweepError(f"{where}: {e}") from None
    return merged


def load_sweep(path: str, config: ml_collections.ConfigDict) -> Sweep:
    """Expands and names every run, checking all overrides before anything runs."""
    overrides_list, meta = read_sweep_file(path)
    fixed = dict(meta.get("fixed", {}))
    known = field_names(config)
    short = short_field_names(known)
    runs, seen = [], {}
    for index, overrides in enumerate(overrides_list):
        clash = sorted(set(fixed) & set(overrides))
        where = f"{path}: run {index} {overrides}"
        if clash:
            raise SweepError(f"{where}: {clash} set both in get_sweep_meta()['fixed'] and in "
                             "the run; keep each field in one place.")
        merged = _check_run(config, {**fixed, **overrides}, where)
        name = run_name(overrides, short)
        if name in seen:
            raise SweepError(f"{where}: same run name {name!r} as run {seen[name]}; remove "
                             "the duplicate (values that print alike, e.g. 1 and '1', clash).")
        seen[name] = index
        runs.append(Run(index, name, overrides, {**fixed, **overrides}, merged))
    if "x" in meta and meta["x"] not in known + list(DERIVED_COLUMNS):
        close = difflib.get_close_matches(meta["x"], known + list(DERIVED_COLUMNS), n=3)
        raise SweepError(f"{path}: get_sweep_meta()['x']={meta['x']!r} is no config field; "
                         f"nearest: {', '.join(close) or 'none'}.")
    return Sweep(path, runs, meta)
