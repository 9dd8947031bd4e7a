"""`LanguageModel` on the JAX model: live training parameters or a restored checkpoint.

Requests are sorted longest first and run in batches of a fixed size, right-padded to a
power-of-two length bucket, so jit compiles a handful of shapes and then reuses them (the
compiled functions are cached per ModelConfig, so a new JaxLanguageModel each evaluation
costs no recompilation). Right padding needs no mask: attention is causal, so a real token
never sees the pads after it.

The forward pass is traced with empty logical-axis rules: evaluation batches need not divide
the training mesh, and XLA lays out the computation from the (possibly sharded) parameters.

Generation has no KV cache (the model has none): each step recomputes the whole padded
window inside one `lax.while_loop`, which is fine for evaluation-sized models and prompts.
Sampling draws row i's token at step s with key fold_in(fold_in(key(seed), i), s), so a
request's sample does not depend on which batch it lands in.
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from geb_jax.eval.scorer import (Request, RollingLoglikelihood, check_generation_room,
                                 cut_at_stop, truncate_request)
from geb_jax.model import ModelConfig, make_apply

MIN_BUCKET = 16


def bucket_length(n: int, max_length: int) -> int:
    """The next power of two >= n (at least MIN_BUCKET), capped at max_length."""
    return min(max(MIN_BUCKET, 1 << max(0, n - 1).bit_length()), max_length)


@functools.lru_cache(maxsize=None)
def _compiled(model_config: ModelConfig):
    """(token_scores, decode) jitted for this model config."""
    apply = make_apply(model_config)

    def logits_fn(params, tokens_bt):
        with nn.logical_axis_rules(()):  # no activation sharding constraints in evaluation
            return apply(params, tokens_bt).astype(jnp.float32)

    def token_scores(params, tokens_bt, targets_bt):
        """log p(target) (B, T) and whether the target is the argmax (B, T)."""
        logits_btv = logits_fn(params, tokens_bt)
        logp_btv = jax.nn.log_softmax(logits_btv, axis=-1)
        picked_bt = jnp.take_along_axis(logp_btv, targets_bt[..., None], axis=-1)[..., 0]
        return picked_bt, jnp.argmax(logits_btv, axis=-1) == targets_bt

    def decode(params, tokens_bt, lengths_b, done_b, row_ids_b, stop_ids_s, max_new,
               temperature, seed):
        """Extend each row not done_b from lengths_b until a stop id or max_new new tokens."""
        b = tokens_bt.shape[0]
        rows = jnp.arange(b)
        row_keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(row_ids_b)

        def step(carry):
            s, tokens, lengths, done = carry
            last_bv = logits_fn(params, tokens)[rows, lengths - 1]
            scaled_bv = last_bv / jnp.maximum(temperature, 1e-6)
            sampled_b = jax.vmap(lambda k, l: jax.random.categorical(
                jax.random.fold_in(k, s), l))(row_keys, scaled_bv)
            nxt_b = jnp.where(temperature > 0, sampled_b, jnp.argmax(last_bv, axis=-1))
            stop_b = jnp.any(nxt_b[:, None] == stop_ids_s[None, :], axis=-1)
            write_b = ~done & ~stop_b
            tokens = tokens.at[rows, lengths].set(
                jnp.where(write_b, nxt_b, tokens[rows, lengths]).astype(tokens.dtype))
            return s + 1, tokens, lengths + write_b, done | stop_b

        def keep_going(carry):
            s, _, _, done = carry
            return (s < max_new) & ~jnp.all(done)

        _, tokens_bt, lengths_b, _ = jax.lax.while_loop(
            keep_going, step, (jnp.int32(0), tokens_bt, lengths_b, done_b))
        return tokens_bt, lengths_b

    return jax.jit(token_scores), jax.jit(decode)


class JaxLanguageModel(RollingLoglikelihood):
    """LanguageModel over `params` (float32 tree from init_params / a checkpoint).

    max_length: positions read at once (default and maximum: model_config.max_seq_len).
    """

    def __init__(self, params, model_config: ModelConfig, tokenizer, batch_size: int = 8,
                 max_length: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.params, self.model_config, self.tokenizer = params, model_config, tokenizer
        self.batch_size = int(batch_size)
        self.max_length = model_config.max_seq_len if max_length is None else int(max_length)
        if not 1 <= self.max_length <= model_config.max_seq_len:
            raise ValueError(f"max_length must be in [1, max_seq_len={model_config.max_seq_len}]"
                             f", got {max_length}")
        self._token_scores, self._decode = _compiled(model_config)

    def loglikelihood(self, requests: Sequence[Request]) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        todo = []
        for i, (context, continuation) in enumerate(requests):
            context, continuation = truncate_request(context, continuation, self.max_length, i)
            if not continuation:
                results[i] = (0.0, True)
            else:
                todo.append((i, context + continuation, len(continuation)))
        todo.sort(key=lambda item: -len(item[1]))
        for start in range(0, len(todo), self.batch_size):
            group = todo[start:start + self.batch_size]
            width = bucket_length(len(group[0][1]) - 1, self.max_length)
            tokens = np.zeros((self.batch_size, width), np.int32)
            targets = np.zeros((self.batch_size, width), np.int32)
            for row, (_, whole, _) in enumerate(group):
                tokens[row, :len(whole) - 1] = whole[:-1]
                targets[row, :len(whole) - 1] = whole[1:]
            logp_bt, greedy_bt = jax.device_get(self._token_scores(self.params, tokens, targets))
            for row, (i, whole, n) in enumerate(group):
                span = slice(len(whole) - 1 - n, len(whole) - 1)  # slots predicting continuation
                results[i] = (float(np.sum(logp_bt[row, span], dtype=np.float64)),
                              bool(np.all(greedy_bt[row, span])))
        return results  # type: ignore[return-value]

    def generate(self, prompts: Sequence[Sequence[int]], *, max_tokens: int,
                 stop: Sequence[str] = (), stop_token_ids: Sequence[int] | None = None,
                 temperature: float = 0.0, seed: int = 0) -> list[str]:
        room = check_generation_room(max_tokens, self.max_length)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
        stop_ids = np.asarray(list(stop_token_ids if stop_token_ids is not None
                                   else [self.tokenizer.eos_id]) or [-1], np.int32)
        cut = []
        for i, p in enumerate(prompts):
            ids = [int(t) for t in p][-room:]
            if not ids:
                raise ValueError(f"generate: prompt {i} is empty; start it with the bos id")
            cut.append((i, ids))
        cut.sort(key=lambda item: -len(item[1]))
        texts: list[str] = [""] * len(cut)
        for start in range(0, len(cut), self.batch_size):
            group = cut[start:start + self.batch_size]
            width = bucket_length(len(group[0][1]) + max_tokens, self.max_length)
            tokens = np.zeros((self.batch_size, width), np.int32)
            lengths = np.ones(self.batch_size, np.int32)  # padding rows: one pad token, done
            done = np.arange(self.batch_size) >= len(group)
            row_ids = np.zeros(self.batch_size, np.int32)
            for row, (i, ids) in enumerate(group):
                tokens[row, :len(ids)], lengths[row], row_ids[row] = ids, len(ids), i
            out, ends = jax.device_get(self._decode(
                self.params, tokens, lengths, done, row_ids, stop_ids, np.int32(max_tokens),
                np.float32(temperature), np.uint32(seed)))
            for row, (i, ids) in enumerate(group):
                texts[i] = cut_at_stop(self.tokenizer.decode(out[row, len(ids):ends[row]]), stop)
        return texts


class JaxScoringEngineDecoding(JaxLanguageModel):
    """Scores with the jitted JAX forward (batched) and generates with the numpy engine (KV
    cache) on the same weights.

    Why: the JAX model has no KV cache, so generating k tokens costs k full forward passes;
    for a published model's evaluation during training that is minutes per suite on CPU. The
    two generate paths give equal greedy replies (tests/test_eval.py compares them); samples
    come from the engine's random stream. The float32 host copy of the weights is made on the
    first generate call.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._engine_model = None

    def generate(self, prompts: Sequence[Sequence[int]], **options) -> list[str]:
        if self._engine_model is None:
            from geb_jax.eval.engine_model import EngineLanguageModel
            from geb_jax.infer import Engine
            from geb_jax.infer.weights import Weights
            weights = Weights.from_params(jax.device_get(self.params), self.model_config)
            self._engine_model = EngineLanguageModel(Engine(weights, max_len=self.max_length),
                                                     self.tokenizer, self.batch_size)
        return self._engine_model.generate(prompts, **options)

