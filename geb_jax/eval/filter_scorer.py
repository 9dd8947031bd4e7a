"""Model-backed scorers for the cleaning chain's perplexity filter (data.clean.perplexity_model
= "model:<path>"): the JAX model on a finished training stage, or the numpy engine on an export.

data/clean/model_scorer.py turns a `RowNll` into bits per byte and knows no model; this module
supplies the RowNll and registers `load_model_scorer` there when imported, so the data package
never imports the model, the checkpoints or geb_jax.infer. JAX is imported only when a stage is
scored (an export is scored by the numpy engine, without JAX).
"""
from __future__ import annotations

import functools
import os

import numpy as np

from geb_jax.data.clean.model_scorer import (ModelScorer, ModelScorerError, RowNll,
                                             register_model_loader)


@functools.lru_cache(maxsize=4)
def _jitted_row_nll(model_config):
    """jit((params, inputs, targets, mask) -> (B,) nats), one per config: compiled once."""
    import jax
    import jax.numpy as jnp

    from geb_jax.model import make_apply

    apply = make_apply(model_config)

    @jax.jit
    def nll_b(params, inputs_bt, targets_bt, mask_bt):
        positions_bt = jnp.broadcast_to(jnp.arange(inputs_bt.shape[1], dtype=jnp.int32),
                                        inputs_bt.shape)
        logits_btv = apply(params, inputs_bt, positions_bt, mask_bt.astype(jnp.int32))
        logp_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
        picked_bt = jnp.take_along_axis(logp_btv, targets_bt[..., None], axis=-1)[..., 0]
        return -jnp.sum(jnp.where(mask_bt, picked_bt, 0.0), axis=-1)  # (B,)

    return nll_b


def jax_row_nll(params, model_config, batch_size: int = 8) -> tuple[RowNll, int]:
    """A RowNll running the JAX model on fixed (batch_size, max_seq_len) batches."""
    nll_b = _jitted_row_nll(model_config)
    t = model_config.max_seq_len

    def row_nll(rows):
        out = []
        for start in range(0, len(rows), batch_size):
            group = rows[start:start + batch_size]
            inputs = np.zeros((batch_size, t), np.int32)
            targets = np.zeros((batch_size, t), np.int32)
            mask = np.zeros((batch_size, t), bool)
            for b, (x, y) in enumerate(group):
                inputs[b, :len(x)], targets[b, :len(y)], mask[b, :len(y)] = x, y, True
            out.append(np.asarray(nll_b(params, inputs, targets, mask))[:len(group)])
        return np.concatenate(out)

    return row_nll, t


def engine_row_nll(weights, batch_size: int = 8) -> tuple[RowNll, int]:
    """A RowNll on geb_jax.infer's numpy engine: Engine.score(prompt=[first], targets)."""
    from geb_jax.infer import Engine

    engine = Engine(weights)

    def row_nll(rows):
        scored = engine.score([[x[0]] for x, _ in rows], [y for _, y in rows],
                              batch_size=batch_size)
        return np.asarray([-logprob for logprob, _ in scored], np.float64)

    return row_nll, engine.max_len


# ----------------------------------------------------------------------------- loading
def load_stage(stage_dir: str):
    """(params, ModelConfig, Tokenizer) of a finished stage's newest good checkpoint
    (geb_jax.checkpoint.read_stage: read-only, checksums verified) and workdir/tokenizer.model;
    the parameters are put on the default device once."""
    import jax

    from geb_jax.checkpoint import CheckpointError
    from geb_jax.checkpoint.reader import read_stage
    from geb_jax.data.tokenizer_files import SENTENCEPIECE_FILE, load_tokenizer

    try:
        checkpoint = read_stage(stage_dir)
    except CheckpointError as e:  # the cleaning chain reports ModelScorerError as config error
        raise ModelScorerError(str(e)) from e
    if checkpoint.tokenizer_path is None:
        raise ModelScorerError(f"{stage_dir}: no {SENTENCEPIECE_FILE} (or tokenizer/) in its "
                               f"workdir ({checkpoint.workdir}); the training run writes it there")
    tokenizer = load_tokenizer(checkpoint.tokenizer_path)
    tokenizer.check_matches_model(checkpoint.model_config.vocab_size, allow_padding=True)
    return jax.device_put(checkpoint.params), checkpoint.model_config, tokenizer


def load_model_scorer(path: str, batch_size: int = 8) -> ModelScorer:
    """A ModelScorer for a finished stage directory or an exported numpy model folder (the
    loader registered in data/clean/model_scorer.py)."""
    from geb_jax.infer.loading import WEIGHTS_NPZ

    path = os.path.expanduser(os.fspath(path))
    if os.path.isdir(os.path.join(path, "checkpoints")):
        params, model_config, tokenizer = load_stage(path)
        row_nll, max_len = jax_row_nll(params, model_config, batch_size)
    elif os.path.isfile(os.path.join(path, WEIGHTS_NPZ)):
        from geb_jax.infer import load_model
        weights, tokenizer = load_model(path)
        row_nll, max_len = engine_row_nll(weights, batch_size)
    else:
        from geb_jax.checkpoint.reader import stages_with_checkpoints
        stages = stages_with_checkpoints(path)
        hint = (f" (it is a workdir: name a stage, e.g. {os.path.join(path, stages[0])!r})"
                if stages else "")
        raise ModelScorerError(
            f"perplexity model {path!r} is neither a finished training stage (a folder with "
            f"checkpoints/, e.g. runs/tiny/pretrain) nor an exported model (a folder with "
            f"{WEIGHTS_NPZ}){hint}")
    return ModelScorer(row_nll, tokenizer, max_len, name=f"model:{path}")


register_model_loader(load_model_scorer)
