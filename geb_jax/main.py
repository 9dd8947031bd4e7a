"""Entry point: python -m geb_jax.main --config configs/tiny.py [--config.a.b=value ...]

With --config.mode=export, writes the numpy, ONNX, GGUF and HF files of a finished run
(geb_jax/export/command.py). Otherwise runs the stages named in config.stages (e.g. "pretrain" or "pretrain,sft,dpo"), each starting
from the previous stage's final parameters (the DPO reference is the SFT model). Running the
same command again resumes every unfinished stage from its newest good checkpoint.
Multi-host: the same command on every host plus --coordinator_address/--num_processes/
--process_id (or a cluster environment JAX recognises); see geb_jax/parallel/distributed.py.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from geb_jax.config_loader import check_field_names, load_config
from geb_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to configs/<preset>.py[:arg].")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for a multi-process job.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process' index in the job.")


def _config_spec(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def precheck(argv: list[str]) -> None:
    """Fails fast, with one clear message, on a missing preset or a misspelt override."""
    spec = _config_spec(argv)
    if spec is None:
        raise ConfigError("Pass --config configs/<preset>.py (e.g. configs/tiny.py).")
    config = load_config(spec)
    overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    check_field_names(config, overrides)


def main(argv):
    del argv
    from geb_jax.checkpoint import CheckpointError  # heavy imports after flag parsing
    from geb_jax.data.sources import SourceError
    from geb_jax.data.tokenizer import TokenizerError
    from geb_jax.export.command import export_stage
    from geb_jax.export.gguf_export import GGUFExportError
    from geb_jax.export.hf import CheckpointError as HFCheckpointError
    from geb_jax.export.onnx_graph import OnnxExportError
    from geb_jax.infer import ModelFileError, WeightsError
    from geb_jax.infer.gguf_file import GGUFFileError
    from geb_jax.parallel import distributed
    from geb_jax.train.stages import run_stages
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    try:
        if config.mode == "train":
            distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
            run_stages(config)
        elif config.mode == "export":
            export_stage(config)
        else:
            raise ConfigError(f"config.mode={config.mode!r}: use train or export.")
    except (ConfigError, TokenizerError, CheckpointError, SourceError, ModelFileError,
            WeightsError, OnnxExportError, GGUFExportError, GGUFFileError, HFCheckpointError,
            FileNotFoundError) as e:
        sys.exit(f"error: {e}")


def run() -> None:
    try:
        precheck(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"error: {e}")
    app.run(main)


if __name__ == "__main__":
    run()
