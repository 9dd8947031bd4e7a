"""A run's config as typed, frozen sections: `run_config(config_dict, stage) -> RunConfig`.

The ConfigDict (geb_jax/config_base.py, presets, `--config.a.b=v`) stays the surface users
override; the code past the entry point reads these sections instead (`run.train.steps`).
Building them is where the cross-section rules live:
  * the stage's `stage_overrides.<stage>` are merged in first; they win over the top-level
    fields, and every field they change is reported in the stage's first log lines (`notes`);
  * `optimizer.total_steps` unset (None) follows `train.steps`, so a shorter run still ends its
    cosine at its last update; an explicit value that differs is kept (a schedule meant to be
    continued later, or a floor held at the end are real uses) and reported in `notes`;
  * `train.seq_len` must fit `model.max_seq_len`;
  * `data.clean` is refused: cleaning is `python -m geb_jax.data.prepare`'s (config_base.py).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import ml_collections

from geb_jax.config_base import ELSEWHERE
from geb_jax.config_sections import Section, as_mapping
from geb_jax.errors import ConfigError
from geb_jax.eval.suite import EvalConfig
from geb_jax.model.config import ModelConfig
from geb_jax.model.lora import LoraConfig
from geb_jax.train.optimizer import OptimizerConfig
from geb_jax.train.spikes import SpikeConfig, parse_batch_numbers

STAGES = ("pretrain", "sft", "dpo")
MODES = ("train", "export")


def _positive(section: Section, *names: str, minimum: int = 1) -> None:
    for name in names:
        if getattr(section, name) < minimum:
            raise ConfigError(f"{section.SECTION}.{name} must be >= {minimum}, got "
                              f"{getattr(section, name)}.")


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
    """Loop lengths, batch and the stage's loss hyperparameters (config.train)."""
    SECTION = "train"

    stage: str = "pretrain"  # pretrain | sft | dpo: the loss and batch; the code path is shared
    steps: int = 300
    batch_size: int = 8
    seq_len: int = 256
    log_every: int = 10
    z_loss_weight: float = 0.0
    dpo_beta: float = 0.1
    dpo_loss_type: str = "sigmoid"
    dpo_label_smoothing: float = 0.0
    dpo_sft_weight: float = 0.0
    skip_batches: str = ""  # data batches never trained on, e.g. "2300-2500" (train/spikes.py)
    spike: SpikeConfig = dataclasses.field(default_factory=SpikeConfig)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ConfigError(f"train.stage={self.stage!r} is not one of {', '.join(STAGES)}.")
        _positive(self, "steps", "batch_size", "seq_len", "log_every")
        parse_batch_numbers(self.skip_batches, "train.skip_batches")  # names a bad range now

    @property
    def skip(self) -> frozenset[int]:
        return parse_batch_numbers(self.skip_batches, "train.skip_batches")


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
    """Where the text or records come from (config.data; data/sources.py reads these names)."""
    SECTION = "data"

    source: str = "builtin"
    tokenizer: str = "builtin"
    shuffle_seed: int = 0
    path: str = ""
    valid_path: str = ""
    valid_fraction: float = 0.05
    field: str = "text"
    txt_unit: str = "file"
    lang: str = ""
    validate: bool = True
    bad_records: str = "skip"
    max_record_bytes: int = 16 * 2**20
    tfds_name: str = ""
    tfds_data_dir: str = ""
    tfds_train_split: str = "train"
    tfds_valid_split: str = "validation"
    mixture: tuple = ()  # of {"source": ..., "weight": w, ...} dicts
    format: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "mixture", tuple(as_mapping(m) for m in self.mixture))

    @classmethod
    def from_dict(cls, values: Any, section: str | None = None):
        if "clean" in as_mapping(values):
            raise ConfigError(ELSEWHERE["data.clean"])
        return super().from_dict(values, section)


@dataclasses.dataclass(frozen=True)
class MeshConfig(Section):
    """Device mesh sizes; one -1 takes the remaining devices (parallel/mesh.py)."""
    SECTION = "mesh"

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(Section):
    SECTION = "checkpoint"

    every: int = 100  # 0: only at the end (and on a stop signal)
    keep: int | None = 3  # None keeps every checkpoint

    def __post_init__(self):
        _positive(self, "every", minimum=0)


@dataclasses.dataclass(frozen=True)
class EvalScheduleConfig(Section):
    """When the loop evaluates (config.eval); `suite` is what the task suite runs."""
    SECTION = "eval"

    every: int = 100  # 0: never
    batches: int = 4
    at_start: bool = False
    suite_at_start: bool = True
    suite_every: int = 0
    suite: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def __post_init__(self):
        _positive(self, "every", "batches", "suite_every", minimum=0)


@dataclasses.dataclass(frozen=True)
class ExportConfig(Section):
    """--config.mode=export's formats (geb_jax/export/command.py)."""
    SECTION = "export"

    stage: str = ""
    formats: str = "numpy,onnx,gguf,hf"
    onnx_quantize: str = "none,int8,int4"
    onnx_accuracy_level: int = 4
    onnx_block_size: int = 0  # 0: onnx_graph.DEFAULT_BLOCK_SIZES
    onnx_graph: str = "plain"
    gguf_dtypes: str = "f16,q8_0"
    out: str = ""


