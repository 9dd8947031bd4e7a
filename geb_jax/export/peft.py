"""LoRA adapters alone, in Hugging Face PEFT's layout (what `PeftModel.save_pretrained` writes):

    <dir>/adapter_config.json          peft_type LORA, task_type CAUSAL_LM, r, lora_alpha,
                                       target_modules [q_proj, k_proj, ...], ...
    <dir>/adapter_model.safetensors    base_model.model.model.layers.{i}.self_attn.q_proj
                                       .lora_A.weight [r, in] and .lora_B.weight [out, r]

`PeftModel.from_pretrained(LlamaForCausalLM(base), dir)` then computes
W_hf + (lora_alpha / r) * lora_B @ lora_A for every target, which is the transpose of our
W + (alpha / r) * a @ b (model/lora.py). Our a (L, *in, r) and b (L, r, *out) are flattened
exactly as export/hf.py flattens the base matrix (q: (D, N, H) -> [N*H, D] rows, head-major;
o: (N, H, D) -> [D, N*H]; RoPE is already HF's rotate-half layout, so nothing is permuted),
then transposed per layer. The adapters apply to the stage's *unmerged* base (the checkpoint's
frozen `params`); the numpy/ONNX/GGUF/HF exports already contain them (merged).

numpy only (no JAX), like export/hf.py.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np
import safetensors.numpy

from geb_jax.atomic_io import atomic_folder
from geb_jax.errors import ConfigError
from geb_jax.model.config import ModelConfig
from geb_jax.model.lora import A_KEY, B_KEY, LAYERS_KEY, TARGETS, LoraConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model.model.layers"  # PeftModel -> LoraModel -> LlamaForCausalLM.model


def hf_in_out(name: str, config: ModelConfig) -> tuple[int, int]:
    """(in_features, out_features) of the HF Linear a target adapts."""
    c = config
    sizes = {"q": (c.d_model, c.n_heads * c.head_dim),
             "k": (c.d_model, c.n_kv_heads * c.head_dim),
             "v": (c.d_model, c.n_kv_heads * c.head_dim),
             "o": (c.n_heads * c.head_dim, c.d_model),
             "gate": (c.d_model, c.d_ff), "up": (c.d_model, c.d_ff), "down": (c.d_ff, c.d_model)}
    return sizes[name]


def tensor_names(name: str, layer: int) -> tuple[str, str]:
    module = TARGETS[name][3]
    stem = f"{_PREFIX}.{layer}.{module}"
    return f"{stem}.lora_A.weight", f"{stem}.lora_B.weight"


def peft_state_dict(adapters: Mapping, config: ModelConfig,
                    lora: LoraConfig) -> dict[str, np.ndarray]:
    """Our adapters -> PEFT tensor names, [r, in] and [out, r] float32 (C-contiguous)."""
    state = {}
    r = lora.rank
    for name in lora.targets:
        group, leaf, _, _ = TARGETS[name]
        pair = adapters[LAYERS_KEY][group][leaf]
        a, b = np.asarray(pair[A_KEY], np.float32), np.asarray(pair[B_KEY], np.float32)
        n_in, n_out = hf_in_out(name, config)
        layers = config.n_layers
        if a.size != layers * n_in * r or b.size != layers * r * n_out or a.shape[-1] != r \
                or b.shape[:2] != (layers, r):
            raise ConfigError(f"LoRA adapter {name!r} has shapes a {a.shape}, b {b.shape}; "
                              f"expected ({layers}, ..., {r}) with {n_in} inputs and "
                              f"({layers}, {r}, ...) with {n_out} outputs for this model.")
        a, b = a.reshape(layers, n_in, r), b.reshape(layers, r, n_out)
        for i in range(layers):
            a_name, b_name = tensor_names(name, i)
            state[a_name] = np.ascontiguousarray(a[i].T)  # [r, in]
            state[b_name] = np.ascontiguousarray(b[i].T)  # [out, r]
    return state


def adapters_from_peft_state_dict(state: Mapping[str, np.ndarray], config: ModelConfig,
                                  lora: LoraConfig) -> dict:
    """The inverse of peft_state_dict: PEFT tensors -> our adapters pytree (numpy)."""
    from geb_jax.model.lora import split_shape  # pylint: disable=import-outside-toplevel
    out: dict = {}
    r = lora.rank
    for name in lora.targets:
        group, leaf, _, _ = TARGETS[name]
        n_in, n_out = hf_in_out(name, config)
        a_layers, b_layers = [], []
        for i in range(config.n_layers):
            a_name, b_name = tensor_names(name, i)
            for tensor, shape in ((a_name, (r, n_in)), (b_name, (n_out, r))):
                if tensor not in state or tuple(np.shape(state[tensor])) != shape:
                    got = np.shape(state[tensor]) if tensor in state else "missing"
                    raise ConfigError(f"PEFT tensor {tensor!r}: expected shape {shape}, got "
                                      f"{got}.")
            a_layers.append(np.asarray(state[a_name], np.float32).T)
            b_layers.append(np.asarray(state[b_name], np.float32).T)
        base_shape = _stacked_shape(name, config)
        _, ins, outs = split_shape(name, base_shape)
        out.setdefault(group, {})[leaf] = {
            A_KEY: np.stack(a_layers).reshape(config.n_layers, *ins, r),
            B_KEY: np.stack(b_layers).reshape(config.n_layers, r, *outs)}
    return {LAYERS_KEY: out}


def _stacked_shape(name: str, c: ModelConfig) -> tuple[int, ...]:
    """Our stacked base shape of a target (model/layers.py)."""
    shapes = {"q": (c.d_model, c.n_heads, c.head_dim), "k": (c.d_model, c.n_kv_heads, c.head_dim),
              "v": (c.d_model, c.n_kv_heads, c.head_dim), "o": (c.n_heads, c.head_dim, c.d_model),
              "gate": (c.d_model, c.d_ff), "up": (c.d_model, c.d_ff), "down": (c.d_ff, c.d_model)}
    return (c.n_layers, *shapes[name])


def adapter_config(lora: LoraConfig, base_model_name_or_path: str | None = None) -> dict:
    """adapter_config.json as PEFT's LoraConfig writes it (defaults spelled out)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "target_modules": [TARGETS[t][3].split(".")[-1] for t in lora.targets],
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
    }


