"""Numpy-only CPU inference for geb_jax models: no jax or torch is imported at run time.

    from geb_jax.infer import Engine, generate, load_model
    weights, tokenizer = load_model("runs/tiny/export", quantize="int8")
    engine = Engine(weights)
    for piece in generate(engine, tokenizer, tokenizer.encode("Hello", add_bos=True),
                          temperature=0.8, top_p=0.95, seed=0):
        print(piece, end="", flush=True)

Modules: config (InferConfig), weights (Weights: fused, pre-transposed matrices), quantize
(int8 / int4 weight-only), engine (prefill / decode / score with a KV cache), sampling
(SamplingParams, streaming `generate`), loading (`load_model`, `save_npz_model`); the CLI is
``python -m geb_jax.infer generate|chat``.
"""
from geb_jax.infer.config import InferConfig, InferConfigError
from geb_jax.infer.engine import ContextLengthError, Engine
from geb_jax.infer.loading import load_model, save_npz_model
from geb_jax.infer.quantize import (Int4Matrix, Int8Matrix, quantize_int4, quantize_int8,
                                    quantize_weights)
from geb_jax.infer.sampling import (Generation, SamplingOptionError, SamplingParams, generate,
                                    next_token_distribution)
from geb_jax.infer.weights import LayerWeights, ModelFileError, Weights, WeightsError

__all__ = ["ContextLengthError", "Engine", "Generation", "InferConfig", "InferConfigError",
           "Int4Matrix", "Int8Matrix", "LayerWeights", "ModelFileError", "SamplingOptionError",
           "SamplingParams", "Weights", "WeightsError", "generate", "load_model",
           "next_token_distribution", "quantize_int4", "quantize_int8", "quantize_weights",
           "save_npz_model"]
