"""Every attention impl against the xla reference, on CPU (model/attention.py).

The Pallas kernels run in Pallas' interpreter (interpret=True): the GPU (Triton) kernel at T=64,
splash (TPU) at T=128, its smallest tile. Inputs are packed rows: several documents of unequal
length, trailing padding (segment id 0), a single-document row; GQA (4 query heads on 2 KV heads)
and MQA; forward and the gradients for q, k and v; and the whole model through the GPU kernel.
cuDNN cannot run here, so its arguments are checked instead: the layout against a numpy
reference and against jax's own conversion to cuDNN's flat offsets, and the traced call.

Tolerances. float32: 1e-5 absolute (measured worst 2.4e-6, gradients of magnitude ~6).
bfloat16: the error against the float32 reference on the same bf16 inputs must stay under 1% of
the largest magnitude of that output. Measured over 3 seeds: worst 0.63% (dK of the GPU kernel;
the xla path's own bf16 error is at most 0.3%); 1% is ~2.5 bfloat16 ulps (2^-8) of that value.
"""
from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geb_jax.model import attention
from geb_jax.model.attention import (attend, attention_mask, cudnn_packed_layout,
                                     resolve_attention_impl)
from geb_jax.errors import ConfigError
from geb_jax.model.config import ATTENTION_IMPLS, ModelConfig

KERNEL_T = {"pallas_gpu": 64, "pallas_tpu": 128}
BF16_BOUND = 1e-2  # of the output's largest magnitude (module docstring)


def packed_segment_ids(t: int) -> np.ndarray:
    """(3, T): 3 documents + padding; one document; 4 documents, the first two short."""
    u = t // 64
    rows = [[(1, 13 * u), (2, 29 * u), (3, 15 * u), (0, 7 * u)], [(1, 64 * u)],
            [(1, 5 * u), (2, 5 * u), (3, 40 * u), (4, 14 * u)]]
    return np.stack([np.repeat([s for s, _ in row], [n for _, n in row]) for row in rows]
                    ).astype(np.int32)


def positions_from_segments(segment_ids_bt: np.ndarray) -> np.ndarray:
    """Positions restarting at 0 in every document, as the data pipeline writes them."""
    pos = np.zeros_like(segment_ids_bt)
    for t in range(1, segment_ids_bt.shape[1]):
        same = segment_ids_bt[:, t] == segment_ids_bt[:, t - 1]
        pos[:, t] = np.where(same, pos[:, t - 1] + 1, 0)
    return pos


def qkv_inputs(t, n, k, h=16, seed=0):
    rng = np.random.default_rng(seed)
    q, kk, v, ct = (rng.normal(size=(3, t, m, h)).astype(np.float32) for m in (n, k, k, n))
    return q, kk, v, ct, packed_segment_ids(t)


def forward_and_grads(impl, q, k, v, ct, segment_ids, dtype):
    """[out, dq, dk, dv] in float32, the gradients of sum(out * ct)."""
    interpret = impl.startswith("pallas")
    fn = lambda q, k, v: attend(q, k, v, jnp.asarray(segment_ids), impl, interpret=interpret)

    @jax.jit
    def run(q, k, v, ct):
        out, vjp = jax.vjp(fn, q, k, v)
        return [out, *vjp(ct)]

    return [np.asarray(x, np.float32)
            for x in run(*(jnp.asarray(x, dtype) for x in (q, k, v, ct)))]


