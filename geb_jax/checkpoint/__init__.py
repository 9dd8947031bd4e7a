"""Checkpointing for exact resume: orbax CheckpointManager wrapper and stop-signal helper."""
from geb_jax.checkpoint.manager import (CheckpointError, Checkpointer, StopRequest,
                                        install_signal_save, should_stop, state_checksums)

__all__ = ["CheckpointError", "Checkpointer", "StopRequest", "install_signal_save",
           "should_stop", "state_checksums"]
