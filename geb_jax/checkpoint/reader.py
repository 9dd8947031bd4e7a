"""Read a finished stage's parameters from its checkpoints, without writing anything.

    stage = read_stage("runs/tiny/sft")            # newest usable step
    stage.params, stage.model_config, stage.step   # numpy tree, ModelConfig, int
    stage.config                                   # the run config saved with that step
    stage.tokenizer_path                           # runs/tiny/tokenizer.model (or tokenizer/)

Layout (written by training, see manager.py and integrity.py):
<workdir>/<stage>/checkpoints/<step>/{state, data_state, config, meta} and
<workdir>/tokenizer.model (ours) or <workdir>/tokenizer/ (a published model's,
data/tokenizer_files.py).

Why not `Checkpointer.restore`: creating a Checkpointer deletes leftover temporary step
folders (orbax's cleanup_tmp_directories), and one of those may be the save in flight of a run
still training in this workdir; restoring through it also needs the whole train state rebuilt
from the optimizer config. Here orbax's item handlers open single items instead, so nothing is
created or deleted. Only the parameters are read (orbax's partial restore: the optimizer
moments, about twice the parameters, stay on disk), onto one CPU device, and every parameter
is compared with the checksum recorded at save time (the META item; same check and messages as
`Checkpointer.restore`, via integrity.step_marker_problem / integrity.checksum_problem). With
step=None an unusable step is skipped with a WARNING and the previous one read, as
`Checkpointer.restore` does; an explicit step is read or raises.

`stages_with_checkpoints` imports no jax (the lm_eval adapter calls it on numpy-only exports);
`read_stage` imports jax and orbax when called.
"""
from __future__ import annotations

# jax, orbax and geb_jax.model are imported inside the functions that need them (see above).
# pylint: disable=import-outside-toplevel

import dataclasses
import logging
import operator
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from geb_jax.model import ModelConfig

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
PARAMS_KEY = "params"  # the parameters' subtree of the saved train state
LORA_KEY = "lora"  # a LoRA stage's adapters (train/state.py LoraTrainState); merged on read


@dataclasses.dataclass(frozen=True)
class StageCheckpoint:
    """One verified checkpoint step of a stage.

    params: the model's parameter tree of numpy arrays (dtypes as saved).
    config: the run config saved with the step (ConfigDict.to_dict()); model_config is built
      from its "model" section.
    tokenizer_path: <workdir>/tokenizer.model or <workdir>/tokenizer/, or None when the
      workdir has none.
    """
    params: Any
    model_config: "ModelConfig"
    config: dict
    step: int
    stage_dir: str
    tokenizer_path: str | None

    @property
    def workdir(self) -> str:
        return os.path.dirname(self.stage_dir)


def stages_with_checkpoints(workdir: str | os.PathLike) -> list[str]:
    """Names of the folders of `workdir` that hold checkpoints/ (sorted; [] if not a folder)."""
    workdir = os.fspath(workdir)
    if not os.path.isdir(workdir):
        return []
    return sorted(name for name in os.listdir(workdir)
                  if os.path.isdir(os.path.join(workdir, name, CHECKPOINTS_DIR)))


def committed_steps(checkpoints: str | os.PathLike) -> list[int]:
    """Steps with a committed (renamed) folder, oldest first. An unfinished save is a
    `<step>.orbax-checkpoint-tmp...` folder and is not listed."""
    checkpoints = os.fspath(checkpoints)
    return sorted(int(name) for name in os.listdir(checkpoints)
                  if name.isdigit() and os.path.isdir(os.path.join(checkpoints, name)))


def read_stage(stage_dir: str | os.PathLike, step: int | None = None,
               merge_lora: bool = True) -> StageCheckpoint:
    """The parameters, configs and step of a stage's newest usable checkpoint (or of `step`).

    Raises CheckpointError (geb_jax.checkpoint) when the stage has no checkpoints/ (naming the
    stages that do exist in its workdir), no committed step, the explicit step is missing or
    unusable, or no step is usable.
    """
    from geb_jax.checkpoint.integrity import CheckpointError
    from geb_jax.model import ModelConfig

    stage_dir = os.path.abspath(os.fspath(stage_dir))
    checkpoints = os.path.join(stage_dir, CHECKPOINTS_DIR)
    _check_stage_exists(stage_dir, checkpoints)
    steps = committed_steps(checkpoints)
    if not steps:
        raise CheckpointError(f"{checkpoints} holds no committed checkpoint: finish stage "
                              f"{os.path.basename(stage_dir)!r} first (a save still in progress "
                              f"is a <step>.orbax-checkpoint-tmp folder, not yet readable)")
    if step is None:
        candidates = list(reversed(steps))
    else:
        try:
            candidates = [operator.index(step)]
        except TypeError:
            candidates = []
        if isinstance(step, bool) or not candidates or candidates[0] not in steps:
            raise CheckpointError(f"No committed checkpoint for step={step!r} in {checkpoints}; "
                                  f"committed steps: {steps}.")

    problems = []
    for s in candidates:
        params, config, problem = _read_step(os.path.join(checkpoints, str(s)), s, merge_lora)
        if problem is None:
            if problems:
                logger.warning("Read checkpoint step %d in %s after skipping %s.",
                               s, checkpoints, [p[0] for p in problems])
            from geb_jax.data.tokenizer_files import tokenizer_in
            return StageCheckpoint(params=params,
                                   model_config=ModelConfig.from_dict(config["model"]),
                                   config=config, step=s, stage_dir=stage_dir,
                                   tokenizer_path=tokenizer_in(os.path.dirname(stage_dir)))
        problems.append((s, problem))
        if step is None:
            logger.warning("Checkpoint step %d in %s is unusable: %s. Falling back to the "
                           "previous checkpoint.", s, checkpoints, problem)
    details = "; ".join(f"step {s}: {p}" for s, p in problems)
    if step is not None:
        raise CheckpointError(f"Checkpoint step {step} in {checkpoints} is unusable: {details}. "
                              f"Read another step (committed: {steps}).")
    raise CheckpointError(f"No usable checkpoint in {checkpoints} (all {len(steps)} committed "
                          f"steps are corrupt or incomplete: {details}).")


