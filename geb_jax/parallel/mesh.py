"""The device mesh (data, fsdp, tensor) and the one table mapping logical axes to mesh axes.

Parameters carry logical names where they are created (model/layers.py); this table is the only
place that says how they are laid out. Changing the mesh is a config change (config.mesh).
A dimension that a mesh axis does not divide (e.g. 2 KV heads over tensor=4) stays replicated
instead of failing, so every preset runs on every mesh shape.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from geb_jax.model.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes. Parameters shard over fsdp (ZeRO-3 style) and tensor (Megatron);
# activations shard their batch over data x fsdp. A mesh axis used by an earlier dimension of
# the same array is skipped for later ones (flax's resolution rule).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("head_dim", None),
    ("layers", None),
)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Sizes for (data, fsdp, tensor); one -1 takes the remaining devices."""
    sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: use positive sizes and "
                          "at most one -1 (which fills the remaining devices).")
    known = math.prod(s for s in sizes if s != -1)
    if fill:
        if num_devices % known:
            raise ConfigError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices "
                              f"are not divisible by the fixed axes' product {known}.")
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                          f"devices but {num_devices} are available; set one axis to -1.")
    return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def _fit_to_shape(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes that do not divide their dimension (that dimension is then replicated)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        kept = []
        for name in names:
            if dim % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[name]) == 0:
                kept.append(name)
        fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*fitted)


def logical_to_shardings(logical_specs: Any, shapes: Any, mesh: Mesh,
                         rules=LOGICAL_AXIS_RULES) -> Any:
    """Tree of logical PartitionSpecs + matching shapes -> tree of NamedShardings."""
    def one(spec, shape_like):
        mesh_spec = nn.logical_to_mesh_axes(spec, rules)
        return NamedSharding(mesh, _fit_to_shape(mesh_spec, shape_like.shape, mesh))

    return jax.tree.map(one, logical_specs, shapes,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch arrays (B, T, ...) shard their leading axis over data x fsdp."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_divides(batch_size: int, mesh: Mesh, field: str = "train.batch_size") -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % shards or batch_size % jax.process_count():
        raise ConfigError(
            f"config.{field}={batch_size} must be divisible by mesh data x fsdp = {shards} and "
            f"by the process count {jax.process_count()}; change the batch size or config.mesh.")
