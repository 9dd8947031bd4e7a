"""Checkpoints for exact resume: an orbax `CheckpointManager` wrapper plus a stop-signal helper.

A checkpoint step holds four orbax items, all written through orbax handlers (orbax coordinates
the processes of a multi-host job and writes the JSON items once, from the primary host):

    state       StandardSave: the train-state pytree of jax arrays (step, params, optimizer
                state, typed rng key -- orbax stores jax.random.key_data and re-wraps it --,
                running statistics), each process writing its own shards.
    data_state  JsonSave: the data iterator's state (grain's JSON-serialisable dict).
    config      JsonSave: the run's config (ConfigDict.to_dict()), for provenance and resume.
    meta        JsonSave: format version, step and two 32-bit checksums per state leaf.

Usage in a training loop::

    ckpt = Checkpointer(workdir / "checkpoints", save_every=1000, keep=3)
    if ckpt.latest_good_step() is not None:
        state, data_state, _, step = ckpt.restore(abstract_state)   # ShapeDtypeStructs + shardings
    with ckpt, install_signal_save() as stop:
        for ...:
            state = train_step(state, batch)
            ckpt.maybe_save(step, state, data_iter.get_state(), config.to_dict())
            if stop.should_stop():
                break
        ckpt.maybe_save(step, state, data_iter.get_state(), config.to_dict(), force=True)

Why it is built this way
------------------------
* Commit protocol. Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it to
  `<step>` once every process has finished (it also writes `commit_success.txt` inside before the
  rename). Orbax lists only renamed directories, so a save that was interrupted is never a
  candidate; leftover temporary directories are removed when the next Checkpointer is created
  (`cleanup_tmp_directories`; orbax reuses the same temporary name for a step, so a leftover
  would otherwise make the next save of that step fail).
* Committed is not the same as intact. Files inside a committed step can later be deleted,
  truncated or zeroed (disk full on copy, a partial rsync, bit rot). `restore` therefore checks
  the commit marker, reads orbax's metadata, restores, and compares each restored leaf with the
  checksum recorded at save time (tensorstore only notices damage where the bytes no longer
  decode; the checksum also catches bytes that decode to different values). If
  the newest step fails, it logs a WARNING naming the step and the problem and tries the previous
  one; if none is usable it raises `CheckpointError` naming the directory.
* A checkpoint whose state *structure* differs from `abstract_state` (a config change: other
  shapes, dtypes or optimizer) is not corruption: falling back would find the same mismatch in
  every step and the advice "delete the checkpoints" would destroy good data, so that raises
  `CheckpointError` at once, listing the differences.
* Steps newer than the restored one (corrupt ones, or all newer ones when an older step is
  restored on purpose) belong to an abandoned trajectory. They are deleted (through orbax,
  with a WARNING) just before this run's first save, not at restore time: a restore that failed
  for a transient reason (e.g. a storage hiccup) can then still succeed on the next restart.
* Saves are asynchronous (orbax's own thread): `maybe_save` returns once the arrays are copied
  off the device, so the train step may donate the state buffers right after. An async save is
  lost if the interpreter exits first (orbax's thread pool is shut down at exit, the step stays a
  temporary directory): `force=True` saves -- the final and the signal save -- therefore wait for
  the commit, and `close()` (or `with checkpointer:`) waits for any save still in flight.
* The periodic decision is our own (`step % save_every == 0`), not orbax's should_save, whose
  default policy also saves the first step it sees and refuses steps <= the latest on disk.
* Signals: the handler only sets a flag. Saving inside a signal handler would re-enter orbax or
  jax in the middle of whatever the main thread was doing; the loop checks `should_stop()` after
  each step instead (all processes must agree to stop at the same step, see `StopRequest`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from geb_jax.checkpoint.integrity import (CONFIG_ITEM, DATA_STATE_ITEM, FORMAT_VERSION, META_ITEM,
                                          STATE_ITEM, CheckpointError, PyTree, checksum_problem,
                                          named_leaves, short_error, state_checksums,
                                          step_marker_problem, structure_problem)

logger = logging.getLogger(__name__)


# ---- multi-process agreement ----------------------------------------------------------------
def _all_processes(flag: bool) -> bool:
    """True iff `flag` is True on every process (a no-op with one process)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray([bool(flag)], dtype=np.int32))
    return bool(np.all(np.asarray(flags)))


def _any_process(flag: bool) -> bool:
    return not _all_processes(not flag)


