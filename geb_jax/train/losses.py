"""Training losses: next-token cross-entropy (pretrain and SFT) and DPO, pure and jit-able.

Every loss has the signature `loss_fn(params, batch, apply, **hyper) -> (loss, metrics)`, where
`apply(params, tokens_bt, positions_bt, segment_ids_bt) -> logits (B, T, V)` is the function
`geb_jax.model.make_apply(config)` returns, `loss` is a float32 scalar to differentiate and
`metrics` a dict of float32 scalars. Log-softmax is taken as `logit[target] - logsumexp(logits)`
with the max-subtracted `logsumexp`, so the (B, T, V) log-softmax is never materialized.

Chunked (the default for the model's apply): nor are the (B, T, V) logits. With
`loss_chunk_size` C > 0 (keyword of every loss; None, the default, takes the model's
`config.loss_chunk_size`, 512 unless set), the loss asks the model for the lm head's input
(`apply.hidden_states`, (B, T, D)) and weight (`apply.lm_head`, (D, V)) and runs lm head,
logsumexp, target gather and argmax over chunks of C sequence positions in a `lax.scan` whose
body is under `jax.checkpoint`: the forward keeps one chunk's (B, C, V) logits at a time and the
backward recomputes them instead of storing them. The lm head's matmul accumulates and returns
float32 (`preferred_element_type`) whatever the compute dtype. A T that C does not divide is
padded to a multiple of C (the padded positions are dropped again).
Dense (C = 0, or an `apply` without `hidden_states`, such as the tests' table models): `apply`'s
logits, upcast to float32 after the model (bfloat16 in mixed precision). In float32 both give
the same loss, metrics and gradients (tests/test_chunked_loss.py); in bfloat16 the chunked path
is the more precise (its logits are never rounded to bfloat16).

Batch layouts (dicts of arrays; the data pipeline has already shifted them so that
`targets[b, t]` is the token that follows `inputs[b, t]`)
-----------------------------------------------------------------------------------------------
Pretrain / SFT (`cross_entropy_loss`, registered as "pretrain" and "sft"; they differ only in the
mask the pipeline writes):

    inputs, targets        (B, T) int32
    positions, segment_ids (B, T) int32   optional: default 0..T-1 and all ones (unpacked rows)
    loss_mask              (B, T) float32 or bool; 0 on padding, on the last token of each packed
                           document (its target would be the next document's first token) and,
                           for SFT, on every non-assistant token.

DPO (`dpo_loss`, registered as "dpo"): the same five arrays twice, prefixed "chosen_" and
"rejected_" (each (B, T); chosen and rejected may have different T), with loss_mask selecting the
response tokens (0 on the prompt and on padding), plus optionally precomputed reference
log-probabilities "reference_chosen_logps" and "reference_rejected_logps" (see
`dpo_reference_logps`).

* Unpacked (default): row b of the chosen arrays and row b of the rejected arrays hold one pair;
  reference log-probs have shape (B,).
* Packed: several pairs per row. Add "chosen_pair_ids" and "rejected_pair_ids", (B, T) int:
  0 on padding, k on the tokens of the k-th pair of that row (k = 1, 2, ...). Row b of the chosen
  arrays holds the chosen responses of pairs 1..n_b and row b of the rejected arrays the rejected
  responses of the same pairs, in the same order; `segment_ids` must still separate the documents
  for attention and `positions` restart at 0 for each document (pair ids only say which sums the
  tokens belong to). Per-pair sums are segment sums into P = `max_pairs_per_row` slots per row
  (default: the width of the reference log-probs in the batch if present, else T, which always
  suffices because every pair owns at least one token of the row); reference log-probs then have
  shape (B, P), slot k-1 for pair k, values in unused slots ignored. Pair ids above P are dropped
  (`check_batch_has_targets` rejects them on the host).

A pair counts (in the loss mean and in every metric) iff both its chosen and its rejected response
have at least one target token; so padding rows (all-zero masks) of an unpacked batch and unused
slots of a packed one are ignored, and a batch with no pair gives loss 0 and "pairs" 0.

Formulas
--------
Cross-entropy, with m the loss mask, N = sum(m), lse = logsumexp(logits) (PaLM z-loss):
    loss    = sum_t m_t * (lse_t - logit_t[target_t]) / N
    z_loss  = z_loss_weight * sum_t m_t * lse_t**2 / N
    objective = loss + z_loss; metrics "loss" (CE alone), "z_loss" (the weighted term that was
    added), "perplexity" = exp(loss), "accuracy" = sum m * [argmax == target] / N, "tokens" = N.
    N = 0 gives objective 0 and every metric 0 (perplexity 1) instead of NaN.

DPO, as TRL's `DPOTrainer` (trl/trainer/dpo_trainer.py, `concatenated_forward` and `dpo_loss`):
    logp(y)  = sum_t m_t * log pi(y_t | ...)         (TRL `_get_batch_logps`, average_log_prob=False)
               for loss_type "ipo" divided by the number of target tokens sum_t m_t: TRL passes
               `average_log_prob=self.loss_type == "ipo"` (v0.7-v0.11) and later does
               `if self.loss_type == "ipo": all_logps = all_logps / loss_mask.sum(-1)`, for the
               policy and the reference alike, so precomputed reference log-probs for IPO must be
               averaged too (`dpo_reference_logps(..., loss_type="ipo")` does that) and the logged
               "logps/*" and rewards are the averaged values (TRL <= 0.11 logged those; TRL 1.16
               logs IPO's from the summed log-probs: the loss is the same,
               tests/test_trl_dpo.py).
    h        = (logp_pi(y_c) - logp_pi(y_r)) - (logp_ref(y_c) - logp_ref(y_r))
    sigmoid: -(1 - ls) * log_sigmoid(beta * h) - ls * log_sigmoid(-beta * h)
             (DPO eq. 7, Rafailov et al. 2023; ls = label_smoothing > 0 is conservative DPO, cDPO)
    ipo:     (h - 1 / (2 * beta))**2                  (IPO eq. 17, Azar et al. 2023, tau = beta)
    hinge:   relu(1 - beta * h)                       (SLiC / RSO hinge)
    + sft_weight * (mean NLL of the chosen replies' tokens over the batch)   (TRL's "sft" term
             in loss_type=["sigmoid", "sft"], loss_weights=[1, sft_weight]; RPO)
    loss     = mean over pairs. TRL warns and ignores label_smoothing for "ipo" and "hinge"; here
               a nonzero label_smoothing with those loss types is an error.
    metrics (TRL names): rewards/chosen = mean beta * (logp_pi(y_c) - logp_ref(y_c)),
    rewards/rejected likewise, rewards/accuracies = mean [reward_c > reward_r],
    rewards/margins = mean (reward_c - reward_r), logps/chosen and logps/rejected = mean policy
    logp, plus "loss" and "pairs" (the number of pairs counted).
The reference log-probs are taken from the batch when present, else computed with
`apply(reference_params, ...)` under `jax.lax.stop_gradient`; no gradient reaches the reference.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from geb_jax.model.transformer import default_positions_and_segments

Array = jax.Array
Batch = Mapping[str, Any]
Apply = Callable[..., Array]

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
_SEQ_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------

def token_log_probs(logits_btv: Array, targets_bt: Array) -> tuple[Array, Array]:
    """float32 (log p(target), logsumexp) per token, without materializing the log-softmax.

    Targets outside [0, V) (e.g. a -100 padding id) are clipped; they must be masked out.
    """
    logits_btv = logits_btv.astype(jnp.float32)
    vocab = logits_btv.shape[-1]
    lse_bt = jax.nn.logsumexp(logits_btv, axis=-1)  # subtracts the (stop-gradient) max: stable
    targets_bt = jnp.clip(targets_bt.astype(jnp.int32), 0, vocab - 1)
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    return target_logit_bt - lse_bt, lse_bt


def chunked_token_log_probs(hidden_btd: Array, head_dv: Array, targets_bt: Array,
                            chunk_size: int, *, with_correct: bool = True
                            ) -> tuple[Array, Array, Array | None]:
    """float32 (log p(target), logsumexp, [argmax == target]) per token, each (B, T), from the lm
    head's input (B, T, D) and weight (D, V), one chunk of `chunk_size` positions at a time.

    Equals `token_log_probs(einsum(hidden, head))` and the argmax test on the same logits, but
    the (B, T, V) logits never exist: a `lax.scan` over T / chunk_size chunks computes each
    chunk's (B, C, V) logits in float32 (`preferred_element_type`), reduces them to three (B, C)
    arrays, and under `jax.checkpoint` recomputes them in the backward pass. T not divisible by
    chunk_size: padded with zero hidden states and target 0, cut off again. Targets outside
    [0, V) are clipped for the log-prob (they must be masked out) and never count as correct.
    The third result is None when with_correct is False.
    """
    b, t, d = hidden_btd.shape
    chunk = max(1, min(int(chunk_size), t))
    n_chunks = -(-t // chunk)
    pad = n_chunks * chunk - t
    targets_bt = jnp.asarray(targets_bt).astype(jnp.int32)
    if pad:
        hidden_btd = jnp.pad(hidden_btd, ((0, 0), (0, pad), (0, 0)))
        targets_bt = jnp.pad(targets_bt, ((0, 0), (0, pad)))
    hidden_nbcd = hidden_btd.reshape(b, n_chunks, chunk, d).swapaxes(0, 1)
    targets_nbc = targets_bt.reshape(b, n_chunks, chunk).swapaxes(0, 1)

    @functools.partial(jax.checkpoint, prevent_cse=False)  # save nothing: recompute the logits
    def one_chunk(head, hidden_bcd, targets_bc):
        logits_bcv = jnp.einsum("BCD,DV->BCV", hidden_bcd, head,
                                preferred_element_type=jnp.float32)
        logits_bcv = nn.with_logical_constraint(logits_bcv, ("batch", "length", "vocab"))
        logp_bc, lse_bc = token_log_probs(logits_bcv, targets_bc)
        if not with_correct:
            return logp_bc, lse_bc
        correct_bc = (jnp.argmax(logits_bcv, axis=-1) == targets_bc).astype(jnp.float32)
        return logp_bc, lse_bc, correct_bc

    def body(carry, chunk_inputs):
        return carry, one_chunk(head_dv, *chunk_inputs)

    _, outs = jax.lax.scan(body, None, (hidden_nbcd, targets_nbc))
    outs = [x.swapaxes(0, 1).reshape(b, n_chunks * chunk)[:, :t] for x in outs]
    return (outs[0], outs[1], outs[2] if with_correct else None)


def resolve_loss_chunk_size(apply: Apply, loss_chunk_size: int | None = None) -> int:
    """The chunk size a loss uses with `apply`: `loss_chunk_size` if given, else the model's
    `apply.config.loss_chunk_size`; 0 (dense) for an apply without a config. An explicit C > 0
    needs an apply with `hidden_states` and `lm_head` (geb_jax.model.make_apply's)."""
    if loss_chunk_size is None:
        loss_chunk_size = getattr(getattr(apply, "config", None), "loss_chunk_size", 0)
    chunk = int(loss_chunk_size)
    if chunk < 0:
        raise ValueError(f"loss_chunk_size must be >= 0 (0: dense), got {loss_chunk_size}")
    if chunk and not (hasattr(apply, "hidden_states") and hasattr(apply, "lm_head")):
        raise ValueError(f"loss_chunk_size={chunk} needs the model's apply (make_apply), which "
                         "has hidden_states and lm_head; this apply only gives logits: use 0")
    return chunk


def target_log_probs(params, apply: Apply, inputs: tuple[Array, Array, Array], targets_bt: Array,
                     *, loss_chunk_size: int | None = None, with_correct: bool = True
                     ) -> tuple[Array, Array, Array | None]:
    """float32 (log p(target), logsumexp, [argmax == target] or None) per token (B, T) of the
    model on inputs = (tokens, positions, segment_ids): chunked or dense (module docstring)."""
    chunk = resolve_loss_chunk_size(apply, loss_chunk_size)
    targets_bt = jnp.asarray(targets_bt)
    if chunk:
        hidden_btd = apply.hidden_states(params, *inputs)
        return chunked_token_log_probs(hidden_btd, apply.lm_head(params), targets_bt, chunk,
                                       with_correct=with_correct)
    logits_btv = apply(params, *inputs).astype(jnp.float32)
    logp_bt, lse_bt = token_log_probs(logits_btv, targets_bt)
    if not with_correct:
        return logp_bt, lse_bt, None
    correct_bt = (jnp.argmax(logits_btv, axis=-1) == targets_bt).astype(jnp.float32)
    return logp_bt, lse_bt, correct_bt


def _mask(mask: Array) -> Array:
    return jnp.asarray(mask).astype(jnp.float32)


def _masked_sum(values: Array, mask: Array, axis=None) -> Array:
    """sum(values * mask) that stays finite where the mask is 0 even if values are not."""
    return jnp.sum(jnp.where(mask != 0, values * mask, 0.0), axis=axis)


def _model_inputs(batch: Batch, prefix: str = "") -> tuple[Array, Array, Array]:
    tokens = jnp.asarray(batch[prefix + "inputs"])
    positions = batch.get(prefix + "positions")
    segments = batch.get(prefix + "segment_ids")
    if positions is None or segments is None:
        default_pos, default_seg = default_positions_and_segments(tokens)
        positions = default_pos if positions is None else positions
        segments = default_seg if segments is None else segments
    return tokens, jnp.asarray(positions), jnp.asarray(segments)


# ----------------------------------------------------------------------------------------------
# Pretrain / SFT
# ----------------------------------------------------------------------------------------------

def cross_entropy_loss(params, batch: Batch, apply: Apply, *, z_loss_weight: float = 0.0,
                       loss_chunk_size: int | None = None) -> tuple[Array, dict[str, Array]]:
    """Mean next-token cross-entropy over the target tokens (loss_mask), plus optional z-loss.

    Returns (ce + z_loss_weight * mean(lse**2), metrics); see the module docstring.
    loss_chunk_size (static): None = the model's config, 0 = dense logits, C > 0 = chunked.
    """
    logp_bt, lse_bt, correct_bt = target_log_probs(
        params, apply, _model_inputs(batch), batch["targets"], loss_chunk_size=loss_chunk_size)
    mask_bt = _mask(batch["loss_mask"])

    n_tokens = jnp.sum(mask_bt)
    denom = jnp.maximum(n_tokens, 1.0)  # zero target tokens: every sum is 0, so everything is 0
    ce = _masked_sum(-logp_bt, mask_bt) / denom
    z_loss = z_loss_weight * _masked_sum(jnp.square(lse_bt), mask_bt) / denom
    accuracy = _masked_sum(correct_bt, mask_bt) / denom
    metrics = {
        "loss": ce,
        "z_loss": z_loss,
        "perplexity": jnp.exp(ce),
        "accuracy": accuracy,
        "tokens": n_tokens,
    }
    return ce + z_loss, metrics


pretrain_loss = cross_entropy_loss
sft_loss = cross_entropy_loss


def check_batch_has_targets(batch: Batch, max_pairs_per_row: int | None = None) -> None:
    """Host-side check, before a batch goes to the jitted step: raise ValueError if it has no
    target token (pretrain / SFT), or, for DPO, no complete pair or a malformed pair layout.

    The jitted losses return 0 for such batches rather than NaN, so this is the place a
    training loop learns that e.g. an SFT mask selected nothing.
    """
    if "loss_mask" in batch:
        mask = np.asarray(batch["loss_mask"])
        if not np.any(mask != 0):
            raise ValueError(
                f"batch has no target token: loss_mask (shape {mask.shape}) is 0 everywhere "
                "(all padding / document boundaries, or an SFT batch without assistant tokens)")
        return
    if "chosen_loss_mask" in batch and "rejected_loss_mask" in batch:
        _check_dpo_batch(batch, max_pairs_per_row)
        return
    raise ValueError("batch has no 'loss_mask' (nor 'chosen_loss_mask' and 'rejected_loss_mask'); "
                     f"keys: {sorted(batch)}")


def _check_dpo_batch(batch: Batch, max_pairs_per_row: int | None) -> None:
    masks = {side: np.asarray(batch[f"{side}_loss_mask"]) != 0 for side in ("chosen", "rejected")}
    if masks["chosen"].shape[0] != masks["rejected"].shape[0]:
        raise ValueError("chosen_loss_mask and rejected_loss_mask have different batch sizes: "
                         f"{masks['chosen'].shape} vs {masks['rejected'].shape}")
    packed = _is_packed(batch)
    if not packed:
        counts = {side: m.sum(axis=-1) for side, m in masks.items()}
        half = np.flatnonzero((counts["chosen"] > 0) != (counts["rejected"] > 0))
        if half.size:
            raise ValueError(f"DPO rows {half.tolist()} have target tokens (loss_mask) in only one "
                             "of chosen_loss_mask / rejected_loss_mask")
        if not np.any(counts["chosen"] > 0):
            raise ValueError("DPO batch has no pair: chosen_loss_mask / rejected_loss_mask are 0 "
                             "everywhere")
        return
    ids = {side: np.asarray(batch[f"{side}_pair_ids"]) for side in ("chosen", "rejected")}
    n_pairs = 0
    for b in range(masks["chosen"].shape[0]):
        n = {side: int(ids[side][b].max(initial=0)) for side in ids}
        if n["chosen"] != n["rejected"]:
            raise ValueError(f"DPO row {b}: chosen_pair_ids has {n['chosen']} pairs but "
                             f"rejected_pair_ids has {n['rejected']}")
        if max_pairs_per_row is not None and n["chosen"] > max_pairs_per_row:
            raise ValueError(f"DPO row {b} packs {n['chosen']} pairs > max_pairs_per_row="
                             f"{max_pairs_per_row}")
        for side in ids:
            if np.any(ids[side][b] < 0):
                raise ValueError(f"DPO row {b}: negative {side}_pair_ids")
            for k in range(1, n[side] + 1):
                if not np.any(masks[side][b] & (ids[side][b] == k)):
                    raise ValueError(f"DPO row {b}, pair {k}: no target token ({side}_loss_mask "
                                     f"is 0 on every token with {side}_pair_ids == {k})")
        n_pairs += n["chosen"]
    if n_pairs == 0:
        raise ValueError("DPO batch has no pair: chosen_pair_ids / rejected_pair_ids are all 0 "
                         "(or no target token in chosen_loss_mask / rejected_loss_mask)")


# ----------------------------------------------------------------------------------------------
# DPO
# ----------------------------------------------------------------------------------------------

def _is_packed(batch: Batch) -> bool:
    has = ("chosen_pair_ids" in batch, "rejected_pair_ids" in batch)
    if has[0] != has[1]:
        raise ValueError("packed DPO needs both 'chosen_pair_ids' and 'rejected_pair_ids'")
    return has[0]


def _num_pair_slots(batch: Batch, max_pairs_per_row: int | None) -> int:
    if max_pairs_per_row is not None:
        return int(max_pairs_per_row)
    if "reference_chosen_logps" in batch:
        return int(np.shape(batch["reference_chosen_logps"])[-1])
    return int(max(np.shape(batch["chosen_inputs"])[-1], np.shape(batch["rejected_inputs"])[-1]))


def _pair_segment_sum(values_bt: Array, pair_ids_bt: Array, num_slots: int) -> Array:
    """(B, T) -> (B, P): out[b, k-1] = sum of values_bt[b, t] over t with pair_ids_bt[b, t] == k."""
    b = values_bt.shape[0]
    ids = jnp.asarray(pair_ids_bt).astype(jnp.int32)
    keep = (ids >= 1) & (ids <= num_slots)
    trash = b * num_slots  # one extra segment collects padding and out-of-range ids
    flat = jnp.where(keep, jnp.arange(b, dtype=jnp.int32)[:, None] * num_slots + ids - 1, trash)
    sums = jax.ops.segment_sum(values_bt.reshape(-1), flat.reshape(-1), num_segments=trash + 1)
    return sums[:-1].reshape(b, num_slots)


def _sequence_logps(logp_bt: Array, batch: Batch, prefix: str, packed: bool,
                    num_slots: int) -> tuple[Array, Array]:
    """(sum of masked token log-probs, number of target tokens) per row (B,) or per pair (B, P)."""
    mask_bt = _mask(batch[prefix + "loss_mask"])
    weighted_bt = jnp.where(mask_bt != 0, logp_bt * mask_bt, 0.0)
    count_bt = (mask_bt != 0).astype(jnp.float32)
    if packed:
        ids = batch[prefix + "pair_ids"]
        return (_pair_segment_sum(weighted_bt, ids, num_slots),
                _pair_segment_sum(count_bt, ids, num_slots))
    return jnp.sum(weighted_bt, axis=-1), jnp.sum(count_bt, axis=-1)


def _policy_pair_logps(params, batch: Batch, apply: Apply, *, packed: bool, num_slots: int,
                       average: bool, loss_chunk_size: int | None
                       ) -> tuple[Array, Array, Array, Array]:
    """(logp_chosen, logp_rejected, n_tokens_chosen, n_tokens_rejected) under `params`.

    Chosen and rejected go through one forward pass (concatenated on the batch axis, as TRL's
    `concatenated_forward`) when they have the same length, else through two.
    """
    chosen, rejected = _model_inputs(batch, "chosen_"), _model_inputs(batch, "rejected_")
    targets_c = jnp.asarray(batch["chosen_targets"]).astype(jnp.int32)
    targets_r = jnp.asarray(batch["rejected_targets"]).astype(jnp.int32)
    token_logps = functools.partial(target_log_probs, params, apply,
                                    loss_chunk_size=loss_chunk_size, with_correct=False)
    n_chosen = chosen[0].shape[0]
    if chosen[0].shape[1] == rejected[0].shape[1]:
        both = tuple(jnp.concatenate([c, r], axis=0) for c, r in zip(chosen, rejected))
        logp_bt = token_logps(both, jnp.concatenate([targets_c, targets_r], axis=0))[0]
        logp_c_bt, logp_r_bt = logp_bt[:n_chosen], logp_bt[n_chosen:]
    else:
        logp_c_bt = token_logps(chosen, targets_c)[0]
        logp_r_bt = token_logps(rejected, targets_r)[0]
    logp_c, count_c = _sequence_logps(logp_c_bt, batch, "chosen_", packed, num_slots)
    logp_r, count_r = _sequence_logps(logp_r_bt, batch, "rejected_", packed, num_slots)
    if average:  # TRL's IPO: log-probs averaged over the target tokens
        logp_c = logp_c / jnp.maximum(count_c, 1.0)
        logp_r = logp_r / jnp.maximum(count_r, 1.0)
    return logp_c, logp_r, count_c, count_r


def _concrete(x) -> float | None:
    """float(x), or None when x is traced (a beta or label smoothing passed as a jit argument)."""
    try:
        return float(x)
    except (jax.errors.ConcretizationTypeError, TypeError):
        return None


def _check_dpo_hyper(beta, loss_type: str, label_smoothing) -> None:
    """Validates the hyperparameters; beta and label_smoothing may also be traced arrays (e.g. a
    schedule), in which case only the static loss_type is checked."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    beta_value, ls_value = _concrete(beta), _concrete(label_smoothing)
    if beta_value is not None and not beta_value > 0:
        raise ValueError(f"DPO beta must be > 0, got {beta}")
    if ls_value is not None:
        if not 0.0 <= ls_value <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        if ls_value != 0.0 and loss_type != "sigmoid":
            raise ValueError(f"label_smoothing={label_smoothing} only applies to "
                             f"loss_type='sigmoid' (conservative DPO), not {loss_type!r}")


def dpo_reference_logps(reference_params, batch: Batch, apply: Apply, *,
                        loss_type: str = "sigmoid", max_pairs_per_row: int | None = None,
                        loss_chunk_size: int | None = None) -> dict[str, Array]:
    """Reference log-probs to store in a DPO batch: {"reference_chosen_logps",
    "reference_rejected_logps"}, (B,) unpacked or (B, P) packed; averaged over tokens for IPO.
    loss_chunk_size as in cross_entropy_loss."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    packed = _is_packed(batch)
    num_slots = _num_pair_slots(batch, max_pairs_per_row)
    ref_c, ref_r, _, _ = _policy_pair_logps(
        jax.lax.stop_gradient(reference_params), batch, apply, packed=packed,
        num_slots=num_slots, average=loss_type == "ipo", loss_chunk_size=loss_chunk_size)
    return {"reference_chosen_logps": jax.lax.stop_gradient(ref_c),
            "reference_rejected_logps": jax.lax.stop_gradient(ref_r)}


def dpo_loss(params, batch: Batch, apply: Apply, *, reference_params=None, beta=0.1,
             loss_type: str = "sigmoid", label_smoothing=0.0, sft_weight=0.0,
             max_pairs_per_row: int | None = None,
             loss_chunk_size: int | None = None) -> tuple[Array, dict[str, Array]]:
    """DPO / cDPO / IPO / hinge preference loss as TRL's DPOTrainer; see the module docstring.

    loss_type, max_pairs_per_row and loss_chunk_size (as in cross_entropy_loss) are static; beta
    and label_smoothing may be Python floats or traced scalars. reference_params is only used
    when the batch has no reference log-probs.
    """
    _check_dpo_args(batch, reference_params, beta, loss_type, label_smoothing, sft_weight)
    packed = _is_packed(batch)
    num_slots = _num_pair_slots(batch, max_pairs_per_row)
    pi_c, pi_r, count_c, count_r = _policy_pair_logps(
        params, batch, apply, packed=packed, num_slots=num_slots, average=loss_type == "ipo",
        loss_chunk_size=loss_chunk_size)
    ref_c, ref_r = _reference_pair_logps(
        batch, reference_params, apply, (pi_c.shape, pi_r.shape), packed=packed,
        loss_type=loss_type, num_slots=num_slots, loss_chunk_size=loss_chunk_size)
    losses = _preference_losses((pi_c - pi_r) - (ref_c - ref_r), beta, loss_type,
                                label_smoothing)

    valid = ((count_c > 0) & (count_r > 0)).astype(jnp.float32)
    n_pairs = jnp.sum(valid)
    denom = jnp.maximum(n_pairs, 1.0)

    def mean(x):
        return jnp.sum(jnp.where(valid > 0, x, 0.0)) / denom

    # The chosen replies' mean token NLL over the batch (TRL's loss_type "sft"; RPO, Pang et
    # al. 2024): added with sft_weight, it keeps the chosen replies likely while DPO pushes the
    # rejected ones down -- without it both can fall, and a small model's greedy reply need
    # not become the chosen one.
    summed_c = pi_c * count_c if loss_type == "ipo" else pi_c
    chosen_nll = -jnp.sum(jnp.where(valid > 0, summed_c, 0.0)) / jnp.maximum(
        jnp.sum(jnp.where(valid > 0, count_c, 0.0)), 1.0)
    loss = mean(losses) + sft_weight * chosen_nll
    reward_c = jax.lax.stop_gradient(beta * (pi_c - ref_c))
    reward_r = jax.lax.stop_gradient(beta * (pi_r - ref_r))
    metrics = {
        "loss": loss,
        "rewards/chosen": mean(reward_c),
        "rewards/rejected": mean(reward_r),
        "rewards/accuracies": mean((reward_c > reward_r).astype(jnp.float32)),
        "rewards/margins": mean(reward_c - reward_r),
        "logps/chosen": mean(jax.lax.stop_gradient(pi_c)),
        "logps/rejected": mean(jax.lax.stop_gradient(pi_r)),
        "nll/chosen": jax.lax.stop_gradient(chosen_nll),
        "pairs": n_pairs,
    }
    return loss, metrics


def _check_dpo_args(batch: Batch, reference_params, beta, loss_type: str, label_smoothing,
                    sft_weight) -> None:
    _check_dpo_hyper(beta, loss_type, label_smoothing)
    weight = _concrete(sft_weight)  # None when traced
    if weight is not None and not weight >= 0:
        raise ValueError(f"DPO sft_weight must be >= 0, got {sft_weight}")
    has_ref = ("reference_chosen_logps" in batch, "reference_rejected_logps" in batch)
    if has_ref[0] != has_ref[1]:
        raise ValueError("the batch needs both 'reference_chosen_logps' and "
                         "'reference_rejected_logps', or neither")
    if not has_ref[0] and reference_params is None:
        raise ValueError("dpo_loss needs reference_params, or 'reference_chosen_logps' and "
                         "'reference_rejected_logps' in the batch")


def _reference_pair_logps(batch: Batch, reference_params, apply: Apply, pi_shapes, *,
                          packed: bool, loss_type: str, num_slots: int,
                          loss_chunk_size: int | None) -> tuple[Array, Array]:
    """The reference model's (chosen, rejected) log-probs, gradient stopped: precomputed in
    the batch (checked against the policy's shapes), or computed from reference_params."""
    if "reference_chosen_logps" in batch:
        ref_c = jnp.asarray(batch["reference_chosen_logps"]).astype(jnp.float32)
        ref_r = jnp.asarray(batch["reference_rejected_logps"]).astype(jnp.float32)
        if (ref_c.shape, ref_r.shape) != tuple(pi_shapes):
            raise ValueError(f"reference logps have shapes {ref_c.shape} / {ref_r.shape}, "
                             f"expected {pi_shapes[0]} ({'(B, P) packed' if packed else '(B,)'})")
    else:
        ref = dpo_reference_logps(reference_params, batch, apply, loss_type=loss_type,
                                  max_pairs_per_row=num_slots, loss_chunk_size=loss_chunk_size)
        ref_c, ref_r = ref["reference_chosen_logps"], ref["reference_rejected_logps"]
    return jax.lax.stop_gradient(ref_c), jax.lax.stop_gradient(ref_r)


def _preference_losses(h: Array, beta, loss_type: str, label_smoothing) -> Array:
    """Per-pair loss of the log-ratio margin h = (pi_c - pi_r) - (ref_c - ref_r), as TRL."""
    if loss_type == "sigmoid":
        return (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
                - label_smoothing * jax.nn.log_sigmoid(-beta * h))
    if loss_type == "ipo":
        return jnp.square(h - 1.0 / (2.0 * beta))
    return jax.nn.relu(1.0 - beta * h)  # hinge


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------

LOSSES: dict[str, Callable[..., tuple[Array, dict[str, Array]]]] = {
    "pretrain": cross_entropy_loss,
    "sft": cross_entropy_loss,
    "dpo": dpo_loss,
}


def get_loss(name: str):
    """The loss function registered under `name` ("pretrain", "sft" or "dpo")."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known losses: {sorted(LOSSES)}") from None
