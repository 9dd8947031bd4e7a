"""Config loading, overrides and the entry point's errors a user can cause."""
import os
import subprocess
import sys

import pytest

from geb_jax.config_loader import apply_overrides, load_config
from geb_jax.errors import ConfigError
from tests.conftest import REPO_ROOT

TINY = os.path.join(REPO_ROOT, "configs", "tiny.py")


def _main(*args):
    return subprocess.run([sys.executable, "-m", "geb_jax.main", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def test_overrides_are_typed_and_copied():
    base = load_config(TINY)
    changed = apply_overrides(base, ["model.n_kv_heads=1", "optimizer.peak_learning_rate=1e-4",
                                     "model.tie_embeddings=true", "workdir=runs/x"])
    assert changed.model.n_kv_heads == 1 and isinstance(changed.model.n_kv_heads, int)
    assert changed.optimizer.peak_learning_rate == pytest.approx(1e-4)
    assert changed.model.tie_embeddings is True and changed.workdir == "runs/x"
    assert base.model.n_kv_heads == 2  # the original is untouched


def test_config_arg_shrinks_the_run():
    assert load_config(TINY + ":smoke").train.steps < load_config(TINY).train.steps
    with pytest.raises(ValueError, match="smok"):
        load_config(TINY + ":smok")


def test_unknown_override_names_nearest_field():
    with pytest.raises(ConfigError, match=r"model\.n_layer .*model\.n_layers"):
        apply_overrides(load_config(TINY), {"model.n_layer": 3})


def test_badly_typed_override_names_the_field():
    with pytest.raises(ConfigError, match="model.d_model"):
        apply_overrides(load_config(TINY), ["model.d_model=wide"])


def test_main_rejects_unknown_preset_listing_the_presets():
    result = _main("--config", "configs/nope.py")
    assert result.returncode != 0
    assert "configs/nope.py" in result.stderr and "tiny" in result.stderr
    assert "Traceback" not in result.stderr


def test_main_rejects_misspelt_field_before_any_work():
    result = _main("--config", "configs/tiny.py", "--config.train.step=3")
    assert result.returncode != 0
    assert "train.step" in result.stderr and "train.steps" in result.stderr
    assert "Traceback" not in result.stderr


def test_main_rejects_indivisible_heads_with_the_field_names():
    result = _main("--config", "configs/tiny.py:smoke", "--config.model.n_kv_heads=4",
                   f"--config.workdir={os.devnull}-unused")
    assert result.returncode != 0
    assert "n_kv_heads" in result.stderr and "Traceback" not in result.stderr


def test_main_reports_a_data_glob_that_matches_nothing_in_one_line(tmp_path):
    """A fresh process, as a user runs it: one `error:` line naming the pattern and the field,
    no traceback."""
    pattern = str(tmp_path / "missing" / "*.jsonl")
    result = _main("--config", TINY + ":smoke", f"--config.workdir={tmp_path / 'run'}",
                   "--config.data.source=local", f"--config.data.path={pattern}")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and pattern in errors[0] and "data.path" in errors[0]
    assert "Traceback" not in result.stderr
