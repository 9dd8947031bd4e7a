"""LoRA (model/lora.py, train/state.py, train/step.py, export/peft.py), against independent
references: float64 numpy forward passes and central differences, the LoRA update written out
unmerged, transformers on the HF export, and PEFT's tensor layout.

Models are tiny; the training runs use the tiny preset shrunk further, on CPU.
"""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from geb_jax.config_loader import apply_overrides, load_config
from geb_jax.model import ModelConfig, abstract_params, make_apply, param_logical_axes
from geb_jax.model import lora as lora_lib
from geb_jax.errors import ConfigError
from geb_jax.model.lora import LoraConfig
from tests import numpy_reference
from tests.test_stages import _first_logged  # one reader of a stage's step-1 metrics
from tests.conftest import REPO_ROOT

ALL = LoraConfig(rank=3, alpha=6.0)  # scale 2: far from 1, so a missing scale cannot hide


def _random_params(config: ModelConfig, seed: int = 0, std: float = 0.15):
    """Random float32 params (norm scales around 1); not init_params, which is slow on CPU."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: rng.normal(0.0, std, a.shape).astype(np.float32),
                          abstract_params(config))
    for node in (params["layers"]["attn_norm"], params["layers"]["mlp_norm"],
                 params["final_norm"]):
        node["scale"] = 1.0 + 0.3 * rng.standard_normal(node["scale"].shape).astype(np.float32)
    return params


def _random_adapters(params, lora: LoraConfig, seed: int = 1, std: float = 0.2):
    """Adapters with b != 0 (a fresh adapter has b = 0, which hides every mistake but one)."""
    rng = np.random.default_rng(seed)
    shapes = lora_lib.adapter_shapes(params, lora)
    return jax.tree.map(lambda s: rng.normal(0.0, std, s).astype(np.float32), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


def _merge64(params, adapters, lora: LoraConfig):
    """float64 merge written independently of model/lora.py: flatten each matrix to
    [in, out] per layer, add scale * A[in, r] @ B[r, out], reshape back."""
    out = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    for name in lora.targets:
        group, leaf, n_in, _ = lora_lib.TARGETS[name]
        w = out["layers"][group][leaf]
        a = np.asarray(adapters["layers"][group][leaf]["a"], np.float64)
        b = np.asarray(adapters["layers"][group][leaf]["b"], np.float64)
        layers, ins, outs = w.shape[0], w.shape[1:1 + n_in], w.shape[1 + n_in:]
        a2 = a.reshape(layers, math.prod(ins), lora.rank)
        b2 = b.reshape(layers, lora.rank, math.prod(outs))
        w2 = w.reshape(layers, math.prod(ins), math.prod(outs))
        out["layers"][group][leaf] = (w2 + lora.scale * np.matmul(a2, b2)).reshape(w.shape)
    return out


def _batch(config: ModelConfig, b=2, t=7, seed=3):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (b, t + 1)).astype(np.int32)
    segments = np.where(np.arange(t) < 4, 1, 2)[None].repeat(b, 0).astype(np.int32)
    positions = np.where(segments == 1, np.arange(t), np.arange(t) - 4).astype(np.int32)
    mask = np.ones((b, t), np.float32)
    mask[:, 3] = 0  # the target that crosses the document boundary
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions,
            "segment_ids": segments, "loss_mask": mask}


def _ce64(params, config, batch) -> float:
    """Masked mean next-token cross-entropy from the float64 numpy forward."""
    logits = numpy_reference.forward(params, config, batch["inputs"], batch["positions"],
                                     batch["segment_ids"])
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    logp = np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0] - lse
    return float(-(logp * batch["loss_mask"]).sum() / batch["loss_mask"].sum())


# ---- config -----------------------------------------------------------------------------------
def test_config_validation_names_the_fix():
    assert not LoraConfig.from_dict({"rank": 0}).enabled
    assert LoraConfig.from_dict(None) == LoraConfig()
    config = LoraConfig.from_dict({"rank": 8, "alpha": 16.0, "targets": "v, q ,q"})
    assert config.targets == ("q", "v") and config.scale == 2.0
    with pytest.raises(ConfigError, match="valid targets: q, k, v, o, gate, up, down"):
        LoraConfig.from_dict({"rank": 4, "targets": "q,qkv"})
    with pytest.raises(ConfigError, match="dropout"):
        LoraConfig.from_dict({"rank": 4, "dropout": 0.1})
    with pytest.raises(ConfigError, match="rank"):
        LoraConfig.from_dict({"rank": -1})
    with pytest.raises(ConfigError, match="Unknown lora field"):
        LoraConfig.from_dict({"rank": 4, "lora_alpha": 8})
    with pytest.raises(ConfigError, match="targets is empty"):
        LoraConfig.from_dict({"rank": 4, "targets": ""})


# ---- the merged forward -----------------------------------------------------------------------
def test_fresh_adapters_give_the_base_logits_exactly(tiny_config):
    params = _random_params(tiny_config)
    adapters = lora_lib.init_adapters(params, ALL, jax.random.key(0))
    for pair in (p for group in adapters["layers"].values() for p in group.values()):
        assert not np.any(np.asarray(pair["b"])) and np.any(np.asarray(pair["a"]))
        fan_in = math.prod(pair["a"].shape[1:-1])  # PEFT: U(+-1/sqrt(fan_in))
        assert np.abs(np.asarray(pair["a"])).max() <= 1 / math.sqrt(fan_in)
    tokens = np.random.default_rng(0).integers(0, tiny_config.vocab_size, (2, 9))
    apply = jax.jit(make_apply(tiny_config))
    base = np.asarray(apply(params, tokens))
    merged = np.asarray(apply(lora_lib.merge(params, adapters, ALL), tokens))
    assert np.array_equal(merged, base)


def test_merge_is_the_unmerged_lora_update(tiny_config):
    """x @ merge(W) == x @ W + scale * (x @ A) @ B for every target (float64 numpy)."""
    params = _random_params(tiny_config)
    adapters = _random_adapters(params, ALL)
    merged = lora_lib.merge(params, adapters, ALL)
    rng = np.random.default_rng(5)
    for name in ALL.targets:
        group, leaf, n_in, _ = lora_lib.TARGETS[name]
        w = np.asarray(params["layers"][group][leaf], np.float64)
        got = np.asarray(merged["layers"][group][leaf], np.float64)
        a = np.asarray(adapters["layers"][group][leaf]["a"], np.float64)
        b = np.asarray(adapters["layers"][group][leaf]["b"], np.float64)
        x = rng.standard_normal((5,) + w.shape[1:1 + n_in])
        ins = "ij"[:n_in]
        outs = "mn"[:w.ndim - 1 - n_in]
        for layer in range(w.shape[0]):
            plain = np.einsum(f"t{ins},{ins}{outs}->t{outs}", x, w[layer])
            lora_path = np.einsum(f"t{ins},{ins}r->tr", x, a[layer])
            lora_path = ALL.scale * np.einsum(f"tr,r{outs}->t{outs}", lora_path, b[layer])
            np.testing.assert_allclose(
                np.einsum(f"t{ins},{ins}{outs}->t{outs}", x, got[layer]), plain + lora_path,
                rtol=1e-5, atol=1e-5, err_msg=name)
    assert merged["embedding"] is params["embedding"]  # non-targets are shared, not copied
    partial = LoraConfig(rank=3, alpha=6.0, targets="v,down")
    some = lora_lib.merge(params, _random_adapters(params, partial), partial)
    assert some["layers"]["attn"]["q"] is params["layers"]["attn"]["q"]
    assert not np.array_equal(some["layers"]["attn"]["v"], params["layers"]["attn"]["v"])


def test_gradients_match_float64_central_differences(tiny_config):
    """dL/dA and dL/dB of the real training loss vs central differences of a float64 numpy
    model (independent forward, independent merge), and the chain rule through dL/dW."""
    from geb_jax.train.losses import cross_entropy_loss
    params = _random_params(tiny_config, std=0.3)
    adapters = _random_adapters(params, ALL, std=0.3)
    batch = _batch(tiny_config)
    apply = make_apply(tiny_config)

    def loss(adapters_):
        return cross_entropy_loss(lora_lib.merge(params, adapters_, ALL), batch, apply)[0]

    grads = jax.jit(jax.grad(loss))(adapters)
    np.testing.assert_allclose(float(jax.jit(loss)(adapters)),
                               _ce64(_merge64(params, adapters, ALL), tiny_config, batch),
                               rtol=1e-5)

    rng = np.random.default_rng(7)
    eps = 1e-5
    for name in ALL.targets:
        group, leaf, _, _ = lora_lib.TARGETS[name]
        for which in ("a", "b"):
            value = np.asarray(adapters["layers"][group][leaf][which], np.float64)
            got = np.asarray(grads["layers"][group][leaf][which])
            for _ in range(2):
                index = tuple(rng.integers(0, n) for n in value.shape)
                moved = []
                for sign in (1, -1):
                    shifted = jax.tree.map(lambda x: np.asarray(x, np.float64), adapters)
                    shifted["layers"][group][leaf][which][index] += sign * eps
                    moved.append(_ce64(_merge64(params, shifted, ALL), tiny_config, batch))
                expected = (moved[0] - moved[1]) / (2 * eps)
                assert abs(got[index] - expected) <= 2e-3 * abs(expected) + 2e-6, \
                    (name, which, index, got[index], expected)

    # Chain rule: dL/dA = s dL/dW . B^T and dL/dB = s A^T . dL/dW, with dL/dW at the merged W.
    merged = lora_lib.merge(params, adapters, ALL)
    grad_w = jax.jit(jax.grad(lambda p: cross_entropy_loss(p, batch, apply)[0]))(merged)
    for name in ALL.targets:
        group, leaf, n_in, _ = lora_lib.TARGETS[name]
        gw = np.asarray(grad_w["layers"][group][leaf], np.float64)
        layers = gw.shape[0]
        gw = gw.reshape(layers, math.prod(gw.shape[1:1 + n_in]), -1)
        a = np.asarray(adapters["layers"][group][leaf]["a"], np.float64).reshape(
            layers, gw.shape[1], ALL.rank)
        b = np.asarray(adapters["layers"][group][leaf]["b"], np.float64).reshape(
            layers, ALL.rank, gw.shape[2])
        ga = np.asarray(grads["layers"][group][leaf]["a"]).reshape(a.shape)
        gb = np.asarray(grads["layers"][group][leaf]["b"]).reshape(b.shape)
        scale = np.abs(gw).max() * np.abs(b).max() * ALL.scale
        np.testing.assert_allclose(ga, ALL.scale * gw @ b.transpose(0, 2, 1),
                                   atol=1e-5 * scale, rtol=1e-4, err_msg=name)
        np.testing.assert_allclose(gb, ALL.scale * a.transpose(0, 2, 1) @ gw,
                                   atol=1e-5 * np.abs(gw).max() * np.abs(a).max() * ALL.scale,
                                   rtol=1e-4, err_msg=name)


# ---- state and optimizer ----------------------------------------------------------------------
def _opt_sizes(opt_state):
    """(floating elements, shapes) of the optimizer state's array leaves (counts excluded)."""
    leaves = [x for x in jax.tree.leaves(opt_state)
              if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim > 0]
    return sum(x.size for x in leaves), {tuple(x.shape) for x in leaves}


