"""Hugging Face Llama checkpoints <-> geb_jax parameters (config.json + safetensors).

Why: pretrained Llama weights come in as HF folders, and trained models go out as folders that
`transformers.LlamaForCausalLM.from_pretrained` loads unchanged. Our RoPE already uses HF's
rotate-half layout, so q/k need no permutation: every tensor is only transposed and reshaped
(torch Linear stores [out, in]; we store [in, ...out] to einsum from the left).
Shapes use the alphabet of model/config.py: B T D N K H F V L.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from typing import Any, Callable, Mapping

import numpy as np
import safetensors.numpy

from geb_jax.atomic_io import atomic_folder
from geb_jax.infer.weights import WeightsError, param_leaf
from geb_jax.errors import ConfigError
from geb_jax.model.config import ModelConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_ARCHITECTURE = "LlamaForCausalLM"
_SILU_NAMES = ("silu", "swish")  # the same function under HF's two activation names


class CheckpointError(ValueError):
    """A checkpoint folder or tensor set that does not match what the config says it holds."""


# ---- config ------------------------------------------------------------------------------

def _hf_field(hf: Mapping[str, Any], key: str) -> Any:
    if hf.get(key) is None:
        raise ConfigError(f"HF config field {key!r} is missing; a Llama config.json must set it.")
    return hf[key]


def _rope_theta(hf: Mapping[str, Any]) -> float:
    """theta from wherever this transformers version put it; refuses non-default RoPE scaling.

    transformers 5 writes `rope_parameters: {rope_type, rope_theta}`; older config.json files
    have a top-level `rope_theta` and an optional `rope_scaling` dict (`type` or `rope_type`).
    """
    theta = hf.get("rope_theta")
    for field in ("rope_scaling", "rope_parameters"):  # later wins: rope_parameters is newest
        rope = hf.get(field)
        if rope is None:
            continue
        if not isinstance(rope, Mapping) or any(isinstance(v, Mapping) for v in rope.values()):
            raise ConfigError(
                f"HF config field {field!r}={rope!r} is not a single RoPE dict; per-layer-type "
                f"RoPE is not a Llama feature and geb_jax does not support it.")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(
                f"HF config field {field}.rope_type={rope_type!r}: geb_jax implements only plain "
                f"RoPE (rope_type 'default'). Use a checkpoint without RoPE scaling, or remove "
                f"{field!r} knowing that long-context behaviour will change.")
        theta = rope.get("rope_theta", theta)
    return 10000.0 if theta is None else float(theta)


def _check_supported(hf: Mapping[str, Any]) -> None:
    """One ConfigError per unsupported feature, naming the field, instead of wrong logits."""
    architectures = hf.get("architectures")
    if architectures is not None and list(architectures) != [_ARCHITECTURE]:
        raise ConfigError(f"HF config field 'architectures'={architectures!r}: only "
                          f"[{_ARCHITECTURE!r}] checkpoints can be loaded into geb_jax.")
    if hf.get("model_type", "llama") != "llama":
        raise ConfigError(f"HF config field 'model_type'={hf['model_type']!r}: only 'llama' "
                          f"checkpoints can be loaded into geb_jax.")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            raise ConfigError(f"HF config field {field!r} is true: geb_jax layers have no biases. "
                              f"Use a checkpoint with {field}=false.")
    act = hf.get("hidden_act", "silu")
    if act not in _SILU_NAMES:
        raise ConfigError(f"HF config field 'hidden_act'={act!r}: geb_jax's MLP is SwiGLU "
                          f"(hidden_act 'silu') only.")


def model_config_from_hf(hf_config: Mapping[str, Any], **overrides) -> ModelConfig:
    """Maps a HF LlamaConfig dict (config.json) to ModelConfig; overrides set our-only fields.

    `overrides` (e.g. dtype, scan_layers, max_seq_len) go through ModelConfig.from_dict so an
    unknown field is named.
    """
    hf = dict(hf_config)
    _check_supported(hf)
    hidden, heads = _hf_field(hf, "hidden_size"), _hf_field(hf, "num_attention_heads")
    head_dim = hf.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ConfigError(f"HF config: hidden_size ({hidden}) is not divisible by "
                              f"num_attention_heads ({heads}); set 'head_dim' explicitly.")
        head_dim = hidden // heads
    values = dict(
        vocab_size=_hf_field(hf, "vocab_size"), d_model=hidden,
        n_layers=_hf_field(hf, "num_hidden_layers"), n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
        d_ff=_hf_field(hf, "intermediate_size"),
        max_seq_len=hf.get("max_position_embeddings", 2048), rope_theta=_rope_theta(hf),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    if hf.get("initializer_range") is not None:
        values["init_std"] = float(hf["initializer_range"])
    values.update(overrides)
    return ModelConfig.from_dict(values)


def hf_config_from_model_config(config: ModelConfig) -> dict[str, Any]:
    """A config.json dict for LlamaForCausalLM.

    RoPE theta is written both the transformers-5 way (`rope_parameters`) and the older way
    (top-level `rope_theta`), and the dtype as both `dtype` (5.x) and `torch_dtype` (4.x), so
    either major version reads the same model. Token ids (bos/eos/pad) are the tokenizer's
    business and are left to the caller.
    """
    if config.norm_position != "pre":
        raise ConfigError(f"model.norm_position={config.norm_position!r}: a HF Llama is pre-norm, "
                          f"so only norm_position='pre' models can be exported.")
    return {
        "architectures": [_ARCHITECTURE], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.d_model,
        "intermediate_size": config.d_ff, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings, "initializer_range": config.init_std,
        "dtype": "float32", "torch_dtype": "float32",
    }


# ---- tensors -----------------------------------------------------------------------------
# One row per per-layer tensor: (HF suffix, our path under "layers", HF shape, HF -> ours,
# ours -> HF). Linear weights are [out, in] in torch, so ours = transpose, then split heads.

_Spec = tuple[str, tuple[str, str], tuple[int, ...], Callable, Callable]


def _layer_specs(c: ModelConfig) -> list[_Spec]:
    d, n, k, h, f = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff
    return [
        # q: (N*H, D) -> (D, N, H); k, v: (K*H, D) -> (D, K, H)
        ("self_attn.q_proj.weight", ("attn", "q"), (n * h, d),
         lambda w: w.T.reshape(d, n, h), lambda p: p.reshape(d, n * h).T),
        ("self_attn.k_proj.weight", ("attn", "k"), (k * h, d),
         lambda w: w.T.reshape(d, k, h), lambda p: p.reshape(d, k * h).T),
        ("self_attn.v_proj.weight", ("attn", "v"), (k * h, d),
         lambda w: w.T.reshape(d, k, h), lambda p: p.reshape(d, k * h).T),
        # o: (D, N*H) -> (N, H, D)
        ("self_attn.o_proj.weight", ("attn", "o"), (d, n * h),
         lambda w: w.T.reshape(n, h, d), lambda p: p.reshape(n * h, d).T),
        # gate, up: (F, D) -> (D, F); down: (D, F) -> (F, D)
        ("mlp.gate_proj.weight", ("mlp", "gate"), (f, d), lambda w: w.T, lambda p: p.T),
        ("mlp.up_proj.weight", ("mlp", "up"), (f, d), lambda w: w.T, lambda p: p.T),
        ("mlp.down_proj.weight", ("mlp", "down"), (d, f), lambda w: w.T, lambda p: p.T),
        ("input_layernorm.weight", ("attn_norm", "scale"), (d,), lambda w: w, lambda p: p),
        ("post_attention_layernorm.weight", ("mlp_norm", "scale"), (d,), lambda w: w, lambda p: p),
    ]


def _is_ignorable(name: str) -> bool:
    """Buffers some exporters save that carry no weights (RoPE is recomputed from theta)."""
    return name.endswith("rotary_emb.inv_freq")


class _Reader:
    """Takes tensors out of a state dict by HF name, checking shapes and naming the file."""

    def __init__(self, state: Mapping[str, Any], files: Mapping[str, str] | None, source: str):
        self.state, self.files, self.source, self.used = state, files or {}, source, set()

    def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.state:
            raise CheckpointError(f"Tensor {name!r} (expected shape {shape}) is missing from "
                                  f"{self.source}.")
        value = np.asarray(self.state[name])
        if tuple(value.shape) != tuple(shape):
            where = self.files.get(name, self.source)
            raise CheckpointError(f"Tensor {name!r} in {where} has shape {tuple(value.shape)}, "
                                  f"expected {shape} from the config.")
        self.used.add(name)
        return value.astype(np.float32)

    def check_all_used(self) -> None:
        extra = sorted(n for n in self.state if n not in self.used and not _is_ignorable(n))
        if extra:
            shown = ", ".join(repr(n) for n in extra[:8]) + (" ..." if len(extra) > 8 else "")
            raise CheckpointError(
                f"{len(extra)} unexpected tensor(s) in {self.source}: {shown}. The config does not "
                f"describe them (more layers than num_hidden_layers, biases, or another "
                f"architecture?); fix config.json or use a matching checkpoint.")


def params_from_hf_state_dict(state: Mapping[str, Any], config: ModelConfig, *,
                              files: Mapping[str, str] | None = None,
                              source: str = "the state dict") -> dict:
    """HF tensor names -> our float32 parameter tree (numpy), layers stacked on axis L.

    `files` maps tensor names to the file they came from and `source` names the whole set, so
    a shape or missing-tensor error points at the file to fix.
    """
    c, r = config, _Reader(state, files, source)
    layers: dict[str, dict[str, np.ndarray]] = {}
    for suffix, (group, leaf), shape, to_ours, _ in _layer_specs(c):
        per_layer = [to_ours(r.take(f"model.layers.{i}.{suffix}", shape))
                     for i in range(c.n_layers)]
        layers.setdefault(group, {})[leaf] = np.stack(per_layer)  # (L, ...)
    params = {"embedding": r.take("model.embed_tokens.weight", (c.vocab_size, c.d_model)),
              "layers": layers,
              "final_norm": {"scale": r.take("model.norm.weight", (c.d_model,))}}
    if not c.tie_embeddings:
        params["lm_head"] = r.take("lm_head.weight", (c.vocab_size, c.d_model)).T  # (V,D)->(D,V)
    elif "lm_head.weight" in state:  # some exporters save the tied copy; accept only a true copy
        head = r.take("lm_head.weight", (c.vocab_size, c.d_model))
        if not np.array_equal(head, params["embedding"]):
            raise CheckpointError(
                f"Tensor 'lm_head.weight' in {r.files.get('lm_head.weight', source)} differs from "
                f"'model.embed_tokens.weight' but the config ties them (tie_word_embeddings=true); "
                f"set tie_word_embeddings=false to load a separate head.")
    r.check_all_used()
    return params


def _ours(params: Mapping, path: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
    """One of our parameters as float32 numpy, shape-checked (infer/weights.py's reader), with
    this module's error type."""
    try:
        return param_leaf(params, "/".join(path), shape)
    except WeightsError as e:
        raise CheckpointError(f"{str(e)[0].upper()}{str(e)[1:]}.") from None


def hf_state_dict_from_params(params: Mapping, config: ModelConfig) -> dict[str, np.ndarray]:
    """Our parameter tree -> HF tensor names and [out, in] layouts (float32, C-contiguous).

    Tied models get no lm_head.weight, exactly as HF's save_pretrained writes them.
    """
    c = config
    state = {"model.embed_tokens.weight": _ours(params, ("embedding",), (c.vocab_size, c.d_model))}
    for suffix, (group, leaf), hf_shape, to_ours, to_hf in _layer_specs(c):
        ours_shape = to_ours(np.empty(hf_shape, np.float32)).shape
        stacked = _ours(params, ("layers", group, leaf), (c.n_layers, *ours_shape))
        for i in range(c.n_layers):
            state[f"model.layers.{i}.{suffix}"] = np.ascontiguousarray(to_hf(stacked[i]))
    state["model.norm.weight"] = _ours(params, ("final_norm", "scale"), (c.d_model,))
    if not c.tie_embeddings:
        head_dv = _ours(params, ("lm_head",), (c.d_model, c.vocab_size))
        state["lm_head.weight"] = np.ascontiguousarray(head_dv.T)  # (D, V) -> (V, D)
    return state


# ---- files -------------------------------------------------------------------------------

def _read_safetensors(file: str) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as numpy.

    safetensors.numpy cannot read bfloat16 (numpy has no such dtype), and most released Llama
    checkpoints are bfloat16, so those files are parsed directly (8-byte header length, JSON
    header, raw little-endian data) with ml_dtypes' bfloat16, which jax already depends on.
    """
    try:
        return safetensors.numpy.load_file(file)
    except TypeError:
        pass
    import ml_dtypes  # pylint: disable=import-outside-toplevel
    dtypes = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64}
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header, data = json.loads(f.read(header_len)), f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise CheckpointError(f"Tensor {name!r} in {file} has dtype {info['dtype']}; only "
                                  f"float tensors ({', '.join(dtypes)}) can be loaded.")
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtypes[info["dtype"]]).reshape(info["shape"])
    return out


def _weight_files(path: str) -> tuple[list[str], str]:
    """The safetensors files of a folder (from the index when sharded) and a name for the set."""
    index_file, single_file = os.path.join(path, INDEX_FILE), os.path.join(path, WEIGHTS_FILE)
    if os.path.exists(index_file):
        with open(index_file) as f:
            weight_map = json.load(f).get("weight_map")
        if not weight_map:
            raise CheckpointError(f"{index_file} has no 'weight_map'; re-save the checkpoint.")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.exists(os.path.join(path, s))]
        if missing:
            raise CheckpointError(f"Shard(s) {missing} listed in {index_file} are missing from "
                                  f"the folder {path}; copy the complete checkpoint.")
        return [os.path.join(path, s) for s in shards], f"the shards of {index_file}"
    if os.path.exists(single_file):
        return [single_file], single_file
    raise CheckpointError(
        f"No {WEIGHTS_FILE} or {INDEX_FILE} in the folder {path}. Only safetensors checkpoints "
        f"are supported; re-save a pytorch_model.bin one with save_pretrained("
        f"safe_serialization=True).")


def load_hf_checkpoint(path: str, **overrides) -> tuple[ModelConfig, dict]:
    """Reads a HF Llama folder (config.json + single or sharded safetensors) -> (config, params).

    `overrides` are ModelConfig fields HF does not know (dtype, scan_layers, ...).
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"Checkpoint folder {path} does not exist (or is not a folder).")
    config_file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_file):
        raise CheckpointError(f"No {CONFIG_FILE} in the folder {path}; is this a Hugging Face "
                              f"checkpoint folder?")
    try:
        with open(config_file) as f:
            hf_config = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file} is not valid JSON: {e}") from None
    config = model_config_from_hf(hf_config, **overrides)
    state, files = {}, {}
    weight_files, source = _weight_files(path)
    for file in weight_files:
        for name, value in _read_safetensors(file).items():
            state[name], files[name] = value, file
    return config, params_from_hf_state_dict(state, config, files=files, source=source)


