"""The one optax pipeline used by pretraining, SFT and DPO.

    embedding-gradient shrink  ->  clip_by_global_norm  ->  AdamW(schedule, decay mask)

* `OptimizerConfig`: frozen, validated; `OptimizerConfig.from_dict(mapping)` (config_sections.py)
  names unknown and missing fields.
* `make_optimizer(hp)`: the `optax.GradientTransformation`.
* `learning_rate_schedule(hp)`, `learning_rate_at(hp, step)`: the learning rate, for the
  optimizer and for logging.
* `decay_mask(params)`: which parameters get weight decay.
* `accumulate_gradients(grad_fn, params, batch, microbatches)`: gradient accumulation inside
  one jitted train step.

Why this order
--------------
1. Embedding-gradient shrink first (GLM-130B / GEB: multiply the gradient of `embedding` by
   alpha, e.g. 0.1). It has to come before clipping, so that the global norm the clip sees is
   the norm of the gradient we actually use; otherwise an embedding-gradient spike (the thing the
   shrink is there to tame) would still decide how much every other parameter gets clipped.
2. Global-norm clipping on the raw (shrunk) gradient, before Adam. Clipping after Adam would
   clip the normalised step, which is not what LLaMA / GPT-3 / GEB mean by "gradient clipping
   at 1.0", and the Adam moments would still see the spike.
3. AdamW last: the moments, the decoupled weight decay (`optax.add_decayed_weights`, masked) and
   the scheduled learning rate. optax's adamw scales the decay term by the learning rate too
   (update = -lr_t * (m_hat / (sqrt(v_hat) + eps) + weight_decay * param)), which is the
   PyTorch `AdamW` convention used by LLaMA and Megatron, not the paper's "decay times schedule
   multiplier only" form.

The chain always has the same three elements (an `optax.identity()` stands in for a disabled
shrink or clip), so the optimizer state -- and therefore a checkpoint -- has the same structure
whatever the config says.

Learning-rate step indexing
---------------------------
`learning_rate_schedule(hp)(n)` is the learning rate of the n-th update, n = 1, 2, ...:
linear warm-up `peak * n / warmup_steps` for n < warmup_steps, the peak at n = warmup_steps,
cosine decay to `min_learning_rate` at n = total_steps, and that floor for n > total_steps
(optax.warmup_cosine_decay_schedule with `end_value`; its `decay_steps` is the total length
*including* the warm-up, and it holds the end value after it). optax counts updates from 0 (the
`count` in the adam/schedule states is the number of updates already applied), so
`make_optimizer` evaluates the schedule at `count + 1`. Without that shift the first update
would run at learning rate 0 (a wasted step whose only effect is to prime Adam's moments) and
the floor would only be reached after `total_steps + 1` updates. With it, a run of exactly
`total_steps` updates warms up over the first `warmup_steps` and ends at the floor.
`learning_rate_at(hp, step)` takes the same 1-based n, which is the optimizer's update count
*after* the update, i.e. the train state's step counter as it is after `apply_gradients`.

Gradient accumulation: in the step, not in the optimizer
--------------------------------------------------------
`microbatches` is NOT implemented with `optax.MultiSteps`. The train step calls
`accumulate_gradients`, which splits the batch into micro-batches, runs the gradient function
on each inside a `lax.scan` (only one micro-batch's activations are alive at a time) and hands
the optimizer one gradient, so there is one optimizer update per train step. Reasons:
  * exactness: with a token-mean loss and micro-batches holding different numbers of real
    (unmasked) tokens, the plain mean of micro-batch gradients that MultiSteps computes is not
    the large-batch gradient; the token-weighted mean computed here is (see
    `accumulate_gradients`);
  * no extra parameter-sized accumulator in the optimizer state (and in every checkpoint), no
    `lax.cond` between "accumulate" and "update" branches, and the optimizer's step count, the
    schedule and the logs all count real updates.
`make_optimizer` therefore ignores `hp.microbatches`; the train step reads it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from geb_jax.config_sections import Section
from geb_jax.errors import ConfigError
from geb_jax.tree_paths import key_name, path_names

Array = jax.Array
PyTree = Any

EMBEDDING_KEY = "embedding"  # the input-embedding table (also the lm head when tied)
LAYERS_KEY = "layers"  # parameters under this key are stacked on a leading layer axis
TOKENS_KEY = "tokens"  # metric that weights micro-batches in `accumulate_gradients`
PAIRS_KEY = "pairs"  # its DPO counterpart: the number of preference pairs a loss averages over

_FLOAT_FIELDS = ("peak_learning_rate", "min_learning_rate", "b1", "b2", "eps", "weight_decay",
                 "grad_clip_norm", "embedding_grad_scale")
_INT_FIELDS = ("warmup_steps", "total_steps", "microbatches")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(Section):
    """AdamW + warm-up/cosine schedule + clipping. Defaults follow LLaMA / GEB.

    peak_learning_rate: reached at the end of the warm-up (GEB: 4e-4).
    min_learning_rate: the cosine floor at total_steps and after (LLaMA: 10% of peak; GEB 4e-5).
    warmup_steps: linear warm-up length, in optimizer updates (0 allowed).
    total_steps: the update at which the cosine reaches the floor (the schedule's decay_steps,
        warm-up included). In a run's config an unset one follows train.steps (run_config.py).
    b1, b2, eps: Adam. b2 = 0.95 as in LLaMA / GPT-3 (0.999 is too slow to react to spikes).
    weight_decay: decoupled, multiplied by the learning rate (PyTorch AdamW convention).
    grad_clip_norm: clip the global gradient norm to this; None disables clipping.
    microbatches: gradient accumulation inside the train step (`accumulate_gradients`).
    embedding_grad_scale: GLM-130B / GEB embedding-gradient shrink alpha in (0, 1]; the
        gradient of `embedding` is multiplied by alpha before clipping. With tied embeddings
        the table is also the lm head, and its whole gradient is shrunk.
    decay_embeddings: whether `embedding` gets weight decay. LLaMA (and Megatron) decay every
        matrix including the embeddings, so the default is True; many codebases (GPT-NeoX
        configs, nanoGPT's variants, HF `no_decay` lists) exempt them -- set False to match.
        `lm_head` is a matmul and is always decayed; norm scales never are.
    """
    SECTION = "optimizer"

    peak_learning_rate: float
    min_learning_rate: float
    warmup_steps: int
    total_steps: int
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip_norm: float | None = 1.0
    microbatches: int = 1
    embedding_grad_scale: float = 1.0
    decay_embeddings: bool = True

    def __post_init__(self):
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if value is None and name == "grad_clip_norm":
                continue
            if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                    or not math.isfinite(value)):
                hint = (" (a string? YAML reads '4e-4' as a string: write 4.0e-4)"
                        if isinstance(value, str) else "")
                raise ConfigError(
                    f"optimizer.{name} must be a finite number, got {value!r}{hint}.")
            object.__setattr__(self, name, float(value))
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ConfigError(f"optimizer.{name} must be an integer, got {value!r}.")
            object.__setattr__(self, name, int(value))
        if not isinstance(self.decay_embeddings, bool):
            raise ConfigError(
                f"optimizer.decay_embeddings must be True or False, got {self.decay_embeddings!r}.")

        if self.peak_learning_rate <= 0:
            raise ConfigError(
                f"optimizer.peak_learning_rate must be > 0, got {self.peak_learning_rate}.")
        if not 0 <= self.min_learning_rate <= self.peak_learning_rate:
            raise ConfigError(
                f"optimizer.min_learning_rate ({self.min_learning_rate}) must be in "
                f"[0, peak_learning_rate={self.peak_learning_rate}] (LLaMA uses 10% of peak).")
        if self.total_steps < 1:
            raise ConfigError(f"optimizer.total_steps must be >= 1, got {self.total_steps}.")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ConfigError(
                f"optimizer.warmup_steps ({self.warmup_steps}) must be in "
                f"[0, total_steps={self.total_steps}].")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"optimizer.{name} must be in [0, 1), got {getattr(self, name)}.")
        if self.eps <= 0:
            raise ConfigError(f"optimizer.eps must be > 0, got {self.eps}.")
        if self.weight_decay < 0:
            raise ConfigError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay}.")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ConfigError(
                f"optimizer.grad_clip_norm must be > 0 (or None to disable clipping), got "
                f"{self.grad_clip_norm}.")
        if self.microbatches < 1:
            raise ConfigError(f"optimizer.microbatches must be >= 1, got {self.microbatches}.")
        if not 0 < self.embedding_grad_scale <= 1:
            raise ConfigError(
                f"optimizer.embedding_grad_scale must be in (0, 1] (GEB/GLM-130B shrink alpha, "
                f"1 = off), got {self.embedding_grad_scale}.")

# ---- learning rate ----------------------------------------------------------------------------
def learning_rate_schedule(hp: OptimizerConfig) -> optax.Schedule:
    """lr(n) for the n-th update (1-based; see the module docstring), as an optax schedule.

    lr(n) = peak * n / W                                         for n < W
          = floor + (peak - floor) * (1 + cos(pi (n - W) / (T - W))) / 2   for W <= n <= T
          = floor                                                for n > T
    (and lr(n) = floor for n >= T when W == T).
    """
    peak, floor = hp.peak_learning_rate, hp.min_learning_rate
    warmup, total = hp.warmup_steps, hp.total_steps
    if warmup == 0:
        # optax.linear_schedule with transition_steps=0 works but logs a warning; skip it.
        return optax.cosine_decay_schedule(peak, total, alpha=floor / peak)
    if warmup == total:
        # optax.cosine_decay_schedule refuses decay_steps=0: straight from warm-up to the floor.
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(floor)], [warmup])
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=total, end_value=floor)


def learning_rate_at(hp: OptimizerConfig, step):
    """The learning rate of update number `step` (1-based: the optimizer count / train-state step
    after that update). A Python float for a concrete step, an array inside jit."""
    value = learning_rate_schedule(hp)(step)
    if isinstance(step, (numbers.Integral, np.integer)):
        return float(value)
    return value


# ---- parameter selection ----------------------------------------------------------------------
def decay_mask(params: PyTree, decay_embeddings: bool = True) -> PyTree:
    """Bool tree: True where AdamW applies weight decay.

    Decayed: matrices, i.e. leaves with ndim >= 2 not counting the stacked layer axis of
    parameters under `layers` (q/k/v/o, gate/up/down, lm_head), and `embedding` iff
    `decay_embeddings`. Spared: anything under a key ending in "norm" (attn_norm, mlp_norm,
    final_norm scales) and any vector or scalar. Works on arrays and ShapeDtypeStructs.
    """
    def rule(path, leaf) -> bool:
        names = path_names(path)
        if any(name.endswith("norm") for name in names):
            return False
        matrix_ndim = len(np.shape(leaf)) - (1 if LAYERS_KEY in names else 0)
        if matrix_ndim < 2:
            return False
        if names and names[-1] == EMBEDDING_KEY:
            return bool(decay_embeddings)
        return True

    return jax.tree_util.tree_map_with_path(rule, params)


def scale_embedding_gradient(alpha: float, key: str = EMBEDDING_KEY
                             ) -> optax.GradientTransformation:
    """Multiplies the gradient of every leaf named `key` by alpha (GLM-130B embedding shrink).

    Equivalent to GLM-130B's forward-pass trick `emb * alpha + stop_gradient(emb) * (1 - alpha)`
    when the table is used only for the input lookup; with tied embeddings this also shrinks the
    lm-head part of the table's gradient. alpha == 1 is the identity. Raises at trace time if the
    gradient tree has no such leaf, so a renamed parameter cannot silently disable the shrink.
    """
    if alpha == 1.0:
        return optax.identity()

    def update_fn(updates, state, params=None):
        del params
        found = []

        def scale(path, g):
            if path and key_name(path[-1]) == key:
                found.append(path)
                return g * jnp.asarray(alpha, dtype=g.dtype)
            return g

        updates = jax.tree_util.tree_map_with_path(scale, updates)
        if not found:
            raise ValueError(
                f"embedding_grad_scale={alpha} but the gradient tree has no leaf named {key!r}.")
        return updates, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


# ---- the optimizer ----------------------------------------------------------------------------
def make_optimizer(hp: OptimizerConfig) -> optax.GradientTransformation:
    """embedding-grad shrink -> clip_by_global_norm -> adamw(schedule(count + 1), mask)."""
    schedule = learning_rate_schedule(hp)

    def learning_rate(count):  # optax count = updates already applied; schedule is 1-based
        return schedule(count + 1)

    clip = (optax.clip_by_global_norm(hp.grad_clip_norm) if hp.grad_clip_norm is not None
            else optax.identity())
    return optax.chain(
        scale_embedding_gradient(hp.embedding_grad_scale),
        clip,
        optax.adamw(learning_rate=learning_rate, b1=hp.b1, b2=hp.b2, eps=hp.eps,
                    weight_decay=hp.weight_decay,
                    mask=functools.partial(decay_mask, decay_embeddings=hp.decay_embeddings)),
    )


# ---- gradient accumulation --------------------------------------------------------------------
def split_microbatches(batch: PyTree, microbatches: int) -> PyTree:
    """(B, ...) leaves -> (microbatches, B // microbatches, ...), micro-batch i = rows i::m.

    Strided rather than contiguous: when the batch axis is sharded over devices, every device
    then holds an equal share of every micro-batch (if its local rows divide by microbatches),
    so the split needs no communication. Order does not matter to the summed gradient.
    """
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError("accumulate_gradients: the batch has no arrays to split.")
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"accumulate_gradients: every batch array needs the same leading "
                         f"(batch) axis; got leading sizes {sorted(map(str, sizes))}.")
    size = sizes.pop()
    if size % microbatches:
        raise ValueError(f"accumulate_gradients: batch size {size} is not divisible by "
                         f"microbatches={microbatches}.")
    per = size // microbatches
    return jax.tree.map(
        lambda x: jnp.swapaxes(jnp.reshape(x, (per, microbatches) + x.shape[1:]), 0, 1), batch)


def accumulate_gradients(grad_fn: Callable, params: PyTree, batch: PyTree, microbatches: int,
                         weight_key: str | None = TOKENS_KEY):
    """Gradient of the whole batch computed over `microbatches` slices in a lax.scan.

    grad_fn(params, microbatch) -> ((loss, metrics), grads), i.e.
    `jax.value_and_grad(loss_fn, has_aux=True)`; anything else it needs (rng, model) is closed
    over. Returns (loss, metrics, grads) for the whole batch.

    Weighting. If `metrics` is a mapping containing `weight_key` ("tokens": the number of tokens
    the micro-batch's loss is averaged over), micro-batch i gets weight n_i. For a token-mean
    loss L_i = S_i / n_i (S_i the summed per-token loss), the large-batch loss is
    L = sum_i S_i / N with N = sum_i n_i, so
        grad L = sum_i grad S_i / N = sum_i n_i * grad L_i / sum_i n_i,
    exactly the n-weighted mean computed here (a plain mean of the grad L_i is wrong as soon as
    micro-batches have different numbers of unpadded / unmasked tokens). The same weights
    average the loss and every floating metric; integer metrics (counts) and `weight_key` itself
    are summed. A micro-batch with weight 0 contributes nothing (even if its loss is NaN from a
    0/0). DPO's loss is a mean over the micro-batch's valid pairs (losses.dpo_loss: padding rows
    and unused packed slots do not count), so DPO passes weight_key=PAIRS_KEY ("pairs"): the
    same argument with n_i = pairs. Without `weight_key` in the metrics, or with
    weight_key=None, micro-batches are weighted equally, which is exact only for a loss averaged
    over a fixed number of examples per row (every micro-batch has B / microbatches rows).

    Accumulation is in float32 (or the gradient dtype if wider); results are cast back to the
    gradient / metric dtypes. microbatches == 1 calls grad_fn once and returns its outputs as is.
    """
    if microbatches < 1:
        raise ValueError(f"accumulate_gradients: microbatches must be >= 1, got {microbatches}.")
    if microbatches == 1:
        (loss, metrics), grads = grad_fn(params, batch)
        return loss, metrics, grads

    micro = split_microbatches(batch, microbatches)
    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(grad_fn, params, first)  # ((loss, metrics), grads)
    weighting = _Weighting.of(weight_key, shapes[0][1])

    def body(carry: _Sums, microbatch) -> tuple[_Sums, None]:
        return _add_microbatch(carry, grad_fn(params, microbatch), weighting), None

    sums, _ = jax.lax.scan(body, _zero_sums(shapes, weighting), micro)
    return _weighted_means(sums, shapes, weighting)


class _Sums(NamedTuple):
    """The scan carry of accumulate_gradients: weighted sums, and the summed weight."""
    grads: PyTree
    loss: Array
    metrics: PyTree
    weight: Array


@dataclasses.dataclass(frozen=True)
class _Weighting:
    """How micro-batches are weighted: by the scalar metric `key`, or equally (key None)."""
    key: str | None

    @classmethod
    def of(cls, weight_key: str | None, metrics_shape: PyTree) -> "_Weighting":
        if weight_key is None or not (isinstance(metrics_shape, Mapping)
                                      and weight_key in metrics_shape):
            return cls(None)
        if np.shape(metrics_shape[weight_key]) != ():
            raise ValueError(f"accumulate_gradients: metrics[{weight_key!r}] must be a scalar, "
                             f"got shape {np.shape(metrics_shape[weight_key])}.")
        return cls(weight_key)

    def is_count(self, path, dtype) -> bool:
        """Integer metrics (counts) and the weight itself are summed, not averaged."""
        names = path_names(path)
        return not jnp.issubdtype(dtype, jnp.inexact) or (
            self.key is not None and len(names) == 1 and names[0] == self.key)

    def weight(self, metrics) -> Array:
        if self.key is None:
            return jnp.ones((), jnp.float32)
        return jnp.asarray(metrics[self.key], jnp.float32)


def _acc_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def _zero_sums(shapes, weighting: _Weighting) -> _Sums:
    (loss_shape, metrics_shape), grads_shape = shapes

    def zeros(path, s):
        dtype = s.dtype if weighting.is_count(path, s.dtype) else _acc_dtype(s.dtype)
        return jnp.zeros(s.shape, dtype)

    return _Sums(grads=jax.tree.map(lambda s: jnp.zeros(s.shape, _acc_dtype(s.dtype)),
                                    grads_shape),
                 loss=jnp.zeros(loss_shape.shape, _acc_dtype(loss_shape.dtype)),
                 metrics=jax.tree_util.tree_map_with_path(zeros, metrics_shape),
                 weight=jnp.zeros((), jnp.float32))


def _add_microbatch(sums: _Sums, outputs, weighting: _Weighting) -> _Sums:
    """sums + weight * this micro-batch's (loss, metrics, grads); a weight-0 micro-batch adds
    exactly nothing (its loss may be a NaN from 0/0)."""
    (loss, metrics), grads = outputs
    weight = weighting.weight(metrics)

    def add_weighted(acc, x):
        contribution = weight.astype(acc.dtype) * x.astype(acc.dtype)
        return acc + jnp.where(weight > 0, contribution, jnp.zeros_like(contribution))

    def add_metric(path, acc, x):
        if weighting.is_count(path, acc.dtype):
            return acc + x.astype(acc.dtype)
        return add_weighted(acc, x)

    return _Sums(grads=jax.tree.map(add_weighted, sums.grads, grads),
                 loss=add_weighted(sums.loss, loss),
                 metrics=jax.tree_util.tree_map_with_path(add_metric, sums.metrics, metrics),
                 weight=sums.weight + weight)


def _weighted_means(sums: _Sums, shapes, weighting: _Weighting):
    """(loss, metrics, grads): the sums over the summed weight, cast back to grad_fn's dtypes;
    counts stay sums."""
    (loss_shape, metrics_shape), grads_shape = shapes
    denom = jnp.where(sums.weight > 0, sums.weight, 1.0)

    def mean(acc, like):
        return (acc / denom.astype(acc.dtype)).astype(like.dtype)

    def finish_metric(path, acc, like):
        if weighting.is_count(path, like.dtype):
            return acc.astype(like.dtype)
        return mean(acc, like)

    grads = jax.tree.map(mean, sums.grads, grads_shape)
    loss = mean(sums.loss, loss_shape)
    metrics = jax.tree_util.tree_map_with_path(finish_metric, sums.metrics, metrics_shape)
    return loss, metrics, grads
