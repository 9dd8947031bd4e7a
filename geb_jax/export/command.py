"""`python -m geb_jax.main --config ... --config.mode=export`: every serving format from the final
checkpoint of one stage, each written atomically and re-read/checked by its writer.

    <workdir>/export/numpy/            weights.npz + config.json + tokenizer.model (numpy engine)
    <workdir>/export/onnx/model.onnx   (+ model-int8.onnx, model-int4.onnx, tokenizer.model;
                                       export.onnx_graph: plain or fused, onnx_fused.py)
    <workdir>/export/gguf/model-f16.gguf, model-q8_0.gguf   (llama.cpp, ollama; also q4_0)
    <workdir>/export/hf/               config.json + model.safetensors + tokenizer.model
    <workdir>/export/peft/             LoRA runs only: adapter_config.json +
                                       adapter_model.safetensors (export/peft.py)

A stage trained with LoRA (config.lora.rank > 0, as saved with its checkpoint) is exported
merged: every format above gets W + (alpha/r) a b, the model that was trained. The adapters
alone go to peft/ in Hugging Face PEFT's layout, to apply onto the stage's unmerged base.

A model that came in from a GGUF file or an HF folder (configs/pretrained.py) keeps its own
tokenizer and chat template: tokenizer/ (tokenizer.json + tokenizer_config.json) beside the
numpy and ONNX files, the same two files in the HF folder, its vocabulary in the GGUF.
"""
from __future__ import annotations

import os

import ml_collections

from geb_jax.errors import ConfigError
from geb_jax.model.config import ModelConfig

FORMATS = ("numpy", "onnx", "gguf", "hf")


def _split(value: str) -> list[str]:
    return [v.strip() for v in str(value).split(",") if v.strip()]


def export_stage(config: ml_collections.ConfigDict, log=print) -> dict[str, str]:
    """Writes the formats in config.export.formats; returns {what: path}."""
    # Heavy imports on use: the trainer's modules are not needed to train.
    from geb_jax.train import inputs  # pylint: disable=import-outside-toplevel
    from geb_jax.train.loop import stage_dir  # pylint: disable=import-outside-toplevel
    from geb_jax.run_config import run_config  # pylint: disable=import-outside-toplevel

    stage = config.export.stage or _split(config.stages)[-1]
    run = run_config(config, stage)
    formats = _split(run.export.formats)
    unknown = sorted(set(formats) - set(FORMATS))
    if not formats or unknown:
        raise ConfigError(f"config.export.formats={run.export.formats!r}: use a comma-"
                          f"separated list of {', '.join(FORMATS)}.")
    model_config = run.model
    from geb_jax.data.tokenizer_files import tokenizer_in  # pylint: disable=import-outside-toplevel
    tokenizer_path = tokenizer_in(config.workdir)
    if tokenizer_path is None:
        raise ConfigError(f"no tokenizer.model (or tokenizer/) in {config.workdir}: train the "
                          f"run first (config.workdir={config.workdir!r}), then export.")
    params, adapters, lora = _final_model(run, model_config, stage_dir(config, stage),
                                          inputs)
    out = run.export.out or os.path.join(config.workdir, "export")
    log(f"[export] {stage} stage of {config.workdir} -> {out}")
    written: dict[str, str] = {}
    if "numpy" in formats:
        from geb_jax.infer.loading import save_npz_model  # pylint: disable=import-outside-toplevel
        written["numpy"] = save_npz_model(os.path.join(out, "numpy"), params, model_config,
                                          tokenizer_path, overwrite=True)
    if "onnx" in formats:
        from geb_jax.export.onnx_export import export_onnx  # pylint: disable=import-outside-toplevel
        for quantize in _split(run.export.onnx_quantize) or ["none"]:
            name = "model.onnx" if quantize == "none" else f"model-{quantize}.onnx"
            written[f"onnx/{quantize}"] = export_onnx(
                params, model_config, tokenizer_path, os.path.join(out, "onnx", name),
                quantize=None if quantize == "none" else quantize,
                accuracy_level=run.export.onnx_accuracy_level,
                block_size=run.export.onnx_block_size, graph=run.export.onnx_graph,
                overwrite=True)
    if "gguf" in formats:
        from geb_jax.export.gguf_export import export_gguf  # pylint: disable=import-outside-toplevel
        for dtype in _split(run.export.gguf_dtypes):
            path = os.path.join(out, "gguf", f"model-{dtype}.gguf")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            written[f"gguf/{dtype}"] = export_gguf(params, model_config, tokenizer_path, path,
                                                   dtype=dtype)
    if "hf" in formats:
        from geb_jax.export.hf import save_hf_checkpoint  # pylint: disable=import-outside-toplevel
        path = os.path.join(out, "hf")
        save_hf_checkpoint(model_config, params, path, overwrite=True,
                           tokenizer_path=tokenizer_path)
        written["hf"] = path
    if lora.enabled:
        from geb_jax.export.peft import save_peft_adapter  # pylint: disable=import-outside-toplevel
        written["peft"] = save_peft_adapter(
            os.path.join(out, "peft"), adapters, model_config, lora,
            base_model_name_or_path=_peft_base(config, stage), overwrite=True)
        log(f"[export] {stage} trained LoRA rank {lora.rank} on {','.join(lora.targets)}: the "
            f"formats hold the merged weights; peft/ holds the adapters for the unmerged base")
    for what, path in written.items():
        log(f"[export] {what}: {path}")
    return written


