"""The chunked cross-entropy (lm head + log-softmax + target gather over chunks of positions, no
(B, T, V) logits) against the dense path it replaces, on a tiny random float32 model.

Loss, every metric and the gradient w.r.t. every parameter agree to 1e-6 (relative to each
leaf's largest entry) for pretraining (packed rows), an SFT mask, z-loss, tied and untied
embeddings, chunk sizes that do and do not divide T, and DPO (one concatenated pass and two
passes of different lengths, reference computed in the loss; its sequence log-probs to 1e-6, its
loss and gradients to 3e-5, the float32 conditioning of h = a small difference of large sums). The compiled loss+gradient of a
vocabulary-dominated shape needs less than half the dense version's temporary memory.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geb_jax.errors import ConfigError
from geb_jax.model import ModelConfig, init_params, make_apply
from geb_jax.train.losses import (chunked_token_log_probs, cross_entropy_loss, dpo_loss,
                                  resolve_loss_chunk_size, token_log_probs)

RTOL = 1e-6
DPO_RTOL = 3e-5  # DPO's loss and gradients: see test_dpo_chunked_equals_dense
B, T = 3, 24


def _config(tied: bool, **changes) -> ModelConfig:
    # init_std 0.2: logits span several units, so 1e-6 means something.
    return ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                       head_dim=8, d_ff=64, max_seq_len=64, tie_embeddings=tied, init_std=0.2,
                       **changes)


@functools.lru_cache(maxsize=None)
def _model(tied: bool):
    config = _config(tied)
    return make_apply(config), init_params(config, jax.random.key(1 + tied))


def _close(actual, expected, what, rtol=RTOL):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
    err = float(np.max(np.abs(actual - expected), initial=0.0))
    assert err <= rtol * scale, f"{what}: max |diff| {err:.3g} > {rtol} x {scale:.3g}"
    return err / scale


def _trees_close(actual, expected, what, rtol=RTOL):
    worst = 0.0
    flat_a = jax.tree_util.tree_leaves_with_path(actual)
    flat_e = jax.tree_util.tree_leaves(expected)
    assert len(flat_a) == len(flat_e)
    for (path, a), e in zip(flat_a, flat_e):
        worst = max(worst, _close(a, e, f"{what} {jax.tree_util.keystr(path)}", rtol))
    return worst


def lm_batch(seed: int, kind: str, t: int = T) -> dict:
    """Two packed documents per row; pretrain masks document ends, SFT also the prompts."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 97, (B, t + 1))
    cut = rng.integers(t // 4, 3 * t // 4, B)
    pos = np.arange(t)[None].repeat(B, 0)
    seg = np.where(pos < cut[:, None], 1, 2)
    positions = np.where(seg == 1, pos, pos - cut[:, None])
    mask = np.ones((B, t), np.float32)
    mask[np.arange(B), cut - 1] = 0.0  # last token of document 1: its target is document 2's
    if kind == "sft":
        mask[(positions < 5)] = 0.0  # prompts
        mask[-1, :] = 0.0  # one row with no target at all
    return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
            "positions": positions.astype(np.int32), "segment_ids": seg.astype(np.int32),
            "loss_mask": mask}


@functools.partial(jax.jit, static_argnames=("apply", "chunk"))
def ce_value_and_grad(params, batch, z, apply, chunk):
    fn = lambda p: cross_entropy_loss(p, batch, apply, z_loss_weight=z, loss_chunk_size=chunk)
    return jax.value_and_grad(fn, has_aux=True)(params)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_cross_entropy_chunked_equals_dense(tied):
    apply, params = _model(tied)
    assert resolve_loss_chunk_size(apply) == 512  # the model's default is chunked
    batches = {kind: lm_batch(3, kind) for kind in ("pretrain", "sft")}
    worst = 0.0
    for kind, batch in batches.items():
        for z in (0.0, 1e-2):
            (loss0, m0), g0 = ce_value_and_grad(params, batch, z, apply, 0)
            assert float(m0["tokens"]) > 0 and (z == 0) == (float(m0["z_loss"]) == 0)
            for chunk in (8, 7):  # divides T=24, does not (pad 4); > T: the unit test below
                (loss, m), g = ce_value_and_grad(params, batch, z, apply, chunk)
                what = f"{kind} z={z} chunk={chunk}"
                worst = max(worst, _close(loss, loss0, what + " objective"))
                assert set(m) == set(m0)
                for key in m0:
                    worst = max(worst, _close(m[key], m0[key], f"{what} {key}"))
                worst = max(worst, _trees_close(g, g0, what + " grad"))
    print(f"tied={tied}: worst relative difference {worst:.2e}")


