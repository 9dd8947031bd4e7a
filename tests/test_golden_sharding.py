"""Every parameter's PartitionSpec per preset and mesh equals the checked-in table
(tests/data/sharding/, tests/golden_sharding.py); a dimension its mesh axis does not divide is a
ConfigError naming the parameter, never a silent replication; and on a real 8-device CPU mesh
the initialised state's parameters (and Adam moments) carry exactly the golden specs."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from geb_jax.errors import ConfigError
from tests import golden_sharding as golden
from tests.conftest import REPO_ROOT


def test_golden_tables_match():
    diffs = golden.differences()
    assert not diffs, (
        "parameter shardings differ from the checked-in tables:\n" + "".join(diffs)
        + f"\nIf the change is intended, rewrite the tables with `{golden.REWRITE_COMMAND}` "
        "and commit tests/data/sharding/ with it.")


def test_golden_tables_cover_every_preset_and_mesh():
    names = set(os.listdir(golden.GOLDEN_DIR))
    assert names == {f"{p}__{m}.tsv" for p in golden.PRESETS for m in golden.MESHES}
    # The tables shard what matters: on fsdp x tensor no 2-D+ parameter is left whole.
    rows = golden.spec_rows("geb_1_3b", "fsdp4_tensor2")
    for name, (shape, spec, shard) in rows.items():
        if len(shape) >= 2:
            assert shard != shape, (name, spec)
    assert rows["layers/attn/k"][2] == (24, 512, 2, 128)  # 4 KV heads over tensor=2


def _state_shardings(model, sizes):
    """The training path (train/state.py state_shardings) on an AbstractMesh: no devices."""
    from geb_jax.config_base import base_config
    from geb_jax.run_config import run_config
    from geb_jax.train.optimizer import make_optimizer
    from geb_jax.train.state import state_shardings
    optimizer = make_optimizer(run_config(base_config()).optimizer)
    return state_shardings(model, optimizer, golden.abstract_mesh(sizes))


@pytest.mark.parametrize("change, sizes, expected", [
    # tiny: 6 query heads, 2 KV heads over tensor=4
    ({}, dict(data=1, fsdp=2, tensor=4),
     ["parameter layers/attn/k (4, 192, 2, 32): dimension 2 (kv_heads, length 2) is not "
      "divisible by mesh axis tensor=4", "parameter layers/attn/v", "parameter layers/attn/q",
      "config.mesh.tensor=1 or 2", "model.n_kv_heads a multiple of 4"]),
    # a vocabulary that tensor=2 does not divide: embedding and lm head
    ({"vocab_size": 4095}, dict(data=1, fsdp=4, tensor=2),
     ["parameter embedding (4095, 192): dimension 0 (vocab, length 4095) is not divisible by "
      "mesh axis tensor=2", "parameter lm_head (192, 4095)", "config.mesh.tensor=1",
      "model.vocab_size a multiple of 2 (e.g. 4096"]),
    # d_model over fsdp=16
    ({"d_model": 200}, dict(data=1, fsdp=16, tensor=1),
     ["parameter final_norm/scale (200,): dimension 0 (embed, length 200) is not divisible "
      "by mesh axis fsdp=16", "config.mesh.fsdp=1, 2, 4, 5, 8 or 10",
      "model.d_model a multiple of 16 (e.g. 208)"]),
], ids=["kv_heads_over_tensor4", "vocab_over_tensor2", "embed_over_fsdp16"])
def test_indivisible_dimension_is_a_config_error(change, sizes, expected):
    model = dataclasses.replace(golden.preset_model("tiny"), **change)
    with pytest.raises(ConfigError) as info:
        _state_shardings(model, sizes)
    message = str(info.value)
    assert "never silently replicated" in message
    for text in expected:
        assert text in message, (text, message)


def test_state_shardings_on_abstract_meshes_match_the_tables_moments_included():
    """train/state.py state_shardings itself (not only the parameter helper the tables use)
    gives the checked-in specs, and lays each Adam moment out exactly like its parameter."""
    import jax
    from geb_jax.tree_paths import path_name
    preset = "tinyllama_1_1b"
    model = golden.preset_model(preset)
    for mesh_name, sizes in golden.MESHES.items():
        expected = {k: spec for k, (spec, _) in _golden_file_rows(preset, mesh_name).items()}
        sh = _state_shardings(model, sizes)
        params = {path_name(p): golden.format_spec(s.spec, len(s.spec))
                  for p, s in jax.tree_util.tree_leaves_with_path(sh.params)}
        assert params == expected, mesh_name
        moments = {path_name(p): golden.format_spec(s.spec, len(s.spec))
                   for p, s in jax.tree_util.tree_leaves_with_path(sh.opt_state) if len(s.spec)}
        assert len(moments) == 2 * len(params)  # Adam mu and nu
        for name, spec in moments.items():
            assert spec == next(v for k, v in params.items() if name.endswith("/" + k)), name


_REAL_MESH_SCRIPT = r"""
import json, os, sys
import jax
from geb_jax.config_base import base_config
from geb_jax.parallel.mesh import make_mesh
from geb_jax.tree_paths import path_name
from geb_jax.run_config import run_config
from geb_jax.train.optimizer import make_optimizer
from geb_jax.train.state import init_sharded_state, state_shardings
from tests import golden_sharding as golden
assert jax.device_count() == 8, jax.devices()
preset, mesh_name = sys.argv[2], sys.argv[3]
model = golden.preset_model(preset)
optimizer = make_optimizer(run_config(base_config()).optimizer)
mesh = make_mesh(golden.MESHES[mesh_name])
state = init_sharded_state(model, optimizer, 0, state_shardings(model, optimizer, mesh))
out = {"params": {}, "moments": {}}
for path, x in jax.tree_util.tree_leaves_with_path(state.params):
    out["params"][path_name(path)] = [golden.format_spec(x.sharding.spec, x.ndim),
                                      list(x.addressable_shards[0].data.shape)]
