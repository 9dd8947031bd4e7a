"""What a stage reads: its tokenizer, its grain dataset, held-out batches, earlier parameters.

The bridge between the config and geb_jax.data; the loop calls these and knows no data details.
`config` is a stage's RunConfig (geb_jax/run_config.py); a ConfigDict with the same fields works.
"""
from __future__ import annotations

import itertools
import os

import jax

from geb_jax.checkpoint import Checkpointer
from geb_jax.data import chat_pipeline, pipeline, pretrain_pipeline, sources
from geb_jax.checkpoint import published
from geb_jax.data.tokenizer_files import load_tokenizer, save_tokenizer
from geb_jax.data.tokenizer import Tokenizer, builtin_tokenizer
from geb_jax.model import ModelConfig
from geb_jax.errors import ConfigError


def stage_tokenizer(config, model_config: ModelConfig) -> Tokenizer:
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
    """The stage's batches of `split`. Pretraining reads texts (sources.texts_source_from_config);
    SFT and DPO read chat records from the same sources (sources.conversations_source_from_config
    / pairs_source_from_config: local files, tfds, mixtures, or data.source="builtin" for the
    demo sets), each record converted by data/chat_records.py per data.format."""
    common = dict(seq_len=config.train.seq_len,
                  batch_size=config.train.batch_size // jax.process_count(), seed=seed,
                  shard_index=jax.process_index(), shard_count=jax.process_count())
    stats = pipeline.PipelineStats()
    name = f"data ({stage}, {split})"
    if stage == "pretrain":
        texts = sources.texts_source_from_config(config.data, split, seed=seed,
                                                 tokenizer=tokenizer)
        return _with_report(pretrain_pipeline.pretrain_dataset(texts, tokenizer, stats=stats,
                                                               **common), texts, stats)
    if stage == "sft":
        records = sources.conversations_source_from_config(config.data, split, seed=seed)
        return _with_report(chat_pipeline.sft_dataset(records, tokenizer, stats=stats,
                                                      name=name, **common), records, stats)
    records = sources.pairs_source_from_config(config.data, split, seed=seed)
    return _with_report(chat_pipeline.dpo_dataset(records, tokenizer, stats=stats, name=name,
                                                  **common), records, stats)


def _with_report(dataset, source, stats: pipeline.PipelineStats):
    """Keeps what input_report needs on the dataset object (grain datasets take attributes)."""
    dataset.geb_input = (sources.skip_reports(source), stats)
    return dataset


def input_report(dataset) -> dict:
    """What the stage's input left out or cut, for the run's log / metrics:

    {"skipped": {reason: n}, "examples": ["file:line: reason", ...], plus PipelineStats counts
    ("conversations" / "pairs" / "documents" encoded so far, "truncated" SFT conversations cut
    to seq_len + 1, "prompt_truncated" / "reply_truncated" DPO pairs)}. Bad records are counted
    when the source is built (validated) and also logged then, as a warning naming the reasons.
    """
    reports, stats = getattr(dataset, "geb_input", ({}, pipeline.PipelineStats()))
    skipped: dict[str, int] = {}
    examples: list[str] = []
    for report in reports.values():
        info = report.as_dict()
        for reason, n in info["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
        examples += info["examples"]
    return {"skipped": dict(sorted(skipped.items())), "examples": examples[:5],
            **stats.as_dict()}


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
