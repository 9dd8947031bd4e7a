"""experiments/bench_cpu.py end to end on the tiny preset (prompt 16, decode 4, numpy and
onnxruntime, f32 and int8): token counts, the tokens/s and bandwidth-bound arithmetic, and the
weight bytes read per decoded token against closed forms written here from the config's shapes.
"""
import importlib.util
import json
import os
import statistics
import subprocess
import sys

import pytest

from geb_jax.config_loader import load_config
from geb_jax.model import ModelConfig

from tests.conftest import REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, "experiments", "bench_cpu.py")
PROMPT, DECODE = 16, 4


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_cpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_cpu"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _run(out):
    return subprocess.run(
        [sys.executable, SCRIPT, "--models", "tiny", "--dtypes", "f32,int8",
         "--engines", "numpy,onnxruntime", "--prompt", str(PROMPT), "--decode", str(DECODE),
         "--threads", "1", "--repeats", "2", "--bandwidth-mib", "32", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = _run(out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(out) as f:
        return out, proc.stdout, json.load(f)


def _tiny() -> ModelConfig:
    return ModelConfig.from_dict(load_config(os.path.join(REPO_ROOT, "configs", "tiny.py")).model)


def _matrices(c: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) of every layer matmul of one layer, q k v gate up down o separately."""
    d, n, k, h, f = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff
    return [(d, n * h), (d, k * h), (d, k * h), (n * h, d), (d, f), (d, f), (f, d)]


def _expected_bytes(c: ModelConfig, engine: str, dtype: str) -> int:
    """Bytes one decode step reads: layer matrices in the engine's format, float32 norms,
    the head (D x V: float32 in numpy, the layers' format in onnxruntime; tiny's is untied),
    one float32 embedding row."""
    per_matrix = {
        "f32": lambda i, o: 4 * i * o,
        # numpy int8: int8 codes + one float32 scale per output column
        ("numpy", "int8"): lambda i, o: i * o + 4 * o,
        # MatMulNBits 8-bit, blocks of 32 along `in`, symmetric: a float32 scale per block
        ("onnxruntime", "int8"): lambda i, o: o * -(-i // 32) * (32 + 4),
    }["f32" if dtype == "f32" else (engine, dtype)]
    layer = sum(per_matrix(i, o) for i, o in _matrices(c)) + 2 * 4 * c.d_model
    head = per_matrix(c.d_model, c.vocab_size) if engine == "onnxruntime" else \
        4 * c.d_model * c.vocab_size
    return c.n_layers * layer + 4 * c.d_model + head + 4 * c.d_model


def test_every_row_ran_with_the_asked_token_counts(bench):
    _, _, data = bench
    rows = {(r["engine"], r["dtype"]): r for r in data["rows"]}
    assert sorted(rows) == [("numpy", "f32"), ("numpy", "int8"), ("onnxruntime", "f32"),
                            ("onnxruntime", "int8")]
    for row in rows.values():
        assert row["status"] == "ok", row
        assert (row["prompt_tokens"], row["decode_tokens"], row["threads"]) == (PROMPT, DECODE, 1)
        assert row["kv_length"] == PROMPT + DECODE  # the cache really holds prompt + decode
        assert 1 <= len(row["prefill_s"]) == len(row["decode_s"]) <= 2
        assert row["prefill_tok_s"] == pytest.approx(PROMPT / statistics.median(row["prefill_s"]))
        assert row["decode_tok_s"] == pytest.approx(DECODE / statistics.median(row["decode_s"]))


def test_weight_bytes_and_bandwidth_bound(bench):
    _, _, data = bench
    config = _tiny()
    for row in data["rows"]:
        assert row["weight_bytes_per_token"] == _expected_bytes(config, row["engine"],
                                                                row["dtype"]), row["engine"]
        bandwidth = row["bandwidth"]["gb_s"]  # measured right before the row
        assert bandwidth > 0 and row["bandwidth"]["bytes"] == 32 << 20
        bound = bandwidth * 1e9 / _expected_bytes(config, row["engine"], row["dtype"])
        assert row["bound_tok_s"] == pytest.approx(bound)
        assert row["pct_of_bound"] == pytest.approx(100 * row["decode_tok_s"] / bound)


def test_engines_ran_the_same_model(bench):
    """float32 numpy and onnxruntime agree on the prompt's last logits; int8 is close."""
    _, _, data = bench
    rows = {(r["engine"], r["dtype"]): r["logits_sample"] for r in data["rows"]}
    ref = rows[("numpy", "f32")]
    assert max(abs(a - b) for a, b in zip(rows[("onnxruntime", "f32")], ref)) < 1e-4
    for engine in ("numpy", "onnxruntime"):
        diff = max(abs(a - b) for a, b in zip(rows[(engine, "int8")], ref))
        assert 0 < diff < 0.1 * max(abs(v) for v in ref)


def test_table_and_resume(bench):
    out, stdout, data = bench
    assert "| tiny | f32 | numpy | float32 |" in stdout
    assert "not offered" not in stdout  # numpy and onnxruntime offer f32 and int8
    again = _run(out)
    assert again.returncode == 0, again.stderr
    assert "nothing to run" in again.stdout
    with open(out) as f:
        assert json.load(f) == data  # rows already there are neither rerun nor rewritten


def test_unknown_model_is_named(capsys):
    script = _load_script()
    with pytest.raises(SystemExit):
        script.parse_args(["--models", "tiny,huge"])
    err = capsys.readouterr().err
    assert "--models" in err and "'huge'" in err and "geb_1_3b" in err
