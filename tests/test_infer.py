"""geb_jax.infer (numpy-only inference) against the JAX model, plus sampling, streaming,
quantization and the CLI.

The engine must not import jax; these tests may (the JAX model is the reference). Random models
use a larger init_std than training (0.2) so logits span several units and a 1e-4 tolerance
means something. The CLI and the jax-free import run in subprocesses with jax blocked.
"""
import dataclasses
import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geb_jax.data.tokenizer import builtin_tokenizer
from geb_jax.export.hf import hf_state_dict_from_params
from geb_jax.infer import (ContextLengthError, Engine, InferConfig, InferConfigError,
                           ModelFileError, SamplingOptionError, SamplingParams, Weights,
                           WeightsError, generate, load_model, next_token_distribution,
                           quantize_int4, quantize_int8, quantize_weights, save_npz_model)
from geb_jax.infer.engine import rope_tables
from geb_jax.infer.sampling import (IncrementalDetokenizer, Sampler, StopStringMatcher,
                                    apply_repetition_penalty)
from geb_jax.model import ModelConfig, abstract_params, make_apply

from tests.conftest import REPO_ROOT

TOKENIZER_VOCAB = 512  # small: most Chinese characters fall back to byte pieces


def _random_params(config: ModelConfig, seed: int = 0):
    """Random numpy parameters in the model's tree layout (init_params' shapes, checked against
    abstract_params in the parity test), with norm scales around 1 so that they matter."""
    c, rng = config, np.random.default_rng(seed)
    L, D, N, K, H, F, V = (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff,
                           c.vocab_size)
    out_std = c.init_std / (2 * L) ** 0.5

    def normal(*shape, std=c.init_std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm(*shape):
        return (1.0 + 0.3 * rng.standard_normal(shape)).astype(np.float32)

    params = {"embedding": normal(V, D), "final_norm": {"scale": norm(D)},
              "layers": {"attn": {"q": normal(L, D, N, H), "k": normal(L, D, K, H),
                                  "v": normal(L, D, K, H), "o": normal(L, N, H, D, std=out_std)},
                         "mlp": {"gate": normal(L, D, F), "up": normal(L, D, F),
                                 "down": normal(L, F, D, std=out_std)},
                         "attn_norm": {"scale": norm(L, D)}, "mlp_norm": {"scale": norm(L, D)}}}
    if not c.tie_embeddings:
        params["lm_head"] = normal(D, V)
    return params


def _setup(tiny_config, changes=None, seed=0):
    config = tiny_config.replace(init_std=0.2, **(changes or {}))
    params = _random_params(config, seed)
    return config, params, Weights.from_params(params, dataclasses.asdict(config))


@functools.lru_cache(maxsize=None)
def _jitted_apply(config):
    return jax.jit(make_apply(config))


def _jax_logits(config, params, tokens):
    """JAX model logits (B, T, V). Inputs are padded at the end to (2, max_seq_len) so each
    config compiles once (causal attention: trailing padding changes no earlier logit)."""
    tokens = np.asarray(tokens)
    b, t = tokens.shape
    padded = np.zeros((max(b, 2), config.max_seq_len), np.int32)
    padded[:b, :t] = tokens
    return np.asarray(_jitted_apply(config)(params, jnp.asarray(padded)))[:b, :t]


CONFIG_CASES = {
    "gqa": {}, "mha": {"n_kv_heads": 4}, "mqa": {"n_kv_heads": 1}, "tied": {"tie_embeddings": True},
    "post_norm": {"norm_position": "post"}, "theta_5e5": {"rope_theta": 500000.0, "norm_eps": 1e-6},
}


# ---- parity with the JAX model -----------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_prefill_logits_match_jax_model(tiny_config, case):
    config, params, weights = _setup(tiny_config, CONFIG_CASES[case])
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 24))
    ref = _jax_logits(config, params, tokens)
    ours = Engine(weights).prefill(tokens, all_logits=True)
    diff = np.abs(ours - ref).max()
    print(f"{case}: max |numpy - jax| = {diff:.2e} (logits up to {np.abs(ref).max():.1f})")
    assert np.abs(ref).max() > 2.0  # the test is not vacuous
    if case == "gqa":  # the numpy parameter tree has exactly the model's structure and shapes
        shapes = jax.tree_util.tree_map(lambda x: (x.shape, str(x.dtype)), params)
        expected = jax.tree_util.tree_map(lambda x: (x.shape, str(x.dtype)),
                                          abstract_params(config))
        assert shapes == expected
    assert diff <= 1e-4
    # Last-position logits (the default) are the same numbers.
    np.testing.assert_allclose(Engine(weights).prefill(tokens), ours[:, -1], atol=1e-5, rtol=0)


