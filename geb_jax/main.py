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

import ml_collections
from absl import app, flags, logging

from geb_jax.config_loader import load_with_overrides
from geb_jax.errors import ConfigError

# --config names the preset; its --config.a.b=value overrides are taken out of the command line
# by config_loader (the one override parser) before absl sees the rest.
_CONFIG = flags.DEFINE_string("config", None, "configs/<preset>.py[:arg]; then --config.a.b=value "
                              "overrides any field of geb_jax/config_base.py.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for a multi-process job.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process' index in the job.")


def precheck(argv: list[str]) -> tuple[ml_collections.ConfigDict, list[str]]:
    """(the config with its overrides, the other arguments); fails fast, with one clear message,
    on a missing preset, a misspelt field, a badly typed value or a field main does not take."""
    return load_with_overrides(argv)


def main(argv, config: ml_collections.ConfigDict):
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
        config, rest = precheck(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"error: {e}")
    app.run(lambda argv: main(argv, config), argv=[sys.argv[0], *rest])


if __name__ == "__main__":
    run()