for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state):
    if x.ndim:
        out["moments"][path_name(path)] = golden.format_spec(x.sharding.spec, x.ndim)
json.dump(out, open(sys.argv[1], "w"))
"""


def _golden_file_rows(preset, mesh_name):
    with open(golden.golden_path(preset, mesh_name), encoding="utf-8") as f:
        lines = [line.rstrip("\n").split("\t") for line in f if not line.startswith("#")]
    header, *rows = lines
    assert header == ["path", "shape", "spec", "shard_shape"]
    return {path: (spec, shard) for path, _, spec, shard in rows}


def test_real_mesh_parameters_are_sharded_as_the_golden_table(tmp_path):
    """8 simulated CPU devices, the tiny preset on fsdp=4 x tensor=2, initialised by
    init_sharded_state: each parameter's .sharding.spec and first shard's shape are the checked-in
    table's (so the parameters really are split, not replicated), and each Adam moment has its
    parameter's spec."""
    preset, mesh_name = "tiny", "fsdp4_tensor2"
    out = tmp_path / "specs.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", _REAL_MESH_SCRIPT, str(out), preset, mesh_name],
                   cwd=REPO_ROOT, env=env, check=True, timeout=600)
    actual = json.loads(out.read_text())
    expected = _golden_file_rows(preset, mesh_name)
    assert set(actual["params"]) == set(expected)
    for name, (spec, shard) in actual["params"].items():
        assert (spec, str(tuple(shard))) == expected[name], name
    # the largest parameter, spelled out: the (4096, 192) embedding is split 2 x 4
    assert actual["params"]["embedding"] == ["[tensor, fsdp]", [2048, 48]]
    assert len(actual["moments"]) == 2 * len(expected)
    for name, spec in actual["moments"].items():
        param = next(k for k in expected if name.endswith("/" + k))
        assert spec == expected[param][0], name