# ---- the checkpointer -----------------------------------------------------------------------
def _check_json(item: str, value: Any, exact: bool) -> None:
    try:
        round_trip = json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise TypeError(f"Checkpointer: {item} must be JSON-serialisable ({e}).") from e
    if exact and round_trip != value:
        raise TypeError(
            f"Checkpointer: {item} does not survive a JSON round trip unchanged (tuples become "
            f"lists, non-string keys become strings), so resume would not be exact: {value!r}")


def _abstract_leaf(name: str, x: Any) -> jax.ShapeDtypeStruct:
    if isinstance(x, jax.ShapeDtypeStruct):
        sharding = x.sharding
    elif isinstance(x, jax.Array):
        sharding = x.sharding
    else:
        raise TypeError(f"Checkpointer.restore: abstract_state leaf {name!r} is a {type(x)}; pass "
                        "jax.ShapeDtypeStruct (with a sharding) or jax.Array leaves.")
    if sharding is None:
        if jax.device_count() != 1:
            raise ValueError(
                f"Checkpointer.restore: abstract_state leaf {name!r} has no sharding. With "
                f"{jax.device_count()} devices every leaf needs one (e.g. from "
                "parallel.mesh.logical_to_shardings), so the checkpoint can be laid out on this "
                "run's mesh.")
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


