"""Models in and out of geb_jax: Hugging Face Llama folders (config.json + safetensors), ONNX
(onnx_export.py writes, onnx_graph.py / onnx_fused.py build the graphs) and GGUF
(gguf_export.py); `python -m geb_jax.main --config.mode=export` writes them from a finished
stage (command.py). The ONNX and GGUF writers are imported on use."""
from geb_jax.export.hf import (CheckpointError, hf_config_from_model_config,
                               hf_state_dict_from_params, load_hf_checkpoint, model_config_from_hf,
                               params_from_hf_state_dict, save_hf_checkpoint)

__all__ = ["CheckpointError", "hf_config_from_model_config", "hf_state_dict_from_params",
           "load_hf_checkpoint", "model_config_from_hf", "params_from_hf_state_dict",
           "save_hf_checkpoint"]
