"""geb_jax.checkpoint: exact round trip, periodic saves, keep-last-N, resharding onto other meshes
(8 simulated CPU devices, in a subprocess), corruption fallback, uncommitted saves, stop signals,
and the read-only stage reader (read_stage).

Run as a script (`python tests/test_checkpoint.py --worker DIR`) it is the subprocess behind the
`worker` fixture, started with XLA_FLAGS giving it 8 CPU devices.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from orbax.checkpoint.path import atomicity as ocp_atomicity

from geb_jax.checkpoint import (CheckpointError, Checkpointer, install_signal_save, read_stage,
                                should_stop, state_checksums)
from geb_jax.model import ModelConfig, abstract_params, init_params, param_logical_axes
from geb_jax.train.optimizer import OptimizerConfig, make_optimizer

LOGGER = "geb_jax.checkpoint.manager"

# When a tensorstore read of a corrupt checkpoint fails, orbax closes its event loop while other
# reads of the same restore are still completing; their callbacks then hit the closed loop
# ("Event loop is closed", reported by pytest as an unraisable exception in whichever test runs
# at that moment). Harmless: that restore has already failed and been handled.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
TMP_SUFFIX = ".orbax-checkpoint-tmp"


@flax.struct.dataclass
class State:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array  # typed key (jax.random.key)
    raw_rng: jax.Array  # uint32 key data
    rbg_rng: jax.Array  # typed key of another implementation (key data of shape (4,))
    stats: dict


def tiny_model() -> ModelConfig:
    # vocab 100 and 4 KV heads: divisible by the meshes the resharding tests restore onto
    return ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4,
                       head_dim=8, d_ff=64, max_seq_len=64)


def make_real_state(seed: int = 0, step: int = 1) -> State:
    """init_params + one AdamW update (non-zero moments, count = 1) + keys + statistics."""
    # An "rbg" key compiles the initialisers several times faster than threefry on CPU.
    params = init_params(tiny_model(), jax.random.key(seed, impl="rbg"))
    opt = make_optimizer(OptimizerConfig(peak_learning_rate=1e-3, min_learning_rate=1e-4,
                                         warmup_steps=2, total_steps=10))
    opt_state = opt.init(params)
    grads = jax.tree.map(lambda p: jnp.sin(p * 7.0 + 1.0), params)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return State(step=jnp.asarray(step, jnp.int32), params=params, opt_state=opt_state,
                 rng=jax.random.fold_in(jax.random.key(seed + 1), 5),
                 raw_rng=jax.random.key_data(jax.random.key(seed + 2)),
                 rbg_rng=jax.random.key(seed + 3, impl="rbg"),
                 stats={"loss_ema": jnp.float32(2.75 + seed),
                        "tokens": jnp.asarray(123456 + seed, jnp.int32)})


def small_state(step: int) -> dict:
    """A cheap state for the bookkeeping tests."""
    return {"step": jnp.asarray(step, jnp.int32),
            "w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4) * step,
            "rng": jax.random.key(step)}


def abstract_of(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)


def data_state_at(step: int) -> dict:
    return {"next_index": 17 * step, "epoch": 2, "shard": "train-00003", "seed": 0}


CONFIG = {"model": {"d_model": 32, "tie_embeddings": False}, "train": {"batch_size": 8},
          "mesh": {"data": -1, "fsdp": 1, "tensor": 1}, "name": "tiny", "lr": 4.0e-4}


def assert_states_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        assert a.dtype == b.dtype, jax.tree_util.keystr(path)
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            assert jax.random.key_impl(a) == jax.random.key_impl(b)
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                      err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def real_state() -> State:
    return jax.jit(make_real_state, static_argnums=(0, 1))(0, 1)  # eager init takes 3x longer


def save_steps(directory, steps) -> None:
    with Checkpointer(directory, save_every=1, keep=None) as ckpt:
        for step in steps:
            assert ckpt.maybe_save(step, small_state(step), data_state_at(step), CONFIG)


# ---- round trip -------------------------------------------------------------------------------
@pytest.mark.parametrize("async_save", [True, False])
def test_real_state_round_trip_is_exact(tmp_path, real_state, async_save):
    directory = tmp_path / "ckpt"
    with Checkpointer(directory, save_every=2, keep=3, async_save=async_save) as ckpt:
        # A copy that is deleted right after maybe_save returns, as a donating train step would.
        donated = jax.tree.map(jnp.copy, real_state)
        assert ckpt.maybe_save(4, donated, data_state_at(4), CONFIG)
        for leaf in jax.tree.leaves(donated):
            leaf.delete()
        ckpt.wait()
        assert ckpt.latest_good_step() == 4
    with Checkpointer(directory, save_every=2, keep=3) as ckpt:  # as after a restart
        state, data_state, config, step = ckpt.restore(abstract_of(real_state))
    assert step == 4
    assert isinstance(state, State)
    assert_states_equal(state, real_state)
    assert int(state.opt_state[2][0].count) == 1  # adam's update count
    assert jax.dtypes.issubdtype(state.rng.dtype, jax.dtypes.prng_key)
    assert data_state == data_state_at(4)
    assert config == json.loads(json.dumps(CONFIG))
    # The restored rng continues the same random stream.
    np.testing.assert_array_equal(jax.random.uniform(state.rng, (3,)),
                                  jax.random.uniform(real_state.rng, (3,)))


def test_restore_by_explicit_step_and_missing_step(tmp_path):
    directory = tmp_path / "ckpt"
    save_steps(directory, [2, 4])
    with Checkpointer(directory, save_every=2, keep=3) as ckpt:
        state, data_state, _, step = ckpt.restore(abstract_of(small_state(2)), step=2)
        assert step == 2 and data_state == data_state_at(2)
        assert_states_equal(state, small_state(2))
        with pytest.raises(CheckpointError, match="No committed checkpoint for step 3"):
            ckpt.restore(abstract_of(small_state(2)), step=3)


def test_checksums_see_every_element_and_every_dtype():
    state = {"f32": jnp.linspace(-1, 1, 24, dtype=jnp.float32).reshape(2, 3, 4),
             "bf16": jnp.arange(6, dtype=jnp.bfloat16), "flag": jnp.array([True, False]),
             "i8": jnp.arange(5, dtype=jnp.int8), "key": jax.random.key(1),
             "raw": jax.random.key_data(jax.random.key(2)), "scalar": jnp.float32(0.5)}
    base = state_checksums(state)
    assert set(base) == set(state)
    assert state_checksums(jax.tree.map(jnp.copy, state)) == base
    changed = dict(state, f32=state["f32"].at[1, 2, 3].set(0.0))
    assert state_checksums(changed)["f32"] != base["f32"]
    swapped = dict(state, i8=state["i8"][jnp.array([1, 0, 2, 3, 4])])  # same sum, other order
    assert state_checksums(swapped)["i8"][0] == base["i8"][0]
    assert state_checksums(swapped)["i8"][1] != base["i8"][1]
    for name, value in [("bf16", state["bf16"].at[0].set(-0.0)), ("flag", ~state["flag"]),
                        ("key", jax.random.key(3)), ("scalar", jnp.float32(-0.5))]:
        assert state_checksums(dict(state, **{name: value}))[name] != base[name], name


# ---- periodic saves and keep-last-N ----------------------------------------------------------
def test_periodic_saves_force_and_keep_last_n(tmp_path):
    with Checkpointer(tmp_path / "ckpt", save_every=3, keep=2) as ckpt:
        assert [ckpt.should_save(s) for s in range(8)] == [False, False, False, True, False,
                                                          False, True, False]
        saved = [s for s in range(1, 11)
                 if ckpt.maybe_save(s, small_state(s), data_state_at(s), CONFIG)]
        assert saved == [3, 6, 9]
        assert ckpt.maybe_save(10, small_state(10), data_state_at(10), CONFIG, force=True)
        # Already saved: the final save right after a periodic one is a no-op.
        assert not ckpt.maybe_save(10, small_state(10), data_state_at(10), CONFIG, force=True)
        assert ckpt.all_steps() == [9, 10]
        assert sorted(os.listdir(tmp_path / "ckpt")) == ["10", "9"]
    with Checkpointer(tmp_path / "never", save_every=0, keep=1) as ckpt:
        assert not any(ckpt.should_save(s) for s in range(5))
        assert not ckpt.maybe_save(4, small_state(4), data_state_at(4), CONFIG)
        assert ckpt.maybe_save(5, small_state(5), data_state_at(5), CONFIG, force=True)
        assert ckpt.all_steps() == [5]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="save_every"):
        Checkpointer(tmp_path / "a", save_every=-1, keep=1)
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(tmp_path / "a", save_every=1, keep=0)
    with Checkpointer(tmp_path / "b", save_every=1, keep=1) as ckpt:
        with pytest.raises(TypeError, match="data_state"):  # tuple would come back as a list
            ckpt.maybe_save(1, small_state(1), {"order": (1, 2)}, CONFIG)
        with pytest.raises(TypeError, match="config"):
            ckpt.maybe_save(1, small_state(1), data_state_at(1), {"f": object()})


def test_saving_behind_unrestored_newer_steps_raises(tmp_path):
    directory = tmp_path / "ckpt"
    save_steps(directory, [6])
    with Checkpointer(directory, save_every=2, keep=3) as ckpt:
        with pytest.raises(CheckpointError, match=r"newer than step 4.*restore\(\)"):
            ckpt.maybe_save(4, small_state(4), data_state_at(4), CONFIG)


# ---- resharding -------------------------------------------------------------------------------
def _dump_state(state, path) -> None:
    """Leaves as numpy (typed keys as key data + implementation name), so that the worker need
    not rebuild (recompile) the state."""
    leaves = jax.tree.leaves(state)
    np.savez(path, *[np.asarray(jax.random.key_data(x) if _is_key(x) else x) for x in leaves],
             impls=np.array([str(jax.random.key_impl(x)) if _is_key(x) else "" for x in leaves]))


def _load_state(path) -> State:
    like = jax.eval_shape(make_real_state, 0, 1)
    with np.load(path) as npz:
        arrays = [npz[f"arr_{i}"] for i in range(len(npz.files) - 1)]
        impls = list(npz["impls"])
    leaves = [jax.random.wrap_key_data(a, impl=str(impl)) if impl else jnp.asarray(a)
              for a, impl in zip(arrays, impls)]
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


@pytest.fixture(scope="module")
def worker(tmp_path_factory, real_state):
    """Runs this file as a subprocess with 8 simulated CPU devices (the flag must be set before
    jax is imported, and this process keeps its single device): `_worker` saves and restores
    across mesh shapes, then starts a save that never commits and exits without waiting."""
    directory = tmp_path_factory.mktemp("worker")
    _dump_state(real_state, directory / "reference.npz")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                          + " --xla_force_host_platform_device_count=8").strip())
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker",
                             str(directory)], env=env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return directory, result.stdout


def test_restore_onto_other_mesh_shapes(worker):
    _, stdout = worker
    for line in ["saved on (8, 1, 1), restored on (2, 2, 2): equal",
                 "saved on (8, 1, 1), restored on (1, 2, 4): equal",
                 "saved on (1, 2, 4), restored on (2, 2, 2): equal"]:
        assert line in stdout, stdout[-3000:]


def test_save_cut_off_by_process_exit_is_never_restored(worker):
    directory, stdout = worker
    assert "INTERRUPTED" in stdout, stdout[-3000:]
    directory = directory / "interrupted"
    leftovers = [n for n in os.listdir(directory) if n.startswith(f"4{TMP_SUFFIX}")]
    assert leftovers and "4" not in os.listdir(directory), os.listdir(directory)
    with Checkpointer(directory, save_every=2, keep=3) as ckpt:
        assert ckpt.all_steps() == [2] and ckpt.latest_good_step() == 2
        state, data_state, _, step = ckpt.restore(abstract_of(small_state(2)))
        assert step == 2 and data_state == data_state_at(2)
        assert_states_equal(state, small_state(2))


def _state_shardings(state_shapes, mesh):
    """Parameters (and optimizer moments, matched by path suffix and shape) by the logical
    rules; everything else replicated."""
    from jax.sharding import NamedSharding, PartitionSpec
    from geb_jax.parallel.mesh import logical_to_shardings
    shapes = abstract_params(tiny_model())
    param_sh = logical_to_shardings(param_logical_axes(tiny_model()), shapes, mesh)
    by_path = {tuple(str(getattr(k, "key", k)) for k in path): (sh, leaf.shape)
               for (path, sh), leaf in zip(jax.tree_util.tree_flatten_with_path(param_sh)[0],
                                           jax.tree.leaves(shapes))}

    def pick(path, leaf):
        names = tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                      for k in path)
        for suffix, (sh, shape) in by_path.items():
            if names[-len(suffix):] == suffix and leaf.shape == shape:
                return sh
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(pick, state_shapes)


def _worker(directory: str) -> None:
    _mesh_phase(directory)
    _interrupted_phase(directory)


def _interrupted_phase(directory: str) -> None:
    """Commits step 2, then starts step 4 whose commit (orbax's rename of the temporary
    directory) never happens, waits until its files are written, and dies without cleanup."""
    import asyncio
    directory = os.path.join(directory, "interrupted")
    ckpt = Checkpointer(directory, save_every=2, keep=3, async_save=True)
    assert ckpt.maybe_save(2, small_state(2), data_state_at(2), CONFIG, force=True)

    async def hang(self):  # the process is killed before the rename
        await asyncio.sleep(3600)

    ocp_atomicity.AtomicRenameTemporaryPath.finalize = hang
    assert ckpt.maybe_save(4, small_state(4), data_state_at(4), CONFIG)
    import time
    time.sleep(0.5)  # let the data files be written (the commit still hangs)
    print("INTERRUPTED", sorted(os.listdir(directory)), flush=True)
    os._exit(0)  # like SIGKILL: no atexit, no wait


def _mesh_phase(directory: str) -> None:
    from geb_jax.parallel.mesh import make_mesh
    assert jax.device_count() == 8, jax.devices()
    reference = _load_state(os.path.join(directory, "reference.npz"))
    meshes = {shape: make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)))
              for shape in [(8, 1, 1), (2, 2, 2), (1, 2, 4)]}
    # (8, 1, 1) replicates the parameters (they shard over fsdp x tensor only); (1, 2, 4) really
    # shards them, so restoring its checkpoint on (2, 2, 2) moves shard boundaries.
    plan = {(8, 1, 1): [(2, 2, 2), (1, 2, 4)], (1, 2, 4): [(2, 2, 2)]}
    for save_shape, restore_shapes in plan.items():
        save_dir = os.path.join(directory, "x".join(map(str, save_shape)))
        shardings = _state_shardings(reference, meshes[save_shape])
        state = jax.device_put(reference, shardings)
        with Checkpointer(save_dir, save_every=7, keep=2) as ckpt:
            assert ckpt.maybe_save(7, state, data_state_at(7), CONFIG)
        for restore_shape in restore_shapes:
            target = _state_shardings(reference, meshes[restore_shape])
            abstract = jax.tree.map(
                lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                reference, target)
            with Checkpointer(save_dir, save_every=7, keep=2) as ckpt:
                restored, data_state, _, step = ckpt.restore(abstract)
            assert step == 7 and data_state == data_state_at(7)
            assert_states_equal(restored, reference)
            for leaf, sh in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
                assert leaf.sharding == sh, (leaf.sharding, sh)
            if restore_shape == (1, 2, 4):  # really sharded, not everything replicated
                assert not restored.params["embedding"].sharding.is_fully_replicated
            print(f"saved on {save_shape}, restored on {restore_shape}: equal")


# ---- corruption -------------------------------------------------------------------------------
def _zero(path):
    with open(path, "r+b") as f:
        size = os.path.getsize(path)
        f.write(b"\0" * size)


def _corrupt(step_dir: str, kind: str) -> str:
    """Damages a committed step directory; returns a regex the WARNING must contain."""
    state_dir = os.path.join(step_dir, "state")
    if kind == "zero_array_data":  # every data file of the OCDBT store (root and per process)
        for root, _, files in os.walk(state_dir):
            if os.path.basename(root) == "d":
                for name in files:
                    _zero(os.path.join(root, name))
        return "cannot read the state metadata|reading it failed"
    if kind == "delete_manifest":
        os.remove(os.path.join(state_dir, "manifest.ocdbt"))
        return "cannot read the state metadata|reading it failed"
    if kind == "zero_state_metadata":
        _zero(os.path.join(state_dir, "_METADATA"))
        return "cannot read the state metadata"
    if kind == "truncate_data_state":
        os.truncate(os.path.join(step_dir, "data_state", "metadata"), 3)
        return "reading it failed"
    if kind == "missing_commit_marker":
        os.remove(os.path.join(step_dir, "commit_success.txt"))
        return "commit marker commit_success.txt is missing"
    if kind == "delete_item":
        shutil.rmtree(os.path.join(step_dir, "config"))
        return r"item directory \['config'\] missing"
    if kind == "checksum_mismatch":  # data readable but not what was saved
        meta_path = os.path.join(step_dir, "meta", "metadata")
        with open(meta_path) as f:
            meta = json.load(f)
        meta["checksums"]["w"][1] ^= 1
        with open(meta_path, "w") as f:
            json.dump(meta, f)
        return r"differ from the checksums recorded at save time \(leaves \['w'\]\)"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["zero_array_data", "delete_manifest", "zero_state_metadata",
                                  "truncate_data_state", "missing_commit_marker", "delete_item",
                                  "checksum_mismatch"])
def test_corrupt_latest_falls_back_with_warning(tmp_path, caplog, kind):
    directory = tmp_path / "ckpt"
    save_steps(directory, [2, 4])
    pattern = _corrupt(str(directory / "4"), kind)
    with Checkpointer(directory, save_every=2, keep=3) as ckpt:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            state, data_state, _, step = ckpt.restore(abstract_of(small_state(2)))
        assert step == 2
        assert_states_equal(state, small_state(2))
        assert data_state == data_state_at(2)
        warnings = [r.getMessage() for r in caplog.records
                    if r.name == LOGGER and r.levelno == logging.WARNING]
        assert any("step 4" in w and "Falling back" in w and str(directory) in w
                   and re.search(pattern, w) for w in warnings), (pattern, warnings)
        assert ckpt.latest_good_step() == 2
        # The run continues from 2; its next save removes the corrupt step 4 and replaces it.
        assert ckpt.maybe_save(4, small_state(4), data_state_at(4), CONFIG)
        ckpt.wait()
        assert ckpt.all_steps() == [2, 4]
        state, _, _, step = ckpt.restore(abstract_of(small_state(4)))
        assert step == 4
        assert_states_equal(state, small_state(4))


def test_no_good_checkpoint_raises(tmp_path, caplog):
    with Checkpointer(tmp_path / "empty", save_every=1, keep=2) as ckpt:
        with pytest.raises(CheckpointError, match="No committed checkpoint"):
            ckpt.restore(abstract_of(small_state(1)))
        assert ckpt.latest_good_step() is None
    directory = tmp_path / "ckpt"
    save_steps(directory, [1, 2])
    _corrupt(str(directory / "1"), "zero_array_data")
    _corrupt(str(directory / "2"), "zero_state_metadata")
    with Checkpointer(directory, save_every=1, keep=2) as ckpt:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            with pytest.raises(CheckpointError) as info:
                ckpt.restore(abstract_of(small_state(1)))
    message = str(info.value)
    assert str(directory) in message and "Delete that directory" in message
    assert "step 1:" in message and "step 2:" in message
    assert "workdir elsewhere" in message


def test_structure_mismatch_is_not_treated_as_corruption(tmp_path, caplog):
    directory = tmp_path / "ckpt"
    save_steps(directory, [2, 4])
    wrong = abstract_of(small_state(4))
    wrong["w"] = jax.ShapeDtypeStruct((4, 3), jnp.float32, sharding=wrong["w"].sharding)
    wrong["extra"] = wrong["step"]
    with Checkpointer(directory, save_every=2, keep=3) as ckpt:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            with pytest.raises(CheckpointError, match=r"different state structure.*extra.*"
                                                      r"w: checkpoint \(3, 4\)"):
                ckpt.restore(wrong)
        assert not [r for r in caplog.records if r.name == LOGGER]  # no fallback attempted
        assert ckpt.latest_good_step() == 4


# ---- uncommitted saves ------------------------------------------------------------------------
def test_uncommitted_temporary_directory_is_ignored_then_cleaned_up(tmp_path):
    directory = tmp_path / "ckpt"
    save_steps(directory, [2])
    with Checkpointer(directory, save_every=2, keep=3) as ckpt:
        # An interrupted save of step 6: complete files, but never renamed (never committed).
        shutil.copytree(directory / "2", directory / f"6{TMP_SUFFIX}")
        assert ckpt.all_steps() == [2]
        assert ckpt.latest_good_step() == 2
        state, _, _, step = ckpt.restore(abstract_of(small_state(2)))
        assert step == 2
        assert_states_equal(state, small_state(2))
    # The next run removes the leftover (orbax does it in the background, and waits for it
    # before its first save), so a later save of step 6 cannot collide with it.
    with Checkpointer(directory, save_every=2, keep=3) as ckpt:
        ckpt.restore(abstract_of(small_state(2)))
        assert ckpt.maybe_save(6, small_state(6), data_state_at(6), CONFIG, force=True)
        assert not (directory / f"6{TMP_SUFFIX}").exists()
        assert ckpt.latest_good_step() == 6
        assert sorted(os.listdir(directory)) == ["2", "6"]


def test_async_save_in_flight_is_not_listed_until_committed(tmp_path):
    directory = tmp_path / "ckpt"
    with Checkpointer(directory, save_every=1, keep=3, async_save=True) as ckpt:
        assert ckpt.maybe_save(1, small_state(1), data_state_at(1), CONFIG)
        # In flight: orbax's temporary directory (or already renamed); never half of both.
        assert set(os.listdir(directory)) <= {"1", f"1{TMP_SUFFIX}"}
        ckpt.wait()
        assert os.listdir(directory) == ["1"]
        assert (directory / "1" / "commit_success.txt").exists()


# ---- read-only stage reading (reader.read_stage) ----------------------------------------------
READER_LOGGER = "geb_jax.checkpoint.reader"
RUN_CONFIG = {**CONFIG, "model": dataclasses.asdict(tiny_model())}


def stage_state(step: int) -> dict:
    """A cheap train-state-like tree: the reader keeps only its "params" subtree."""
    return {"step": jnp.asarray(step, jnp.int32),
            "params": {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4) * step,
                       "norm": {"scale": jnp.full((5,), step, jnp.bfloat16)}},
            "opt_state": {"mu": jnp.ones((3, 4), jnp.float32) * -step},
            "rng": jax.random.key(step)}


def save_stage_steps(stage_dir, steps) -> None:
    with Checkpointer(stage_dir / "checkpoints", save_every=1, keep=None) as ckpt:
        for step in steps:
            assert ckpt.maybe_save(step, stage_state(step), data_state_at(step), RUN_CONFIG)


def assert_numpy_params_equal(got, want):
    """got: numpy leaves; want: the saved jax tree. Same paths, dtypes and exact bits."""
    got_leaves = jax.tree_util.tree_flatten_with_path(got)[0]
    want_leaves = jax.tree_util.tree_flatten_with_path(want)[0]
    assert [p for p, _ in got_leaves] == [p for p, _ in want_leaves]
    for (path, a), (_, b) in zip(got_leaves, want_leaves):
        assert isinstance(a, np.ndarray), jax.tree_util.keystr(path)
        assert a.dtype == b.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(a, np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_read_stage_equals_checkpointer_restore(tmp_path, real_state):
    stage_dir = tmp_path / "run" / "sft"
    with Checkpointer(stage_dir / "checkpoints", save_every=0, keep=None) as ckpt:
        assert ckpt.maybe_save(4, real_state, data_state_at(4), RUN_CONFIG, force=True)
    stage = read_stage(stage_dir)
    assert stage.step == 4
    assert stage.model_config == tiny_model()
    assert stage.config == json.loads(json.dumps(RUN_CONFIG))
    assert stage.tokenizer_path is None  # the workdir has no tokenizer.model yet
    assert_numpy_params_equal(stage.params, real_state.params)  # what was saved
    with Checkpointer(stage_dir / "checkpoints", save_every=0, keep=None) as ckpt:
        restored, *_ = ckpt.restore(abstract_of(real_state))
    assert_numpy_params_equal(stage.params, restored.params)  # what training would restore

    (tmp_path / "run" / "tokenizer.model").write_bytes(b"not parsed by the reader")
    assert read_stage(str(stage_dir)).tokenizer_path == str(tmp_path / "run" / "tokenizer.model")


@pytest.mark.parametrize("kind", ["params_checksum", "zero_array_data", "missing_commit_marker",
                                  "delete_item"])
def test_read_stage_falls_back_past_corrupt_newest_with_warning(tmp_path, caplog, kind):
    stage_dir = tmp_path / "sft"
    save_stage_steps(stage_dir, [2, 4])
    step_dir = stage_dir / "checkpoints" / "4"
    if kind == "params_checksum":  # readable, but not the values that were saved
        meta = json.loads((step_dir / "meta" / "metadata").read_text())
        meta["checksums"]["params/norm/scale"][0] ^= 1
        (step_dir / "meta" / "metadata").write_text(json.dumps(meta))
        pattern = r"differ from the checksums recorded at save time.*params/norm/scale"
    else:
        pattern = {"zero_array_data": "reading it failed|cannot read the state metadata|differ "
                                      "from the checksums",
                   "missing_commit_marker": "commit marker commit_success.txt is missing",
                   "delete_item": r"item directory \['config'\] missing"}[kind]
        _corrupt(str(step_dir), kind)
    with caplog.at_level(logging.WARNING, logger=READER_LOGGER):
        stage = read_stage(stage_dir)
    assert stage.step == 2
    assert_numpy_params_equal(stage.params, stage_state(2)["params"])
    warnings = [r.getMessage() for r in caplog.records
                if r.name == READER_LOGGER and r.levelno == logging.WARNING]
    assert any("step 4" in w and "Falling back" in w and re.search(pattern, w)
               for w in warnings), (pattern, warnings)

    # An explicit step is read or raises: no fallback, no warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=READER_LOGGER):
        with pytest.raises(CheckpointError, match=r"step 4 in .* is unusable.*committed: \[2, 4\]"):
            read_stage(stage_dir, step=4)
    assert not [r for r in caplog.records if r.name == READER_LOGGER]


def test_read_stage_errors_name_the_stage_step_and_alternatives(tmp_path):
    workdir = tmp_path / "run"
    save_stage_steps(workdir / "sft", [2, 4])
    assert read_stage(workdir / "sft", step=2).step == 2
    for bad in (3, "4", True):
        with pytest.raises(CheckpointError,
                           match=rf"No committed checkpoint for step={bad!r}.*committed steps: "
                                 r"\[2, 4\]"):
            read_stage(workdir / "sft", step=bad)
    with pytest.raises(CheckpointError, match=r"stage 'dpo' has not been trained.*"
                                              r"stages with checkpoints there: \['sft'\]"):
        read_stage(workdir / "dpo")
    with pytest.raises(CheckpointError, match=r"is a workdir: name one of its stages \['sft'\]"):
        read_stage(workdir)
    (workdir / "pretrain" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="holds no committed checkpoint"):
        read_stage(workdir / "pretrain")
    for step in (2, 4):
        _corrupt(str(workdir / "sft" / "checkpoints" / str(step)), "missing_commit_marker")
    with pytest.raises(CheckpointError, match=r"No usable checkpoint .*step 4: .*step 2: "):
        read_stage(workdir / "sft")


def _tree_listing(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, name), root)
                  for d, dirs, files in os.walk(root) for name in dirs + files)


def test_read_stage_deletes_and_creates_nothing(tmp_path):
    """A leftover temporary step folder may be the save in flight of a run still training:
    Checkpointer() would remove it (see the uncommitted-temporary-directory test above)."""
    stage_dir = tmp_path / "sft"
    save_stage_steps(stage_dir, [2])
    checkpoints = stage_dir / "checkpoints"
    shutil.copytree(checkpoints / "2", checkpoints / f"6{TMP_SUFFIX}")  # complete, uncommitted
    before = _tree_listing(tmp_path)
    assert read_stage(stage_dir).step == 2  # the uncommitted step is not a candidate
    with pytest.raises(CheckpointError, match="step=6"):
        read_stage(stage_dir, step=6)
    assert _tree_listing(tmp_path) == before


# ---- stop signals -----------------------------------------------------------------------------
def test_sigterm_sets_the_stop_flag_and_handlers_are_restored():
    received = []
    sentinel = lambda signum, frame: None  # noqa: E731
    old_term = signal.signal(signal.SIGTERM, sentinel)
    try:
        assert not should_stop()
        with install_signal_save(received.append) as stop:
            assert not stop.should_stop() and not should_stop()
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.should_stop() and should_stop()
            assert stop.signum == signal.SIGTERM and received == [signal.SIGTERM]
            os.kill(os.getpid(), signal.SIGTERM)  # repeated SIGTERM: still just stopping
            assert received == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is sentinel
        assert not should_stop()
    finally:
        signal.signal(signal.SIGTERM, old_term)


def test_second_sigint_aborts():
    previous = signal.getsignal(signal.SIGINT)
    with install_signal_save() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.should_stop() and stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        sys.exit(f"usage: {sys.argv[0]} --worker DIR")
