"""`--config.mode=export` on a trained run: every format holds the checkpoint's model.

One short real run, then the export command; each file is read back by a different reader
(numpy engine, onnxruntime, gguf reader, transformers) and compared with the JAX model on the
checkpoint's parameters (float32; f16/q8_0 GGUF within their rounding).
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from geb_jax.config_loader import apply_overrides, load_config
from geb_jax.export.command import export_stage
from geb_jax.model import ModelConfig, make_apply
from geb_jax.train.stages import run_stages
from tests.conftest import REPO_ROOT

PROMPT = [1, 17, 230, 99, 4, 350, 12, 77]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("export_run")
    config = load_config(os.path.join(REPO_ROOT, "configs", "tiny.py:smoke"))
    config = apply_overrides(config, {
        "workdir": str(workdir), "train.steps": 2, "optimizer.total_steps": 2,
        "optimizer.warmup_steps": 1, "eval.every": 2, "eval.batches": 1,
        "eval.suite.max_documents": 4, "model.d_model": 64,
        "model.n_layers": 2, "model.n_heads": 2, "model.n_kv_heads": 1, "model.d_ff": 128,
        "mode": "export", "export.gguf_dtypes": "f32,q8_0"})
    run_stages(config)
    written = export_stage(config, log=lambda *_: None)
    from geb_jax.export.command import _final_params  # the checkpoint, for the reference
    from geb_jax.train import inputs
    from geb_jax.train.stages import stage_config
    model_config = ModelConfig.from_dict(config.model)
    params = _final_params(stage_config(config, "pretrain"), model_config,
                           os.path.join(str(workdir), "pretrain"), inputs)
    logits = np.asarray(make_apply(model_config)(params, np.array([PROMPT], np.int32)))[0]
    return config, written, logits


def test_numpy_export_matches_the_checkpoint(exported):
    from geb_jax.infer import Engine, load_model
    _, written, expected = exported
    weights, tokenizer = load_model(written["numpy"])
    got = Engine(weights).prefill([PROMPT], all_logits=True)[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert tokenizer.vocab_size == weights.config.vocab_size


def test_onnx_exports_match_the_checkpoint(exported):
    from geb_jax.export.onnx_export import ort_feed, ort_session
    from geb_jax.infer import load_model
    _, written, expected = exported
    for quantize, atol in (("none", 1e-4), ("int8", 0.05), ("int4", 0.5)):
        path = written[f"onnx/{quantize}"]
        weights, _ = load_model(path)
        session = ort_session(path)
        logits = session.run(["logits"], ort_feed(weights.config, np.array([PROMPT])))[0][0]
        np.testing.assert_allclose(logits, expected, atol=atol, err_msg=quantize)


def test_gguf_exports_match_the_checkpoint(exported):
    from geb_jax.infer import Engine
    from geb_jax.infer.gguf_file import load_gguf
    _, written, expected = exported
    for dtype, atol in (("f32", 1e-4), ("q8_0", 0.05)):
        model = load_gguf(written[f"gguf/{dtype}"])
        got = Engine(model.weights).prefill([PROMPT], all_logits=True)[0]
        np.testing.assert_allclose(got, expected, atol=atol, err_msg=dtype)


def test_hf_export_runs_in_transformers(exported):
    import torch
    import transformers
    _, written, expected = exported
    model = transformers.LlamaForCausalLM.from_pretrained(written["hf"]).eval()
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0].numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    assert os.path.isfile(os.path.join(written["hf"], "tokenizer.model"))


def test_generate_cli_on_the_exported_onnx(exported):
    _, written, _ = exported
    result = subprocess.run(
        [sys.executable, "-m", "geb_jax.infer", "generate", "--model", written["onnx/none"],
         "--prompt", "The sea", "--max-tokens", "5", "--temperature", "0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_export_without_a_run_is_one_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "geb_jax.main", "--config", "configs/tiny.py:smoke",
         f"--config.workdir={tmp_path / 'nothing'}", "--config.mode=export"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "train the run first" in result.stderr


def test_training_logged_the_eval_suite(exported):
    """eval.suite runs at eval steps: bits per byte consistent with its own nats and bytes."""
    import json
    import math
    config, _, _ = exported
    with open(os.path.join(config.workdir, "pretrain", "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    suite = [r for r in records if r["split"] == "eval_suite"]
    assert [r["step"] for r in suite] == [2]
    r = suite[0]
    nats = r["perplexity/nll_per_token"] * r["perplexity/tokens"]
    np.testing.assert_allclose(r["perplexity/bits_per_byte"],
                               nats / (math.log(2) * r["perplexity/bytes"]), rtol=1e-6)
    np.testing.assert_allclose(r["perplexity/perplexity"],
                               math.exp(r["perplexity/nll_per_token"]), rtol=1e-6)
