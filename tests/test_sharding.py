"""Sharded training equals single-device training (8 simulated CPU devices, float32, 1e-5);
and on 4 simulated devices each parameter and Adam moment is really split as the logical-axis
rules say (a table written out here, not read from the code)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO_ROOT

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)]


def _run(tmp_path, dims):
    out = tmp_path / ("run_" + "_".join(map(str, dims)) + ".npz")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-m", "tests.sharded_run", str(out), *map(str, dims)],
                   cwd=REPO_ROOT, env=env, check=True, timeout=600)
    return dict(np.load(out))


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("single"), (1, 1, 1))


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "x".join(map(str, m)))
def test_mesh_matches_single_device(tmp_path, single_device, mesh):
    sharded = _run(tmp_path, mesh)
    assert abs(single_device["losses"][0] - single_device["losses"][-1]) > 1e-3  # it trained
    np.testing.assert_allclose(sharded["losses"], single_device["losses"], atol=1e-5, rtol=0)
    assert sharded.keys() == single_device.keys()
    for name in single_device:
        np.testing.assert_allclose(sharded[name], single_device[name], atol=1e-5, rtol=0,
                                   err_msg=name)


def test_microbatches_match_one_big_batch(tmp_path, single_device):
    accumulated = _run(tmp_path, (2, 1, 1, 4))  # 4 micro-batches of 2 rows, on 2 devices
    np.testing.assert_allclose(accumulated["losses"], single_device["losses"], atol=1e-5, rtol=0)
    for name in single_device:
        np.testing.assert_allclose(accumulated[name], single_device[name], atol=1e-5, rtol=0)


def test_two_processes_match_one_process(tmp_path, single_device):
    """jax.distributed: 2 local processes x 4 simulated CPU devices == 1 process x 8."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two_procs.npz"
    procs = []
    for pid in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
                   JAX_PLATFORMS="cpu", GEB_JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   GEB_JAX_NUM_PROCESSES="2", GEB_JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.sharded_run", str(out), "8", "1", "1"],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-2000:] for log in logs)
    two = dict(np.load(out))
    np.testing.assert_allclose(two["losses"], single_device["losses"], atol=1e-5, rtol=0)
    for name in single_device:
        np.testing.assert_allclose(two[name], single_device[name], atol=1e-5, rtol=0)


# ---- the layout itself: every parameter and Adam moment split as the rules say -------------
# Written out here from the design (parallel/mesh.py's docstring: parameters ZeRO-3 over fsdp
# on d_model, Megatron over tensor on heads / FFN / vocabulary; the layer stack and head_dim
# whole), not read from the code: each parameter's dimensions by what they mean in a Llama
# block, and each meaning's mesh axis.
RULES = {"embed": "fsdp", "vocab": "tensor", "heads": "tensor", "kv_heads": "tensor",
         "mlp": "tensor", "layers": None, "head_dim": None}
PARAM_AXES = {
    "embedding": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "final_norm/scale": ("embed",),
    "layers/attn_norm/scale": ("layers", "embed"),
    "layers/mlp_norm/scale": ("layers", "embed"),
    "layers/attn/q": ("layers", "embed", "heads", "head_dim"),
    "layers/attn/k": ("layers", "embed", "kv_heads", "head_dim"),
    "layers/attn/v": ("layers", "embed", "kv_heads", "head_dim"),
    "layers/attn/o": ("layers", "heads", "head_dim", "embed"),
    "layers/mlp/gate": ("layers", "embed", "mlp"),
    "layers/mlp/up": ("layers", "embed", "mlp"),
    "layers/mlp/down": ("layers", "mlp", "embed"),
}
# Every length different, so a dimension split along the wrong axis shows in the shapes.
LENGTHS = {"vocab": 96, "embed": 40, "layers": 3, "heads": 6, "kv_heads": 2, "head_dim": 10,
           "mlp": 56}
LAYOUT_MESH = dict(data=1, fsdp=2, tensor=2)  # both parameter axes split; one compile (~9 s CPU)