def save_peft_adapter(path: str, adapters: Mapping, config: ModelConfig, lora: LoraConfig,
                      base_model_name_or_path: str | None = None,
                      overwrite: bool = False) -> str:
    """Writes <path>/adapter_config.json + adapter_model.safetensors, all or nothing."""
    if not lora.enabled:
        raise ConfigError("save_peft_adapter: LoRA is off (lora.rank=0), there are no adapters.")
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise ConfigError(f"{path} already exists; pass overwrite=True to replace it.")
    state = peft_state_dict(adapters, config, lora)  # validates shapes before touching disk
    with atomic_folder(path) as tmp:
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
            json.dump(adapter_config(lora, base_model_name_or_path), f, indent=2, sort_keys=True)
        safetensors.numpy.save_file(state, os.path.join(tmp, ADAPTER_WEIGHTS), {"format": "pt"})
    return path


def load_peft_adapter(path: str, config: ModelConfig) -> tuple[LoraConfig, dict]:
    """(LoraConfig, adapters) from a PEFT LoRA folder for a Llama of `config` (plain LoRA only:
    no rsLoRA/DoRA, per-module ranks or biases)."""
    with open(os.path.join(path, ADAPTER_CONFIG)) as f:
        hf = json.load(f)
    if hf.get("peft_type") != "LORA" or hf.get("use_rslora") or hf.get("use_dora") \
            or hf.get("rank_pattern") or hf.get("alpha_pattern") or hf.get("bias", "none") != "none":
        raise ConfigError(f"{path}: only plain LoRA adapters (no rsLoRA, DoRA, per-module "
                          f"rank/alpha or biases) can be read.")
    by_module = {TARGETS[t][3].split(".")[-1]: t for t in TARGETS}
    modules = hf["target_modules"]
    modules = [modules] if isinstance(modules, str) else list(modules)
    unknown = [m for m in modules if m not in by_module]
    if unknown:
        raise ConfigError(f"{path}: target_modules {unknown} are not Llama projections "
                          f"({', '.join(by_module)}).")
    lora = LoraConfig(rank=int(hf["r"]), alpha=float(hf["lora_alpha"]),
                      targets=tuple(by_module[m] for m in modules))
    state = safetensors.numpy.load_file(os.path.join(path, ADAPTER_WEIGHTS))
    return lora, adapters_from_peft_state_dict(state, config, lora)


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "adapter_config", "adapters_from_peft_state_dict",
           "load_peft_adapter", "peft_state_dict", "save_peft_adapter", "tensor_names"]
