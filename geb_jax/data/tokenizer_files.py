"""Where a run keeps its tokenizer, in whichever form it came: the one place that knows.

    <workdir>/tokenizer.model   a SentencePiece model (ours, trained here)
    <workdir>/tokenizer/        a published model's tokenizer: tokenizer.json +
                                tokenizer_config.json (special tokens, chat template)

`load_tokenizer` (geb_jax.data.hf_tokenizer) reads either, a GGUF file's embedded vocabulary
or a Hugging Face folder; `save_tokenizer` writes the run's copy atomically; `tokenizer_in`
finds it again for evaluation and export.
"""
from __future__ import annotations

import os

from geb_jax.data.hf_tokenizer import load_tokenizer
from geb_jax.data.tokenizer import Tokenizer

SENTENCEPIECE_FILE = "tokenizer.model"
FOLDER = "tokenizer"

__all__ = ["FOLDER", "SENTENCEPIECE_FILE", "load_tokenizer", "save_tokenizer", "tokenizer_in"]


def save_tokenizer(tokenizer, workdir: str) -> str:
    """Write the run's tokenizer into `workdir` (replacing an older copy); returns its path."""
    os.makedirs(workdir, exist_ok=True)
    if isinstance(tokenizer, Tokenizer):  # ours: the SentencePiece proto, wherever it came from
        return tokenizer.save(os.path.join(workdir, SENTENCEPIECE_FILE))
    return tokenizer.save(os.path.join(workdir, FOLDER))


def tokenizer_in(workdir: str) -> str | None:
    """The tokenizer a run saved in `workdir` (file or folder), or None."""
    for name in (SENTENCEPIECE_FILE, FOLDER):
        path = os.path.join(workdir, name)
        if os.path.exists(path):
            return path
    return None
