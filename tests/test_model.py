"""The decoder against a float64 numpy reference, packing, GQA, switches and presets."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geb_jax.config_loader import load_config
from geb_jax.errors import ConfigError
from geb_jax.model import ModelConfig, abstract_params, init_params, make_apply
from geb_jax.model.layers import apply_rope, rope_tables
from tests import numpy_reference


def _randomized_params(config, seed=0):
    """Init, then perturb norm scales so that the norms' weights are exercised too."""
    params = init_params(config, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.3 * rng.standard_normal(x.shape).astype(np.float32)
        if "norm" in jax.tree_util.keystr(path) else x, params)


def _packed_row(doc_lengths, vocab, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=sum(doc_lengths))
    positions = np.concatenate([np.arange(n) for n in doc_lengths])
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(doc_lengths)])
    return tokens[None], positions[None], segments[None]


@pytest.mark.parametrize("changes", [
    {}, {"n_kv_heads": 4}, {"n_kv_heads": 1}, {"tie_embeddings": True},
    {"norm_position": "post"}, {"rope_theta": 500000.0, "norm_eps": 1e-6},
])
def test_logits_match_float64_numpy_reference(tiny_config, changes):
    config = tiny_config.replace(**changes)
    params = _randomized_params(config)
    tokens, positions, segments = _packed_row([5, 7, 4], config.vocab_size)
    ours = jax.jit(make_apply(config))(params, jnp.asarray(tokens), jnp.asarray(positions),
                              jnp.asarray(segments))
    ref = numpy_reference.forward(jax.device_get(params), config, tokens, positions, segments)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


def test_packed_documents_equal_each_document_alone(tiny_config):
    lengths = [6, 9, 5]
    params = _randomized_params(tiny_config)
    apply = jax.jit(make_apply(tiny_config))
    tokens, positions, segments = _packed_row(lengths, tiny_config.vocab_size, seed=3)
    packed = np.asarray(apply(params, tokens, positions, segments))[0]
    start = 0
    for n in lengths:
        alone = np.asarray(apply(params, tokens[:, start:start + n]))[0]  # positions 0..n-1
        np.testing.assert_allclose(packed[start:start + n], alone, atol=1e-5, rtol=0)
        start += n


def test_gqa_equals_mha_with_repeated_kv_heads(tiny_config):
    """GQA with K heads must equal MHA whose KV weights repeat each KV head N/K times."""
    gqa = tiny_config.replace(n_kv_heads=2)
    mha = tiny_config.replace(n_kv_heads=4)
    params = _randomized_params(gqa)
    mha_params = jax.tree.map(lambda x: x, params)
    for name in ("k", "v"):
        mha_params["layers"]["attn"][name] = jnp.repeat(params["layers"]["attn"][name], 2, axis=2)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 97, (2, 11)))
    np.testing.assert_allclose(jax.jit(make_apply(gqa))(params, tokens),
                               jax.jit(make_apply(mha))(mha_params, tokens),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("changes", [{"scan_layers": False}, {"remat_policy": "full"},
                                     {"remat_policy": "save_dots"}])
def test_scan_and_remat_switches_keep_logits_and_gradients(tiny_config, changes):
    params = _randomized_params(tiny_config)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 97, (2, 9)))

    def loss(config, p):
        return jnp.mean(jax.nn.log_softmax(make_apply(config)(p, tokens))[..., 0])

    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
    base_loss, base_grads = grad_fn(tiny_config, params)
    new_loss, new_grads = grad_fn(tiny_config.replace(**changes), params)
    np.testing.assert_allclose(new_loss, base_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), new_grads, base_grads)


def test_bfloat16_compute_keeps_rope_positions_distinct():
    """bf16 cannot represent 2049; float32 RoPE must still tell positions 2048 and 2049 apart."""
    cos, sin = rope_tables(jnp.array([[2048, 2049]]), head_dim=8, theta=10000.0)
    assert cos.dtype == jnp.float32
    x = jnp.ones((1, 2, 1, 8), jnp.bfloat16)
    rotated = apply_rope(x, cos, sin)
    assert rotated.dtype == jnp.bfloat16
    expected_angle_diff = 1.0  # the fastest frequency rotates by exactly 1 radian per position
    a0 = np.arctan2(float(sin[0, 0, 0]), float(cos[0, 0, 0]))
    a1 = np.arctan2(float(sin[0, 1, 0]), float(cos[0, 1, 0]))
    np.testing.assert_allclose(np.angle(np.exp(1j * (a1 - a0))), expected_angle_diff, atol=1e-3)
    assert not np.array_equal(np.asarray(rotated[0, 0], np.float32), np.asarray(rotated[0, 1], np.float32))


def test_bfloat16_model_runs_and_is_close_to_float32(tiny_config):
    params = _randomized_params(tiny_config)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 97, (1, 12)))
    f32 = jax.jit(make_apply(tiny_config))(params, tokens)
    bf16 = jax.jit(make_apply(tiny_config.replace(dtype="bfloat16")))(params, tokens)
    assert bf16.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(bf16.astype(jnp.float32) - f32))) < 0.05 * float(jnp.max(jnp.abs(f32)))


# ---- presets: parameter counts derived by hand from the published shapes (DESIGN.md table) ----

def _hand_count(layers, d, heads, kv_heads, head_dim, ffn, vocab, tied):
    attention = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2
    per_layer = attention + 3 * d * ffn + 2 * d
    return layers * per_layer + d + vocab * d * (1 if tied else 2)


PUBLISHED = {
    "geb_1_3b": (_hand_count(24, 2048, 16, 4, 128, 5632, 64896, False), 1_348_044_800),
    "tinyllama_1_1b": (_hand_count(22, 2048, 32, 4, 64, 5632, 32000, False), 1_100_048_384),
    "llama_7b": (_hand_count(32, 4096, 32, 32, 128, 11008, 32000, False), 6_738_415_616),
}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_published_preset_parameter_counts(repo_root, preset):
    hand, published = PUBLISHED[preset]
    assert hand == published
    config = ModelConfig.from_dict(load_config(os.path.join(repo_root, "configs", f"{preset}.py")).model)
    shapes = abstract_params(config)  # jax.eval_shape: no memory
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == published
    assert config.num_params() == published


def test_every_config_parses_and_builds_abstractly(repo_root):
    config_dir = os.path.join(repo_root, "configs")
    names = [f for f in os.listdir(config_dir) if f.endswith(".py") and not f.startswith("_")]
    assert {"tiny.py", "small.py", "geb_1_3b.py", "tinyllama_1_1b.py", "llama_7b.py"} <= set(names)
    counts = {}
    for name in names:
        config = ModelConfig.from_dict(load_config(os.path.join(config_dir, name)).model)
        counts[name] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(config)))
    assert 1e6 <= counts["tiny.py"] <= 1e7  # "a few million"
    assert 100e6 <= counts["small.py"] <= 120e6  # ~110M


def test_heads_not_divisible_by_kv_heads_is_a_clear_error(tiny_config):
    with pytest.raises(ConfigError, match=r"n_heads \(4\).*n_kv_heads \(3\)"):
        tiny_config.replace(n_kv_heads=3)


def test_unknown_model_field_is_named():
    with pytest.raises(ConfigError, match="n_layer"):
        ModelConfig.from_dict({"n_layer": 2})