def numpy_attention(q, k, v, segment_ids):
    """float64: softmax(q k / sqrt(H)) v over keys s <= t of the same document; GQA groups."""
    b, t, n, h = q.shape
    g = n // k.shape[2]
    out = np.zeros((b, t, n, h))
    for bi, ti, ni in itertools.product(range(b), range(t), range(n)):
        keys = [s for s in range(ti + 1) if segment_ids[bi, s] == segment_ids[bi, ti]]
        logits = np.array([q[bi, ti, ni] @ k[bi, s, ni // g] for s in keys], np.float64)
        p = np.exp(logits / np.sqrt(h) - (logits / np.sqrt(h)).max())
        out[bi, ti, ni] = (p / p.sum()) @ v[bi, keys, ni // g]
    return out


# ----------------------------------------------------------------------------- the reference
def test_xla_reference_matches_float64_numpy():
    q, k, v, _, seg = qkv_inputs(t=16, n=4, k=2)
    seg = packed_segment_ids(64)[:, ::4]  # the same packing at T=16
    out = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(seg), "xla")
    np.testing.assert_allclose(np.asarray(out), numpy_attention(q, k, v, seg), atol=1e-5)


# ----------------------------------------------------------------------------- Pallas kernels
@pytest.mark.parametrize("impl,n,k", [("pallas_gpu", 4, 2), ("pallas_tpu", 4, 2),
                                      ("pallas_tpu", 4, 1)])
def test_pallas_kernel_equals_xla_float32(impl, n, k):
    q, kk, v, ct, seg = qkv_inputs(KERNEL_T[impl], n, k)
    ref = forward_and_grads("xla", q, kk, v, ct, seg, jnp.float32)
    got = forward_and_grads(impl, q, kk, v, ct, seg, jnp.float32)
    for name, r, g in zip(("out", "dq", "dk", "dv"), ref, got):
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=0, err_msg=f"{impl} {name}")


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_pallas_kernel_bfloat16_error_is_within_bound(impl):
    q, kk, v, ct, seg = qkv_inputs(KERNEL_T[impl], 4, 2)
    bf16 = [np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32) for x in (q, kk, v, ct)]
    ref = forward_and_grads("xla", *bf16, seg, jnp.float32)  # exact math on the bf16 inputs
    got = forward_and_grads(impl, *bf16, seg, jnp.bfloat16)
    for name, r, g in zip(("out", "dq", "dk", "dv"), ref, got):
        err = np.abs(g - r).max() / np.abs(r).max()
        assert err < BF16_BOUND, f"{impl} {name}: bf16 error {err:.2%} of max |{name}|"


def test_whole_model_with_pallas_kernel_equals_xla(tiny_config, monkeypatch):
    """Logits and parameter gradients of the scanned model on packed rows (positions restarting
    per document), attention_impl="pallas_gpu" in the interpreter (layers.attend patched to
    interpret) vs "xla". Parameter gradients sum over all B * T tokens, so they are compared
    relative to their largest magnitude (measured worst: 3e-7 of it)."""
    from geb_jax.model import layers
    from geb_jax.model.transformer import init_params, make_apply
    monkeypatch.setattr(layers, "attend", lambda q, k, v, seg, impl, **_: attend(
        q, k, v, seg, impl, interpret=impl.startswith("pallas")))
    seg = packed_segment_ids(64)
    tokens = np.random.default_rng(2).integers(0, tiny_config.vocab_size, seg.shape)
    args = [jnp.asarray(x, jnp.int32) for x in (tokens, positions_from_segments(seg), seg)]
    params = init_params(tiny_config, jax.random.key(0))

    def logits_and_grads(impl):
        apply = make_apply(tiny_config.replace(attention_impl=impl))

        def loss(p):
            logits = apply(p, *args)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

        return jax.jit(jax.grad(loss, has_aux=True))(params)[::-1]

    ref_logits, ref_grads = logits_and_grads("xla")
    logits, grads = logits_and_grads("pallas_gpu")
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=0)
    for r, g in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(grads)):
        r, g = np.asarray(r), np.asarray(g)
        assert np.abs(g - r).max() <= 1e-5 * np.abs(r).max()


