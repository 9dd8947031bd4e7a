"""Model files for the numpy engine: `load_model(path)` is the single dispatch point.

Formats:
* a directory with ``weights.npz`` (our parameter tree, flattened to "layers/attn/q" keys),
  ``config.json`` (the ModelConfig fields) and ``tokenizer.model`` (SentencePiece) or
  ``tokenizer/`` (a published model's tokenizer.json + tokenizer_config.json), written
  atomically by `save_npz_model`.
* ``.gguf`` files of the llama architecture (ours or any published one; infer/gguf_file.py
  says what each tensor type becomes in memory); the tokenizer is the file's own vocabulary
  (geb_jax.data.hf_tokenizer.load_tokenizer), or `tokenizer_path`.
* a Hugging Face folder (config.json + safetensors + tokenizer.json or tokenizer.model, chat
  template from tokenizer_config.json), as geb_jax.export.hf writes and the Hub serves.
* ``.onnx`` files written by geb_jax.export.onnx_export (read by infer/onnx_file.py with the
  ``onnx`` package only; quantized MatMulNBits weights are dequantized to float32).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

import numpy as np

from geb_jax.atomic_io import atomic_folder
from geb_jax.infer import onnx_file
from geb_jax.infer.config import InferConfig, config_dict
from geb_jax.infer.weights import ModelFileError, Weights

WEIGHTS_NPZ = "weights.npz"
CONFIG_JSON = "config.json"
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_FOLDER = "tokenizer"  # a published model's tokenizer.json + tokenizer_config.json


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = np.asarray(value, dtype=np.float32)
    return flat


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def save_npz_model(directory: str, params: Mapping, config: Any, tokenizer_path: str,
                   overwrite: bool = False) -> str:
    """Write weights.npz + config.json + tokenizer.model into `directory`, all or nothing.

    Files go to a temporary sibling folder that is renamed into place; with overwrite=True an
    existing folder is replaced (moved aside first, deleted once the new one is in place).
    The parameters are validated against the config before anything is written.
    """
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not overwrite:
        raise ModelFileError(f"{directory} already exists; pass overwrite=True to replace it")
    as_dict = config_dict(config)
    Weights.from_params(params, as_dict)  # shape check against the config
    if not os.path.exists(tokenizer_path):
        raise ModelFileError(f"tokenizer not found: {tokenizer_path}")
    with atomic_folder(directory) as tmp:
        np.savez(os.path.join(tmp, WEIGHTS_NPZ), **_flatten(params))
        with open(os.path.join(tmp, CONFIG_JSON), "w") as f:
            json.dump(as_dict, f, indent=2, sort_keys=True)
        copy_tokenizer(tokenizer_path, tmp)
    return directory


def copy_tokenizer(tokenizer_path: str, folder: str) -> str:
    """Put a run's tokenizer into an export folder: tokenizer.model (ours) or, for a published
    model's tokenizer folder, tokenizer/ (tokenizer.json + tokenizer_config.json)."""
    if os.path.isdir(tokenizer_path):
        target = os.path.join(folder, TOKENIZER_FOLDER)
        shutil.copytree(tokenizer_path, target, dirs_exist_ok=True)
    else:
        target = os.path.join(folder, TOKENIZER_MODEL)
        shutil.copyfile(tokenizer_path, target)
    return target


def _load_npz_dir(path: str) -> tuple[Weights, str]:
    tokenizer = _tokenizer_beside(path) or os.path.join(path, TOKENIZER_MODEL)
    for file in (WEIGHTS_NPZ, CONFIG_JSON, tokenizer):
        if not os.path.exists(os.path.join(path, file)):
            raise ModelFileError(f"model folder {path} has no {file} (expected {WEIGHTS_NPZ}, "
                                 f"{CONFIG_JSON} and {TOKENIZER_MODEL}; see save_npz_model)")
    try:
        with open(os.path.join(path, CONFIG_JSON)) as f:
            config = InferConfig.from_dict(json.load(f))
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{os.path.join(path, CONFIG_JSON)} is not valid JSON: {e}") from None
    with np.load(os.path.join(path, WEIGHTS_NPZ)) as npz:
        params = _unflatten({k: npz[k] for k in npz.files})
    return Weights.from_params(params, config), tokenizer


def _load_hf_folder(path: str) -> Weights:
    """A Hugging Face Llama folder (config.json + safetensors) -> float32 Weights."""
    from geb_jax.export.hf import CheckpointError, load_hf_checkpoint  # pylint: disable=import-outside-toplevel
    from geb_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
    try:
        config, params = load_hf_checkpoint(path)
    except (CheckpointError, ConfigError) as e:
        raise ModelFileError(f"{path}: {e}") from None
    return Weights.from_params(params, config)


def _load_gguf(path: str, quantize: str | None) -> Weights:
    """A llama GGUF -> Weights: Q4_0/Q4_1 matrices kept as int4 (infer/gguf_file.py) unless
    another quantization (int8) was asked for, which then starts from float32."""
    from geb_jax.infer.gguf_file import GGUFFileError, load_gguf  # pylint: disable=import-outside-toplevel
    try:
        return load_gguf(path, keep_quantized=quantize in (None, "none", "int4")).weights
    except GGUFFileError as e:
        raise ModelFileError(str(e)) from None


def _tokenizer_beside(path: str) -> str | None:
    """A published model's tokenizer folder written next to an export (tokenizer/)."""
    folder = os.path.join(os.path.dirname(os.path.abspath(path)) if os.path.isfile(path)
                          else path, TOKENIZER_FOLDER)
    return folder if os.path.isdir(folder) else None


def load_model(path: str, quantize: str | None = None, quantize_embeddings: bool = False,
               tokenizer_path: str | None = None):
    """path -> (Weights, Tokenizer). The one place that knows the model file formats.

    quantize: None, "int8" or "int4" (geb_jax.infer.quantize); tokenizer_path overrides the
    tokenizer that comes with the model.
    """
    from geb_jax.data.tokenizer import TokenizerError  # pylint: disable=import-outside-toplevel
    from geb_jax.data.tokenizer_files import load_tokenizer  # pylint: disable=import-outside-toplevel
    from geb_jax.infer.quantize import quantize_weights  # pylint: disable=import-outside-toplevel

    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelFileError(f"model path not found: {path}")
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, WEIGHTS_NPZ)):
        weights, bundled_tokenizer = _load_npz_dir(path)
    elif path.endswith(".onnx"):
        weights, bundled_tokenizer = onnx_file.load_onnx_model(path)
    elif path.endswith(".gguf"):
        weights, bundled_tokenizer = _load_gguf(path, quantize), path  # its embedded vocabulary
    elif os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_JSON)):
        weights, bundled_tokenizer = _load_hf_folder(path), path
    else:
        raise ModelFileError(
            f"{path} is not a model this engine can load: expected a .gguf file, an .onnx file "
            f"written by geb_jax, a Hugging Face folder (config.json + safetensors + tokenizer) "
            f"or a folder with {WEIGHTS_NPZ} + {CONFIG_JSON} + {TOKENIZER_MODEL}")
    try:
        tokenizer = load_tokenizer(tokenizer_path or bundled_tokenizer)
        tokenizer.check_matches_model(weights.config.vocab_size, allow_padding=True)
    except TokenizerError as e:
        raise ModelFileError(str(e)) from None
    return quantize_weights(weights, quantize, quantize_embeddings), tokenizer
