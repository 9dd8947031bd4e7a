"""What a stage reads: its tokenizer, its grain dataset, held-out batches, earlier parameters.

The bridge between the config and geb_jax.data; the loop calls these and knows no data details.
"""
from __future__ import annotations

import itertools
import os

import jax
import ml_collections

from geb_jax.checkpoint import Checkpointer
from geb_jax.data import pipeline, sources
from geb_jax.checkpoint import published
from geb_jax.data.tokenizer_files import load_tokenizer, save_tokenizer
from geb_jax.data.tokenizer import Tokenizer, builtin_tokenizer
from geb_jax.model import ModelConfig
from geb_jax.model.config import ConfigError


def stage_tokenizer(config: ml_collections.ConfigDict, model_config: ModelConfig) -> Tokenizer:
    """The run's tokenizer, checked against the model's vocabulary and saved into workdir.

    config.data.tokenizer: "builtin", a SentencePiece .model, a GGUF file or a Hugging Face
    folder (a published model's own tokenizer and chat template).
    """
    if config.data.tokenizer == "builtin":
        tokenizer = builtin_tokenizer(model_config.vocab_size)
    else:
        tokenizer = load_tokenizer(config.data.tokenizer)
    tokenizer.check_matches_model(model_config.vocab_size,
                                  allow_padding=published.is_published(config.data.tokenizer))
    if jax.process_index() == 0:
        save_tokenizer(tokenizer, config.workdir)
    return tokenizer


def _dataset(config, stage: str, tokenizer: Tokenizer, split: str, seed: int):
    common = dict(seq_len=config.train.seq_len,
                  batch_size=config.train.batch_size // jax.process_count(), seed=seed,
                  shard_index=jax.process_index(), shard_count=jax.process_count())
    if stage == "pretrain":
        texts = sources.texts_source_from_config(config.data, split, seed=seed,
                                                 tokenizer=tokenizer)
        return pipeline.pretrain_dataset(texts, tokenizer, **common)
    if stage == "sft":
        return pipeline.sft_dataset(pipeline.builtin_sft_conversations(split), tokenizer,
                                    **common)
    return pipeline.dpo_dataset(pipeline.builtin_dpo_pairs(split), tokenizer, **common)


def train_dataset(config, stage: str, tokenizer: Tokenizer):
    return _dataset(config, stage, tokenizer, "train", config.data.shuffle_seed)


def eval_batches(config, stage: str, tokenizer: Tokenizer) -> list:
    """A fixed list of held-out host batches (the same every evaluation)."""
    if not config.eval.every:
        return []
    dataset = _dataset(config, stage, tokenizer, "valid", seed=0)
    return list(itertools.islice(iter(dataset), config.eval.batches))


def iterator_state(iterator) -> dict:
    return pipeline.iterator_state(iterator)


def restore_iterator(dataset, state: dict):
    return pipeline.restore_iterator(dataset, state)


def load_params(stage_directory: str, abstract_state):
    """The final parameters of an earlier stage (its newest good checkpoint), or of a published
    model (a GGUF file or a Hugging Face folder).

    The optimizer chain has the same structure in every stage, so the whole state restores
    onto this stage's abstract state (and mesh); only the parameters are kept.
    """
    if published.is_published(stage_directory):
        return _published_params(stage_directory, abstract_state.params)
    checkpoints = os.path.join(stage_directory, "checkpoints")
    if not os.path.isdir(checkpoints):
        raise ConfigError(f"{stage_directory!r} holds no checkpoints/: finish that stage first "
                          "or fix config.init_from.")
    checkpointer = Checkpointer(checkpoints, save_every=0, keep=None)
    state, *_ = checkpointer.restore(abstract_state)
    checkpointer.close()
    return state.params


def _published_params(path: str, abstract_params):
    """A published model's float32 parameters placed with this stage's shardings and dtypes."""
    params = published.read_published(path).params
    try:
        return jax.tree.map(lambda a, x: jax.device_put(x.astype(a.dtype), a.sharding),
                            abstract_params, params)
    except ValueError as e:  # tree structures differ: tied vs untied head, ...
        raise ConfigError(f"{path} does not fit config.model: {e}") from None


def load_reference_params(init_params_from: str | None, abstract_state):
    """DPO's frozen reference: the model the stage starts from (normally the SFT model)."""
    if not init_params_from:
        raise ConfigError("The dpo stage needs a reference model: run it after sft in "
                          "config.stages, or set config.init_from to an SFT stage directory.")
    return load_params(init_params_from, abstract_state)