def test_hidden_states_and_lm_head_give_apply_logits():
    for tied in (False, True):
        apply, params = _model(tied)
        tokens = lm_batch(4, "pretrain")["inputs"]
        hidden = apply.hidden_states(params, tokens)
        assert hidden.shape == (B, T, 32)
        logits = jnp.einsum("BTD,DV->BTV", hidden, apply.lm_head(params))
        _close(logits, apply(params, tokens), f"tied={tied} logits")
        if tied:
            np.testing.assert_array_equal(apply.lm_head(params), params["embedding"].T)


def test_chunked_token_log_probs_matches_token_log_probs_and_ignores_bad_targets():
    rng = np.random.default_rng(5)
    hidden = rng.standard_normal((2, 11, 6)).astype(np.float32)
    head = rng.standard_normal((6, 13)).astype(np.float32)
    targets = rng.integers(0, 13, (2, 11)).astype(np.int32)
    targets[0, 3] = -100  # padding id: clipped for the log-prob, never correct
    logits = np.einsum("btd,dv->btv", hidden, head)
    logp0, lse0 = token_log_probs(jnp.asarray(logits), targets)
    for chunk in (1, 4, 11, 100):
        logp, lse, correct = chunked_token_log_probs(jnp.asarray(hidden), jnp.asarray(head),
                                                     targets, chunk)
        _close(logp, logp0, f"logp chunk={chunk}")
        _close(lse, lse0, f"lse chunk={chunk}")
        np.testing.assert_array_equal(correct, logits.argmax(-1) == targets)
        assert correct.dtype == logp.dtype == lse.dtype == jnp.float32
    bf16 = chunked_token_log_probs(jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(head, jnp.bfloat16),
                                   targets, 4, with_correct=False)
    assert bf16[0].dtype == jnp.float32 and bf16[2] is None


def head_only_apply(dtype):
    """The model's last einsum on given final hidden states, with the chunked-loss attributes:
    the lm head exactly as make_apply's (weight cast to the compute dtype)."""
    def apply(params, *_):
        return jnp.einsum("BTD,DV->BTV", params["hidden"], params["lm_head"].astype(dtype))
    apply.hidden_states = lambda params, *_: params["hidden"]
    apply.lm_head = lambda params: params["lm_head"].astype(dtype)
    return apply


def test_bfloat16_chunked_logits_are_float32():
    """Mixed precision: the chunked lm head returns float32 logits (preferred_element_type), so
    its loss equals the float64 loss of the same bfloat16 hidden states and head to float32
    rounding; the dense path rounds the logits to bfloat16 first and is visibly off."""
    rng = np.random.default_rng(8)
    d, v = 64, 97
    params = {"hidden": jnp.asarray(rng.standard_normal((B, T, d)), jnp.bfloat16),
              "lm_head": jnp.asarray(0.4 * rng.standard_normal((d, v)), jnp.float32)}
    batch = lm_batch(8, "pretrain")
    hidden = np.asarray(params["hidden"].astype(jnp.float32), np.float64)
    logits = hidden @ np.asarray(params["lm_head"].astype(jnp.bfloat16).astype(jnp.float32),
                                 np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    logp = np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0] - lse
    expected = -(logp * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    apply = head_only_apply(jnp.bfloat16)
    loss = {chunk: float(jax.jit(lambda p, b, c=chunk: cross_entropy_loss(
        p, b, apply, loss_chunk_size=c)[0])(params, batch)) for chunk in (0, 7)}
    chunked_err, dense_err = (abs(loss[c] - expected) / expected for c in (7, 0))
    print(f"bfloat16: relative error vs float64, chunked {chunked_err:.1e}, dense {dense_err:.1e}")
    assert chunked_err < 1e-6 and dense_err > 10 * chunked_err


def test_chunk_size_choice():
    apply, _ = _model(False)
    assert resolve_loss_chunk_size(apply, 0) == 0 and resolve_loss_chunk_size(apply, 5) == 5
    table_apply = lambda p, tokens, *_: p["table"][tokens]
    assert resolve_loss_chunk_size(table_apply) == 0  # an apply without hidden states: dense
    with pytest.raises(ValueError, match="hidden_states"):
        resolve_loss_chunk_size(table_apply, 8)
    assert resolve_loss_chunk_size(make_apply(_config(False, loss_chunk_size=0))) == 0
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="loss_chunk_size"):
            _config(False, loss_chunk_size=bad)


