"""Checkpoints: exact resume (manager.Checkpointer, stop signals), the integrity checks both
sides share (integrity.py: layout, checksums) and read-only stage reading (reader.read_stage).

The exports are resolved on first use (PEP 562), so importing a jax-free helper such as
geb_jax.checkpoint.reader.stages_with_checkpoints does not import jax and orbax.
"""
import importlib

_EXPORTS = {
    "CheckpointError": "geb_jax.checkpoint.integrity",
    "Checkpointer": "geb_jax.checkpoint.manager",
    "StopRequest": "geb_jax.checkpoint.manager",
    "checksum_problem": "geb_jax.checkpoint.integrity",
    "install_signal_save": "geb_jax.checkpoint.manager",
    "should_stop": "geb_jax.checkpoint.manager",
    "state_checksums": "geb_jax.checkpoint.integrity",
    "step_marker_problem": "geb_jax.checkpoint.integrity",
    "StageCheckpoint": "geb_jax.checkpoint.reader",
    "read_stage": "geb_jax.checkpoint.reader",
    "stages_with_checkpoints": "geb_jax.checkpoint.reader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
