"""The decoder against a float64 numpy reference, packing, GQA, switches and presets."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geb_jax.config_loader import load_config
from geb_jax.errors import ConfigError
from geb_jax.model import ModelConfig, abstract_params, init_params, layers, make_apply
from tests import numpy_reference

TOL = 1e-4  # float32 model vs float64 reference, on logits of order 1


def _random_params(config, std, seed=0):
    """N(0, std) weights in the model's tree (abstract_params: no flax init run), norm scales
    1 + N(0, 0.3) so that the norms' weights matter too."""
    rng = np.random.default_rng(seed)

    def one(path, x):
        if "norm" in jax.tree_util.keystr(path):
            return (1.0 + 0.3 * rng.standard_normal(x.shape)).astype(np.float32)
        return rng.normal(0.0, std, x.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(one, abstract_params(config))


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
    """Weights of std 0.1, not the 0.02 init: at 0.02 attention is nearly uniform and a wrong
    RoPE layout (Meta's / llama.cpp's interleaved pairs instead of Hugging Face's rotate-half)
    moved the logits by only ~20x TOL; here by ~1e4x. The test checks its own margin: the
    reference with the wrong layout must miss by >= 100x TOL."""
    config = tiny_config.replace(**changes)
    params = _random_params(config, std=0.1)
    tokens, positions, segments = _packed_row([5, 7, 4], config.vocab_size)
    ours = jax.jit(make_apply(config))(params, jnp.asarray(tokens), jnp.asarray(positions),
                              jnp.asarray(segments))
    ref = numpy_reference.forward(params, config, tokens, positions, segments)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=TOL, rtol=0)
    wrong_layout = numpy_reference.forward(params, config, tokens, positions, segments,
                                           rope=numpy_reference.interleaved_rope)
    assert np.max(np.abs(wrong_layout - ref)) >= 100 * TOL


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


def test_bfloat16_model_rotates_large_positions_like_float64(tiny_config, monkeypatch):
    """bfloat16 holds integers exactly only up to 256 (2049 -> 2048, 4085 -> 4080): a model
    that cast its positions, or the angles, to the compute dtype would turn many tokens by
    the same angle. The whole bfloat16 model runs on int32 positions (what the pipeline
    feeds) up to 4095; every q and k leaving RoPE must equal a float64 rotation of the q and k
    entering it, to bfloat16's rounding of the output. The test checks its own margin: the
    same rotation at bfloat16-rounded positions must miss by >= 100x the tolerance."""
    config = tiny_config.replace(dtype="bfloat16", max_seq_len=4096)
    positions = np.concatenate([np.arange(2040, 2056), np.arange(4080, 4096)])[None]
    segments = np.repeat([1, 2], 16)[None]
    tokens = np.random.default_rng(5).integers(0, config.vocab_size, (1, 32))
    seen = []  # (input, output) of every apply_rope call: q and k of each layer

    def recording_rope(x_btnh, cos_bth, sin_bth):
        out_btnh = real_rope(x_btnh, cos_bth, sin_bth)
        jax.debug.callback(lambda x, out: seen.append((np.asarray(x), np.asarray(out))),
                           x_btnh, out_btnh)
        return out_btnh

    real_rope = layers.apply_rope
    monkeypatch.setattr(layers, "apply_rope", recording_rope)
    jax.jit(make_apply(config))(_random_params(config, std=0.1), *(
        jnp.asarray(a, jnp.int32) for a in (tokens, positions, segments))).block_until_ready()
    assert len(seen) == 2 * config.n_layers
    rounded = np.asarray(jnp.asarray(positions[0], jnp.bfloat16), np.float64)
    assert len(set(rounded)) < len(set(positions[0])) / 2  # what bfloat16 positions would lose
    for x, out in seen:
        assert x.dtype == out.dtype == jnp.bfloat16  # RoPE really ran in the bfloat16 model
        x_tnh = x[0].astype(np.float64)
        expected = numpy_reference.rope(x_tnh, positions[0], config.rope_theta)
        # one rounding of the output to bfloat16 (<= 2^-8 relative), plus float32 angles at
        # position 4095 (~2.5e-4 rad), with headroom: 1.5 x 2^-8 of the largest value
        tol = 1.5 * 2.0 ** -8 * np.max(np.abs(expected))
        np.testing.assert_allclose(out[0].astype(np.float64), expected, atol=tol, rtol=0)
        wrong = numpy_reference.rope(x_tnh, rounded, config.rope_theta)
        assert np.max(np.abs(wrong - expected)) >= 100 * tol


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
