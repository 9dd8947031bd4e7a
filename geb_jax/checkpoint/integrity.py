"""What makes a checkpoint step trustworthy, shared by the Checkpointer (manager.py) and the
read-only reader (reader.py): the step layout, the commit-marker check, per-leaf checksums of
the exact bits, and the comparison of a stored state structure with the expected one.

Why checksums: tensorstore only notices damage where the bytes no longer decode; a checksum of
every leaf, recorded in the META item at save time, also catches bytes that decode to different
values (see manager.py's docstring for the whole restore protocol).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from geb_jax.tree_paths import path_name

PyTree = Any

FORMAT_VERSION = 1
STATE_ITEM = "state"
DATA_STATE_ITEM = "data_state"
CONFIG_ITEM = "config"
META_ITEM = "meta"
ITEMS = (STATE_ITEM, DATA_STATE_ITEM, CONFIG_ITEM, META_ITEM)
COMMIT_MARKER = ocp.path.atomicity.COMMIT_SUCCESS_FILE  # "commit_success.txt"

_GOLDEN = 0x9E3779B1  # odd multiplier that spreads element positions over 32 bits


class CheckpointError(RuntimeError):
    """A checkpoint problem the user has to act on; the message says what to do."""


# ---- pytree paths ---------------------------------------------------------------------------
def leaf_name(path) -> str:
    """'opt_state/2/0/mu/embedding': the same for dict keys, attributes and orbax metadata."""
    return path_name(path) or "<root>"


def named_leaves(tree: PyTree) -> list[tuple[str, Any]]:
    return [(leaf_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def is_key(dtype) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


# ---- checksums ------------------------------------------------------------------------------
def _as_uint32_words(x: jax.Array) -> jax.Array:
    """The bits of x as uint32 words (one per element; 8-byte types add a trailing axis of 2)."""
    if is_key(x.dtype):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}.get(x.dtype.itemsize)
    try:
        return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    except (TypeError, ValueError):  # e.g. sub-byte int4: widen first (exact for integers)
        return x.astype(jnp.int32).view(jnp.uint32)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """Two uint32 sums: of the words, and of the words weighted by an odd function of position.

    Integer addition mod 2^32 is exact and order-independent, so the result does not depend on
    how the array is sharded (a checkpoint saved on one mesh verifies on another). Any change of
    a single word changes the weighted sum (odd weights are invertible mod 2^32). Positions come
    from broadcasted iotas, not a reshape, so a sharded array is never gathered.
    """
    words = _as_uint32_words(jnp.asarray(x))
    position = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        position = position + (jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
                               * jnp.uint32(stride % 2**32))
        stride *= words.shape[axis]
    weights = position * jnp.uint32(_GOLDEN) + jnp.uint32(1)
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32),
                      jnp.sum(words * weights, dtype=jnp.uint32)])


def _checksums(leaves: list) -> jax.Array:
    if not leaves:
        return jnp.zeros((0, 2), jnp.uint32)
    return jnp.stack([_leaf_checksum(x) for x in leaves])


@functools.lru_cache(maxsize=None)
def _checksums_jit(mesh: Mesh | None):
    """Jitted `_checksums`; on a mesh its output is pinned replicated, so that every process of
    a multi-host job can read the (tiny) result."""
    if mesh is None:
        return jax.jit(_checksums)
    return jax.jit(_checksums, out_shardings=NamedSharding(mesh, PartitionSpec()))


def state_checksums(state: PyTree) -> dict[str, list[int]]:
    """{leaf path: [sum, weighted sum]} of the exact bits of every leaf (one small device pass).

    Every process must call it (it is one jitted computation over the global arrays).
    """
    named = named_leaves(state)
    leaves = [x for _, x in named]
    meshes = [x.sharding.mesh for x in leaves
              if isinstance(getattr(x, "sharding", None), NamedSharding)]
    sums = np.asarray(jax.device_get(_checksums_jit(meshes[0] if meshes else None)(leaves)))
    return {name: [int(a), int(b)] for (name, _), (a, b) in zip(named, sums)}


# ---- step checks ----------------------------------------------------------------------------
def step_marker_problem(step_dir: str | os.PathLike) -> str | None:
    """Why a committed step folder cannot be a complete checkpoint (no commit marker, an item
    folder missing), or None. A directory check only: no data is read."""
    step_dir = epath.Path(step_dir)
    if not (step_dir / COMMIT_MARKER).exists():
        return (f"orbax's commit marker {COMMIT_MARKER} is missing from {step_dir} (the save "
                "did not finish, or files were removed afterwards)")
    missing = [item for item in ITEMS if not (step_dir / item).exists()]
    if missing:
        return f"item director{'ies' if len(missing) > 1 else 'y'} {missing} missing"
    return None


def checksum_problem(meta: Mapping[str, Any], step: int, state: PyTree,
                     whole_state: bool = True) -> str | None:
    """Why restored `state` is not what step `step` saved (per the META item), or None.

    whole_state=False checks a restored part of the state (e.g. only {"params": ...}): each of
    its leaves must match its recorded checksum, the other recorded leaves are not needed.
    """
    expected = meta.get("checksums")
    if meta.get("step") != step or not isinstance(expected, dict):
        return "its meta item is inconsistent (wrong step or no checksums)"
    actual = state_checksums(state)
    bad = sorted(n for n in actual if expected.get(n) != actual[n])
    unmatched = sorted(set(expected) ^ set(actual)) if whole_state else []
    if bad or unmatched:
        return (f"restored values differ from the checksums recorded at save time "
                f"(leaves {bad[:5] or unmatched[:5]})")
    return None


def stored_shape_dtype(x: jax.ShapeDtypeStruct) -> tuple[tuple[int, ...], np.dtype]:
    """What orbax stores for a leaf: typed keys as their uint32 key data."""
    if is_key(x.dtype):
        x = jax.eval_shape(jax.random.key_data, x)
    return tuple(x.shape), np.dtype(x.dtype)


def structure_problem(stored_tree: PyTree, named: Sequence[tuple[str, jax.ShapeDtypeStruct]]
                      ) -> str | None:
    """How a stored state structure (orbax metadata) differs from the expected leaves, or None:
    leaves missing or extra, and shapes / dtypes that differ (at most 8 of each)."""
    stored = {n: (tuple(m.shape), np.dtype(m.dtype)) for n, m in named_leaves(stored_tree)}
    wanted = {n: stored_shape_dtype(x) for n, x in named}
    missing = sorted(set(wanted) - set(stored))
    extra = sorted(set(stored) - set(wanted))
    differ = [f"{n}: checkpoint {stored[n][0]} {stored[n][1]}, expected {wanted[n][0]} "
              f"{wanted[n][1]}" for n in sorted(set(wanted) & set(stored))
              if stored[n] != wanted[n]]
    lines = []
    if missing:
        lines.append(f"not in the checkpoint: {missing[:8]}")
    if extra:
        lines.append(f"only in the checkpoint: {extra[:8]}")
    if differ:
        lines.append("shape/dtype differ: " + "; ".join(differ[:8]))
    return " | ".join(lines) or None


def short_error(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."


__all__ = ["FORMAT_VERSION", "STATE_ITEM", "DATA_STATE_ITEM", "CONFIG_ITEM", "META_ITEM", "ITEMS",
           "COMMIT_MARKER", "CheckpointError", "leaf_name", "named_leaves", "is_key",
           "state_checksums", "step_marker_problem", "checksum_problem", "stored_shape_dtype",
           "structure_problem", "short_error"]
