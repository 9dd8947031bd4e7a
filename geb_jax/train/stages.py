"""Stage chaining: pretrain -> SFT -> DPO in one config, each from the previous stage's end.

config.stages is a comma-separated list. config.stage_overrides.<stage> holds the fields that
differ for that stage (e.g. a lower learning rate for SFT) as nested sections mirroring the
config; they win over the top-level fields (geb_jax/run_config.py merge_stage, which also lists
what they changed in the stage's first log line). The DPO reference model is the SFT stage's
final parameters.
"""
from __future__ import annotations

import os

import ml_collections

from geb_jax.checkpoint import published
from geb_jax.errors import ConfigError
from geb_jax.run_config import STAGES, RunConfig, merge_stage, run_config, stage_names
from geb_jax.train.loop import stage_dir, train

__all__ = ["STAGES", "run_stages", "stage_config", "validate"]


def stage_config(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
    """The config with the stage's overrides merged in and train.stage set (a ConfigDict)."""
    return merge_stage(config, stage)[0]


def validate(config: ml_collections.ConfigDict, stage: str | None = None) -> RunConfig:
    """The typed sections a stage will build, so that errors come before any work."""
    return run_config(config, stage)


def run_stages(config: ml_collections.ConfigDict) -> list[dict]:
    stages = stage_names(config)
    summaries, previous = [], config.get("init_from") or None
    if previous and not os.path.exists(previous):
        raise ConfigError(f"config.init_from={previous!r} does not exist; point it at a stage "
                          "directory (workdir/<stage>) of a finished run, a GGUF file or a "
                          "Hugging Face folder, or leave it empty.")
    runs = {stage: run_config(config, stage) for stage in stages}  # every stage's mistakes
    for run in runs.values():                                        # surface before training
        if published.is_published(previous):
            published.check_overrides(previous, published.published_model_config(previous),
                                      run.model.to_dict())
    for stage in stages:
        summaries.append(train(runs[stage], stage, init_params_from=previous))
        previous = stage_dir(config, stage)
    return summaries