def test_optimizer_state_is_twice_the_adapters_and_holds_no_base_moments(tiny_config):
    from geb_jax.train.optimizer import OptimizerConfig, make_optimizer
    from geb_jax.train.state import LoraTrainState, TrainState, abstract_state, trainable
    optimizer = make_optimizer(OptimizerConfig(peak_learning_rate=1e-3, min_learning_rate=1e-4,
                                               warmup_steps=1, total_steps=4))
    full = abstract_state(tiny_config, optimizer)
    lora = abstract_state(tiny_config, optimizer, lora=ALL)
    assert type(full) is TrainState and type(lora) is LoraTrainState
    n_params = sum(x.size for x in jax.tree.leaves(full.params))
    n_adapters = sum(x.size for x in jax.tree.leaves(lora.lora))
    full_size, _ = _opt_sizes(full.opt_state)
    lora_size, lora_shapes = _opt_sizes(lora.opt_state)
    assert full_size == 2 * n_params
    assert lora_size == 2 * n_adapters
    base_shapes = {tuple(x.shape) for x in jax.tree.leaves(lora.params)}
    assert not lora_shapes & base_shapes, lora_shapes & base_shapes
    assert jax.tree.structure(trainable(lora)) == jax.tree.structure(lora.lora)
    assert jax.tree.structure(lora.params) == jax.tree.structure(full.params)
    # Printed for the record (pytest -s): the sizes this test measured.
    print(f"\ntiny model: {n_params} params, AdamW state {full_size}; LoRA r={ALL.rank}: "
          f"{n_adapters} adapter params, AdamW state {lora_size}")


