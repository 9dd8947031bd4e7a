"""Golden sharding tables: every parameter's PartitionSpec per preset and mesh, from abstract
shapes only (no weights, no devices: an AbstractMesh of the chosen sizes).

    python -m tests.golden_sharding --write  # rewrite tests/data/sharding/ (intended change)
    python -m tests.golden_sharding          # print the differences, change nothing

The tables go through the training code's own path: param_logical_axes and abstract_params of
the preset's model (model/transformer.py), then parallel.mesh.logical_to_shardings, exactly as
train/state.py state_shardings lays out the parameters (and, by the same specs, their optimizer
moments). tests/test_golden_sharding.py compares them with the checked-in files.
"""
from __future__ import annotations

import difflib
import functools
import math
import os
import sys

import jax
from jax.sharding import AbstractMesh

from geb_jax.config_loader import load_config
from geb_jax.model import ModelConfig, abstract_params, param_logical_axes
from geb_jax.parallel.mesh import MESH_AXES, logical_to_shardings
from geb_jax.tree_paths import path_name

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_DIR = os.path.join(REPO_ROOT, "tests", "data", "sharding")
REWRITE_COMMAND = "python -m tests.golden_sharding --write"

# configs/pretrained.py and configs/finetune.py take their model from a published file.
PRESETS = ("tiny", "small", "geb_1_3b", "tinyllama_1_1b", "llama_7b")
# 8 devices each: pure data parallel, ZeRO-3 over all 8, ZeRO-3 x Megatron tensor parallel.
MESHES = {"data8": dict(data=8, fsdp=1, tensor=1),
          "fsdp8": dict(data=1, fsdp=8, tensor=1),
          "fsdp4_tensor2": dict(data=1, fsdp=4, tensor=2)}


def preset_model(preset: str) -> ModelConfig:
    config = load_config(os.path.join(REPO_ROOT, "configs", f"{preset}.py"))
    return ModelConfig.from_dict(config.model)


def abstract_mesh(sizes: dict) -> AbstractMesh:
    return AbstractMesh(tuple(int(sizes[a]) for a in MESH_AXES), MESH_AXES)


@functools.lru_cache(maxsize=None)
def _model_trees(preset: str):
    model = preset_model(preset)
    return param_logical_axes(model), abstract_params(model)


def _fmt_entry(entry) -> str:
    if entry is None:
        return "None"
    return "(" + ",".join(entry) + ")" if isinstance(entry, tuple) else str(entry)


def format_spec(spec, rank: int) -> str:
    """PartitionSpec -> "[None, fsdp, tensor, None]", padded with None to the array's rank (a
    dimension over several mesh axes reads "(data,fsdp)")."""
    entries = list(spec) + [None] * (rank - len(spec))
    return "[" + ", ".join(_fmt_entry(e) for e in entries) + "]"


def spec_rows(preset: str, mesh_name: str) -> dict[str, tuple]:
    """{parameter path: (shape, PartitionSpec, per-device shard shape)}."""
    sizes = MESHES[mesh_name]
    logical, shapes = _model_trees(preset)
    shardings = logical_to_shardings(logical, shapes, abstract_mesh(sizes))
    rows = {}
    for (path, sh), leaf in zip(jax.tree_util.tree_flatten_with_path(shardings)[0],
                                jax.tree.leaves(shapes)):
        spec = sh.spec
        shard = tuple(
            dim // math.prod(sizes[a] for a in ((e,) if isinstance(e, str) else e or ()))
            for dim, e in zip(leaf.shape, list(spec) + [None] * (len(leaf.shape) - len(spec))))
        rows[path_name(path)] = (tuple(leaf.shape), spec, shard)
    return rows


def table_text(preset: str, mesh_name: str) -> str:
    sizes = MESHES[mesh_name]
    rows = spec_rows(preset, mesh_name)
    total = sum(math.prod(shape) for shape, _, _ in rows.values())
    per_device = sum(math.prod(shard) for _, _, shard in rows.values())
    lines = [f"# preset {preset}, mesh " + " ".join(f"{a}={sizes[a]}" for a in MESH_AXES)
             + f"; float32 parameter bytes per device {4 * per_device:,} of {4 * total:,}",
             f"# rewrite after an intended change: {REWRITE_COMMAND}",
             "path\tshape\tspec\tshard_shape"]
    for name in sorted(rows):
        shape, spec, shard = rows[name]
        lines.append(f"{name}\t{tuple(shape)}\t{format_spec(spec, len(shape))}\t{tuple(shard)}")
    return "\n".join(lines) + "\n"


def golden_path(preset: str, mesh_name: str) -> str:
    return os.path.join(GOLDEN_DIR, f"{preset}__{mesh_name}.tsv")


def differences() -> list[str]:
    """Unified diffs (checked-in -> computed) of every table that differs, plus stray files."""
    out = []
    expected = set()
    for preset in PRESETS:
        for mesh_name in MESHES:
            path = golden_path(preset, mesh_name)
            expected.add(os.path.basename(path))
            computed = table_text(preset, mesh_name)
            stored = open(path, encoding="utf-8").read() if os.path.isfile(path) else ""
            if computed != stored:
                rel = os.path.relpath(path, REPO_ROOT)
                out.append("".join(difflib.unified_diff(
                    stored.splitlines(True), computed.splitlines(True),
                    fromfile=f"{rel} (checked in{'' if stored else ', missing'})",
                    tofile=f"{rel} (computed)")))
    if os.path.isdir(GOLDEN_DIR):
        for stray in sorted(set(os.listdir(GOLDEN_DIR)) - expected):
            out.append(f"{os.path.relpath(os.path.join(GOLDEN_DIR, stray), REPO_ROOT)}: "
                       "no preset x mesh computes it (remove it)\n")
    return out


def write() -> None:
    """Rewrites every table (and removes tables no preset x mesh computes any more)."""
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    written = set()
    for preset in PRESETS:
        for mesh_name in MESHES:
            path = golden_path(preset, mesh_name)
            with open(path, "w", encoding="utf-8") as f:
                f.write(table_text(preset, mesh_name))
            written.add(os.path.basename(path))
    for stray in set(os.listdir(GOLDEN_DIR)) - written:
        if stray.endswith(".tsv"):
            os.remove(os.path.join(GOLDEN_DIR, stray))


def main(argv: list[str]) -> int:
    if "--write" in argv:
        write()
        print(f"wrote {len(PRESETS) * len(MESHES)} tables to "
              f"{os.path.relpath(GOLDEN_DIR, REPO_ROOT)}/")
        return 0
    diffs = differences()
    print("".join(diffs) if diffs else "golden sharding tables are up to date")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