def test_kernel_runs_per_device_under_a_mesh():
    """With a mesh set, the kernel runs inside shard_map (batch/heads per the logical rules)."""
    from geb_jax.parallel.mesh import LOGICAL_AXIS_RULES, MESH_AXES
    q, kk, v, _, seg = qkv_inputs(64, 4, 2)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), MESH_AXES)
    fn = jax.jit(lambda q, k, v, s: attend(q, k, v, s, "pallas_gpu", interpret=True))
    args = [jnp.asarray(x) for x in (q, kk, v, seg)]
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        assert "shard_map" in str(jax.make_jaxpr(fn)(*args))
        out = fn(*args)
    np.testing.assert_allclose(out, attend(*args, "xla"), atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu", "pallas_tpu"])
def test_only_xla_builds_a_dense_mask(impl):
    t = KERNEL_T.get(impl, 64)
    q, kk, v, _, seg = qkv_inputs(t, 4, 2)
    jaxpr = jax.make_jaxpr(lambda *a: attend(*a, impl, interpret=impl != "xla"))(
        q, kk, v, seg).jaxpr
    square = [x.aval.shape for e in jaxpr.eqns for x in e.outvars
              if x.aval.shape[-2:] == (t, t)]
    assert bool(square) == (impl == "xla"), square


# ----------------------------------------------------------------------------- cuDNN arguments
def numpy_packed_layout(segment_ids: np.ndarray, max_segments: int):
    seqlens, offsets, overflow = [], [], []
    for row in segment_ids:
        lengths = [len(list(run)) for _, run in itertools.groupby(row)]
        overflow.append(len(lengths) > max_segments)
        lengths = lengths[:max_segments - 1] + [sum(lengths[max_segments - 1:])]
        lengths = [n for n in lengths if n]
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        pad = max_segments - len(lengths)
        seqlens.append(list(lengths) + [-1] * pad)
        offsets.append(list(starts) + [-1] * (pad + 1))
    return np.array(seqlens), np.array(offsets), np.array(overflow)


LAYOUT_ROWS = np.array([[1, 1, 1, 2, 2, 3, 0, 0],  # 3 documents + padding: 4 runs
                        [1, 1, 1, 1, 1, 1, 1, 1],  # one document
                        [1, 2, 3, 4, 5, 6, 7, 8],  # 8 one-token documents
                        [0, 0, 1, 1, 1, 2, 2, 2]], np.int32)  # leading padding


@pytest.mark.parametrize("max_segments", [2, 4, 8])
def test_cudnn_layout_matches_numpy(max_segments):
    got = cudnn_packed_layout(jnp.asarray(LAYOUT_ROWS), max_segments)
    for name, g, r in zip(("seqlens", "offsets", "overflow"), got,
                          numpy_packed_layout(LAYOUT_ROWS, max_segments)):
        np.testing.assert_array_equal(np.asarray(g), r, err_msg=name)


def test_cudnn_layout_describes_the_reference_mask():
    """jax's own conversion (_fix_seqlen_offsets) of the layout to cuDNN's flat element offsets
    gives documents that tile the batch, each causal inside: exactly attention_mask's pattern."""
    from jax._src.cudnn.fused_attention_stablehlo import _fix_seqlen_offsets
    seg = packed_segment_ids(64)
    b, t, n, h = seg.shape + (4, 16)
    seqlens, offsets, overflow = cudnn_packed_layout(jnp.asarray(seg), 8)
    assert not np.asarray(overflow).any()
    qkv = jnp.zeros((b, t, n, h), jnp.bfloat16)
    flat_len, _, flat_off, _ = (np.asarray(x).ravel()
                                for x in _fix_seqlen_offsets(seqlens, seqlens, offsets, offsets,
                                                             qkv, qkv))
    docs = [(off // (n * h), length) for off, length in zip(flat_off, flat_len) if length > 0]
    assert flat_off[len(docs)] == b * t * n * h  # the end of the last document
    allowed = np.zeros((b * t, b * t), bool)
    for start, length in docs:
        allowed[start:start + length, start:start + length] = np.tril(np.ones((length,) * 2))
    expected = np.zeros_like(allowed)
    for bi, row_mask in enumerate(np.asarray(attention_mask(jnp.asarray(seg)))[:, 0]):
        expected[bi * t:(bi + 1) * t, bi * t:(bi + 1) * t] = row_mask
    np.testing.assert_array_equal(allowed, expected)


def test_installed_jax_scales_kv_offsets_by_query_heads():
    """Why the cudnn path repeats KV heads (jax-ml/jax#39521). If this fails, jax has the fix
    and _cudnn can pass GQA keys unrepeated."""
    from jax._src.cudnn.fused_attention_stablehlo import _fix_seqlen_offsets
    seqlens, offsets, _ = cudnn_packed_layout(jnp.asarray(LAYOUT_ROWS[:1]), 4)
    q, k = jnp.zeros((1, 8, 4, 16), jnp.bfloat16), jnp.zeros((1, 8, 2, 16), jnp.bfloat16)
    _, _, q_off, kv_off = _fix_seqlen_offsets(seqlens, seqlens, offsets, offsets, q, k)
    np.testing.assert_array_equal(kv_off, q_off)  # 4 * 16 per token, not the keys' 2 * 16


def test_cudnn_call_traces_with_the_packed_layout(monkeypatch):
    """The cudnn path's call is well formed: packed (softmax statistics per document slot,
    (B * M, N, T)), causal within documents, KV heads repeated; gradients trace too."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa
    monkeypatch.setattr(cudnn_fa, "check_cudnn_version", lambda: 91000)  # no GPU here
    monkeypatch.setattr(cudnn_fa, "check_is_flash_attention", lambda *a, **k: None)
    b, t, n, k, h = 2, 64, 4, 2, 16
    q, kk = jnp.zeros((b, t, n, h), jnp.bfloat16), jnp.zeros((b, t, k, h), jnp.bfloat16)
    seg = jnp.asarray(packed_segment_ids(t)[:b])
    fn = lambda q, k, v: attention._cudnn(q, k, v, seg, max_segments=5)
    text = str(jax.make_jaxpr(lambda q, k, v: jax.vjp(fn, q, k, v)[1](q))(q, kk, kk))
    assert "MaskType.PADDING_CAUSAL" in text
    assert f"f32[{b * 5},{n},{t}]" in text  # softmax statistics of the packed layout
    assert "dot_product_attention_bwd" in text


def test_cudnn_rows_with_too_many_documents_are_nan(monkeypatch):
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa
    monkeypatch.setattr(cudnn_fa, "dot_product_attention", lambda q, *a, **kw: q)
    q = jnp.ones((4, 8, 2, 8), jnp.bfloat16)
    out = np.asarray(attention._cudnn(q, q, q, jnp.asarray(LAYOUT_ROWS), max_segments=4),
                     np.float32)
    np.testing.assert_array_equal(np.isnan(out).all(axis=(1, 2, 3)), [False, False, True, False])


# ----------------------------------------------------------------------------- choosing
HOPPER, AMPERE = ((9, 0), 90800), ((8, 0), 90800)


@pytest.mark.parametrize("requested,backend,dtype,head_dim,seq_len,gpu,impl,why", [
    ("auto", "cpu", "float32", 64, 256, None, "xla", "no fused"),
    ("auto", "gpu", "bfloat16", 64, 256, HOPPER, "cudnn", ""),
    ("auto", "cuda", "float16", 128, 100, HOPPER, "cudnn", ""),
    ("auto", "gpu", "bfloat16", 64, 256, AMPERE, "pallas_gpu", "sm_80"),
    ("auto", "gpu", "bfloat16", 64, 256, ((9, 0), 90100), "pallas_gpu", "predates"),
    ("auto", "gpu", "float32", 64, 256, HOPPER, "pallas_gpu", "float32"),
    ("auto", "gpu", "bfloat16", 12, 256, HOPPER, "pallas_gpu", "head_dim"),
    ("auto", "gpu", "float32", 64, 100, HOPPER, "xla", "multiple of 16"),
    ("auto", "rocm", "bfloat16", 64, 256, (None, None), "pallas_gpu", "compute capability"),
    ("auto", "tpu", "bfloat16", 128, 512, None, "pallas_tpu", ""),
    ("auto", "tpu", "bfloat16", 128, 200, None, "xla", "multiple"),
    ("xla", "gpu", "bfloat16", 64, 256, HOPPER, "xla", "requested"),
    ("cudnn", "gpu", "bfloat16", 64, 256, HOPPER, "cudnn", "requested"),
    ("pallas_gpu", "gpu", "float32", 64, 256, HOPPER, "pallas_gpu", "requested"),
    ("pallas_tpu", "tpu", "float32", 64, 256, None, "pallas_tpu", "requested"),
])
def test_resolve_attention_impl(requested, backend, dtype, head_dim, seq_len, gpu, impl, why):
    got, reason = resolve_attention_impl(requested, backend, jnp.dtype(dtype), head_dim, seq_len,
                                         gpu=gpu)
    assert got == impl and why in reason, reason


@pytest.mark.parametrize("requested,backend,dtype,seq_len,message", [
    ("cudnn", "cpu", "bfloat16", 256, "does not run on the cpu backend"),
    ("pallas_tpu", "gpu", "bfloat16", 256, "does not run on the gpu backend"),
    ("cudnn", "gpu", "float32", 256, "bfloat16/float16"),
    ("pallas_tpu", "tpu", "bfloat16", 200, "multiples of 128"),
    ("flash", "gpu", "bfloat16", 256, "is not one of"),
])
def test_impl_that_cannot_run_is_a_clear_error(requested, backend, dtype, seq_len, message):
    with pytest.raises(ConfigError, match=message):
        resolve_attention_impl(requested, backend, jnp.dtype(dtype), 64, seq_len, gpu=HOPPER)


def test_config_takes_every_impl_and_names_them_on_a_typo():
    base = dict(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8,
                d_ff=32, max_seq_len=16)
    for impl in ATTENTION_IMPLS:
        ModelConfig(**base, attention_impl=impl)
    with pytest.raises(ConfigError, match="pallas_gpu, pallas_tpu"):
        ModelConfig(**base, attention_impl="flash")


@pytest.mark.parametrize("impl", ["cudnn", "pallas_gpu", "pallas_tpu"])
def test_an_explicit_kernel_does_not_change_initialisation(impl):
    """Parameters are initialised on one token: a kernel that tiles T (or needs a GPU) must not
    be asked to run there; the parameters and their sharding axes equal the XLA model's."""
    from geb_jax.model import init_params, param_logical_axes
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         head_dim=8, d_ff=64, max_seq_len=64, attention_impl=impl)
    reference = config.replace(attention_impl="xla")
    got, want = init_params(config, jax.random.key(0)), init_params(reference, jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert param_logical_axes(config) == param_logical_axes(reference)