def test_adapters_shard_like_their_base_matrices(tiny_config):
    from jax.sharding import PartitionSpec as P
    axes = lora_lib.adapter_logical_axes(param_logical_axes(tiny_config), ALL)["layers"]
    assert axes["attn"]["q"] == {"a": P("layers", "embed", None),
                                 "b": P("layers", None, "heads", "head_dim")}
    assert axes["attn"]["k"]["b"] == P("layers", None, "kv_heads", "head_dim")
    assert axes["attn"]["o"] == {"a": P("layers", "heads", "head_dim", None),
                                 "b": P("layers", None, "embed")}
    assert axes["mlp"]["down"] == {"a": P("layers", "mlp", None), "b": P("layers", None, "embed")}
    assert axes["mlp"]["up"] == {"a": P("layers", "embed", None), "b": P("layers", None, "mlp")}


_SHARDED_SCRIPT = r"""
import json, sys
import flax.linen as nn, jax, numpy as np
from geb_jax.model import make_apply
from geb_jax.model.lora import LoraConfig
from geb_jax.parallel.mesh import LOGICAL_AXIS_RULES, make_mesh
from geb_jax.train.losses import cross_entropy_loss
from geb_jax.train.optimizer import OptimizerConfig, make_optimizer
from geb_jax.train.state import init_sharded_state, state_shardings
from geb_jax.train.step import batch_shardings, global_batch, jit_train_step, make_train_step
from tests.sharded_run import CONFIG, batches
lora = LoraConfig(rank=2, alpha=4.0)
hp = OptimizerConfig.from_dict(dict(peak_learning_rate=1e-3, min_learning_rate=1e-4,
                                    warmup_steps=1, total_steps=3))
optimizer = make_optimizer(hp)
apply = make_apply(CONFIG)
loss_fn = lambda p, b, reference_params=None: cross_entropy_loss(p, b, apply)
out = {}
for shape, n in (((1, 1, 1), 1), ((2, 2, 2), 8)):
    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)), jax.devices()[:n])
    state_sh = state_shardings(CONFIG, optimizer, mesh, lora=lora)
    state = init_sharded_state(CONFIG, optimizer, 0, state_sh, lora=lora)
    data = list(batches())
    batch_sh = batch_shardings(data[0], mesh)
    step = jit_train_step(make_train_step(loss_fn, optimizer, lora=lora), mesh, state_sh,
                          batch_sh)
    losses = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        for b in data:
            state, metrics = step(state, global_batch(b, batch_sh), None)
            losses.append(float(metrics["loss"]))
    q, o = state.lora["layers"]["attn"]["q"], state.lora["layers"]["attn"]["o"]
    out[str(shape)] = {
        "losses": losses,
        "adapters": [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(state.lora)],
        "base_unchanged": bool(np.array_equal(
            np.asarray(state.params["layers"]["attn"]["q"]),
            np.asarray(init_sharded_state(CONFIG, optimizer, 0, state_sh, lora=lora)
                       .params["layers"]["attn"]["q"]))),
        "specs": {k: list(v.sharding.spec) for k, v in (
            ("q.a", q["a"]), ("q.b", q["b"]), ("o.a", o["a"]), ("o.b", o["b"]),
            ("mu.q.a", state.opt_state[2][0].mu["layers"]["attn"]["q"]["a"]))},
    }
json.dump(out, open(sys.argv[1], "w"))
"""