class Checkpointer:
    """Periodic, asynchronous, keep-last-N checkpoints that restore onto any mesh.

    Args:
      directory: where the step directories go (local path or a URL orbax understands, e.g.
        gs://). Use one directory per run (orbax is multi-process safe, not multi-job safe).
      save_every: `maybe_save` saves when step % save_every == 0 (step > 0); 0 disables periodic
        saves (only forced ones happen).
      keep: how many most recent steps orbax keeps (older ones are deleted after a newer save is
        committed); None keeps all.
      async_save: write in orbax's background thread (True) or block until committed (False).
    """

    def __init__(self, directory: str | os.PathLike, save_every: int, keep: int | None = 3,
                 async_save: bool = True):
        if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 0:
            raise ValueError(f"Checkpointer: save_every must be an integer >= 0 (0: only forced "
                             f"saves), got {save_every!r}.")
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"Checkpointer: keep must be an integer >= 1 or None (keep all), "
                             f"got {keep!r}.")
        directory = os.fspath(directory)
        if "://" not in directory:
            directory = os.path.abspath(directory)  # orbax wants absolute local paths
        self.directory = epath.Path(directory)
        self.save_every = save_every
        self.keep = keep
        self.async_save = bool(async_save)

        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        registry.add(STATE_ITEM, ocp.args.StandardSave)
        registry.add(STATE_ITEM, ocp.args.StandardRestore)
        for item in (DATA_STATE_ITEM, CONFIG_ITEM, META_ITEM):
            registry.add(item, ocp.args.JsonSave)
            registry.add(item, ocp.args.JsonRestore)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=self.async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              handler_registry=registry)
        self._bad_steps: set[int] = set()  # steps restore() found unusable (this process)
        self._superseded: list[int] = []  # steps newer than the restored one: deleted on save
        self._closed = False

    # ---- queries -----------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        """The periodic rule alone: step > 0 and step % save_every == 0."""
        return self.save_every > 0 and step > 0 and step % self.save_every == 0

    def all_steps(self) -> list[int]:
        """Committed steps on disk, oldest first (waits for a save in flight, then re-lists)."""
        self.wait()
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_good_step(self) -> int | None:
        """The newest committed step that carries orbax's commit marker and that `restore` has
        not already found unusable; None if there is none.

        Cheap (a directory listing); the full check -- metadata, data, checksums -- happens in
        `restore`, which falls back further if needed.
        """
        for step in reversed(self.all_steps()):
            if step not in self._bad_steps and self._marker_problem(step) is None:
                return step
        return None

    # ---- saving ------------------------------------------------------------------------------
    def maybe_save(self, step: int, state: PyTree, data_state: Mapping[str, Any],
                   config: Mapping[str, Any], force: bool = False) -> bool:
        """Saves if `should_save(step)` or `force`; returns whether a save was started.

        Call it on every process with the same arguments. `force=True` (the final save, or the
        save after a stop signal) also waits until the step is committed, so the process may
        exit right after; it is a no-op returning False if this step is already saved (e.g. the
        last periodic save). `data_state` must survive a JSON round trip unchanged (it decides
        which example comes next); `config` only has to be JSON-serialisable.
        """
        if self._closed:
            raise CheckpointError(f"Checkpointer for {self.directory} is closed.")
        step = int(step)
        if not (force or self.should_save(step)):
            return False
        _check_json(DATA_STATE_ITEM, data_state, exact=True)
        _check_json(CONFIG_ITEM, config, exact=False)
        self._delete_superseded()
        existing = self._manager.all_steps()
        if step in existing:
            logger.debug("Checkpoint for step %d already exists in %s; not saving again.",
                         step, self.directory)
            if force:
                self.wait()
            return False
        newer = sorted(s for s in existing if s > step)
        if newer:
            raise CheckpointError(
                f"{self.directory} already holds checkpoints for steps {newer}, newer than step "
                f"{step}, and this run did not restore from them. Call restore() before "
                f"training to resume, or point the run at another workdir.")
        meta = {"format_version": FORMAT_VERSION, "step": step,
                "checksums": state_checksums(state)}
        args = ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardSave(state),
            DATA_STATE_ITEM: ocp.args.JsonSave(dict(data_state)),
            CONFIG_ITEM: ocp.args.JsonSave(dict(config)),
            META_ITEM: ocp.args.JsonSave(meta),
        })
        try:
            saved = self._manager.save(step, args=args, force=True)
        except Exception as e:  # includes a failure of the previous async save
            raise CheckpointError(f"Saving the checkpoint for step {step} to {self.directory} "
                                  f"failed: {type(e).__name__}: {e}") from e
        if force:
            self.wait()
        return bool(saved)

    def wait(self) -> None:
        """Blocks until the save in flight (if any) is committed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise CheckpointError(f"A checkpoint save to {self.directory} failed: "
                                  f"{type(e).__name__}: {e}") from e

    def close(self) -> None:
        """Waits for the save in flight and releases orbax's threads. Idempotent."""
        if not self._closed:
            self._closed = True
            self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _delete_superseded(self) -> None:
        stale = [s for s in self._superseded if s in self._manager.all_steps()]
        self._superseded = []
        if stale:
            logger.warning(
                "Deleting checkpoint step(s) %s in %s: they are newer than the step this run "
                "resumed from (corrupt, or from an abandoned trajectory) and would clash with "
                "this run's saves.", stale, self.directory)
            for s in stale:
                self._manager.delete(s)
                self._bad_steps.discard(s)

    # ---- restoring ---------------------------------------------------------------------------
    def restore(self, abstract_state: PyTree, step: int | None = None
                ) -> tuple[PyTree, dict, dict, int]:
        """Restores (state, data_state, config, step).

        abstract_state: the state's pytree with jax.ShapeDtypeStruct leaves carrying the
          shardings of *this* run (jax.Array leaves are accepted too); the checkpoint is laid out
          onto them whatever mesh wrote it. Shapes and dtypes must match the checkpoint exactly.
        step: None restores the newest usable step, falling back past unusable ones with a
          WARNING each; an explicit step is restored or raises (no fallback).

        Raises CheckpointError if there is no checkpoint, none is usable, or the state structure
        differs from the checkpoint's.
        """
        named = [(n, _abstract_leaf(n, x)) for n, x in named_leaves(abstract_state)]
        treedef = jax.tree.structure(abstract_state)
        abstract = jax.tree.unflatten(treedef, [x for _, x in named])
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"No committed checkpoint in {self.directory}: nothing to "
                                  "restore (check the path, or start without restoring).")
        if step is not None:
            if int(step) not in steps:
                raise CheckpointError(f"No committed checkpoint for step {step} in "
                                      f"{self.directory}; committed steps: {steps}.")
            candidates = [int(step)]
        else:
            candidates = list(reversed(steps))

        problems = []
        for s in candidates:
            result, problem = self._try_restore(s, abstract, named)
            if result is not None:
                if problems:
                    logger.warning("Resumed from checkpoint step %d in %s after skipping %s.",
                                   s, self.directory, [p[0] for p in problems])
                self._superseded = [t for t in steps if t > s]
                return result
            self._bad_steps.add(s)
            problems.append((s, problem))
            if step is None:
                logger.warning("Checkpoint step %d in %s is unusable: %s. Falling back to the "
                               "previous checkpoint.", s, self.directory, problem)
        details = "; ".join(f"step {s}: {p}" for s, p in problems)
        if step is not None:
            raise CheckpointError(f"Checkpoint step {step} in {self.directory} is unusable: "
                                  f"{details}. Restore another step (committed: {steps}).")
        raise CheckpointError(
            f"No usable checkpoint in {self.directory} (all {len(steps)} committed steps are "
            f"corrupt or incomplete: {details}). Delete that directory (or move it away) to "
            f"start from scratch, or point the run's workdir elsewhere.")

    def _marker_problem(self, step: int) -> str | None:
        return step_marker_problem(self.directory / str(step))

    def _structure_problem(self, step: int, named: Sequence[tuple[str, jax.ShapeDtypeStruct]]
                           ) -> str | None:
        """Compares orbax's stored metadata with the abstract state. Raises CheckpointError on a
        genuine mismatch; returns a problem string if the metadata cannot be read."""
        try:
            metadata = self._manager.item_metadata(step)[STATE_ITEM]
        except Exception as e:  # unreadable metadata: treat as corruption
            return f"cannot read the state metadata ({type(e).__name__}: {short_error(e)})"
        if metadata is None:
            return "the state metadata is missing"
        differences = structure_problem(getattr(metadata, "tree", metadata), named)
        if differences:
            raise CheckpointError(
                f"Checkpoint step {step} in {self.directory} was written for a different state "
                f"structure ({differences}). This is a model/optimizer config change, not "
                "corruption: restore with the config that wrote it, or start a new workdir.")
        return None

    def _try_restore(self, step: int, abstract: PyTree,
                     named: Sequence[tuple[str, jax.ShapeDtypeStruct]]):
        """((state, data_state, config, step), None) or (None, problem)."""
        problem = self._marker_problem(step) or self._structure_problem(step, named)
        restored = None
        if problem is None:
            args = ocp.args.Composite(**{
                STATE_ITEM: ocp.args.StandardRestore(abstract),
                DATA_STATE_ITEM: ocp.args.JsonRestore(),
                CONFIG_ITEM: ocp.args.JsonRestore(),
                META_ITEM: ocp.args.JsonRestore(),
            })
            try:
                restored = self._manager.restore(step, args=args)
            except Exception as e:
                problem = f"reading it failed ({type(e).__name__}: {short_error(e)})"
        if problem is None:
            for item in (DATA_STATE_ITEM, CONFIG_ITEM, META_ITEM):
                if not isinstance(restored[item], dict):
                    problem = f"item {item!r} did not restore to a dict"
                    break
        # Every process must take the same decision before the next collective.
        if not _all_processes(problem is None):
            return None, problem or "another process could not read it"
        state = restored[STATE_ITEM]
        problem = checksum_problem(restored[META_ITEM], step, state)
        if problem is not None:
            return None, problem
        return (state, restored[DATA_STATE_ITEM], restored[CONFIG_ITEM], step), None