def dpo_batch(seed: int, t_chosen: int, t_rejected: int) -> dict:
    rng = np.random.default_rng(seed)
    batch = {}
    for side, t in (("chosen", t_chosen), ("rejected", t_rejected)):
        tokens = rng.integers(0, 97, (B, t + 1))
        prompt = rng.integers(2, 6, B)
        length = rng.integers(t // 2, t + 1, B)
        pos = np.arange(t)[None].repeat(B, 0)
        mask = ((pos >= prompt[:, None]) & (pos < length[:, None])).astype(np.float32)
        mask[-1] = 0.0  # a padding row (no pair): ignored by the loss and metrics
        batch.update({f"{side}_inputs": tokens[:, :-1].astype(np.int32),
                      f"{side}_targets": tokens[:, 1:].astype(np.int32),
                      f"{side}_loss_mask": mask})
    return batch


@functools.partial(jax.jit, static_argnames=("apply", "chunk", "loss_type"))
def dpo_value_and_grad(params, batch, reference, apply, chunk, loss_type):
    fn = lambda p: dpo_loss(p, batch, apply, reference_params=reference, beta=0.5,
                            loss_type=loss_type, loss_chunk_size=chunk)
    return jax.value_and_grad(fn, has_aux=True)(params)


@pytest.mark.parametrize("tied,t_rejected,loss_type", [
    (False, T, "sigmoid"),  # chosen and rejected in one concatenated pass
    (True, 17, "ipo"),  # two passes, lengths 24 and 17 (7 divides neither); tied
])
def test_dpo_chunked_equals_dense(tied, t_rejected, loss_type):
    apply, params = _model(tied)
    reference = init_params(_config(tied), jax.random.key(7))
    batch = dpo_batch(6, T, t_rejected)
    (loss0, m0), g0 = dpo_value_and_grad(params, batch, reference, apply, 0, loss_type)
    assert float(m0["pairs"]) == B - 1 and float(loss0) > 0
    worst = 0.0
    for chunk in (7,):  # divides neither 24 nor 17
        (loss, m), g = dpo_value_and_grad(params, batch, reference, apply, chunk, loss_type)
        assert set(m) == set(m0)
        for key in ("logps/chosen", "logps/rejected", "pairs", "rewards/accuracies"):
            worst = max(worst, _close(m[key], m0[key], f"chunk={chunk} {key}"))
        # The loss, rewards and gradients depend on h = (pi_c - pi_r) - (ref_c - ref_r), a
        # small difference of sums of ~60 in size: one float32 ulp of a sum (4e-6) moves them by
        # up to ~1e-5 relative (measured 7e-6), whichever path computes the token log-probs.
        _close(loss, loss0, f"chunk={chunk} loss", rtol=DPO_RTOL)
        for key in m0:
            _close(m[key], m0[key], f"chunk={chunk} {key}", rtol=DPO_RTOL)
        _trees_close(g, g0, f"chunk={chunk} grad", rtol=DPO_RTOL)
    print(f"DPO tied={tied} T_rejected={t_rejected} {loss_type}: worst relative difference "
          f"{worst:.2e}")


def test_chunked_loss_needs_far_less_compiled_memory():
    """Vocabulary 32000 and B*T = 4096 with d_model 64: the (B, T, V) float32 logits (0.5 GB)
    and their gradient dominate the dense step; the chunked step keeps one chunk's."""
    config = ModelConfig(vocab_size=32000, d_model=64, n_layers=1, n_heads=2, n_kv_heads=1,
                         head_dim=32, d_ff=128, max_seq_len=1024)
    apply = make_apply(config)
    params = jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
    shape = jax.ShapeDtypeStruct((4, 1024), jnp.int32)
    batch = {"inputs": shape, "targets": shape,
             "loss_mask": jax.ShapeDtypeStruct((4, 1024), jnp.float32)}
    temp = {}
    for chunk in (0, 128):
        step = jax.jit(jax.value_and_grad(
            lambda p, b, c=chunk: cross_entropy_loss(p, b, apply, z_loss_weight=1e-4,
                                                     loss_chunk_size=c), has_aux=True))
        stats = step.lower(params, batch).compile().memory_analysis()
        assert stats is not None, "memory_analysis unavailable on this backend"
        temp[chunk] = stats.temp_size_in_bytes
        print(f"chunk={chunk}: temp {stats.temp_size_in_bytes / 2**20:.1f} MiB, arguments "
              f"{stats.argument_size_in_bytes / 2**20:.1f} MiB, output "
              f"{stats.output_size_in_bytes / 2**20:.1f} MiB")
    logits_bytes = 4 * 1024 * 32000 * 4
    assert temp[0] >= logits_bytes  # the dense step does hold (B, T, V) float32 logits
    assert temp[128] < 0.5 * temp[0], temp
