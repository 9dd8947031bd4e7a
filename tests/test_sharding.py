"""Sharded training equals single-device training (8 simulated CPU devices, float32, 1e-5)."""
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