# ---- stop signals ---------------------------------------------------------------------------
class StopRequest:
    """Set by `install_signal_save`'s handler; read by the training loop after each step."""

    def __init__(self):
        self.signum: int | None = None  # the first signal received, if any

    def requested(self) -> bool:
        """Whether this process received a stop signal (no communication)."""
        return self.signum is not None

    def should_stop(self) -> bool:
        """Whether any process received a stop signal. With several processes this is a small
        all-gather (a host sync), so every process stops after the same step -- stopping on one
        only would hang the others in the next collective. Call it at the same step on all."""
        return _any_process(self.requested())


_ACTIVE: list[StopRequest] = []


def should_stop() -> bool:
    """`StopRequest.should_stop()` of the innermost active `install_signal_save` context
    (False outside any)."""
    return _ACTIVE[-1].should_stop() if _ACTIVE else False


@contextlib.contextmanager
def install_signal_save(callback: Callable[[int], None] | None = None,
                        signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)
                        ) -> Iterator[StopRequest]:
    """Within the context, SIGTERM/SIGINT request a clean stop instead of killing the process.

    The handler records the signal, logs a WARNING and calls `callback(signum)` if given (it runs
    inside the signal handler: keep it to setting flags or logging). The training loop checks
    `should_stop()` after each step, saves with `maybe_save(..., force=True)` and returns. A
    second SIGINT (Ctrl-C twice) raises KeyboardInterrupt at once; repeated SIGTERMs are logged
    and otherwise ignored (the scheduler's grace period then ends with SIGKILL). The previous
    handlers are restored on exit. Outside the main thread signals cannot be handled: a warning
    is logged and the returned request never fires.
    """
    request = StopRequest()
    previous: dict[int, Any] = {}

    def handler(signum, frame):
        del frame
        name = signal.Signals(signum).name
        if request.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt(f"second {name}: aborting without saving")
            logger.warning("Received %s again; still stopping after the current step.", name)
            return
        request.signum = signum
        logger.warning("Received %s: will save a checkpoint and stop after the current step%s.",
                       name, " (Ctrl-C again aborts without saving)" if signum == signal.SIGINT
                       else "")
        if callback is not None:
            callback(signum)

    if threading.current_thread() is not threading.main_thread():
        logger.warning("install_signal_save: not in the main thread, cannot install signal "
                       "handlers; SIGTERM/SIGINT will not trigger a final checkpoint.")
    else:
        for sig in signals:
            previous[sig] = signal.signal(sig, handler)
    _ACTIVE.append(request)
    try:
        yield request
    finally:
        _ACTIVE.remove(request)
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
