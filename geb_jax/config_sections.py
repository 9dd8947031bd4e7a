"""The one `from_dict` every typed config section uses (model, optimizer, train, data, ...).

Each section is a frozen dataclass that subclasses `Section` and names itself (`SECTION =
"train"`). `Section.from_dict(values)` takes a ConfigDict, a dict or an instance and:
  * rejects unknown keys in one ConfigError naming them, their nearest valid spellings and the
    section's valid fields;
  * names every missing required field;
  * converts what is safe to convert: int -> float, list -> tuple, numpy scalars -> Python, a
    nested mapping -> its nested section; it never parses a string into a number (a quoted
    "4e-4" from YAML or JSON is a mistake worth naming, not guessing);
  * then lets the dataclass' own __post_init__ check ranges and choices.
Written by hand: dacite / pydantic would do the conversion but not name the config path.
"""
from __future__ import annotations

import dataclasses
import difflib
import numbers
import types
import typing
from typing import Any, Mapping

import numpy as np

from geb_jax.errors import ConfigError


class Section:
    """Mixin for a frozen dataclass built from one ConfigDict section."""

    SECTION = ""  # the dotted config path used in messages, e.g. "train.spike"
    ERROR = ConfigError  # what from_dict raises (a section may name its own subclass)

    @classmethod
    def from_dict(cls, values: Any, section: str | None = None):
        """Builds the section from a ConfigDict / dict / instance (None: all defaults)."""
        return build_section(cls, values, section or cls.SECTION or cls.__name__)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _plain(value: Any) -> Any:
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def as_mapping(values: Any) -> dict:
    """A ConfigDict, mapping or dataclass instance as a plain dict (None: empty)."""
    if values is None:
        return {}
    if hasattr(values, "to_dict") and not isinstance(values, Section):
        return dict(values.to_dict())
    if dataclasses.is_dataclass(values) and not isinstance(values, type):
        return {f.name: getattr(values, f.name) for f in dataclasses.fields(values)}
    if isinstance(values, Mapping):
        return dict(values)
    raise ConfigError(f"expected a config section (a mapping), got {type(values).__name__}.")


def check_keys(given, valid, section: str, error: type = ConfigError) -> None:
    """One ConfigError naming every unknown key (as section.key), close matches and the valid
    keys."""
    unknown = sorted(set(given) - set(valid))
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, list(valid), n=2)
        hints.append(f"{section}.{key}" + (f" (did you mean "
                                           f"{', '.join(f'{section}.{c}' for c in close)}?)"
                                           if close else ""))
    raise error(f"Unknown {section} field(s): {'; '.join(hints)}. Valid fields: "
                      f"{', '.join(sorted(valid))}.")


def build_section(cls, values: Any, section: str):
    """cls(**converted values), naming unknown, missing and badly typed fields."""
    if isinstance(values, cls):
        return values
    error = getattr(cls, "ERROR", ConfigError)
    values = as_mapping(values)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(values, fields, section, error)
    missing = sorted(name for name, f in fields.items() if name not in values
                     and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    if missing:
        raise error(f"Missing required {section} field(s) {missing}.")
    hints = typing.get_type_hints(cls)
    try:
        return cls(**{name: convert(value, hints.get(name, Any), f"{section}.{name}")
                      for name, value in values.items()})
    except ConfigError as e:
        raise (e if isinstance(e, error) else error(str(e))) from None


def convert(value: Any, hint: Any, where: str) -> Any:
    """`value` as type `hint`, converting only what cannot change its meaning."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        return convert(value, options[0], where) if len(options) == 1 else value
    if isinstance(hint, type) and issubclass(hint, Section):
        return hint.from_dict(value, where)
    if hint is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise ConfigError(f"{where}={value!r}: expected bool (true or false).")
    if hint in (int, float):
        return _number(value, hint, where)
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"{where}={value!r}: expected str.")
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


def _number(value: Any, kind: type, where: str):
    integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if integral or (kind is float and isinstance(value, numbers.Real)
                    and not isinstance(value, bool)):
        return kind(value)
    hint = (" (a quoted number? write it unquoted; YAML reads 4e-4 as a string: 4.0e-4)"
            if isinstance(value, str) else "")
    raise ConfigError(f"{where}={value!r}: expected {kind.__name__}{hint}.")