def test_named_tensors_roundtrip_matches_params(tiny_config):
    """HF names (geb_jax/export/hf.py) -> Weights equals Weights from our params, and back."""
    for changes in ({}, {"tie_embeddings": True}):
        config, params, weights = _setup(tiny_config, changes)
        state = hf_state_dict_from_params(params, config)
        named = Weights.from_named_tensors(state, dataclasses.asdict(config))
        tokens = np.random.default_rng(2).integers(0, config.vocab_size, (1, 10))
        np.testing.assert_array_equal(Engine(named).prefill(tokens, all_logits=True),
                                      Engine(weights).prefill(tokens, all_logits=True))
        back = weights.to_named_tensors()
        assert sorted(back) == sorted(state)
        for name in state:
            np.testing.assert_array_equal(back[name], state[name])
    state = dict(state)
    state["model.layers.0.self_attn.q_proj.bias"] = np.zeros(4, np.float32)
    with pytest.raises(WeightsError, match="q_proj.bias"):
        Weights.from_named_tensors(state, dataclasses.asdict(config))
    del state["model.layers.0.self_attn.q_proj.bias"], state["model.norm.weight"]
    with pytest.raises(WeightsError, match="model.norm.weight"):
        Weights.from_named_tensors(state, dataclasses.asdict(config))


def test_infer_config_reads_model_config_and_hf(tiny_config):
    c = InferConfig.from_dict(dataclasses.asdict(tiny_config))  # training-only fields ignored
    assert (c.n_heads, c.n_kv_heads, c.head_dim) == (4, 2, 8)
    with pytest.raises(InferConfigError, match="n_experts"):
        InferConfig.from_dict({**dataclasses.asdict(tiny_config), "n_experts": 4})
    from geb_jax.export.hf import hf_config_from_model_config
    assert InferConfig.from_hf(hf_config_from_model_config(tiny_config)) == c


def test_rope_tables_match_jax_model():
    from geb_jax.model.layers import rope_tables as jax_rope_tables
    positions = jnp.arange(64)[None]
    for theta in (10000.0, 500000.0):
        cos, sin = rope_tables(64, 16, theta)
        jcos, jsin = jax_rope_tables(positions, 16, theta)
        np.testing.assert_allclose(cos, np.asarray(jcos)[0], atol=1e-6)
        np.testing.assert_allclose(sin, np.asarray(jsin)[0], atol=1e-6)


# ---- KV cache ----------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["gqa", "mqa", "post_norm"])
def test_incremental_decoding_equals_full_recomputation(tiny_config, case):
    """Batch 2 with different prompt lengths (left padding): prefill, then one token at a time;
    at every step the logits equal (a) the JAX model on each row's whole sequence and (b) a
    fresh numpy prefill of the sequence so far."""
    config, params, weights = _setup(tiny_config, CONFIG_CASES[case])
    rng = np.random.default_rng(3)
    full = [list(rng.integers(0, config.vocab_size, 20)), list(rng.integers(0, config.vocab_size,
                                                                             23))]
    prompt_lens = [4, 7]
    ref = [_jax_logits(config, params, np.asarray([row]))[0] for row in full]
    engine, fresh = Engine(weights), Engine(weights)
    logits = engine.prefill([row[:n] for row, n in zip(full, prompt_lens)])
    worst = 0.0
    for step in range(14):
        for b in range(2):
            pos = prompt_lens[b] + step - 1  # position of the last token fed to row b
            worst = max(worst, np.abs(logits[b] - ref[b][pos]).max())
            if step % 4 == 0:  # a from-scratch numpy prefill of this row's sequence so far
                again = fresh.prefill([full[b][:pos + 1]])[0]
                np.testing.assert_allclose(logits[b], again, atol=1e-4, rtol=0)
        logits = engine.decode_step([full[b][prompt_lens[b] + step] for b in range(2)])
    print(f"{case}: incremental vs JAX full recomputation max diff {worst:.2e}")
    assert worst <= 1e-4
    assert engine.history[0] == full[0][:prompt_lens[0] + 14]  # pads are not history


