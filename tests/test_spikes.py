"""GEB/PaLM loss-spike handling: detection in the step, and the loop's skip / replace / rewind.

Loop tests corrupt one batch with NaN loss weights (always a spike) and compare against a
run that never sees the bad data (train.skip_batches): the update sequences must then be
identical, so the logged losses are compared exactly.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from geb_jax.config_loader import apply_overrides, load_config
from geb_jax.errors import ConfigError
from geb_jax.train.loop import train
from geb_jax.train.spikes import inject_fault, parse_batch_numbers, rewind_window
from geb_jax.train.state import TrainState
from geb_jax.train.spikes import SpikeConfig
from geb_jax.train.step import make_train_step
from tests.conftest import REPO_ROOT

# ---------------------------------------------------------------------------- pure helpers


def test_parse_batch_numbers():
    assert parse_batch_numbers("5-8, 20", "f") == {5, 6, 7, 8, 20}
    assert parse_batch_numbers("", "f") == frozenset()
    for bad in ("0-3", "8-5", "x"):
        with pytest.raises(ConfigError, match="train.skip_batches"):
            parse_batch_numbers(bad, "train.skip_batches")


def test_rewind_window_covers_the_spike_and_at_least_n_batches():
    assert list(rewind_window(4, 8, 2)) == [5, 6, 7, 8]  # up to the spike
    assert list(rewind_window(4, 6, 5)) == [5, 6, 7, 8, 9]  # at least 5


def test_injected_faults():
    batch = {"inputs": np.arange(12, dtype=np.int32).reshape(2, 6),
             "targets": np.arange(1, 13, dtype=np.int32).reshape(2, 6),
             "loss_mask": np.ones((2, 6), np.float32)}
    bad = inject_fault(batch, "nonfinite", 50, 3)
    assert np.isnan(bad["loss_mask"]).all() and (bad["inputs"] == batch["inputs"]).all()
    junk = inject_fault(batch, "garbage", 50, 3)
    assert junk["inputs"].max() < 50 and (junk["inputs"][0] == junk["inputs"][1]).all()
    assert (junk["targets"][:, :-1] == junk["inputs"][:, 1:]).all()  # still next-token pairs
    with pytest.raises(ConfigError, match="inject_kind"):
        inject_fault(batch, "fire", 50, 3)


# ---------------------------------------------------------------------------- the step


def _quadratic_setup(policy):
    """loss = scale * mean((w - x)^2): `scale` in the batch makes a spike on demand."""
    def loss_fn(params, batch, reference_params=None):
        loss = batch["scale"][0] * jnp.mean((params["w"] - batch["x"]) ** 2)
        return loss, {"loss": loss}
    optimizer = optax.adam(0.1)
    params = {"w": jnp.zeros(4)}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=optimizer.init(params), rng=jnp.zeros(2, jnp.uint32),
                       loss_ema=jnp.zeros(()), grad_norm_ema=jnp.zeros(()),
                       ema_count=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32))
    spike = SpikeConfig(policy=policy, loss_factor=2.0, grad_norm_factor=10.0, warmup_steps=3,
                        ema_decay=0.9)
    return jax.jit(make_train_step(loss_fn, optimizer, weight_key=None, spike=spike)), state


def _batch(scale, x=1.0):
    return {"scale": jnp.array([scale], jnp.float32), "x": jnp.full(4, x, jnp.float32)}


def test_step_skips_a_spike_and_keeps_a_bias_corrected_running_mean():
    step, state = _quadratic_setup("skip")
    losses, norms = [], []
    for _ in range(4):
        w = np.asarray(state.params["w"], np.float64)
        losses.append(np.mean((w - 1.0) ** 2))
        norms.append(np.linalg.norm(2 * (w - 1.0) / 4))
        state, metrics = step(state, _batch(1.0))
        assert float(metrics["spike"]) == 0.0
    # Bias-corrected EMA, computed independently in float64.
    ema_l = ema_n = 0.0
    for loss, norm in zip(losses, norms):
        ema_l, ema_n = 0.9 * ema_l + 0.1 * loss, 0.9 * ema_n + 0.1 * norm
    np.testing.assert_allclose(float(state.loss_ema), ema_l / (1 - 0.9 ** 4), rtol=1e-5)
    np.testing.assert_allclose(float(state.grad_norm_ema), ema_n / (1 - 0.9 ** 4), rtol=1e-5)

    before = jax.device_get(state)
    state, metrics = step(state, _batch(100.0))  # loss 100x its running mean
    after = jax.device_get(state)
    assert float(metrics["spike"]) == 1.0 and float(metrics["skipped"]) == 1.0
    np.testing.assert_array_equal(after.params["w"], before.params["w"])
    for old, new in zip(jax.tree.leaves(before.opt_state), jax.tree.leaves(after.opt_state)):
        np.testing.assert_array_equal(old, new)
    assert int(after.skipped) == 1 and int(after.step) == int(before.step) + 1
    assert float(after.loss_ema) == float(before.loss_ema)  # spikes do not feed the mean


def test_step_skips_non_finite_even_before_warm_up_and_policy_none_does_not():
    step, state = _quadratic_setup("skip")
    state, metrics = step(state, _batch(np.nan))
    assert float(metrics["skipped"]) == 1.0
    assert np.isfinite(np.asarray(state.params["w"])).all()
    step, state = _quadratic_setup("none")
    state, metrics = step(state, _batch(np.nan))
    assert float(metrics["spike"]) == 1.0 and float(metrics["skipped"]) == 0.0
    assert np.isnan(np.asarray(state.params["w"])).all()


# ---------------------------------------------------------------------------- the loop

STEPS = 12


def _run(tmp_path, name, **overrides):
    config = load_config(os.path.join(REPO_ROOT, "configs", "tiny.py:smoke"))
    base = {"workdir": str(tmp_path / name), "train.steps": STEPS,
            "optimizer.total_steps": STEPS, "checkpoint.every": 4, "eval.every": 0,
            "train.log_every": 1, "model.d_model": 64, "model.n_layers": 2,
            "model.n_heads": 2, "model.n_kv_heads": 1, "model.d_ff": 128,
            "train.spike.warmup_steps": 2}
    config = apply_overrides(config, {**base, **overrides})
    summary = train(config, "pretrain")
    losses, events = {}, []
    with open(tmp_path / name / "pretrain" / "metrics.jsonl") as f:
        for line in f:
            record = json.loads(line)
            if record["split"] == "train":
                losses[record["step"]] = record["loss"]
            elif record["split"] == "event":
                events.append(record)
    return losses, events, summary


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("spikes")


@pytest.fixture(scope="module")
def without_batch_8(module_tmp):
    return _run(module_tmp, "ref_skip8", **{"train.skip_batches": "8",
                                            "train.spike.policy": "none"})[0]


def test_policy_none_trains_on_the_bad_batch(module_tmp):
    losses, _, summary = _run(module_tmp, "none", **{"train.spike.policy": "none",
                                                     "train.spike.inject_batches": "8",
                                                     "train.spike.inject_kind": "nonfinite"})
    assert all(np.isfinite(losses[s]) for s in range(1, 8))
    assert all(np.isnan(losses[s]) for s in range(9, STEPS + 1))  # NaN weights
    assert summary["skipped_updates"] == 0


def test_policy_skip_drops_the_update(module_tmp, without_batch_8):
    losses, _, summary = _run(module_tmp, "skip", **{"train.spike.policy": "skip",
                                                     "train.spike.inject_batches": "8",
                                                     "train.spike.inject_kind": "nonfinite"})
    assert summary["skipped_updates"] == 1
    for s in range(1, 8):
        assert losses[s] == without_batch_8[s]
    # Batch k >= 9 trains at step k here and at step k - 1 without batch 8, from equal params.
    for s in range(9, STEPS + 1):
        assert losses[s] == without_batch_8[s - 1]


def test_policy_replace_retries_the_update_on_the_next_batch(module_tmp, without_batch_8):
    losses, events, summary = _run(module_tmp, "replace", **{
        "train.spike.policy": "replace", "train.spike.inject_batches": "8",
        "train.spike.inject_kind": "nonfinite"})
    assert summary["replaced"] == 1 and [e["event"] for e in events] == ["replaced"]
    assert losses == without_batch_8


def test_policy_rewind_restores_the_checkpoint_and_skips_the_window(module_tmp):
    losses, events, summary = _run(module_tmp, "rewind", **{
        "train.spike.policy": "rewind", "train.spike.inject_batches": "8",
        "train.spike.inject_kind": "nonfinite", "train.spike.rewind_skip_batches": 2})
    # Checkpoint at step 4 (4 batches drawn); skip batches 5..max(8, 4 + 2) = 5..8.
    assert summary["rewound"] == 1
    assert events[0]["step"] == 4 and events[0]["skipped_batches"] == "5-8"
    reference = _run(module_tmp, "ref_skip5_8", **{"train.skip_batches": "5-8",
                                                   "train.spike.policy": "none"})[0]
    assert losses == reference
