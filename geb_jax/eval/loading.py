"""The models an evaluation can run on: a training stage's newest checkpoint, or an export.

A finished run is laid out as workdir/<stage>/checkpoints/<step>/ (orbax; the step's `config`
item holds the run's config) plus the run's tokenizer (workdir/tokenizer.model, or workdir/tokenizer/ for a published
model's). `load_stage` reads the newest good
step with geb_jax.checkpoint.read_stage (read-only, checksums verified), checks the tokenizer
against the model's vocabulary and puts the parameters on the default device.
"""
from __future__ import annotations

import os

import jax

from geb_jax.checkpoint import CheckpointError
from geb_jax.checkpoint.reader import read_stage
from geb_jax.data.tokenizer import TokenizerError
from geb_jax.data.tokenizer_files import SENTENCEPIECE_FILE, load_tokenizer


class EvalError(ValueError):
    """A model, checkpoint or tokenizer an evaluation cannot use; the message names it."""


def load_stage(workdir: str, stage: str, tokenizer_path: str | None = None):
    """(params, ModelConfig, Tokenizer, step) of workdir/<stage>'s newest good checkpoint.

    Raises CheckpointError when the stage has no usable checkpoint, EvalError when the
    tokenizer is missing or does not fit the model.
    """
    checkpoint = read_stage(os.path.join(workdir, stage))
    model_config = checkpoint.model_config
    tokenizer_path = tokenizer_path or checkpoint.tokenizer_path
    if tokenizer_path is None or not os.path.exists(tokenizer_path):
        missing = tokenizer_path or os.path.join(workdir, SENTENCEPIECE_FILE)
        raise EvalError(f"tokenizer {missing} not found (training copies it into the "
                        f"workdir); pass --tokenizer PATH")
    tokenizer = load_tokenizer(tokenizer_path)
    try:
        tokenizer.check_matches_model(model_config.vocab_size, allow_padding=True)
    except TokenizerError as e:
        raise EvalError(f"checkpoint {checkpoint.stage_dir} (step {checkpoint.step}) and "
                        f"tokenizer {tokenizer_path} do not match: the model has vocab_size "
                        f"{model_config.vocab_size}, the tokenizer {tokenizer.vocab_size}; pass "
                        f"the run's own tokenizer") from e
    return jax.device_put(checkpoint.params), model_config, tokenizer, checkpoint.step


__all__ = ["CheckpointError", "EvalError", "load_stage"]
