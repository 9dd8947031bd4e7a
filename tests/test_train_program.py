"""train/program.py: one builder for the step the loop runs and the benchmark times; the loop's
per-step host work.

The ahead-of-time compile on abstract shapes (what experiments/bench_train.py --aot reports
for GEB-1.3B without allocating it) must be the very program that runs on real arrays: same
HLO, same memory. The loop must not serialise the data iterator when it is not saving, and its
tokens/s must not count the first step's compilation.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np

from geb_jax.config_loader import apply_overrides, load_config
from geb_jax.parallel.mesh import make_mesh
from geb_jax.train import loop
from geb_jax.train.program import abstract_batch, build_step_program, compile_ahead, step_context
from geb_jax.train.state import init_sharded_state
from tests.conftest import REPO_ROOT

SMALL = {"model.d_model": 64, "model.n_layers": 2, "model.n_heads": 2, "model.n_kv_heads": 1,
         "model.d_ff": 128, "train.batch_size": 4, "train.seq_len": 64, "eval.every": 0,
         "train.log_every": 1}


def _config(tmp_path, **overrides):
    config = load_config(os.path.join(REPO_ROOT, "configs", "tiny.py:smoke"))
    return apply_overrides(config, {"workdir": str(tmp_path), **SMALL, **overrides})


def _batch(config):
    rng = np.random.default_rng(0)
    b, t = config.train.batch_size, config.train.seq_len
    ids = rng.integers(0, config.model.vocab_size, (b, t), dtype=np.int32)
    return {"inputs": ids, "targets": np.roll(ids, -1, axis=1),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
            "segment_ids": np.ones((b, t), np.int32), "loss_mask": np.ones((b, t), np.float32)}


def test_ahead_of_time_compile_is_the_program_that_runs(tmp_path):
    config = _config(tmp_path)
    mesh = make_mesh(config.mesh)
    batch = _batch(config)
    program = build_step_program(config, "pretrain", mesh, batch)
    _, memory = compile_ahead(program, batch)
    with step_context(mesh):
        state = init_sharded_state(program.model_config, program.optimizer, 0, program.state_sh)
        concrete = program.train_step.lower(state, batch, None)
        abstract = program.train_step.lower(program.abstract,
                                            abstract_batch(batch, program.batch_sh), None)
        assert abstract.as_text() == concrete.as_text()
        stats = concrete.compile().memory_analysis()
    assert memory["temp_bytes"] == stats.temp_size_in_bytes
    assert memory["argument_bytes"] == stats.argument_size_in_bytes
    # The argument bytes are the state and the batch, counted independently.
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    batch_bytes = sum(x.size * x.dtype.itemsize for x in batch.values())
    assert memory["argument_bytes"] == state_bytes + batch_bytes
    # The state is donated: its buffers are aliased to the new state, counted once in the peak.
    assert memory["alias_bytes"] == state_bytes
    assert memory["peak_bytes"] == (memory["argument_bytes"] + memory["output_bytes"]
                                    + memory["temp_bytes"] - memory["alias_bytes"])


def test_bench_train_cli_times_the_program_in_a_fresh_process(tmp_path):
    out = tmp_path / "bench.json"
    overrides = [f"--config.{k}={v}" for k, v in SMALL.items()]
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    for extra in ([], ["--aot"]):
        subprocess.run([sys.executable, os.path.join(REPO_ROOT, "experiments", "bench_train.py"),
                        "--config", os.path.join(REPO_ROOT, "configs", "tiny.py:smoke"),
                        "--steps", "2", "--warmup", "1", f"--json={out}", *overrides, *extra],
                       check=True, capture_output=True, cwd=tmp_path, env=env, timeout=300)
        result = json.loads(out.read_text())
        assert result["batch_size"] == 4 and result["seq_len"] == 64
        assert result["compiled_memory"]["peak_bytes"] > result["compiled_memory"]["alias_bytes"]
        assert ("tokens_per_s" in result) == (not extra)
    config = _config(tmp_path)
    program = build_step_program(config, "pretrain", make_mesh(config.mesh), _batch(config))
    _, memory = compile_ahead(program, _batch(config))
    assert result["compiled_memory"] == memory  # the CLI compiled the same program


def test_loop_serialises_the_iterator_only_when_saving(tmp_path, monkeypatch):
    calls = []
    real = loop.inputs.iterator_state
    monkeypatch.setattr(loop.inputs, "iterator_state",
                        lambda it: calls.append(1) or real(it))
    config = _config(tmp_path, **{"train.steps": 6, "optimizer.total_steps": 6,
                                  "checkpoint.every": 4})
    summary = loop.train(config, "pretrain")
    assert len(calls) == 2  # the saves at steps 4 and 6
    assert summary["compile_s"] > 0
    with open(tmp_path / "pretrain" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    train_rows = {r["step"]: r for r in rows if r["split"] == "train"}
    assert sorted(train_rows) == list(range(1, 7))
    # Step 1 compiled: it has a loss but no tokens/s; every later window has one.
    assert "tokens_per_s" not in train_rows[1]
    assert all(train_rows[s]["tokens_per_s"] > 0 for s in range(2, 7))
