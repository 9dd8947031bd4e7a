"""Loads configs/<preset>.py[:arg] and applies `a.b.c=value` overrides with clear errors.

The one override parser: `split_overrides(argv)` takes `--config.a.b=v` (also `--config.a.b v`,
a bare `--config.a.b` for true, `--noconfig.a.b` for false) out of a command line, and
`apply_overrides` types each value by the field it sets. geb_jax.main, the sweep runner,
data/prepare.py and tests all go through them, so a value means the same everywhere and a typo
fails before any work starts, naming the field and its nearest valid spellings.
"""
from __future__ import annotations

import ast
import copy
import difflib
import importlib.util
import os
from typing import Any, Iterable, Mapping, Sequence

import ml_collections

from geb_jax.config_base import ELSEWHERE
from geb_jax.errors import ConfigError

PREFIX, NEGATED = "--config.", "--noconfig."


def available_presets(config_dir: str) -> list[str]:
    if not os.path.isdir(config_dir):
        return []
    return sorted(f[:-3] for f in os.listdir(config_dir)
                  if f.endswith(".py") and not f.startswith("_"))


def load_config(spec: str) -> ml_collections.ConfigDict:
    """"configs/tiny.py" or "configs/tiny.py:smoke" -> the preset's ConfigDict."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        presets = available_presets(os.path.dirname(path) or ".")
        raise ConfigError(f"Config file {path!r} does not exist. Presets in "
                          f"{os.path.dirname(path) or '.'}/: {', '.join(presets) or 'none'}.")
    module_spec = importlib.util.spec_from_file_location("geb_jax_user_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"Config file {path!r} defines no get_config(arg=None).")
    return module.get_config(arg or None)


def field_names(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every leaf field as a dotted path."""
    names = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            names += field_names(value, f"{prefix}{key}.")
        else:
            names.append(f"{prefix}{key}")
    return names


def check_field_names(config: ml_collections.ConfigDict, names: Iterable[str]) -> None:
    """Raises one ConfigError listing every unknown field with close matches."""
    known = field_names(config)
    problems = []
    for name in names:
        if name in known:
            continue
        moved = next((why for field, why in ELSEWHERE.items()  # absent here, acts elsewhere
                      if (name == field or name.startswith(field + "."))
                      and not any(k.startswith(field + ".") for k in known)), None)
        if moved:
            raise ConfigError(f"--config.{name}: {moved}")
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        problems.append(f"--config.{name}{hint}")
    if problems:
        raise ConfigError("Unknown config field(s): " + "; ".join(problems)
                          + ". The fields and their defaults are in geb_jax/config_base.py.")


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the other arguments, the overrides as "a.b=value" strings) of a command line.

    `--config.a.b v` takes the next argument as its value; a bare `--config.a.b` (last, or
    followed by another --flag) becomes "a.b" (true for a boolean field, else an error naming
    it); `--noconfig.a.b` becomes "a.b=false". `--config X` / `--config=X` stay in the rest.
    """
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(NEGATED):
            overrides.append(arg[len(NEGATED):] + "=false")
        elif not arg.startswith(PREFIX):
            rest.append(arg)
        elif "=" in arg or i + 1 == len(argv) or argv[i + 1].startswith("--"):
            overrides.append(arg[len(PREFIX):])
        else:
            overrides.append(arg[len(PREFIX):] + "=" + argv[i + 1])
            i += 1
        i += 1
    return rest, overrides


def config_spec(argv: Sequence[str]) -> str | None:
    """The X of `--config X` / `--config=X` in a command line, else None."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def load_with_overrides(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, list[str]]:
    """(the preset named by --config with every --config.a.b override applied, the arguments
    left for the program's own flags)."""
    rest, overrides = split_overrides(argv)
    spec = config_spec(rest)
    if spec is None:
        raise ConfigError("Pass --config configs/<preset>.py (e.g. configs/tiny.py).")
    return apply_overrides(load_config(spec), overrides), rest


def _parse_value(raw: str | None, current: Any, kind: type) -> Any:
    """`raw` (None: a bare flag) as the type of the field it sets."""
    if kind is bool or isinstance(current, bool):
        if raw is None:
            return True
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true/false, got {raw!r}")
        return raw.lower() in ("true", "1")
    if raw is None:
        raise ValueError("needs a value (--config.field=value)")
    if raw.lower() in ("none", "null") and kind is not str:
        return None  # unsets a field; its typed section says if it may be unset
    if kind in (int, float):
        return float(raw) if kind is float else int(raw)
    if kind is str or kind is type(None):
        return raw
    return ast.literal_eval(raw)


_BARE = object()  # a bare `--config.a.b`: true for a boolean field


def _pairs(overrides: Mapping[str, Any] | Iterable[str]) -> dict[str, Any]:
    if isinstance(overrides, Mapping):
        return {key.removeprefix(PREFIX): value for key, value in overrides.items()}
    pairs: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        pairs[key.removeprefix(PREFIX)] = raw if sep else _BARE
    return pairs


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any] | Iterable[str]) -> ml_collections.ConfigDict:
    """Returns a copy with overrides applied: {"a.b": v} or ["a.b=v", ...]; strings are parsed
    by the type of the field they set (a None placeholder by its declared type)."""
    pairs = _pairs(overrides)
    check_field_names(config, pairs)
    config = copy.deepcopy(config)
    for name, value in pairs.items():
        *parents, leaf = name.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        if isinstance(value, str) or value is _BARE:
            raw = None if value is _BARE else value
            try:
                value = _parse_value(raw, node[leaf], node.get_type(leaf))
            except (ValueError, SyntaxError) as e:
                shown = f"--config.{name}" + ("" if raw is None else f"={raw!r}")
                raise ConfigError(f"{shown}: {e}.") from None
        try:
            node[leaf] = value
        except TypeError as e:
            raise ConfigError(f"--config.{name}={value!r}: {e}.") from None
    return config