def test_chunked_prefill_and_prefix_reuse(tiny_config):
    config, params, weights = _setup(tiny_config)
    ids = list(np.random.default_rng(4).integers(0, config.vocab_size, 30))
    whole = Engine(weights).prefill([ids], all_logits=True)
    chunked = Engine(weights, prefill_chunk=7).prefill([ids], all_logits=True)
    np.testing.assert_allclose(chunked, whole, atol=1e-5, rtol=0)
    engine = Engine(weights)
    engine.prefill_reusing_cache(ids[:20])
    engine.decode_step([5])
    # The new prompt shares 20 tokens with the cache (not the decoded 5): only 10 recomputed.
    reused = engine.prefill_reusing_cache(ids)
    assert engine.history[0] == ids
    np.testing.assert_allclose(reused[0], whole[0, -1], atol=1e-5, rtol=0)


def test_context_length_errors_name_max_seq_len(tiny_config):
    config, params, weights = _setup(tiny_config)  # max_seq_len 64
    engine = Engine(weights)
    with pytest.raises(ContextLengthError, match="max_seq_len"):
        engine.prefill(np.zeros((1, 65), np.int64))
    engine.prefill(np.zeros((1, 63), np.int64))
    engine.decode_step([1])
    with pytest.raises(ContextLengthError, match="max_seq_len is 64"):
        engine.decode_step([1])
    with pytest.raises(ContextLengthError, match="max_new_tokens"):
        generate(engine, None, [1] * 60, max_new_tokens=10)
    with pytest.raises(ContextLengthError, match="max_seq_len"):
        engine.score([[1] * 40], [[2] * 30])


def test_score_matches_jax_log_softmax(tiny_config):
    config, params, weights = _setup(tiny_config)
    rng = np.random.default_rng(5)
    prompts = [list(rng.integers(0, config.vocab_size, n)) for n in (3, 9, 5, 1)]
    conts = [list(rng.integers(0, config.vocab_size, n)) for n in (4, 2, 6, 3)]
    # Make one continuation greedy: extend prompt 2 with its own argmax tokens.
    greedy_ids, seq = [], list(prompts[2])
    for _ in range(3):
        nxt = int(np.argmax(_jax_logits(config, params, np.asarray([seq]))[0, -1]))
        greedy_ids.append(nxt)
        seq.append(nxt)
    prompts.append(list(prompts[2]))
    conts.append(greedy_ids)
    prompts.append([7])
    conts.append([])
    engine = Engine(weights)
    results = engine.score(prompts, conts, batch_size=3)
    for (p, c), (logprob, is_greedy) in zip(zip(prompts, conts), results):
        if not c:
            assert (logprob, is_greedy) == (0.0, True)
            continue
        logits = _jax_logits(config, params, np.asarray([p + c]))[0].astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
            -1, keepdims=True)) - logits.max(-1, keepdims=True)
        rows = np.arange(len(p) - 1, len(p) + len(c) - 1)
        expected = logp[rows, c].sum()
        assert abs(logprob - expected) < 1e-4
        assert is_greedy == bool((logits[rows].argmax(-1) == c).all())
    assert results[4][1] and not results[0][1]
    for one, batched in zip(engine.score(prompts, conts, batch_size=1), results):
        assert one[0] == pytest.approx(batched[0], abs=1e-5) and one[1] == batched[1]


