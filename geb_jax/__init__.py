"""geb_jax: pretrain, SFT and DPO small Llama-family models in JAX; serve them on CPUs."""
__version__ = "0.1.0"
