"""Typed config sections (geb_jax/config_sections.py, geb_jax/run_config.py) and the one
override parser (geb_jax/config_loader.py): what a user overriding a preset meets."""
import dataclasses
import math
import os
import subprocess
import sys

import pytest

from geb_jax.config_base import base_config
from geb_jax.config_loader import apply_overrides, load_config, split_overrides
from geb_jax.errors import ConfigError
from geb_jax.run_config import (CheckpointConfig, DataConfig, EvalScheduleConfig, ExportConfig,
                                MeshConfig, RunConfig, TrainConfig, run_config)
from geb_jax.train.optimizer import learning_rate_at
from tests.conftest import REPO_ROOT

TINY = os.path.join(REPO_ROOT, "configs", "tiny.py")
SECTIONS = {"train": TrainConfig, "data": DataConfig, "mesh": MeshConfig,
            "checkpoint": CheckpointConfig, "eval": EvalScheduleConfig, "export": ExportConfig}


def _tiny(**overrides):
    return apply_overrides(load_config(TINY), overrides)


# ---- one from_dict ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_each_section_has_the_schema_fields_and_defaults(name):
    """The dataclass defaults are config_base's values, field for field (no drift)."""
    schema = base_config()[name].to_dict()
    built = SECTIONS[name].from_dict(schema).to_dict()
    assert built == SECTIONS[name]().to_dict()
    assert set(built) == set(schema)
    for key, value in schema.items():
        assert built[key] == (list(value) if isinstance(value, tuple) else value), key


def test_unknown_key_names_the_field_and_lists_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"step": 3})
    message = str(e.value)
    assert "train.step (did you mean train.steps" in message
    for field in ("batch_size", "seq_len", "log_every", "spike"):
        assert field in message
    with pytest.raises(ConfigError, match=r"train\.spike\.factor .*train\.spike\.loss_factor"):
        TrainConfig.from_dict({"spike": {"factor": 2.0}})