# ---- sampling ----------------------------------------------------------------------------

def test_greedy_is_argmax_and_penalty_matches_hand_computation():
    rng = np.random.default_rng(6)
    greedy = Sampler(SamplingParams(temperature=0))
    for _ in range(20):
        logits = rng.standard_normal(50).astype(np.float32)
        assert greedy(logits, []) == int(np.argmax(logits))
    logits = np.array([2.0, -1.0, 0.5, -0.3, 1.9], np.float32)
    penalized = apply_repetition_penalty(logits, [0, 1, 1, 3], 1.5)
    np.testing.assert_allclose(penalized, [2.0 / 1.5, -1.5, 0.5, -0.45, 1.9], rtol=1e-6)
    # Greedy with the penalty: token 0 (2.0 -> 1.33) loses to token 4 (1.9).
    assert Sampler(SamplingParams(temperature=0, repetition_penalty=1.5))(logits, [0]) == 4
    probs = next_token_distribution(logits, [0], SamplingParams(temperature=0.5,
                                                                repetition_penalty=1.5))
    expected = np.exp(apply_repetition_penalty(logits, [0], 1.5) / 0.5)
    np.testing.assert_allclose(probs, expected / expected.sum(), rtol=1e-9)


def test_top_k_never_samples_outside_top_k():
    logits = np.random.default_rng(7).standard_normal(100).astype(np.float32)
    sampler = Sampler(SamplingParams(top_k=5, temperature=2.0, seed=0))
    draws = {sampler(logits, []) for _ in range(3000)}
    top5 = set(np.argsort(-logits)[:5].tolist())
    assert draws == top5  # inside the top 5, and all of them occur at temperature 2


