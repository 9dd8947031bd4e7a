"""The device mesh (data, fsdp, tensor) and the one table mapping logical axes to mesh axes.

Parameters carry logical names where they are created (model/layers.py); this table is the only
place that says how they are laid out. Changing the mesh is a config change (config.mesh).
A dimension that its mesh axis does not divide (e.g. 2 KV heads over tensor=4) is a ConfigError
when the shardings are built (logical_to_shardings), naming the parameter, its dimension, the mesh
axis and the fix; it is never silently replicated. tests/data/sharding/ holds the resulting
PartitionSpec of every parameter per preset and mesh (python -m tests.golden_sharding --write).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from geb_jax.errors import ConfigError
from geb_jax.tree_paths import path_name

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


# The config field that sets each logical axis's length (for the divisibility error's fix).
_LOGICAL_AXIS_FIELDS = {"vocab": "model.vocab_size", "embed": "model.d_model",
                        "heads": "model.n_heads", "kv_heads": "model.n_kv_heads",
                        "mlp": "model.d_ff", "head_dim": "model.head_dim",
                        "layers": "model.n_layers"}
_FIELD_NOTES = {"vocab": "; pad the vocabulary",
                "kv_heads": "; model.n_heads must stay a multiple of it",
                "heads": "; it must stay a multiple of model.n_kv_heads"}


def _entry_axes(entry) -> tuple[str, ...]:
    return () if entry is None else entry if isinstance(entry, tuple) else (entry,)


def mesh_partition_spec(logical_spec: PartitionSpec, shape: Sequence[int],
                        axis_sizes: Mapping[str, int], rules=LOGICAL_AXIS_RULES,
                        name: str = "") -> tuple[PartitionSpec, list[tuple]]:
    """Logical names -> mesh axes (flax's rules: a mesh axis used by an earlier dimension is
    skipped for later ones), one entry per dimension of `shape`; and the dimensions that their
    mesh axes do not divide, as (name, shape, dim index, logical axis, mesh axes, product)."""
    logical = tuple(logical_spec) + (None,) * (len(shape) - len(logical_spec))
    mesh_spec = tuple(nn.logical_to_mesh_axes(PartitionSpec(*logical), rules))
    mesh_spec += (None,) * (len(shape) - len(mesh_spec))
    problems = []
    for i, (dim, entry) in enumerate(zip(shape, mesh_spec)):
        axes = _entry_axes(entry)
        product = math.prod(int(axis_sizes[a]) for a in axes)
        if axes and dim % product:
            problems.append((name, tuple(shape), i, logical[i], axes, product))
    return PartitionSpec(*mesh_spec), problems


def _problem_line(problem, axis_sizes) -> str:
    name, shape, i, logical, axes, product = problem
    over = (f"mesh axis {axes[0]}={product}" if len(axes) == 1 else
            "mesh axes " + " x ".join(f"{a}={axis_sizes[a]}" for a in axes) + f" = {product}")
    return (f"  - parameter {name} {shape}: dimension {i} ({logical or 'unnamed'}, length "
            f"{shape[i]}) is not divisible by {over}")


def _fix_line(logical, axes, product, dim) -> str:
    if len(axes) == 1:
        divisors = [d for d in range(1, product) if dim % d == 0]
        choices = ", ".join(map(str, divisors[:-1])) + " or " if len(divisors) > 1 else ""
        mesh_fix = (f"config.mesh.{axes[0]}={choices}{divisors[-1]} (a divisor of {dim}; the "
                    "other devices go to another axis)")
    else:
        mesh_fix = f"sizes of config.mesh.{'/'.join(axes)} whose product divides {dim}"
    field = _LOGICAL_AXIS_FIELDS.get(logical)
    note = _FIELD_NOTES.get(logical, "")
    model_fix = (f"; or {field} a multiple of {product} (e.g. {-(-dim // product) * product}"
                 f"{note})" if field else "")
    return (f"  fix ({logical or 'unnamed'} over {'x'.join(axes)}): another mesh shape, e.g. "
            f"{mesh_fix}{model_fix}.")


def indivisible_error(problems: Sequence[tuple], axis_sizes: Mapping[str, int]) -> ConfigError:
    """One ConfigError listing every indivisible parameter dimension and a fix for each."""
    lines = [f"config.mesh {dict(axis_sizes)} cannot shard every parameter evenly: "
             f"{len(problems)} parameter dimension(s) are not divisible by their mesh axes "
             "(geb_jax/parallel/mesh.py LOGICAL_AXIS_RULES; they are never silently replicated)."]
    fixes = {}
    for problem in problems:
        lines.append(_problem_line(problem, axis_sizes))
        _, shape, i, logical, axes, product = problem
        fixes.setdefault((logical, axes, shape[i]), _fix_line(logical, axes, product, shape[i]))
    return ConfigError("\n".join(lines + list(fixes.values())))


def mesh_partition_specs(logical_specs: Any, shapes: Any, axis_sizes: Mapping[str, int],
                         rules=LOGICAL_AXIS_RULES) -> Any:
    """Tree of logical PartitionSpecs + matching shapes -> tree of mesh PartitionSpecs, for a
    mesh given only by its axis sizes (no devices). Raises a ConfigError naming every dimension
    that its mesh axes do not divide."""
    problems = []

    def one(path, spec, shape_like):
        mesh_spec, bad = mesh_partition_spec(spec, shape_like.shape, axis_sizes, rules,
                                             path_name(path))
        problems.extend(bad)
        return mesh_spec

    specs = jax.tree_util.tree_map_with_path(one, logical_specs, shapes,
                                             is_leaf=lambda x: isinstance(x, PartitionSpec))
    if problems:
        raise indivisible_error(problems, axis_sizes)
    return specs


def logical_to_shardings(logical_specs: Any, shapes: Any, mesh: Mesh | AbstractMesh,
                         rules=LOGICAL_AXIS_RULES) -> Any:
    """Tree of logical PartitionSpecs + matching shapes -> tree of NamedShardings. A dimension
    its mesh axes do not divide raises a ConfigError (mesh_partition_specs). An AbstractMesh
    gives the same shardings without devices (tests/golden_sharding.py)."""
    specs = mesh_partition_specs(logical_specs, shapes, dict(mesh.shape), rules)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
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
