"""The Llama-family decoder: a frozen config and the pure `apply` built from it."""
from geb_jax.model.config import ConfigError, ModelConfig
from geb_jax.model.transformer import (Transformer, abstract_params, init_params, make_apply,
                                       param_logical_axes)

__all__ = ["ConfigError", "ModelConfig", "Transformer", "abstract_params", "init_params",
           "make_apply", "param_logical_axes"]
