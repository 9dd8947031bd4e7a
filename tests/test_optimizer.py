"""geb_jax.train.optimizer against independent float64 numpy references."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from geb_jax.errors import ConfigError
from geb_jax.model import abstract_params
from geb_jax.train.optimizer import (OptimizerConfig, accumulate_gradients, decay_mask,
                                     learning_rate_at, learning_rate_schedule, make_optimizer)


def hp_for(**overrides):
    values = dict(peak_learning_rate=4e-4, min_learning_rate=4e-5, warmup_steps=10,
                  total_steps=100)
    values.update(overrides)
    return OptimizerConfig(**values)


def reference_lr(n, peak, floor, warmup, total):
    """Closed form: linear 0 -> peak over `warmup`, cosine to `floor` at `total`, then floor."""
    if n < warmup:
        return peak * n / warmup
    if n >= total:
        return floor
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * (n - warmup) / (total - warmup)))


# ---- schedule ---------------------------------------------------------------------------------
@pytest.mark.parametrize("warmup,total", [(10, 100), (2000, 100_000), (0, 50), (30, 30), (1, 7)])
def test_schedule_matches_closed_form(warmup, total):
    hp = hp_for(warmup_steps=warmup, total_steps=total)
    schedule = learning_rate_schedule(hp)
    steps = sorted({0, 1, max(warmup - 1, 0), warmup, warmup + 1, (warmup + total) // 2,
                    total - 1, total, total + 1, 3 * total})
    got = np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(steps)))
    want = np.array([reference_lr(n, 4e-4, 4e-5, warmup, total) for n in steps])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * 4e-4)
    for n, w in zip(steps, want):
        value = learning_rate_at(hp, n)
        assert isinstance(value, float)
        assert value == pytest.approx(w, rel=1e-5, abs=1e-10)


def test_schedule_landmarks():
    hp = hp_for(warmup_steps=10, total_steps=100)
    assert learning_rate_at(hp, 0) == 0.0
    assert learning_rate_at(hp, 10) == pytest.approx(4e-4)
    assert learning_rate_at(hp, 55) == pytest.approx(0.5 * (4e-4 + 4e-5))
    assert learning_rate_at(hp, 100) == pytest.approx(4e-5)
    assert learning_rate_at(hp, 10**7) == pytest.approx(4e-5)


# ---- the full chain against numpy AdamW -------------------------------------------------------
def small_tree(rng, scale=1.0):
    L, D, N, H, V = 2, 4, 2, 3, 5
    return {
        "embedding": scale * rng.standard_normal((V, D)),
        "lm_head": scale * rng.standard_normal((D, V)),
        "final_norm": {"scale": 1.0 + scale * rng.standard_normal((D,))},
        "layers": {
            "attn": {"q": scale * rng.standard_normal((L, D, N, H))},
            "attn_norm": {"scale": 1.0 + scale * rng.standard_normal((L, D))},
        },
    }


def numpy_reference_run(params, grads_seq, hp):
    """Float64 AdamW, decoupled weight decay (times lr, PyTorch convention), global-norm clip,
    embedding-gradient shrink; lr of the n-th update (n = 1, 2, ...) from `reference_lr`."""
    flat_p, treedef = jax.tree.flatten(params)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    p = [np.array(x, np.float64) for x in flat_p]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    decays = []
    for path in paths:
        if "norm" in path:
            decays.append(False)
        elif path == "['embedding']":
            decays.append(hp.decay_embeddings)
        else:
            decays.append(True)
    for n, grads in enumerate(grads_seq, start=1):
        g = [np.array(x, np.float64) for x in jax.tree.leaves(grads)]
        g = [x * hp.embedding_grad_scale if path == "['embedding']" else x
             for x, path in zip(g, paths)]
        norm = math.sqrt(sum(float(np.sum(x * x)) for x in g))
        if norm > hp.grad_clip_norm:
            g = [x * hp.grad_clip_norm / norm for x in g]
        lr = reference_lr(n, hp.peak_learning_rate, hp.min_learning_rate, hp.warmup_steps,
                          hp.total_steps)
        for i in range(len(p)):
            m[i] = hp.b1 * m[i] + (1 - hp.b1) * g[i]
            v[i] = hp.b2 * v[i] + (1 - hp.b2) * g[i] ** 2
            m_hat = m[i] / (1 - hp.b1 ** n)
            v_hat = v[i] / (1 - hp.b2 ** n)
            step = m_hat / (np.sqrt(v_hat) + hp.eps)
            if decays[i]:
                step = step + hp.weight_decay * p[i]
            p[i] = p[i] - lr * step
    return jax.tree.unflatten(treedef, p)


@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_full_chain_matches_numpy_adamw(decay_embeddings):
    rng = np.random.default_rng(0)
    # Large learning rate and decay so that every term is visible above float32 noise.
    hp = OptimizerConfig(peak_learning_rate=0.05, min_learning_rate=0.005, warmup_steps=2,
                         total_steps=5, weight_decay=0.3, embedding_grad_scale=0.1,
                         decay_embeddings=decay_embeddings)
    params = small_tree(rng)
    # Gradients alternately well above and well below the clip threshold (norms ~0.1 to ~14).
    grads_seq = [jax.tree.map(lambda x, s=s: s * rng.standard_normal(x.shape), params)
                 for s in (1.0, 0.02, 0.5, 0.01, 2.0, 0.03, 0.1)]
    norms = [math.sqrt(sum(np.sum(x ** 2) for x in jax.tree.leaves(g))) for g in grads_seq]
    assert min(norms) < 0.5 and max(norms) > 2.0

    opt = make_optimizer(hp)
    p32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = opt.init(p32)

    @jax.jit
    def step(p, s, g):
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s

    for k, grads in enumerate(grads_seq, start=1):
        p32, state = step(p32, state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads))
        want = numpy_reference_run(params, grads_seq[:k], hp)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
                     p32, want)
    # The norm scales moved only by their Adam step, never toward zero by the decay: compare
    # with a run whose weight decay is zero -- identical for spared leaves, different otherwise.
    no_decay = numpy_reference_run(params, grads_seq, hp.replace(weight_decay=0.0))
    np.testing.assert_allclose(p32["final_norm"]["scale"], no_decay["final_norm"]["scale"],
                               rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(p32["layers"]["attn_norm"]["scale"],
                               no_decay["layers"]["attn_norm"]["scale"], rtol=2e-5, atol=2e-6)
    assert not np.allclose(p32["lm_head"], no_decay["lm_head"], rtol=1e-4, atol=1e-5)
    emb_equal = np.allclose(p32["embedding"], no_decay["embedding"], rtol=2e-5, atol=2e-6)
    assert emb_equal == (not decay_embeddings)


def _first_mu(hp, grads):
    """Adam's first moment after one update = (1 - b1) * (the gradient Adam received)."""
    opt = make_optimizer(hp)
    params = jax.tree.map(jnp.zeros_like, grads)
    _, state = jax.jit(opt.update)(grads, opt.init(params), params)
    return optax.tree_utils.tree_get(state, "mu")