def _check_stage_exists(stage_dir: str, checkpoints: str) -> None:
    from geb_jax.checkpoint.integrity import CheckpointError

    if os.path.isdir(checkpoints):
        return
    workdir, stage = os.path.split(stage_dir)
    message = (f"{checkpoints} does not exist: stage {stage!r} has not been trained in {workdir} "
               f"(stages with checkpoints there: {stages_with_checkpoints(workdir) or 'none'})")
    inner = stages_with_checkpoints(stage_dir)
    if inner:
        message += f"; {stage_dir} is a workdir: name one of its stages {inner}"
    raise CheckpointError(message)


def _read_step(step_dir: str, step: int, merge_lora: bool = True
               ) -> tuple[Any, dict | None, str | None]:
    """(params, config, None) when the step reads and verifies, else (None, None, problem).

    Raises CheckpointError when the step is readable but is not a train state with a model
    config (no fallback: an older step of the same run would be no different).
    """
  
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from etils import epath

    from geb_jax.checkpoint.integrity import (CONFIG_ITEM, META_ITEM, STATE_ITEM, CheckpointError,
                                              checksum_problem, short_error, step_marker_problem)

    problem = step_marker_problem(step_dir)
    if problem is not None:
        return None, None, problem
    path = epath.Path(step_dir)
    try:
        json_handler = ocp.JsonCheckpointHandler()
        config = json_handler.restore(path / CONFIG_ITEM, args=ocp.args.JsonRestore())
        meta = json_handler.restore(path / META_ITEM, args=ocp.args.JsonRestore())
    except Exception as e:  # noqa: BLE001  unreadable JSON: treat as corruption
        return None, None, (f"reading its config/meta failed ({type(e).__name__}: "
                            f"{short_error(e)})")
    if not isinstance(config, dict) or not isinstance(meta, dict):
        return None, None, "its config or meta item did not restore to a dict"

    state_handler = ocp.PyTreeCheckpointHandler()
    try:
        try:
            stored = state_handler.metadata(path / STATE_ITEM)
        except Exception as e:  # noqa: BLE001
            return None, None, (f"cannot read the state metadata ({type(e).__name__}: "
                                f"{short_error(e)})")
        stored = getattr(stored, "tree", stored)
        if not isinstance(stored, dict) or PARAMS_KEY not in stored:
            raise CheckpointError(f"{step_dir}/{STATE_ITEM} holds no {PARAMS_KEY!r} subtree: not "
                                  "a training checkpoint of this codebase")
        if not isinstance(config.get("model"), dict):
            raise CheckpointError(f"the run config saved in {step_dir}/{CONFIG_ITEM} has no "
                                  "model section: not a training checkpoint of this codebase")
        cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        keys = [PARAMS_KEY] + ([LORA_KEY] if merge_lora and stored.get(LORA_KEY) else [])
        target = {key: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                                                   sharding=cpu), stored[key])
                  for key in keys}
        restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=cpu), target)
        try:
            restored = state_handler.restore(path / STATE_ITEM, args=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True))
        except Exception as e:  # noqa: BLE001  orbax/tensorstore raise many types
            return None, None, f"reading it failed ({type(e).__name__}: {short_error(e)})"
    finally:
        state_handler.close()
    problem = checksum_problem(meta, step, restored, whole_state=False)
    if problem is not None:
        return None, None, problem
    params = restored[PARAMS_KEY]
    if LORA_KEY in restored:  # a LoRA stage: what it computes is the base plus its adapters
        from geb_jax.model.lora import LoraConfig, merge
        params = merge(params, restored[LORA_KEY], LoraConfig.from_dict(config.get("lora")))
    return jax.tree.map(np.asarray, params), config, None