def test_top_p_frequencies_match_renormalised_nucleus():
    probs = np.array([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = np.log(probs).astype(np.float32)
    params = SamplingParams(top_p=0.8, seed=123)
    # Sorted: 0.4, 0.3, 0.15 (cumulative before 0.7 < 0.8: kept), 0.1 (0.85: dropped), 0.05.
    nucleus = np.array([0.0, 0.4, 0.0, 0.3, 0.15]) / 0.85
    np.testing.assert_allclose(next_token_distribution(logits, [], params), nucleus, atol=1e-6)
    sampler, n = Sampler(params), 20000
    counts = np.bincount([sampler(logits, []) for _ in range(n)], minlength=5)
    assert counts[0] == counts[2] == 0
    kept = nucleus > 0
    chi2 = (((counts[kept] - n * nucleus[kept]) ** 2) / (n * nucleus[kept])).sum()
    assert chi2 < 13.8  # chi-square, 2 degrees of freedom, p = 0.001


def test_sampling_options_are_validated():
    with pytest.raises(SamplingOptionError, match="'topk'"):
        SamplingParams.from_options(topk=5)
    with pytest.raises(SamplingOptionError, match="'nucleus'"):
        generate(None, None, [1], nucleus=0.9)
    for bad in ({"top_p": 0.0}, {"top_p": 1.5}, {"temperature": -0.1}, {"top_k": -1},
                {"max_new_tokens": 0}, {"repetition_penalty": 0.0}, {"top_k": 2.5}):
        with pytest.raises(SamplingOptionError, match=next(iter(bad))):
            SamplingParams(**bad)


# ---- streaming and stop strings (a scripted engine emits a chosen token sequence) ----------

class ScriptedEngine:
    """Engine stand-in whose logits make the greedy choice follow `script`."""

    def __init__(self, script, vocab_size, max_len=10_000):
        self.script, self.vocab_size, self.max_len, self.step = list(script), vocab_size, max_len, 0
        self.config = InferConfig(vocab_size=vocab_size, d_model=8, n_layers=1, n_heads=1,
                                  n_kv_heads=1, head_dim=8, d_ff=8, max_seq_len=max_len)

    def _logits(self):
        logits = np.zeros((1, self.vocab_size), np.float32)
        logits[0, self.script[min(self.step, len(self.script) - 1)]] = 10.0
        self.step += 1
        return logits

    def prefill_reusing_cache(self, ids):
        self.step = 0
        return self._logits()

    def decode_step(self, tokens, copy=True):
        return self._logits()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return builtin_tokenizer(TOKENIZER_VOCAB, cache_dir=str(tmp_path_factory.mktemp("tok")))


def test_streaming_chinese_and_byte_fallback(tokenizer):
    text = "Hello 世界！中文测试：龘𠀋 emoji 😀 and code:\n\tx = 1  # 注释"
    ids = tokenizer.encode(text)
    assert sum(tokenizer.id_to_piece(i).startswith("<0x") for i in ids) > 10
    engine = ScriptedEngine(ids + [tokenizer.eos_id], tokenizer.vocab_size)
    generation = generate(engine, tokenizer, [tokenizer.bos_id], temperature=0,
                          max_new_tokens=len(ids) + 5)
    pieces = list(generation)
    assert "".join(pieces) == text == generation.text
    assert all(p and "\ufffd" not in p for p in pieces)
    assert generation.finish_reason == "eos" and generation.token_ids == ids
    # Stopped in the middle of a 4-byte character: the dangling bytes come out at the end
    # (as U+FFFD, exactly like tokenizer.decode) so the pieces still add up to the decode.
    cut = next(i for i in range(len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    generation = generate(ScriptedEngine(ids, tokenizer.vocab_size), tokenizer, [1],
                          temperature=0, max_new_tokens=cut)
    assert "".join(generation) == tokenizer.decode(ids[:cut])
    assert generation.finish_reason == "length"
    # Random id sequences (invalid byte runs included): concatenation == decode.
    rng = np.random.default_rng(8)
    for _ in range(100):
        seq = [int(i) for i in rng.integers(0, tokenizer.vocab_size, rng.integers(1, 30))]
        detok = IncrementalDetokenizer(tokenizer)
        assert "".join([detok.add(i) for i in seq] + [detok.flush()]) == tokenizer.decode(seq)


def test_stop_strings_truncate(tokenizer):
    text = "a STx b 停止 STOP after"
    ids = tokenizer.encode(text)
    for stops, expected in ((["STOP"], "a STx b 停止 "), (["停止", "STOP"], "a STx b "),
                            (["x b"], "a ST"), (["nothere"], text)):
        generation = generate(ScriptedEngine(ids + [tokenizer.eos_id], tokenizer.vocab_size),
                              tokenizer, [1], temperature=0, stop=stops, max_new_tokens=100)
        assert "".join(generation) == expected
        assert generation.finish_reason == ("eos" if stops == ["nothere"] else "stop")
    matcher = StopStringMatcher(["<end>"])
    assert matcher.push("ab<e") == ("ab", False)  # "<e" might begin "<end>": held back
    assert matcher.push("x") == ("<ex", False)
    assert matcher.push("<en") == ("", False)
    assert matcher.push("d> tail") == ("", True)


def test_generate_seed_and_greedy_on_random_model(tiny_config, tokenizer):
    config, params, weights = _setup(tiny_config.replace(vocab_size=tokenizer.vocab_size))
    engine = Engine(weights)
    prompt = tokenizer.encode("你好, world", add_bos=True)

    def run(**options):
        generation = generate(engine, tokenizer, prompt, max_new_tokens=12,
                              stop_token_ids=(), **options)
        text = "".join(generation)
        assert text == generation.text == tokenizer.decode(generation.token_ids)
        return generation.token_ids

    a = run(temperature=1.0, top_p=0.9, seed=11)
    assert run(temperature=1.0, top_p=0.9, seed=11) == a
    assert run(temperature=1.0, top_p=0.9, seed=12) != a
    greedy, seq = run(temperature=0), list(prompt)
    for _ in range(12):  # by hand: argmax of the JAX model on the growing sequence
        seq.append(int(np.argmax(_jax_logits(config, params, np.asarray([seq]))[0, -1])))
    assert greedy == seq[len(prompt):]


# ---- quantization ------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(64, 96), (96, 17), (256, 300)])
def test_quantization_round_trip_within_closed_form_bound(shape):
    rng = np.random.default_rng(9)
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 2.0, shape[1])).astype(np.float32)
    w[:, 0] = 0.0  # an all-zero column
    w[:32, 1] = 0.37  # a constant group
    w[:, 2] += 5.0  # a skewed column (asymmetric int4 helps)
    for quantize, bytes_per_weight in ((quantize_int8, 1.0), (quantize_int4, 0.5)):
        q = quantize(w)
        err = np.abs(q.dequantize() - w)
        bound = np.broadcast_to(q.max_error(), w.shape)
        assert (err <= bound * (1 + 1e-6) + 1e-7).all(), quantize.__name__
        assert q.nbytes < w.nbytes * bytes_per_weight * 1.2
        if quantize is quantize_int4:
            assert q.packed.dtype == np.uint8 and q.packed.size == w.size // 2
        for rows in (1, 5, 20):  # decode and prefill paths of the quantized matmul
            x = rng.standard_normal((rows, shape[0])).astype(np.float32)
            ref = x @ q.dequantize()
            np.testing.assert_allclose(q.matmul(x), ref, atol=1e-5 * np.abs(ref).max())
        cols = np.array([3, 0, 7])
        np.testing.assert_allclose(q.columns(cols), q.dequantize()[:, cols], rtol=1e-6)


def test_float16_to_float32_conversion_is_exact_for_every_float16(monkeypatch):
    """int4 scales / minima are float16; the matmul converts them with integer bit operations
    (quantize._f16_to_f32). Every finite float16 (subnormals, signed zeros included) must
    come out equal to numpy's cast, on strided input too, and so must the fallback used when
    subnormals are flushed to zero."""
    from geb_jax.infer import quantize
    every = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    every = every[np.isfinite(every)]
    assert every.size >= quantize.F16_BITS_MIN_SIZE  # the bit operations are used
    for fallback in (False, True):
        if fallback:
            monkeypatch.setattr(quantize, "_F16_SUBNORMAL", np.float32(0.0))
        out = quantize._f16_to_f32(every, np.empty(every.shape, np.float32))
        assert np.array_equal(out, every.astype(np.float32))
        assert np.array_equal(np.signbit(out), np.signbit(every))
        strided = every[:63488].reshape(-1, 64).T  # (64, 992), transposed
        out = quantize._f16_to_f32(strided, np.empty(strided.shape, np.float32))
        assert np.array_equal(out, strided.astype(np.float32))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_matmul_equals_float64_on_the_dequantized_matrix(mode):
    """Both matmul paths (decode: <= DECODE_ROWS rows, scales applied after the group
    matmuls; prefill: dequantized blocks) against float64 on the dequantized matrix, to a
    float32 rounding bound (1e-6 of sum |x| |w|), on a matrix spanning several column blocks
    and an `out` buffer that is a column slice."""
    from geb_jax.infer import quantize
    rng = np.random.default_rng(12)
    w = rng.standard_normal((256, 3000)).astype(np.float32) * 0.1
    w[:, 5] += 3.0  # a skewed column
    q = quantize_int8(w) if mode == "int8" else quantize_int4(w)
    assert quantize._block_cols(256, 3000) < 3000  # several blocks
    dense = q.dequantize().astype(np.float64)
    for rows in (1, 3, quantize.DECODE_ROWS, quantize.DECODE_ROWS + 1, 20):
        x = rng.standard_normal((rows, 256)).astype(np.float32)
        buf = np.full((rows, 3010), np.nan, np.float32)
        got = q.matmul(x, out=buf[:, 5:3005])
        assert np.shares_memory(got, buf)
        bound = 1e-6 * (np.abs(x).astype(np.float64) @ np.abs(dense))
        assert (np.abs(got - x.astype(np.float64) @ dense) <= bound).all(), rows
        assert np.isnan(buf[:, :5]).all() and np.isnan(buf[:, 3005:]).all()


@pytest.mark.parametrize("tied", [False, True])
def test_quantized_model_logits_close_to_float32(tiny_config, tied):
    config = tiny_config.replace(vocab_size=256, d_model=64, head_dim=16, d_ff=128,
                                 tie_embeddings=tied)
    params = _random_params(config)  # training init (std 0.02)
    weights = Weights.from_params(params, dataclasses.asdict(config))
    tokens = np.random.default_rng(10).integers(0, config.vocab_size, (2, 40))
    ref = Engine(weights).prefill(tokens, all_logits=True)
    limits = {"int8": 0.02, "int4": 0.15}
    for mode in ("int8", "int4"):
        for embeddings in (False, True):
            q = quantize_weights(weights, mode, quantize_embeddings=embeddings)
            logits = Engine(q).prefill(tokens, all_logits=True)
            rel = np.linalg.norm(logits - ref) / np.linalg.norm(ref)
            print(f"tied={tied} {mode} embeddings={embeddings}: relative logit error {rel:.4f}, max abs "
                  f"diff {np.abs(logits - ref).max():.4f} (logits up to {np.abs(ref).max():.2f})"
                  f", {q.nbytes / weights.nbytes:.2f}x the float32 bytes")
            assert rel < limits[mode]
            # The engine's quantized matmuls equal float32 on the dequantized weights.
            dq = Weights.from_named_tensors(q.to_named_tensors(), dataclasses.asdict(config))
            np.testing.assert_allclose(Engine(dq).prefill(tokens, all_logits=True), logits,
                                       atol=1e-4, rtol=0)
            step = Engine(q)
            step.prefill(tokens[:, :30])
            np.testing.assert_allclose(step.decode_step(tokens[:, 30]), logits[:, 30],
                                       atol=1e-4, rtol=0)


# ---- model files, CLI, no jax at run time ------------------------------------------------

@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tokenizer):
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=64, n_layers=2, n_heads=4,
                         n_kv_heads=2, head_dim=16, d_ff=128, max_seq_len=128, init_std=0.2)
    params = _random_params(config, seed=1)
    path = str(tmp_path_factory.mktemp("models") / "tiny")
    save_npz_model(path, params, config, tokenizer.path)
    return path, config, params