@pytest.mark.parametrize("target_norm,clipped", [(0.5, False), (0.999, False), (1.5, True),
                                                 (40.0, True)])
def test_clipping_engages_only_above_threshold(target_norm, clipped):
    rng = np.random.default_rng(1)
    raw = {"embedding": rng.standard_normal((5, 4)), "w": rng.standard_normal((4, 3))}
    alpha = 0.5
    # The norm the clip sees is that of the *shrunk* gradient (shrink comes first).
    shrunk_norm = math.sqrt(alpha ** 2 * np.sum(raw["embedding"] ** 2) + np.sum(raw["w"] ** 2))
    grads = jax.tree.map(lambda x: jnp.asarray(x * target_norm / shrunk_norm, jnp.float32), raw)
    hp = hp_for(embedding_grad_scale=alpha)
    mu = _first_mu(hp, grads)
    factor = 1.0 / target_norm if clipped else 1.0
    np.testing.assert_allclose(mu["w"], 0.1 * factor * grads["w"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(mu["embedding"], 0.1 * factor * alpha * grads["embedding"],
                               rtol=1e-6, atol=1e-9)
    seen = optax.tree.norm(jax.tree.map(lambda x: x / 0.1, mu))
    assert float(seen) == pytest.approx(1.0 if clipped else target_norm, rel=1e-5)


def test_clipping_disabled_with_none():
    grads = {"w": jnp.full((3, 3), 10.0)}
    mu = _first_mu(hp_for(grad_clip_norm=None), grads)
    np.testing.assert_allclose(mu["w"], 1.0, rtol=1e-6)


def test_state_structure_does_not_depend_on_clip_or_shrink():
    params = {"embedding": jnp.zeros((5, 4)), "w": jnp.zeros((4, 3))}
    structures = {jax.tree.structure(make_optimizer(hp_for(**kw)).init(params))
                  for kw in ({}, {"grad_clip_norm": None}, {"embedding_grad_scale": 0.1})}
    assert len(structures) == 1


def test_embedding_shrink_without_embedding_leaf_raises():
    opt = make_optimizer(hp_for(embedding_grad_scale=0.1))
    params = {"w": jnp.zeros((4, 3))}
    with pytest.raises(ValueError, match="embedding"):
        opt.update(params, opt.init(params), params)


# ---- weight-decay mask on the real parameter tree ---------------------------------------------
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_decay_mask_on_model_params(tiny_config, tie, decay_embeddings):
    shapes = abstract_params(tiny_config.replace(tie_embeddings=tie))
    mask = decay_mask(shapes, decay_embeddings=decay_embeddings)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    for path, decayed in flat.items():
        if "norm" in path:
            assert decayed is False, path
        elif path == "['embedding']":
            assert decayed is decay_embeddings, path
        else:
            assert decayed is True, path
    assert ("['lm_head']" in flat) == (not tie)
    assert "['layers']['attn']['q']" in flat and "['layers']['mlp']['down']" in flat
    assert flat["['layers']['attn_norm']['scale']"] is False  # (L, D): 2-D only via layer axis


# ---- gradient accumulation --------------------------------------------------------------------
def _toy_problem():
    """A token-mean cross-entropy over a linear 'model', with very unequal masks per row."""
    rng = np.random.default_rng(2)
    B, T, D, V = 8, 6, 5, 7
    x = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    lengths = np.array([6, 1, 3, 0, 5, 2, 6, 0])  # rows 3 and 7 fully padded
    mask = jnp.asarray(np.arange(T)[None, :] < lengths[:, None], jnp.float32)
    params = {"w": jnp.asarray(rng.standard_normal((D, V)), jnp.float32),
              "b": jnp.asarray(rng.standard_normal((V,)), jnp.float32)}
    return params, {"x": x, "labels": labels, "mask": mask}


def token_mean_loss(params, batch):
    logits = batch["x"] @ params["w"] + params["b"]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch["labels"][..., None], axis=-1)[..., 0]
    tokens = jnp.sum(batch["mask"])
    loss = jnp.sum(nll * batch["mask"]) / tokens  # NaN for an all-padding micro-batch
    correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
    metrics = {"tokens": tokens.astype(jnp.int32),
               "accuracy": jnp.sum(correct * batch["mask"]) / tokens,
               "sequences": jnp.asarray(batch["x"].shape[0], jnp.int32)}
    return loss, metrics


@functools.lru_cache(maxsize=None)
def _full_batch_reference():
    params, batch = _toy_problem()
    return jax.jit(jax.value_and_grad(token_mean_loss, has_aux=True))(params, batch)


@pytest.mark.parametrize("microbatches", [1, 2, 4])
def test_accumulated_gradient_equals_full_batch(microbatches):
    params, batch = _toy_problem()
    grad_fn = jax.value_and_grad(token_mean_loss, has_aux=True)
    (full_loss, full_metrics), full_grads = _full_batch_reference()

    run = jax.jit(lambda p, b: accumulate_gradients(grad_fn, p, b, microbatches))
    loss, metrics, grads = run(params, batch)
    np.testing.assert_allclose(loss, full_loss, rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                 grads, full_grads)
    assert int(metrics["tokens"]) == int(full_metrics["tokens"]) == 23
    assert int(metrics["sequences"]) == 8
    np.testing.assert_allclose(metrics["accuracy"], full_metrics["accuracy"], rtol=1e-6,
                               atol=1e-7)
    assert all(x.dtype == y.dtype for x, y in zip(jax.tree.leaves((loss, metrics, grads)),
                                                  jax.tree.leaves((full_loss, full_metrics,
                                                                   full_grads))))


def test_unweighted_mean_would_be_wrong():
    """The test above is meaningful: micro-batch token counts differ, so a plain mean of
    micro-batch gradients (what optax.MultiSteps computes) is not the full-batch gradient."""
    params, batch = _toy_problem()
    grad_fn = jax.value_and_grad(token_mean_loss, has_aux=True)
    _, full = _full_batch_reference()
    tokens = [int(jnp.sum(batch["mask"][i::2])) for i in range(2)]
    assert tokens == [20, 3]  # micro-batch i holds rows i::2
    _, _, naive = jax.jit(
        lambda p, b: accumulate_gradients(grad_fn, p, b, 2, weight_key=None))(params, batch)
    assert not np.allclose(naive["w"], full["w"], rtol=1e-3, atol=1e-4)


def test_equal_weights_for_per_sequence_loss():
    """weight_key=None: per-example-mean losses (DPO) are averaged with equal weights."""
    params, batch = _toy_problem()

    def per_sequence_loss(p, b):
        logits = b["x"] @ p["w"] + p["b"]
        loss = jnp.mean(jnp.square(logits).mean(axis=(1, 2)))
        return loss, {"tokens": jnp.sum(b["mask"]).astype(jnp.int32)}

    grad_fn = jax.value_and_grad(per_sequence_loss, has_aux=True)
    (full_loss, _), full_grads = jax.jit(grad_fn)(params, batch)
    loss, metrics, grads = jax.jit(
        lambda p, b: accumulate_gradients(grad_fn, p, b, 4, weight_key=None))(params, batch)
    np.testing.assert_allclose(loss, full_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                 grads, full_grads)
    assert int(metrics["tokens"]) == 23


def test_accumulate_rejects_indivisible_batch():
    params, batch = _toy_problem()
    grad_fn = jax.value_and_grad(token_mean_loss, has_aux=True)
    with pytest.raises(ValueError, match="divisible"):
        accumulate_gradients(grad_fn, params, batch, 3)


# ---- config validation ------------------------------------------------------------------------
def test_from_dict_roundtrip_and_coercion():
    hp = OptimizerConfig.from_dict(dict(peak_learning_rate=1, min_learning_rate=0,
                                        warmup_steps=0, total_steps=10, microbatches=2))
    assert hp.peak_learning_rate == 1.0 and isinstance(hp.peak_learning_rate, float)
    assert hp.b2 == 0.95 and hp.weight_decay == 0.1 and hp.grad_clip_norm == 1.0


@pytest.mark.parametrize("overrides,field", [
    ({"learning_rate": 1e-3}, "learning_rate"),
    ({"warmup_steps": 101}, "warmup_steps"),
    ({"min_learning_rate": 5e-4}, "min_learning_rate"),
    ({"min_learning_rate": -1e-5}, "min_learning_rate"),
    ({"peak_learning_rate": 0.0, "min_learning_rate": 0.0}, "peak_learning_rate"),
    ({"peak_learning_rate": "4e-4"}, "peak_learning_rate"),
    ({"microbatches": 0}, "microbatches"),
    ({"microbatches": 2.0}, "microbatches"),
    ({"total_steps": True}, "total_steps"),
    ({"b2": 1.0}, "b2"),
    ({"eps": 0.0}, "eps"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"grad_clip_norm": 0.0}, "grad_clip_norm"),
    ({"embedding_grad_scale": 0.0}, "embedding_grad_scale"),
    ({"embedding_grad_scale": float("nan")}, "embedding_grad_scale"),
    ({"decay_embeddings": 1}, "decay_embeddings"),
])
def test_config_errors_name_the_field(overrides, field):
    values = dict(peak_learning_rate=4e-4, min_learning_rate=4e-5, warmup_steps=10,
                  total_steps=100)
    values.update(overrides)
    with pytest.raises(ConfigError, match=field):
        OptimizerConfig.from_dict(values)


def test_missing_field_is_named():
    with pytest.raises(ConfigError, match="total_steps"):
        OptimizerConfig.from_dict(dict(peak_learning_rate=4e-4, min_learning_rate=4e-5,
                                       warmup_steps=10))