def test_sharded_lora_training_matches_one_device(tmp_path):
    """8 simulated CPU devices, mesh data 2 x fsdp 2 x tensor 2 vs one device: the same losses
    and adapters (1e-5); a is sharded like its base's input axes, b like its outputs."""
    out = tmp_path / "sharded.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT, str(out)], cwd=REPO_ROOT, env=env,
                   check=True, timeout=600)
    result = json.loads(out.read_text())
    one, many = result["(1, 1, 1)"], result["(2, 2, 2)"]
    assert abs(one["losses"][0] - one["losses"][-1]) > 1e-4  # it trained
    np.testing.assert_allclose(many["losses"], one["losses"], atol=1e-5, rtol=0)
    for x, y in zip(many["adapters"], one["adapters"]):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
    assert one["base_unchanged"] and many["base_unchanged"]
    specs = {k: v + [None] * (4 - len(v)) for k, v in many["specs"].items()}  # pad trailing
    assert specs == {"q.a": [None, "fsdp", None, None],  # a (L, D, r): D like q's input
                     "q.b": [None, None, "tensor", None],  # b (L, r, N, H): N like q's heads
                     "o.a": [None, "tensor", None, None],  # a (L, N, H, r): o's input heads
                     "o.b": [None, None, "fsdp", None],  # b (L, r, D): o's output embed
                     "mu.q.a": [None, "fsdp", None, None]}  # Adam moments like the adapter