def test_save_and_load_npz_model(saved_model, tokenizer, tmp_path):
    path, config, params = saved_model
    assert sorted(os.listdir(path)) == ["config.json", "tokenizer.model", "weights.npz"]
    assert json.load(open(os.path.join(path, "config.json")))["d_model"] == 64
    weights, tok = load_model(path)
    assert tok.vocab_size == tokenizer.vocab_size
    tokens = np.arange(10)[None]
    np.testing.assert_array_equal(
        Engine(weights).prefill(tokens, all_logits=True),
        Engine(Weights.from_params(params, config)).prefill(tokens, all_logits=True))
    assert load_model(path, quantize="int4")[0].quantization == "int4"
    with pytest.raises(ModelFileError, match="already exists"):
        save_npz_model(path, params, config, tokenizer.path)
    with pytest.raises(ModelFileError, match="not found"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(ModelFileError, match="onnx"):
        load_model(str(tmp_path / "model.onnx"))
    with pytest.raises(WeightsError, match="layers/attn/q"):
        save_npz_model(str(tmp_path / "bad"), params, config.replace(n_heads=2, n_kv_heads=2),
                       tokenizer.path)
    assert not os.path.exists(tmp_path / "bad")


_NO_JAX = ("import sys, runpy\n"
           "for name in ('jax', 'jaxlib', 'flax', 'torch', 'tensorflow'):\n"
           "    sys.modules[name] = None  # any import of them now raises ImportError\n")


def _run(code: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "-c", code], input=stdin, capture_output=True,
                          text=True, encoding="utf-8", cwd=REPO_ROOT, env=env, timeout=120)


