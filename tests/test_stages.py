"""Stage chaining: pretrain -> SFT -> DPO in one config, each from the previous stage's end.

Checked against independent recomputation: SFT's first logged loss is the pretrain stage's
final parameters evaluated on SFT's first batch; DPO starts with policy == reference (the SFT
model), so its first loss is ln 2 and every implicit reward is 0 (closed form).
"""
import json
import math
import os

import jax
import numpy as np
import pytest

from geb_jax.config_loader import apply_overrides, load_config
from geb_jax.model import ModelConfig, make_apply
from geb_jax.errors import ConfigError
from geb_jax.train import inputs
from geb_jax.train.losses import cross_entropy_loss
from geb_jax.train.optimizer import make_optimizer
from geb_jax.run_config import run_config
from geb_jax.train.stages import run_stages, stage_config
from geb_jax.train.state import abstract_state, state_shardings
from geb_jax.parallel.mesh import make_mesh
from tests.conftest import REPO_ROOT


def _first_logged(workdir, stage):
    with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if record["split"] == "train" and record["step"] == 1:
                return record
    raise AssertionError(f"{stage}: no step-1 record")


def test_pretrain_sft_dpo_chain(tmp_path):
    config = load_config(os.path.join(REPO_ROOT, "configs", "tiny.py:smoke"))
    config = apply_overrides(config, {
        "workdir": str(tmp_path), "stages": "pretrain,sft,dpo", "train.steps": 3,
        "optimizer.total_steps": 3, "eval.every": 0, "checkpoint.every": 0,
        "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 2, "model.n_kv_heads": 1,
        "model.d_ff": 128, "train.seq_len": 128,
        "stage_overrides.sft.train.steps": 2, "stage_overrides.sft.optimizer.total_steps": 2,
        "stage_overrides.sft.optimizer.warmup_steps": 1,
        "stage_overrides.dpo.train.steps": 2, "stage_overrides.dpo.optimizer.total_steps": 2,
        "stage_overrides.dpo.optimizer.warmup_steps": 1})
    summaries = run_stages(config)
    assert [s["stage"] for s in summaries] == ["pretrain", "sft", "dpo"]
    assert [s["steps"] for s in summaries] == [3, 2, 2]

    # SFT step 1 == the pretrain stage's final parameters on SFT's first batch.
    sft = stage_config(config, "sft")
    model_config = ModelConfig.from_dict(sft.model)
    mesh = make_mesh(sft.mesh)
    optimizer = make_optimizer(run_config(sft).optimizer)
    abstract = abstract_state(model_config, optimizer,
                              state_shardings(model_config, optimizer, mesh))
    params = inputs.load_params(os.path.join(str(tmp_path), "pretrain"), abstract)
    tokenizer = inputs.stage_tokenizer(sft, model_config)
    batch = next(iter(inputs.train_dataset(sft, "sft", tokenizer)))
    with jax.set_mesh(mesh):
        expected, _ = cross_entropy_loss(params, batch, make_apply(model_config))
    np.testing.assert_allclose(_first_logged(str(tmp_path), "sft")["loss"], float(expected),
                               rtol=1e-5)

    # DPO step 1: policy == reference (the SFT model) -> loss ln 2, zero rewards.
    dpo = _first_logged(str(tmp_path), "dpo")
    np.testing.assert_allclose(dpo["loss"], math.log(2.0), atol=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(dpo[key]) < 1e-6, (key, dpo[key])


def test_a_bad_later_stage_fails_before_the_first_stage_trains(tmp_path):
    config = load_config(os.path.join(REPO_ROOT, "configs", "tiny.py:smoke"))
    config = apply_overrides(config, {"workdir": str(tmp_path), "stages": "pretrain,sft",
                                      "stage_overrides.sft.optimizer.total_steps": 2})
    with pytest.raises(ConfigError, match="warmup_steps"):
        run_stages(config)
    assert not os.path.exists(tmp_path / "pretrain")