# ---- training runs: resume, the stage chain, export -------------------------------------------
def _tiny_run_config(workdir, **overrides):
    config = load_config(os.path.join(REPO_ROOT, "configs", "tiny.py:smoke"))
    values = {"workdir": str(workdir), "eval.every": 0, "checkpoint.every": 2,
              "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 2,
              "model.n_kv_heads": 1, "model.d_ff": 128, "train.seq_len": 64,
              "optimizer.warmup_steps": 1}
    values.update(overrides)
    return apply_overrides(config, values)


def _restore(stage_dir, config, lora):
    from geb_jax.parallel.mesh import make_mesh
    from geb_jax.run_config import run_config
    from geb_jax.train.optimizer import make_optimizer
    from geb_jax.train.state import lora_optimizer_config, restore_stage_state
    model_config = ModelConfig.from_dict(config.model)
    optimizer = make_optimizer(lora_optimizer_config(
        run_config(config).optimizer, lora))
    return restore_stage_state(str(stage_dir), model_config, optimizer,
                               make_mesh(config.mesh), lora)


def test_resume_gives_identical_params_adapters_and_optimizer_state(tmp_path):
    """4 LoRA steps straight == 2 steps, stop, rerun to 4 (restored from the checkpoint)."""
    from geb_jax.train.stages import run_stages
    common = {"lora.rank": 4, "lora.targets": "q,v,o,down", "optimizer.total_steps": 4}
    straight = _tiny_run_config(tmp_path / "straight", **common, **{"train.steps": 4})
    run_stages(straight)
    split = _tiny_run_config(tmp_path / "split", **common, **{"train.steps": 2})
    run_stages(split)
    summary = run_stages(apply_overrides(split, {"train.steps": 4}))[0]
    assert summary["steps"] == 4
    lora = LoraConfig.from_dict(straight.lora)
    a = _restore(tmp_path / "straight" / "pretrain", straight, lora)
    b = _restore(tmp_path / "split" / "pretrain", straight, lora)
    assert int(a.step) == int(b.step) == 4
    named_a = jax.tree_util.tree_flatten_with_path(a)[0]
    named_b = jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in named_a] == [p for p, _ in named_b]
    for (path, x), (_, y) in zip(named_a, named_b):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)
    assert np.any(np.asarray(a.lora["layers"]["attn"]["q"]["b"]))  # the adapters trained
    with open(tmp_path / "straight" / "pretrain" / "metrics.jsonl") as f:
        straight_losses = {r["step"]: r["loss"] for r in map(json.loads, f)
                           if r["split"] == "train"}
    with open(tmp_path / "split" / "pretrain" / "metrics.jsonl") as f:
        split_losses = {r["step"]: r["loss"] for r in map(json.loads, f)
                        if r["split"] == "train"}
    assert split_losses == straight_losses


