"""Names of pytree paths ("layers/attn/q"), the same for dict keys, attributes, sequence indices
and orbax metadata: one spelling for sharding tables, optimizer masks and checkpoint checks."""
from __future__ import annotations

from typing import Any, Sequence


def key_name(key: Any) -> str:
    """One path entry: a DictKey's key, a GetAttrKey's name, a SequenceKey's index."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
    return tuple(key_name(k) for k in path)


def path_name(path: Sequence[Any]) -> str:
    """ "layers/attn/q" ("" for the root)."""
    return "/".join(path_names(path))