def _shards(state: Mapping[str, np.ndarray], max_bytes: int | None) -> list[list[str]]:
    """Greedy packing of tensors, in order, into shards of at most max_bytes (one oversized
    tensor gets a shard of its own, as HF does)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, value in state.items():
        if max_bytes is not None and shards[-1] and size + value.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += value.nbytes
    return shards


def _write_folder(folder: str, config: ModelConfig, state: Mapping[str, np.ndarray],
                  max_shard_bytes: int | None) -> None:
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(hf_config_from_model_config(config), f, indent=2, sort_keys=True)
    metadata = {"format": "pt"}  # transformers checks for it: these are torch-layout tensors
    shards = _shards(state, max_shard_bytes)
    if len(shards) == 1:
        safetensors.numpy.save_file(dict(state), os.path.join(folder, WEIGHTS_FILE), metadata)
        return
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        shard = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        safetensors.numpy.save_file({n: state[n] for n in names}, os.path.join(folder, shard),
                                    metadata)
        weight_map.update({n: shard for n in names})
    index = {"metadata": {"total_size": sum(v.nbytes for v in state.values())},
             "weight_map": weight_map}
    with open(os.path.join(folder, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)


def save_hf_checkpoint(config: ModelConfig, params: Mapping, path: str,
                       max_shard_bytes: int | None = None, overwrite: bool = False,
                       tokenizer_path: str | None = None) -> None:
    """Writes a folder that `LlamaForCausalLM.from_pretrained(path)` loads, all or nothing.

    tokenizer_path: the run's tokenizer, copied in: a SentencePiece tokenizer.model (ours), or
    a published model's tokenizer folder, whose tokenizer.json + tokenizer_config.json (with
    the chat template) `AutoTokenizer.from_pretrained(path)` reads.

    Everything is written into a temporary sibling folder, then renamed into place, so a crash
    never leaves a half-written checkpoint at `path`. With `overwrite`, an existing folder is
    moved aside first and deleted only after the new one is in place.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise CheckpointError(f"{path} already exists; pass overwrite=True to replace it.")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ConfigError(f"max_shard_bytes must be positive, got {max_shard_bytes}.")
    state = hf_state_dict_from_params(params, config)  # validates shapes before touching disk
    with atomic_folder(path) as tmp:
        _write_folder(tmp, config, state, max_shard_bytes)
        if tokenizer_path:
            _copy_tokenizer(tokenizer_path, tmp)


def _copy_tokenizer(tokenizer_path: str, folder: str) -> None:
    """The tokenizer files at the folder's top level, where transformers looks for them."""
    if not os.path.isdir(tokenizer_path):
        shutil.copyfile(tokenizer_path, os.path.join(folder, "tokenizer.model"))
        return
    for name in sorted(os.listdir(tokenizer_path)):
        if os.path.isfile(os.path.join(tokenizer_path, name)):
            shutil.copyfile(os.path.join(tokenizer_path, name), os.path.join(folder, name))


__all__ = ["CheckpointError", "hf_config_from_model_config", "hf_state_dict_from_params",
           "load_hf_checkpoint", "model_config_from_hf", "params_from_hf_state_dict",
           "save_hf_checkpoint"]