@pytest.fixture(scope="module")
def lora_chain(tmp_path_factory):
    """pretrain (full) -> sft (LoRA) -> dpo (LoRA), then export of the dpo stage."""
    from geb_jax.export.command import export_stage
    from geb_jax.train.stages import run_stages
    workdir = tmp_path_factory.mktemp("lora_chain")
    config = _tiny_run_config(workdir, **{
        "stages": "pretrain,sft,dpo", "train.steps": 2, "optimizer.total_steps": 2,
        "checkpoint.every": 0, "train.seq_len": 128,
        "stage_overrides.sft.train.steps": 2, "stage_overrides.sft.optimizer.total_steps": 2,
        "stage_overrides.sft.optimizer.warmup_steps": 1,
        "stage_overrides.dpo.train.steps": 2, "stage_overrides.dpo.optimizer.total_steps": 2,
        "stage_overrides.dpo.optimizer.warmup_steps": 1,
        "mode": "export", "export.formats": "numpy,hf", "export.gguf_dtypes": "f32"})
    for stage in ("sft", "dpo"):
        config.stage_overrides[stage].lora = {"rank": 4, "alpha": 8.0}
    summaries = run_stages(config)
    written = export_stage(config, log=lambda *_: None)
    return config, summaries, written


def test_stage_chain_hands_merged_params_on(lora_chain):
    """SFT (LoRA) starts on pretrain's final params; DPO (LoRA) on SFT's merged params, which
    are also its reference (first loss ln 2, zero rewards); a LoRA stage leaves its base."""
    from geb_jax.train import inputs
    from geb_jax.train.losses import cross_entropy_loss
    from geb_jax.train.stages import stage_config
    config, summaries, _ = lora_chain
    assert [s["steps"] for s in summaries] == [2, 2, 2]
    workdir = config.workdir
    off, on = LoraConfig(), LoraConfig(rank=4, alpha=8.0)
    pretrain = _restore(os.path.join(workdir, "pretrain"), stage_config(config, "pretrain"), off)
    sft_cfg = stage_config(config, "sft")
    sft = _restore(os.path.join(workdir, "sft"), sft_cfg, on)
    dpo = _restore(os.path.join(workdir, "dpo"), stage_config(config, "dpo"), on)
    for x, y in zip(jax.tree.leaves(sft.params), jax.tree.leaves(pretrain.params)):
        assert np.array_equal(np.asarray(x), np.asarray(y))  # the base stayed frozen
    sft_merged = lora_lib.merge(sft.params, sft.lora, on)
    for x, y in zip(jax.tree.leaves(dpo.params), jax.tree.leaves(sft_merged)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-7)
    assert not np.allclose(sft_merged["layers"]["attn"]["q"], sft.params["layers"]["attn"]["q"])

    model_config = ModelConfig.from_dict(sft_cfg.model)
    tokenizer = inputs.stage_tokenizer(sft_cfg, model_config)
    batch = next(iter(inputs.train_dataset(sft_cfg, "sft", tokenizer)))
    expected, _ = cross_entropy_loss(pretrain.params, batch, make_apply(model_config))
    np.testing.assert_allclose(_first_logged(workdir, "sft")["loss"], float(expected),
                               rtol=1e-5)
    first_dpo = _first_logged(workdir, "dpo")
    np.testing.assert_allclose(first_dpo["loss"], math.log(2.0), atol=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(first_dpo[key]) < 1e-6, (key, first_dpo[key])


PROMPT = [1, 17, 230, 99, 4, 350, 12, 77]


def test_merged_export_matches_the_adapted_model(lora_chain):
    from geb_jax.infer import Engine, load_model
    config, _, written = lora_chain
    on = LoraConfig(rank=4, alpha=8.0)
    dpo = _restore(os.path.join(config.workdir, "dpo"), config, on)
    model_config = ModelConfig.from_dict(config.model)
    # The unmerged LoRA model, in float64: x W + s (x A) B written out (see _merge64).
    params64 = _merge64(jax.device_get(dpo.params), jax.device_get(dpo.lora), on)
    tokens = np.array([PROMPT])
    pos, seg = np.arange(len(PROMPT))[None], np.ones((1, len(PROMPT)), np.int32)
    expected64 = numpy_reference.forward(params64, model_config, tokens, pos, seg)[0]
    expected = np.asarray(make_apply(model_config)(
        lora_lib.merge(dpo.params, dpo.lora, on), jnp.asarray(tokens)))[0]
    np.testing.assert_allclose(expected, expected64, atol=1e-5)
    weights, _ = load_model(written["numpy"])
    got = Engine(weights).prefill([PROMPT], all_logits=True)[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert set(written) == {"numpy", "hf", "peft"}


def test_peft_adapters_on_the_base_equal_the_merged_hf_export(lora_chain, tmp_path):
    """PEFT's layout: names, [r, in] / [out, r] shapes, config; base + (alpha/r) B @ A equals
    the merged HF export tensor by tensor; with peft installed, PeftModel on the HF base gives
    the merged model's logits (without it, the same sum done on the torch model's weights)."""
    import torch
    import transformers
    from geb_jax.export import hf
    from geb_jax.export.peft import load_peft_adapter
    config, _, written = lora_chain
    on = LoraConfig(rank=4, alpha=8.0)
    model_config = ModelConfig.from_dict(config.model)
    dpo = _restore(os.path.join(config.workdir, "dpo"), config, on)
    base = jax.device_get(dpo.params)

    folder = written["peft"]
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
    with open(os.path.join(folder, "adapter_config.json")) as f:
        adapter_config = json.load(f)
    assert adapter_config["peft_type"] == "LORA" and adapter_config["task_type"] == "CAUSAL_LM"
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8.0
    assert adapter_config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj",
                                                "gate_proj", "up_proj", "down_proj"]
    tensors = safetensors.numpy.load_file(os.path.join(folder, "adapter_model.safetensors"))
    assert len(tensors) == 2 * 7 * model_config.n_layers
    base_hf = hf.hf_state_dict_from_params(base, model_config)
    merged_hf = safetensors.numpy.load_file(os.path.join(written["hf"], "model.safetensors"))
    assert set(merged_hf) == set(base_hf)
    scale = adapter_config["lora_alpha"] / adapter_config["r"]
    adapted = set()
    for i in range(model_config.n_layers):
        for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                       "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            stem = f"model.layers.{i}.{module}"
            lora_a = tensors[f"base_model.model.{stem}.lora_A.weight"]
            lora_b = tensors[f"base_model.model.{stem}.lora_B.weight"]
            out_features, in_features = base_hf[f"{stem}.weight"].shape
            assert lora_a.shape == (4, in_features) and lora_b.shape == (out_features, 4)
            np.testing.assert_allclose(base_hf[f"{stem}.weight"] + scale * lora_b @ lora_a,
                                       merged_hf[f"{stem}.weight"], atol=1e-6, rtol=0)
            adapted.add(f"{stem}.weight")
    for name in set(base_hf) - adapted:
        assert np.array_equal(base_hf[name], merged_hf[name]), name

    # Round trip through our reader of PEFT folders.
    lora_back, adapters_back = load_peft_adapter(folder, model_config)
    assert lora_back == on
    for x, y in zip(jax.tree.leaves(adapters_back), jax.tree.leaves(jax.device_get(dpo.lora))):
        assert np.array_equal(x, y)

    # transformers: the HF base with the adapters applied vs the merged HF export.
    base_dir = tmp_path / "base_hf"
    hf.save_hf_checkpoint(model_config, base, str(base_dir))
    tokens = torch.tensor([PROMPT])
    with torch.no_grad():
        merged_model = transformers.LlamaForCausalLM.from_pretrained(written["hf"]).eval()
        expected = merged_model(tokens).logits[0].numpy()
        model = transformers.LlamaForCausalLM.from_pretrained(str(base_dir)).eval()
        try:
            import peft
        except ImportError:
            peft = None
        if peft is not None:
            model = peft.PeftModel.from_pretrained(model, folder).eval()
        else:  # what PEFT's LoRA Linear computes, applied to the named modules
            modules = dict(model.named_modules())
            for name, value in tensors.items():
                if name.endswith("lora_A.weight"):
                    module = modules[name[len("base_model.model."):-len(".lora_A.weight")]]
                    lora_b = tensors[name.replace("lora_A", "lora_B")]
                    module.weight += scale * torch.from_numpy(lora_b @ value)
        got = model(tokens).logits[0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    ours = np.asarray(make_apply(model_config)(lora_lib.merge(dpo.params, dpo.lora, on),
                                               jnp.asarray([PROMPT])))[0]
    np.testing.assert_allclose(expected, ours, atol=1e-4)


def test_cli_lora_train_then_export(tmp_path):
    """A fresh process trains with --config.lora.rank=4 (finite losses), another exports GGUF
    and HF (merged) plus peft/; the HF tensors are the checkpoint's frozen base + adapters."""
    from geb_jax.checkpoint.reader import read_stage
    from geb_jax.export import hf
    common = [sys.executable, "-m", "geb_jax.main", "--config", "configs/tiny.py:smoke",
              "--config.lora.rank=4", f"--config.workdir={tmp_path}", "--config.eval.every=0",
              "--config.train.steps=3", "--config.optimizer.total_steps=3",
              "--config.model.d_model=64", "--config.model.n_layers=2", "--config.model.n_heads=2",
              "--config.model.n_kv_heads=1", "--config.model.d_ff=128"]
    trained = subprocess.run(common, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "LoRA rank 4" in trained.stderr + trained.stdout
    with open(tmp_path / "pretrain" / "metrics.jsonl") as f:
        losses = [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]
    assert len(losses) == 3 and all(np.isfinite(losses))
    exported = subprocess.run(common + ["--config.mode=export", "--config.export.formats=gguf,hf"],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert exported.returncode == 0, exported.stderr[-3000:]
    out = tmp_path / "export"
    assert sorted(os.listdir(out)) == ["gguf", "hf", "peft"]
    assert sorted(os.listdir(out / "gguf")) == ["model-f16.gguf", "model-q8_0.gguf"]
    assert (out / "peft" / "adapter_model.safetensors").is_file()

    stage = read_stage(tmp_path / "pretrain", merge_lora=False)  # the frozen base
    base_hf = hf.hf_state_dict_from_params(stage.params, stage.model_config)
    merged_hf = safetensors.numpy.load_file(str(out / "hf" / "model.safetensors"))
    merged = read_stage(tmp_path / "pretrain")  # what eval and lm-eval read: base + adapters
    for name, value in hf.hf_state_dict_from_params(merged.params, merged.model_config).items():
        np.testing.assert_allclose(value, merged_hf[name], atol=1e-6, rtol=0)
    tensors = safetensors.numpy.load_file(str(out / "peft" / "adapter_model.safetensors"))
    scale = 16.0 / 4  # the default lora.alpha over the rank
    for name, lora_a in tensors.items():
        if name.endswith("lora_A.weight"):
            stem = name[len("base_model.model."):-len(".lora_A.weight")]
            lora_b = tensors[name.replace("lora_A", "lora_B")]
            assert np.any(lora_b)  # trained
            np.testing.assert_allclose(base_hf[stem + ".weight"] + scale * lora_b @ lora_a,
                                       merged_hf[stem + ".weight"], atol=1e-6, rtol=0)