def _peft_base(config: ml_collections.ConfigDict, stage: str) -> str | None:
    """The base model PEFT should load the adapters onto, when it is a Hugging Face folder:
    config.init_from for the first stage. Other bases (a GGUF file, an earlier stage) have no
    name PEFT can load, so adapter_config.json leaves base_model_name_or_path null."""
    from geb_jax.checkpoint import published  # pylint: disable=import-outside-toplevel
    stages = _split(config.stages)
    source = config.get("init_from") if not stages or stages[0] == stage else None
    if source and published.is_published(source) and os.path.isdir(source):
        return os.path.abspath(source)
    return None


def _final_model(stage_cfg, model_config: ModelConfig, directory: str, inputs):
    """(parameters, adapters, LoraConfig) of the stage's newest good checkpoint, as host numpy
    arrays. The LoRA setting is the one saved with the checkpoint (so an export needs no LoRA
    flags); under LoRA the parameters are merged and the adapters returned too, else None."""
    import jax  # pylint: disable=import-outside-toplevel

    from geb_jax.parallel.mesh import make_mesh  # pylint: disable=import-outside-toplevel
    from geb_jax.run_config import run_config  # pylint: disable=import-outside-toplevel
    from geb_jax.train.optimizer import make_optimizer  # pylint: disable=import-outside-toplevel
    from geb_jax.train.state import (abstract_state,  # pylint: disable=import-outside-toplevel
                                     lora_optimizer_config, model_params, restore_stage_state,
                                     saved_lora_config, state_shardings)
    stage_cfg = run_config(stage_cfg)  # a stage's ConfigDict or RunConfig
    mesh = make_mesh(stage_cfg.mesh.to_dict())
    lora = saved_lora_config(directory)
    opt_config = lora_optimizer_config(stage_cfg.optimizer, lora)
    optimizer = make_optimizer(opt_config)
    if not lora.enabled:
        abstract = abstract_state(model_config, optimizer,
                                  state_shardings(model_config, optimizer, mesh))
        return jax.device_get(inputs.load_params(directory, abstract)), None, lora
    state = restore_stage_state(directory, model_config, optimizer, mesh, lora)
    with jax.set_mesh(mesh):
        merged = jax.jit(lambda s: model_params(s, lora))(state)
    return jax.device_get(merged), jax.device_get(state.lora), lora


def _final_params(stage_cfg, model_config: ModelConfig, directory: str, inputs) -> dict:
    """The stage's newest good checkpoint's parameters (merged, under LoRA) as numpy arrays."""
    return _final_model(stage_cfg, model_config, directory, inputs)[0]
