"""Model files for the numpy engine: `load_model(path)` is the single dispatch point.

Formats:
* a directory with ``weights.npz`` (our parameter tree, flattened to "layers/attn/q" keys),
  ``config.json`` (the ModelConfig fields) and ``tokenizer.model`` (SentencePiece), written
  atomically by `save_npz_model`.
* ``.gguf`` files (llama architecture, f32/f16/q8_0; infer/gguf_file.py), dequantized to
  float32; the tokenizer is the SentencePiece model geb_jax embeds, or `tokenizer_path`.
* ``.onnx`` files written by geb_jax.export.onnx_export (read by infer/onnx_file.py with the
  ``onnx`` package only; quantized MatMulNBits weights are dequantized to float32).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import numpy as np

from geb_jax.atomic_folder import atomic_folder
from geb_jax.infer.config import InferConfig
from geb_jax.infer.weights import Weights

WEIGHTS_NPZ = "weights.npz"
CONFIG_JSON = "config.json"
TOKENIZER_MODEL = "tokenizer.model"


class ModelFileError(ValueError):
    """A model path that is missing, incomplete or of an unknown format."""


def _config_dict(config: Any) -> dict:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
        return dict(config.to_dict())
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"config must be a dataclass, ConfigDict or dict, got {type(config).__name__}")


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
    config_dict = _config_dict(config)
    Weights.from_params(params, config_dict)  # shape check against the config
    if not os.path.isfile(tokenizer_path):
        raise ModelFileError(f"tokenizer model file not found: {tokenizer_path}")
    with atomic_folder(directory) as tmp:
        np.savez(os.path.join(tmp, WEIGHTS_NPZ), **_flatten(params))
        with open(os.path.join(tmp, CONFIG_JSON), "w") as f:
            json.dump(config_dict, f, indent=2, sort_keys=True)
        shutil.copyfile(tokenizer_path, os.path.join(tmp, TOKENIZER_MODEL))
    return directory


def _load_npz_dir(path: str) -> tuple[Weights, str]:
    for file in (WEIGHTS_NPZ, CONFIG_JSON, TOKENIZER_MODEL):
        if not os.path.isfile(os.path.join(path, file)):
            raise ModelFileError(f"model folder {path} has no {file} (expected {WEIGHTS_NPZ}, "
                                 f"{CONFIG_JSON} and {TOKENIZER_MODEL}; see save_npz_model)")
    try:
        with open(os.path.join(path, CONFIG_JSON)) as f:
            config = InferConfig.from_dict(json.load(f))
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{os.path.join(path, CONFIG_JSON)} is not valid JSON: {e}") from None
    with np.load(os.path.join(path, WEIGHTS_NPZ)) as npz:
        params = _unflatten({k: npz[k] for k in npz.files})
    return Weights.from_params(params, config), os.path.join(path, TOKENIZER_MODEL)


def _load_gguf(path: str, need_tokenizer: bool) -> tuple[Weights, str | None]:
    """A llama GGUF -> Weights, plus the SentencePiece model geb_jax embeds in its GGUFs
    (extracted once into the cache, named by its hash)."""
    import hashlib  # pylint: disable=import-outside-toplevel

    from geb_jax.data.tokenizer import default_cache_dir  # pylint: disable=import-outside-toplevel
    from geb_jax.infer.gguf_file import GGUFFileError, load_gguf  # pylint: disable=import-outside-toplevel
    try:
        model = load_gguf(path)
    except GGUFFileError as e:
        raise ModelFileError(str(e)) from None
    if model.sentencepiece_model is None:
        if need_tokenizer:
            raise ModelFileError(f"{path} carries no SentencePiece model (not written by "
                                 "geb_jax): pass tokenizer_path= (--tokenizer) as well.")
        return model.weights, None
    digest = hashlib.sha256(model.sentencepiece_model).hexdigest()[:24]
    target = os.path.join(default_cache_dir(), "gguf-tokenizers", f"{digest}.model")
    if not os.path.isfile(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tokenizer-", dir=os.path.dirname(target))
        with os.fdopen(fd, "wb") as f:
            f.write(model.sentencepiece_model)
        os.replace(tmp, target)
    return model.weights, target


def load_model(path: str, quantize: str | None = None, quantize_embeddings: bool = False,
               tokenizer_path: str | None = None):
    """path -> (Weights, Tokenizer). The one place that knows the model file formats.

    quantize: None, "int8" or "int4" (geb_jax.infer.quantize); tokenizer_path overrides the
    tokenizer that comes with the model.
    """
    from geb_jax.data.tokenizer import Tokenizer  # pylint: disable=import-outside-toplevel
    from geb_jax.infer.quantize import quantize_weights  # pylint: disable=import-outside-toplevel

    path = os.fspath(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, WEIGHTS_NPZ)):
        weights, bundled_tokenizer = _load_npz_dir(path)
    elif path.endswith(".onnx"):
        from geb_jax.infer import onnx_file  # pylint: disable=import-outside-toplevel
        weights, bundled_tokenizer = onnx_file.load_onnx_model(path)
    elif path.endswith(".gguf"):
        weights, bundled_tokenizer = _load_gguf(path, need_tokenizer=tokenizer_path is None)
    elif not os.path.exists(path):
        raise ModelFileError(f"model path not found: {path}")
    else:
        raise ModelFileError(f"{path} is not a model this engine can load: expected a folder "
                             f"with {WEIGHTS_NPZ} + {CONFIG_JSON} + {TOKENIZER_MODEL}")
    tokenizer = Tokenizer.load(tokenizer_path or bundled_tokenizer)
    tokenizer.check_matches_model(weights.config.vocab_size, allow_padding=True)
    return quantize_weights(weights, quantize, quantize_embeddings), tokenizer
