"""The Llama-family decoder: a frozen config and the pure `apply` built from it.

The config is imported eagerly and the JAX modules on first use, so that jax-free code (the
numpy engine in geb_jax/infer) can share `ModelConfig` without importing JAX.
"""
import importlib

from geb_jax.model.config import ModelConfig

_FROM_TRANSFORMER = ("Transformer", "abstract_params", "init_params", "lm_head_weight",
                     "make_apply", "param_logical_axes")

__all__ = ["ModelConfig", *_FROM_TRANSFORMER]


def __getattr__(name: str):
    if name in _FROM_TRANSFORMER:
        return getattr(importlib.import_module("geb_jax.model.transformer"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
