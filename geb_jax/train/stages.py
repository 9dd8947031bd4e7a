"""Stage chaining: pretrain -> SFT -> DPO in one config, each from the previous stage's end.

config.stages is a comma-separated list. config.stage_overrides.<stage> holds the fields that
differ for that stage (e.g. a lower learning rate for SFT) as nested sections mirroring the
config. The DPO reference model is the SFT stage's final parameters.
"""
from __future__ import annotations

import os

import ml_collections

from geb_jax.checkpoint import published
from geb_jax.eval import EvalConfig
from geb_jax.errors import ConfigError
from geb_jax.model.config import ModelConfig
from geb_jax.train.optimizer import OptimizerConfig
from geb_jax.train.spikes import SpikeConfig
from geb_jax.train.loop import stage_dir, train

STAGES = ("pretrain", "sft", "dpo")


def stage_config(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
    """The config with the stage's overrides merged in and train.stage set."""
    merged = ml_collections.ConfigDict(config.to_dict())
    overrides = config.get("stage_overrides", {}).get(stage)
    if overrides:
        for section, values in overrides.items():
            if section not in merged:
                raise ConfigError(f"config.stage_overrides.{stage}.{section} names no section.")
            for key, value in values.items():
                if value is None:  # an unset per-stage field (config_base.stage_data_fields)
                    continue
                if key not in merged[section]:
                    raise ConfigError(f"config.stage_overrides.{stage}.{section}.{key} names no "
                                      f"field of config.{section}.")
                merged[section][key] = value
    merged.train.stage = stage
    return merged


def validate(config: ml_collections.ConfigDict) -> None:
    """Builds the frozen configs a stage will build, so that errors come before any work."""
    ModelConfig.from_dict(config.model)
    OptimizerConfig.from_dict(config.optimizer)
    SpikeConfig.from_dict(config.train.spike)
    EvalConfig.from_dict(config.eval.suite)


def run_stages(config: ml_collections.ConfigDict) -> list[dict]:
    stages = [s.strip() for s in config.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if not stages or unknown:
        raise ConfigError(f"config.stages={config.stages!r}: use a comma-separated list of "
                          f"{', '.join(STAGES)}.")
    summaries, previous = [], config.get("init_from") or None
    if previous and not os.path.exists(previous):
        raise ConfigError(f"config.init_from={previous!r} does not exist; point it at a stage "
                          "directory (workdir/<stage>) of a finished run, a GGUF file or a "
                          "Hugging Face folder, or leave it empty.")
    configs = {stage: stage_config(config, stage) for stage in stages}
    for stage_cfg in configs.values():  # every stage's mistakes surface before any training
        validate(stage_cfg)
        if published.is_published(previous):
            published.check_overrides(previous, published.published_model_config(previous),
                                      stage_cfg.model)
    for stage in stages:
        summaries.append(train(configs[stage], stage, init_params_from=previous))
        previous = stage_dir(config, stage)
    return summaries