@dataclasses.dataclass(frozen=True)
class RunConfig(Section):
    """Every section of one stage's config, typed; `notes` says what was merged or differs."""
    SECTION = "config"

    model: ModelConfig
    optimizer: OptimizerConfig
    workdir: str = "runs/default"
    seed: int = 0
    stages: str = "pretrain"
    init_from: str = ""
    mode: str = "train"
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    eval: EvalScheduleConfig = dataclasses.field(default_factory=EvalScheduleConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)
    stage_overrides: Any = None  # raw: read only when merging a stage (merge_stage)
    notes: tuple = dataclasses.field(default=(), compare=False)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"config.mode={self.mode!r}: use {' or '.join(MODES)}.")
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"train.seq_len ({self.train.seq_len}) exceeds model.max_seq_len "
                f"({self.model.max_seq_len}): the model has no positions past its context. Set "
                f"--config.train.seq_len={self.model.max_seq_len} (or less), or raise "
                f"--config.model.max_seq_len to {self.train.seq_len} (for a stage with its own "
                f"seq_len: --config.stage_overrides.{self.train.stage}.train.seq_len).")

    def to_dict(self) -> dict:
        """The resolved config as a plain dict (what each checkpoint stores), without notes."""
        out = super().to_dict()
        out.pop("notes")
        return out


def merge_stage(config: ml_collections.ConfigDict, stage: str
                ) -> tuple[ml_collections.ConfigDict, list[str]]:
    """(the config with `stage_overrides.<stage>` merged in and train.stage set, the fields the
    stage changed as "section.key=value (top-level: old)")."""
    merged = copy.deepcopy(config)
    overrides = as_mapping(config.get("stage_overrides", {}).get(stage))
    changed: list[str] = []
    for section, values in overrides.items():
        if section not in merged:
            raise ConfigError(f"config.stage_overrides.{stage}.{section} names no section.")
        _merge_into(merged[section], as_mapping(values), f"{stage}.{section}", section, changed)
    # A top-level total_steps pairs with the top-level steps: a stage with its own steps and no
    # total_steps of its own follows its steps.
    if (overrides.get("train", {}).get("steps") is not None
            and overrides.get("optimizer", {}).get("total_steps") is None):
        if merged.optimizer.total_steps is not None:
            changed.append(f"optimizer.total_steps follows this stage's train.steps (top-level: "
                           f"{merged.optimizer.total_steps})")
        merged.optimizer.total_steps = None
    merged.train.stage = stage
    return merged, changed


def _merge_into(node: ml_collections.ConfigDict, values: dict, where: str, path: str,
                changed: list[str]) -> None:
    """Sets each non-None value in `node`, field by field (nested sections merge, not replace)."""
    for key, value in values.items():
        if value is None:  # an unset per-stage field (config_base.stage_data_fields)
            continue
        if key not in node:
            raise ConfigError(f"config.stage_overrides.{where}.{key} names no field of "
                              f"config.{path}.")
        if isinstance(node[key], ml_collections.ConfigDict) and isinstance(value, dict):
            _merge_into(node[key], value, f"{where}.{key}", f"{path}.{key}", changed)
            continue
        if node[key] != value:
            changed.append(f"{path}.{key}={value!r} (top-level: {node[key]!r})")
        node[key] = value


def run_config(config: ml_collections.ConfigDict | RunConfig, stage: str | None = None
               ) -> RunConfig:
    """The typed sections of `config` (merged with `stage`'s overrides when given)."""
    if isinstance(config, RunConfig):
        return config
    notes = []
    if stage is not None:
        config, changed = merge_stage(config, stage)
        if changed:
            notes.append(f"stage_overrides.{stage} (these win over the top-level fields): "
                         + ", ".join(changed))
    values = as_mapping(config)
    values["optimizer"] = dict(as_mapping(values.get("optimizer")))
    notes += _resolve_total_steps(values["optimizer"], as_mapping(values.get("train")))
    return RunConfig.from_dict({**values, "notes": tuple(notes)})


def _resolve_total_steps(optimizer: dict, train: dict) -> list[str]:
    """Fills an unset optimizer.total_steps from train.steps; reports an explicit mismatch."""
    steps = train.get("steps", TrainConfig.steps)
    total = optimizer.get("total_steps")
    if total is None:
        optimizer["total_steps"] = steps
        return []
    valid = all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in (total, steps))
    if total == steps or not valid:  # an invalid value: OptimizerConfig / TrainConfig name it
        return []
    where = (f"after this run ends (at {steps / total:.0%} of the schedule)" if total > steps
             else f"and holds it for the last {steps - total} updates")
    return [f"warning: optimizer.total_steps={total} differs from train.steps={steps}: the "
            f"learning rate reaches its floor at update {total}, {where}. Leave "
            f"optimizer.total_steps unset (None) to follow train.steps."]


def stage_names(config: ml_collections.ConfigDict | RunConfig) -> list[str]:
    """config.stages as a checked list."""
    text = config.stages
    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if not stages or unknown:
        raise ConfigError(f"config.stages={text!r}: use a comma-separated list of "
                          f"{', '.join(STAGES)}.")
    return stages