def test_infer_imports_and_runs_without_jax():
    code = _NO_JAX + textwrap.dedent("""
        import numpy as np
        import geb_jax.infer
        from geb_jax.infer import Engine, quantize_weights
        from geb_jax.infer.bench import PRESETS, random_weights
        from geb_jax.infer.config import InferConfig
        import geb_jax.infer.__main__, geb_jax.data.chat
        w = random_weights(InferConfig.from_dict(PRESETS["tiny"]))
        for mode in (None, "int8", "int4"):
            e = Engine(quantize_weights(w, mode, quantize_embeddings=True))
            e.prefill([[1, 2, 3], [4, 5]])
            assert e.decode_step([6, 7]).shape == (2, 512)
        assert all(sys.modules[m] is None for m in ("jax", "flax", "torch"))
        print("ok")
    """)
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_cli_generate_and_chat_end_to_end(saved_model, tokenizer):
    path, config, params = saved_model
    argv = ["generate", "--model", path, "--prompt", "你好, world", "--max-tokens", "16",
            "--temperature", "0", "--threads", "1"]
    result = _run(_NO_JAX + f"sys.argv = ['geb_jax.infer'] + {argv!r}\n"
                  "runpy.run_module('geb_jax.infer', run_name='__main__')")
    assert result.returncode == 0, result.stderr
    # Same text as the library's greedy generation (the CLI adds bos and a final newline).
    weights, _ = load_model(path)
    expected = generate(Engine(weights), tokenizer, tokenizer.encode("你好, world", add_bos=True),
                        temperature=0, max_new_tokens=16)
    expected_text = "".join(expected)
    assert expected_text and result.stdout == expected_text + "\n"

    chat = ["chat", "--model", path, "--max-tokens", "8", "--seed", "0", "--quantize", "int4",
            "--system", "Be brief.", "--verbose"]
    result = _run(_NO_JAX + f"sys.argv = ['geb_jax.infer'] + {chat!r}\n"
                  "runpy.run_module('geb_jax.infer', run_name='__main__')",
                  stdin="hi\nhow are you?\n/reset\n再见\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("user> ") == 5  # one prompt per input line
    assert result.stderr.count("tokens/s") == 3
    assert len(result.stdout.splitlines()) >= 3

    bad = ["generate", "--model", path, "--prompt", "x", "--top-p", "1.5"]
    result = _run(_NO_JAX + f"sys.argv = ['geb_jax.infer'] + {bad!r}\n"
                  "runpy.run_module('geb_jax.infer', run_name='__main__')")
    assert result.returncode != 0 and "top_p" in result.stderr


def test_cli_generate_stops_at_the_end_of_the_context(saved_model, tokenizer):
    """The README's line (default --max-tokens 256) on a context shorter than prompt + 256:
    generation fills the context and stops with a note, as llama.cpp does, instead of failing."""
    path, _, _ = saved_model
    prompt_ids = tokenizer.encode("你好", add_bos=True)
    max_len = len(prompt_ids) + 9
    argv = ["generate", "--model", path, "--prompt", "你好", "--temperature", "0",
            "--max-len", str(max_len), "--verbose"]
    result = _run(_NO_JAX + f"sys.argv = ['geb_jax.infer'] + {argv!r}\n"
                  "runpy.run_module('geb_jax.infer', run_name='__main__')")
    assert result.returncode == 0, result.stderr
    weights, _ = load_model(path)
    expected = generate(Engine(weights, max_len=max_len), tokenizer, prompt_ids, temperature=0,
                        max_new_tokens=9, stop_token_ids=())
    text = "".join(expected)
    assert len(expected.token_ids) == 9 and result.stdout == text + "\n"
    assert f"stopped at the end of the context: {max_len} positions" in result.stderr
    full = ["generate", "--model", path, "--prompt", "你好", "--max-len", str(len(prompt_ids))]
    result = _run(_NO_JAX + f"sys.argv = ['geb_jax.infer'] + {full!r}\n"
                  "runpy.run_module('geb_jax.infer', run_name='__main__')")
    assert result.returncode == 2 and result.stderr.startswith("error: the prompt")