def test_types_are_converted_only_where_meaning_is_kept():
    train = TrainConfig.from_dict({"z_loss_weight": 1, "spike": {"loss_factor": 3}})
    assert isinstance(train.z_loss_weight, float) and train.z_loss_weight == 1.0
    assert isinstance(train.spike.loss_factor, float)  # a nested mapping -> its section
    data = DataConfig.from_dict({"mixture": [{"source": "builtin", "weight": 1}]})
    assert data.mixture == ({"source": "builtin", "weight": 1},)
    for bad, field in (({"steps": 2.5}, "train.steps"), ({"steps": "3"}, "train.steps"),
                       ({"steps": True}, "train.steps"), ({"seq_len": 0}, "train.seq_len"),
                       ({"stage": "rl"}, "train.stage"),
                       ({"skip_batches": "9-3"}, "train.skip_batches")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            TrainConfig.from_dict(bad)
    with pytest.raises(ConfigError, match=r"checkpoint\.keep"):
        CheckpointConfig.from_dict({"keep": "all"})
    assert CheckpointConfig.from_dict({"keep": None}).keep is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        train.steps = 5  # frozen


# ---- total_steps follows train.steps ------------------------------------------------------------
def test_readme_steps_override_ends_the_cosine_at_the_last_update():
    """README: --config.train.steps=100. The schedule's floor is reached at update 100 exactly,
    and update 99 is still above it (the floor is not reached early either)."""
    run = run_config(_tiny(**{"train.steps": 100}), "pretrain")
    assert run.optimizer.total_steps == 100 and run.notes == ()
    floor, peak = run.optimizer.min_learning_rate, run.optimizer.peak_learning_rate
    assert learning_rate_at(run.optimizer, 100) == pytest.approx(floor, rel=1e-6)
    warmup = run.optimizer.warmup_steps
    # closed form: floor + (peak - floor) * (1 + cos(pi * (n - w) / (T - w))) / 2
    expected_99 = floor + (peak - floor) * (1 + math.cos(math.pi * (99 - warmup)
                                                         / (100 - warmup))) / 2
    assert learning_rate_at(run.optimizer, 99) == pytest.approx(expected_99, rel=1e-5)
    assert expected_99 > floor


def test_an_explicit_total_steps_that_differs_is_kept_and_reported():
    run = run_config(_tiny(**{"train.steps": 100, "optimizer.total_steps": 400}), "pretrain")
    assert run.optimizer.total_steps == 400
    (note,) = run.notes
    assert note.startswith("warning:") and "total_steps=400" in note and "train.steps=100" in note
    assert "25%" in note  # 100 / 400 of the schedule
    same = run_config(_tiny(**{"train.steps": 100, "optimizer.total_steps": 100}), "pretrain")
    assert same.notes == ()
    with pytest.raises(ConfigError, match=r"optimizer\.total_steps must be >= 1"):
        run_config(_tiny(**{"optimizer.total_steps": 0}), "pretrain")


def test_a_stage_with_its_own_steps_follows_them_and_reports_what_it_overrides():
    """The stage_overrides trap: a top-level train.steps does not shorten sft (its own steps
    win), the top-level total_steps does not stretch it, and its log says both."""
    config = _tiny(**{"train.steps": 40, "optimizer.total_steps": 40})
    pretrain, sft = run_config(config, "pretrain"), run_config(config, "sft")
    assert (pretrain.train.steps, pretrain.optimizer.total_steps) == (40, 40)
    sft_steps = config.stage_overrides.sft.train.steps
    assert (sft.train.steps, sft.optimizer.total_steps) == (sft_steps, sft_steps)
    (note,) = sft.notes
    assert f"train.steps={sft_steps} (top-level: 40)" in note
    assert "total_steps follows this stage's train.steps (top-level: 40)" in note
    assert "win over the top-level" in note
    own = run_config(apply_overrides(config, {"stage_overrides.sft.optimizer.total_steps": 70}),
                     "sft")
    assert own.optimizer.total_steps == 70 and any("warning" in n for n in own.notes)


def test_nested_stage_overrides_merge_field_by_field():
    config = _tiny(**{"eval.suite.max_documents": 4})
    dpo = run_config(config, "dpo")  # tiny's dpo sets eval.suite.tasks only
    assert dpo.eval.suite.tasks == "perplexity,dpo_preference"
    assert dpo.eval.suite.max_documents == 4


# ---- cross-section checks ---------------------------------------------------------------------
def test_seq_len_longer_than_the_context_names_both_fields_and_the_fix():
    with pytest.raises(ConfigError) as e:
        run_config(_tiny(**{"train.seq_len": 512}), "pretrain")
    message = str(e.value)
    assert "train.seq_len (512)" in message and "model.max_seq_len (256)" in message
    assert "--config.train.seq_len=256" in message
    assert run_config(_tiny(**{"train.seq_len": 256}), "pretrain").train.seq_len == 256


def test_data_clean_is_refused_with_a_pointer_to_prepare():
    with pytest.raises(ConfigError, match=r"geb_jax\.data\.prepare"):
        apply_overrides(load_config(TINY), ["data.clean.perplexity=false"])
    config = load_config(TINY)
    config.data.clean = {"perplexity": False}  # a preset that sets it
    with pytest.raises(ConfigError, match=r"geb_jax\.data\.prepare"):
        run_config(config)


def test_every_preset_builds_every_stage():
    for name in sorted(os.listdir(os.path.join(REPO_ROOT, "configs"))):
        if not name.endswith(".py") or name.startswith("_") or name == "pretrained.py":
            continue  # pretrained.py reads a published model file (tests/test_published_*)
        config = load_config(os.path.join(REPO_ROOT, "configs", name))
        for stage in [s for s in config.stages.split(",") if s]:
            run = run_config(config, stage)
            assert isinstance(run, RunConfig) and run.optimizer.total_steps >= 1, name


# ---- the one override parser ------------------------------------------------------------------
def test_split_overrides_reads_every_flag_form():
    rest, overrides = split_overrides(
        ["--config", "configs/tiny.py", "--config.train.steps", "5", "--config.model.dtype=x",
         "--config.model.tie_embeddings", "--noconfig.data.validate", "--process_id=0"])
    assert rest == ["--config", "configs/tiny.py", "--process_id=0"]
    assert overrides == ["train.steps=5", "model.dtype=x", "model.tie_embeddings",
                         "data.validate=false"]
    config = apply_overrides(load_config(TINY), overrides[:1] + overrides[2:])
    assert config.train.steps == 5 and config.model.tie_embeddings is True
    assert config.data.validate is False
    with pytest.raises(ConfigError, match=r"--config\.train\.steps: needs a value"):
        apply_overrides(load_config(TINY), ["train.steps"])


def test_an_unset_placeholder_is_typed_by_its_declared_type():
    config = apply_overrides(load_config(TINY), ["optimizer.total_steps=50"])
    assert config.optimizer.total_steps == 50 and isinstance(config.optimizer.total_steps, int)
    assert apply_overrides(config, ["optimizer.total_steps=None"]).optimizer.total_steps is None
    with pytest.raises(ConfigError, match="optimizer.total_steps"):
        apply_overrides(load_config(TINY), ["optimizer.total_steps=fifty"])


def _main(*args):
    return subprocess.run([sys.executable, "-m", "geb_jax.main", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)


def test_main_refuses_data_clean_and_a_too_long_seq_len_in_one_line(tmp_path):
    for args, needle in ((["--config.data.clean.perplexity=false"], "geb_jax.data.prepare"),
                         (["--config.train.seq_len=512"], "model.max_seq_len (256)")):
        result = _main("--config", TINY + ":smoke", f"--config.workdir={tmp_path}", *args)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode != 0 and len(errors) == 1 and needle in errors[0], result.stderr
        assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "pretrain")


def test_main_warns_of_a_total_steps_mismatch_in_the_first_log_lines(tmp_path):
    """A fresh process: the warning comes before the first step's line."""
    result = _main("--config", TINY + ":smoke", f"--config.workdir={tmp_path}",
                   "--config.train.steps", "2", "--config.optimizer.total_steps=8",
                   "--config.eval.every=0", "--config.checkpoint.every=0",
                   "--config.model.d_model=32", "--config.model.n_layers=1",
                   "--config.model.d_ff=64", "--config.train.seq_len=32")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()  # tqdm.write and print: one stream, in order
    warning = next(i for i, line in enumerate(lines) if "total_steps=8 differs" in line)
    first_step = next(i for i, line in enumerate(lines) if line.startswith("step 1"))
    assert warning < first_step and "train.steps=2" in lines[warning]
