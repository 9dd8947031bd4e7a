"""Loads configs/<preset>.py[:arg] and applies `a.b.c=value` overrides with clear errors.

`python -m geb_jax.main` parses flags with ml_collections' config_flags; this module gives the
same behaviour to library callers (sweeps, tests) and checks override names up front, so a typo
fails before any work starts, naming the field and its nearest valid spellings.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any, Iterable, Mapping

import ml_collections

from geb_jax.errors import ConfigError


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
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.append(f"--config.{name}{hint}")
    if problems:
        raise ConfigError("Unknown config field(s): " + "; ".join(problems)
                          + ". List the fields with --helpfull or read geb_jax/config_base.py.")


def _parse_value(raw: str, current: Any) -> Any:
    if isinstance(current, bool):
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true/false, got {raw!r}")
        return raw.lower() in ("true", "1")
    if isinstance(current, (int, float)):
        return type(current)(float(raw) if isinstance(current, float) else int(raw))
    if isinstance(current, str) or current is None:
        return raw
    return ast.literal_eval(raw)


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any] | Iterable[str]) -> ml_collections.ConfigDict:
    """Returns a copy with overrides applied: {"a.b": v} or ["a.b=v", ...] (strings parsed)."""
    if not isinstance(overrides, Mapping):
        pairs = {}
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ConfigError(f"Override {item!r} is not of the form field.path=value.")
            pairs[key.removeprefix("--config.")] = raw
        overrides = pairs
    check_field_names(config, overrides)
    config = ml_collections.ConfigDict(config.to_dict())
    for name, value in overrides.items():
        *parents, leaf = name.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        if isinstance(value, str):
            try:
                value = _parse_value(value, node[leaf])
            except (ValueError, SyntaxError) as e:
                raise ConfigError(f"--config.{name}={value!r}: {e}.") from None
        node[leaf] = value
    return config