_LAYOUT_SCRIPT = r"""
import json, sys
import jax
from geb_jax.config_base import base_config
from geb_jax.model import ModelConfig
from geb_jax.parallel.mesh import make_mesh
from geb_jax.run_config import run_config
from geb_jax.train.optimizer import make_optimizer
from geb_jax.train.state import init_sharded_state, state_shardings
from geb_jax.tree_paths import path_name
assert jax.device_count() == 4, jax.devices()
lengths, sizes = json.loads(sys.argv[2]), json.loads(sys.argv[3])
model = ModelConfig(vocab_size=lengths["vocab"], d_model=lengths["embed"],
                    n_layers=lengths["layers"], n_heads=lengths["heads"],
                    n_kv_heads=lengths["kv_heads"], head_dim=lengths["head_dim"],
                    d_ff=lengths["mlp"], max_seq_len=32)
optimizer = make_optimizer(run_config(base_config()).optimizer)
mesh = make_mesh(sizes)
state = init_sharded_state(model, optimizer, 0, state_shardings(model, optimizer, mesh))
json.dump({path_name(path): {
    "shape": list(x.shape), "spec": [e if e is None or isinstance(e, str) else list(e)
                                     for e in x.sharding.spec],
    "shards": sorted({str(tuple(s.data.shape)) for s in x.addressable_shards}),
    "pieces": len({str(s.index) for s in x.addressable_shards}),
    "devices": len(x.addressable_shards)}
    for path, x in jax.tree_util.tree_leaves_with_path(state)}, open(sys.argv[1], "w"))
"""


def _expected_leaf(axes, sizes):
    """(shape, spec, shard shapes, distinct pieces) of a leaf whose dimensions mean `axes`."""
    shape = [LENGTHS[a] for a in axes]
    split = [sizes[RULES[a]] if RULES[a] else 1 for a in axes]
    shard = str(tuple(n // k for n, k in zip(shape, split)))
    return shape, [RULES[a] for a in axes], [shard], int(np.prod(split))


def _role(name):
    """("params" | "mu" | "nu", parameter name) of a parameter or an Adam moment, else None."""
    for param in PARAM_AXES:
        if name == "params/" + param:
            return "params", param
        for moment in ("mu", "nu"):
            if name.startswith("opt_state/") and name.endswith(f"/{moment}/{param}"):
                return moment, param
    return None


def test_each_parameter_and_moment_is_split_as_the_rules_say(tmp_path):
    """4 simulated CPU devices, the real train state (init_sharded_state under
    state_shardings): each parameter's PartitionSpec, global shape, per-device shard shape and
    number of distinct pieces equal the table above; each Adam moment (mu, nu) is laid out like
    its parameter; every other leaf (step, counters, rng, running averages) is replicated."""
    out = tmp_path / "layout.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", _LAYOUT_SCRIPT, str(out), json.dumps(LENGTHS),
                    json.dumps(LAYOUT_MESH)], cwd=REPO_ROOT, env=env, check=True, timeout=600)
    leaves = json.loads(out.read_text())
    roles = {name: _role(name) for name in leaves}
    assert sorted(r for r in roles.values() if r) == sorted(
        (kind, p) for p in PARAM_AXES for kind in ("params", "mu", "nu"))  # each exactly once
    for name, leaf in leaves.items():
        rank = len(leaf["shape"])
        got = (leaf["shape"], leaf["spec"] + [None] * (rank - len(leaf["spec"])),
               leaf["shards"], leaf["pieces"])
        if roles[name]:
            assert got == _expected_leaf(PARAM_AXES[roles[name][1]], LAYOUT_MESH), name
        else:  # step, Adam's count, rng (2,), the loss / grad-norm averages: whole everywhere
            assert rank <= 1 and got[1:] == ([None] * rank, [str(tuple(leaf["shape"]))], 1), name
        assert leaf["devices"] == 4, name
    # spelled out once: the (96, 40) embedding in 4 distinct (48, 20) pieces, one per device
    assert leaves["params/embedding"]["shards"] == ["(48, 20)"]
    assert leaves["params/embedding"]["pieces"] == 4
