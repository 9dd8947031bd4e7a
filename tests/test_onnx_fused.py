"""The fused ONNX decoder graph (geb_jax/export/onnx_fused.py) against the plain one
(geb_jax/export/onnx_export.py), both run by onnxruntime's CPU provider, and the numpy engine
reading the fused file (geb_jax/infer/onnx_file.py).

Random tiny models (d 64, 2 layers, init_std 0.2 as tests/test_onnx.py: logits span several
units, so 1e-4 means something). The fused graph pads a batch on the right
(GroupQueryAttention's convention); the plain graph is run both ways.
"""
import dataclasses
import functools
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from geb_jax.data.tokenizer import builtin_tokenizer
from geb_jax.export.onnx_export import export_onnx, ort_feed, ort_graph, ort_session
from geb_jax.export.onnx_graph import OnnxExportError, build_onnx_model
from geb_jax.export.onnx_fused import build_fused_model, graph_ops
from geb_jax.infer import Engine, load_model
from geb_jax.infer.onnx_file import read_onnx_info, read_onnx_weights
from geb_jax.infer.weights import Weights
from geb_jax.model import ModelConfig

from tests.conftest import REPO_ROOT
from tests.test_infer import _random_params

TOL = 1e-4  # float32 and accuracy_level 0: summation order only (measured <= 2e-5)
VOCAB = 384  # the built-in tokenizer's smallest size
BASE = ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                   head_dim=16, d_ff=128, max_seq_len=64, init_std=0.2)
VARIANTS = {"gqa-untied-pre": {},
            "mqa-tied-post": {"tie_embeddings": True, "norm_position": "post", "n_kv_heads": 1}}
MEASURED = {}  # max abs differences, printed at the end with -s


def _record(name, value):
    MEASURED[name] = max(MEASURED.get(name, 0.0), float(value))
    return value


@pytest.fixture(scope="module")
def tokenizer():
    return builtin_tokenizer(VOCAB)


@functools.lru_cache(maxsize=None)
def _params(variant):
    config = BASE.replace(**VARIANTS[variant])
    return config, _random_params(config, seed=len(variant))


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    """(variant, graph, quantize, quantize_embedding) -> path, exported (and verified) once."""
    folder = tmp_path_factory.mktemp("fused")
    cache = {}

    def get(variant, graph, quantize=None, quantize_embedding=True):
        key = (variant, graph, quantize, quantize_embedding)
        if key not in cache:
            config, params = _params(variant)
            name = "-".join(str(k) for k in key) + ".onnx"
            cache[key] = export_onnx(params, config, tokenizer.path, str(folder / name),
                                     quantize=quantize, accuracy_level=0, graph=graph,
                                     quantize_embedding=quantize_embedding)
        return cache[key]
    return get


class _Runner:
    """An onnxruntime session and the feed for its graph."""

    def __init__(self, path_or_model, config):
        self.config = config
        if isinstance(path_or_model, str):
            self.session = ort_session(path_or_model)
        else:
            import onnxruntime as ort
            self.session = ort.InferenceSession(path_or_model.SerializeToString(),
                                                providers=["CPUExecutionProvider"])
        self.graph = ort_graph(self.session)
        self.names = [o.name for o in self.session.get_outputs()]

    def __call__(self, ids, mask=None, past=None):
        feed = ort_feed(self.config, ids, attention_mask=mask, past=past, graph=self.graph)
        out = dict(zip(self.names, self.session.run(None, feed)))
        return out["logits"], {k: v for k, v in out.items() if k.startswith("present.")}


def _tokens(shape, seed):
    return np.random.default_rng(seed).integers(4, VOCAB, size=shape)


def _pad(rows, side):
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros_like(ids)
    for b, row in enumerate(rows):
        cols = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[b, cols], mask[b, cols] = row, 1
    return ids, mask


def _incremental(run, prompt, steps):
    """Prefill `prompt` (B, T), then each (B, S) block of `steps` with the KV cache; the
    logits of every step concatenated (B, T + sum S, V)."""
    logits, past = run(prompt)
    pieces = [logits]
    for block in steps:
        logits, past = run(block, past=past)
        pieces.append(logits)
    return np.concatenate(pieces, axis=1)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_float32_fused_equals_plain_prefill_and_decode(files, variant):
    config, _ = _params(variant)
    plain = _Runner(files(variant, "plain"), config)
    fused = _Runner(files(variant, "fused"), config)
    assert (plain.graph, fused.graph) == ("plain", "fused")
    prompt = _tokens((1, 7), 1)
    steps = [_tokens((1, 1), 10 + i) for i in range(4)] + [_tokens((1, 3), 20)]
    got, expected = _incremental(fused, prompt, steps), _incremental(plain, prompt, steps)
    assert np.abs(expected).max() > 1.0  # logits large enough for the tolerance to matter
    assert _record("float32_batch1_fused_vs_plain", np.abs(got - expected).max()) < TOL
    # the whole sequence at once agrees too (the cache changes nothing)
    full, _ = fused(np.concatenate([prompt] + steps, axis=1))
    assert _record("float32_fused_incremental_vs_full", np.abs(got - full).max()) < TOL


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_float32_batch2_right_padded_fused_equals_plain_both_sides(files, variant):
    """Rows of 9 and 4 tokens: the fused graph padded on the right, the plain graph on the
    right and on the left, and each row alone; then single-token decodes (the mask gains a
    column of ones each step) and a 2-token append to both rows."""
    config, _ = _params(variant)
    plain = _Runner(files(variant, "plain"), config)
    fused = _Runner(files(variant, "fused"), config)
    rows = [list(_tokens(9, 2)), list(_tokens(4, 3))]
    runs = {}
    for name, run, side in (("fused", fused, "right"), ("plain_right", plain, "right"),
                            ("plain_left", plain, "left")):
        ids, mask = _pad(rows, side)
        logits, past = run(ids, mask)
        real = [logits[b, :len(r)] if side == "right" else logits[b, 9 - len(r):]
                for b, r in enumerate(rows)]
        outs = []
        for step in range(4):
            width = 2 if step == 3 else 1
            new = _tokens((2, width), 30 + step)
            mask = np.concatenate([mask, np.ones((2, width), np.int64)], axis=1)
            logits, past = run(new, mask, past)
            outs.append(logits)
        runs[name] = (real, np.concatenate(outs, axis=1))
    history = [row + list(np.concatenate([_tokens((2, 2 if s == 3 else 1), 30 + s)[b]
                                          for s in range(4)])) for b, row in enumerate(rows)]
    for b, row in enumerate(history):
        alone, _ = plain(np.array([row]))
        n = len(rows[b])
        for name, (real, decoded) in runs.items():
            diff = max(np.abs(real[b] - alone[0, :n]).max(),
                       np.abs(decoded[b] - alone[0, n:]).max())
            assert _record(f"float32_batch2_{name}_vs_alone", diff) < TOL, (name, b)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_fused_equals_plain_quantized_at_accuracy_level_0(files, mode):
    """Same MatMulNBits blocks (packing q/k/v and gate/up side by side quantizes each column
    as before), float32 compute: summation order only. quantize_embedding=False keeps the
    table float32 as the plain graph does."""
    variant = "gqa-untied-pre"
    config, _ = _params(variant)
    plain = _Runner(files(variant, "plain", mode), config)
    fused = _Runner(files(variant, "fused", mode, False), config)
    prompt = _tokens((2, 6), 4)
    steps = [_tokens((2, 1), 40 + i) for i in range(3)] + [_tokens((2, 2), 44)]
    diff = np.abs(_incremental(fused, prompt, steps) - _incremental(plain, prompt, steps))
    assert _record(f"{mode}_level0_fused_vs_plain", diff.max()) < TOL


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_engine_reads_the_fused_file(files, variant, mode):
    """The numpy engine on the fused file's weights: float32 bit-identical to the plain
    file's; quantized with a float table, equal to the plain quantized file's; with the
    table quantized (GatherBlockQuantized, a tied head sharing its blocks), within one
    quantization step of the original table, and equal to onnxruntime on the file."""
    config, params = _params(variant)
    ids = _tokens((2, 8), 5)

    def named(path):
        return read_onnx_weights(path)[0].to_named_tensors()

    float_plain = named(files(variant, "plain"))
    for key in [(variant, "fused"), (variant, "fused", mode, False)]:
        reference = float_plain if len(key) == 2 else named(files(variant, "plain", mode))
        got = named(files(*key))
        assert got.keys() == reference.keys()
        for name, value in reference.items():
            assert np.array_equal(got[name], value), (key, name)
    path = files(variant, "fused", mode)
    weights, info = read_onnx_weights(path)
    assert info.graph == "fused" and info.quantization == mode
    model = onnx.load(path, load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GatherBlockQuantized") == 1 and "Gather" in ops  # (the lengths' Gather)
    table = params["embedding"]
    scales = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer
              if t.name.endswith("gather_scales")}
    gather = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"][0]
    attrs = {a.name: a.i for a in gather.attribute}
    assert attrs["bits"] == 8 and len(gather.input) == 3  # 8-bit at int4 too; no zero points
    step = np.repeat(np.abs(scales["model.embed_tokens.weight_gather_scales"][..., 0]),
                     attrs["block_size"], axis=1)
    error = np.abs(weights.embedding - table)
    # symmetric blocks map the block's largest |w| to -128, so a +|w| of the other sign
    # clips at 127: up to one step (measured 0.96)
    assert (error <= step + 1e-7).all() and error.max() > 0
    engine = Engine(weights).prefill(ids, all_logits=True)
    logits, _ = _Runner(path, config)(ids)
    assert _record(f"{mode}_qtable_ort_vs_engine", np.abs(logits - engine).max()) < TOL
    if config.tie_embeddings:  # the head reads the same uint8 blocks as the lookup
        head = [n for n in model.graph.node if n.name == "/lm_head/MatMulNBits"][0]
        gather = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"][0]
        assert head.input[1] == gather.input[0]


def _reference_symmetric_blocks(w_kn: np.ndarray, bits: int, block: int) -> np.ndarray:
    """llama.cpp's q4_0 rule (quantize_row_q4_0_ref), for any bits, in float64: per block of
    `block` rows, scale = (the value of largest |w|) / -2^(bits-1), code =
    clip(floor(w / scale + 2^(bits-1) + 0.5), 0, 2^bits - 1), w ~ (code - 2^(bits-1)) * scale.
    Returns the dequantized (K, N) matrix and the scales (N, blocks)."""
    k, n = w_kn.shape
    blocks = w_kn.astype(np.float64).T.reshape(n, k // block, block)
    largest = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)
    half = 2 ** (bits - 1)
    scale = largest / -half
    code = np.clip(np.floor(blocks / scale + half + 0.5), 0, 2 * half - 1)
    return ((code - half) * scale).reshape(n, k).T, scale[..., 0]


@pytest.mark.parametrize("bits,block", [(4, 32), (4, 128), (8, 32), (8, 64)])
def test_quantized_blocks_follow_llama_cpp_symmetric_rule(bits, block):
    """The exporter's MatMulNBits blocks are q4_0-style symmetric blocks (float32 scales, no
    zero points), read back by the numpy engine's reader: the same weights as the float64
    rule, int4 exactly, int8 but for rounding ties of float32 w / scale (measured 1 element
    in 12,288 off by one step)."""
    from geb_jax.export.onnx_graph import quantize_nbits
    from geb_jax.infer.onnx_file import dequantize_matmul_nbits
    k, n = 256, 48
    w = (np.random.default_rng(bits + block).standard_t(4, (k, n)) * 0.05).astype(np.float32)
    packed, scales = quantize_nbits(w, bits, block)
    got = dequantize_matmul_nbits(packed, scales, None, k, n, bits, block)
    expected, expected_scales = _reference_symmetric_blocks(w, bits, block)
    np.testing.assert_allclose(scales, expected_scales, rtol=1e-6)
    step = np.repeat(np.abs(expected_scales).T, block, axis=0)  # (K, N)
    off = np.abs(got - expected) > 1e-4 * step  # float32 products: ~1e-5 of a step at 8 bits
    assert off.mean() <= (0 if bits == 4 else 1e-3), off.sum()
    assert (np.abs(got - expected) <= step * 1.0001).all()


def test_int4_export_layout_and_the_float_table_option(tokenizer, tmp_path):
    """int4 by default: symmetric 4-bit layers in blocks of 128, cut to 64 where K = 64 (no
    padded rows), an 8-bit head that shares the 8-bit table's blocks; quantize_embedding=False
    keeps the table float32 and gives the tied head its own 8-bit copy, which the numpy
    engine reads as Weights.lm_head. Both files: the engine equals onnxruntime."""
    config, params = _params("mqa-tied-post")
    ids = _tokens((1, 8), 11)
    table = params["embedding"]
    for quantize_embedding in (True, False):
        path = export_onnx(params, config, tokenizer.path,
                           str(tmp_path / f"int4-{quantize_embedding}.onnx"), quantize="int4",
                           accuracy_level=0, graph="fused",
                           quantize_embedding=quantize_embedding)
        model = onnx.load(path, load_external_data=False)
        nbits = {n.name: (n, {a.name: a.i for a in n.attribute}) for n in model.graph.node
                 if n.op_type == "MatMulNBits"}
        head, head_attrs = nbits.pop("/lm_head/MatMulNBits")
        assert (head_attrs["bits"], head_attrs["block_size"]) == (8, 64)
        assert {(a["K"], a["bits"], a["block_size"], len(n.input))
                for n, a in nbits.values()} == {(64, 4, 64, 3), (128, 4, 128, 3)}  # down: F = 128
        assert read_onnx_info(path).metadata["geb_jax.block_size"] == "128"
        weights, _ = read_onnx_weights(path)
        ops = [n.op_type for n in model.graph.node]
        if quantize_embedding:
            gather = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"][0]
            assert head.input[1] == gather.input[0] == "model.embed_tokens.weight_Q8"
        else:
            assert "GatherBlockQuantized" not in ops and "FusedMatMul" not in ops
            assert head.input[1] == "lm_head.MatMul.weight_Q8"
            assert np.array_equal(weights.embedding, table)
            scales = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
            step = np.repeat(np.abs(scales["lm_head.MatMul.weight_scales"]), 64, axis=1)
            error = np.abs(weights.lm_head.T - table)
            assert (error <= step + 1e-7).all() and error.max() > 0
        logits, _ = _Runner(path, config)(ids)
        assert _record(f"int4_table_{quantize_embedding}_ort_vs_engine", np.abs(
            logits - Engine(weights).prefill(ids, all_logits=True)).max()) < TOL


def test_external_data_fused_file_reads_and_runs(tokenizer, tmp_path):
    """Every initializer in the .data file (tied int4: the shared 8-bit blocks too)."""
    config, params = _params("mqa-tied-post")
    path = export_onnx(params, config, tokenizer.path, str(tmp_path / "ext.onnx"),
                       quantize="int4", accuracy_level=0, graph="fused",
                       external_data_threshold=0, quantize_embedding=True)
    model = onnx.load(path, load_external_data=False)
    external = {t.name for t in model.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL}
    assert {"model.embed_tokens.weight_Q8", "model.layers.1.self_attn.qkv_proj.MatMul.weight_Q4",
            "model.layers.1.mlp.gate_up_proj.MatMul.weight_Q4"} <= external
    weights, _ = load_model(path)
    ids = _tokens((1, 6), 9)
    logits, _ = _Runner(path, config)(ids)
    assert np.abs(logits - Engine(weights).prefill(ids, all_logits=True)).max() < TOL


def _greedy(run, prompt, n):
    """n greedy tokens per row after `prompt` rows (padded as the runner's graph needs)."""
    side = "right" if run.graph == "fused" else "left"
    ids, mask = _pad(prompt, side)
    logits, past = run(ids, mask)
    last = [len(r) - 1 if side == "right" else ids.shape[1] - 1 for r in prompt]
    token = np.array([[int(np.argmax(logits[b, last[b]]))] for b in range(len(prompt))])
    out = [token]
    for _ in range(n - 1):
        mask = np.concatenate([mask, np.ones((len(prompt), 1), np.int64)], axis=1)
        logits, past = run(token, mask, past)
        token = np.argmax(logits[:, -1], axis=-1)[:, None]
        out.append(token)
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("mode", [None, "int4"])
def test_greedy_generation_tokens_equal(files, mode):
    variant = "gqa-untied-pre"
    config, _ = _params(variant)
    plain = _Runner(files(variant, "plain", mode), config)
    fused = _Runner(files(variant, "fused", mode, False), config)
    prompts = [list(_tokens(6, 6)), list(_tokens(3, 7))]
    expected = _greedy(plain, prompts, 16)
    assert len(set(expected[0].tolist())) > 1  # not a constant stream
    np.testing.assert_array_equal(_greedy(fused, prompts, 16), expected)
    np.testing.assert_array_equal(_greedy(fused, prompts[:1], 16), expected[:1])


def test_graph_design_ops_and_interface():
    """Per layer: 11 nodes in the fused graph (pre-norm) against the plain graph's ~60, the
    same inputs and outputs; opset 21 builds and agrees too."""
    config, params = _params("gqa-untied-pre")
    weights = Weights.from_params(params, dataclasses.asdict(config))
    plain, fused = build_onnx_model(weights), build_fused_model(weights)
    ops_plain, ops_fused = graph_ops(plain), graph_ops(fused)
    assert ops_fused["layer"] == {"SimplifiedLayerNormalization": 1, "MatMul": 4,
                                  "GroupQueryAttention": 1,
                                  "SkipSimplifiedLayerNormalization": 1, "Split": 1,
                                  "Sigmoid": 1, "Mul": 2}  # layers > 0: two SkipSimplified...
    MEASURED.update({"nodes_per_layer_plain": sum(ops_plain["layer"].values()),
                     "nodes_per_layer_fused": sum(ops_fused["layer"].values()),
                     "nodes_total_plain": len(plain.graph.node),
                     "nodes_total_fused": len(fused.graph.node)})
    assert sum(ops_plain["layer"].values()) > 4 * sum(ops_fused["layer"].values())

    def interface(model):
        return ([(v.name, v.type.tensor_type.elem_type) for v in model.graph.input],
                [(v.name, v.type.tensor_type.elem_type) for v in model.graph.output])
    assert interface(fused) == interface(plain)
    # onnxruntime registers SimplifiedLayerNormalization in the ONNX domain (where the
    # builder's models use it too); onnx's own checker knows no such op there
    with pytest.raises(onnx.checker.ValidationError, match="SimplifiedLayerNormalization"):
        onnx.checker.check_model(fused)
    quantized = build_fused_model(weights, quantize="int4", block_size=64, accuracy_level=4)
    nbits = [n for n in quantized.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4 * config.n_layers + 1  # qkv, o, gate_up, down per layer (+ head)
    assert all({a.name: a.i for a in n.attribute}["block_size"] == 64 for n in nbits)
    ids = _tokens((1, 5), 8)
    at21 = _Runner(build_fused_model(weights, opset=21), config)(ids)[0]
    assert np.abs(at21 - _Runner(plain, config)(ids)[0]).max() < TOL


def test_feed_refuses_left_padding_for_the_fused_graph(files):
    config, _ = _params("gqa-untied-pre")
    ids, mask = _pad([[5, 6, 7], [8]], "left")
    with pytest.raises(OnnxExportError, match="padded on the right"):
        ort_feed(config, ids, attention_mask=mask, graph="fused")
    ort_feed(config, ids, attention_mask=mask)  # the plain graph takes it
    assert read_onnx_info(files("gqa-untied-pre", "fused")).graph == "fused"
    assert read_onnx_info(files("gqa-untied-pre", "plain")).graph == "plain"
    assert "geb_jax.onnx_graph" not in read_onnx_info(files("gqa-untied-pre", "plain")).metadata
    with pytest.raises(OnnxExportError, match="graph='other'"):
        export_onnx({}, BASE, "unused", "/nonexistent/x.onnx", graph="other")


CLI_OVERRIDES = {"train.steps": 2, "optimizer.total_steps": 2, "optimizer.warmup_steps": 1,
                 "eval.every": 100, "eval.batches": 1, "model.d_model": 64,
                 "model.n_layers": 2, "model.n_heads": 2, "model.n_kv_heads": 1,
                 "model.d_ff": 128}


def test_cli_export_of_the_fused_graph_in_a_fresh_process(tmp_path):
    """A 2-step run, then `--config.mode=export --config.export.onnx_graph=fused` in a new
    process: fused float32 and int4 (blocks of 64) files that onnxruntime runs, the numpy
    engine reads, and the generate CLI serves."""
    from geb_jax.config_loader import apply_overrides, load_config
    from geb_jax.train.stages import run_stages
    spec = os.path.join(REPO_ROOT, "configs", "tiny.py:smoke")
    run_stages(apply_overrides(load_config(spec), dict(CLI_OVERRIDES, workdir=str(tmp_path))))
    flags = [f"--config.{k}={v}" for k, v in CLI_OVERRIDES.items()]
    result = subprocess.run(
        [sys.executable, "-m", "geb_jax.main", "--config", spec, f"--config.workdir={tmp_path}",
         "--config.mode=export", "--config.export.formats=onnx",
         "--config.export.onnx_quantize=none,int4", "--config.export.onnx_graph=fused",
         "--config.export.onnx_block_size=64"] + flags,
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    ids = np.array([[1, 17, 230, 99, 4, 350, 12, 77]])
    for name in ("model.onnx", "model-int4.onnx"):
        path = str(tmp_path / "export" / "onnx" / name)
        weights, _ = load_model(path)
        run = _Runner(path, weights.config)
        assert run.graph == "fused"
        nodes = onnx.load(path, load_external_data=False).graph.node
        assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= \
            {n.op_type for n in nodes}
        assert all(a.i == 64 for n in nodes for a in n.attribute if a.name == "block_size")
        engine = Engine(weights).prefill(ids, all_logits=True)
        # int4 at the default accuracy_level 4 also rounds activations to int8 blocks
        tolerance = TOL if name == "model.onnx" else 0.1 * np.abs(engine).max()
        assert _record(f"cli_{name}_ort_vs_engine", np.abs(run(ids)[0] - engine).max()) \
            < tolerance
    result = subprocess.run(
        [sys.executable, "-m", "geb_jax.infer", "generate", "--model",
         str(tmp_path / "export" / "onnx" / "model.onnx"), "--prompt", "The sea",
         "--max-tokens", "5", "--temperature", "0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()


@pytest.fixture(scope="module", autouse=True)
def _report_measurements():
    """After the module, prints what its tests measured (pytest -s shows it). Not a test: each
    value is asserted where it is measured (this was test_zz_report_measurements, which
    asserted nothing)."""
    yield
    if MEASURED:
        print("\nfused ONNX measurements:",
              {k: f"{v:.3g}" for k, v in sorted(MEASURED.items())})


@pytest.mark.parametrize("graph", ["plain", "fused"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_to_keep_computes_the_head_on_the_last_positions(files, graph, variant):
    """logits_to_keep = n returns the last n positions' logits of the full run (0: all), the
    head's MatMul / Gemm running on n rows only; the bound decoder's prefill uses 1."""
    from geb_jax.infer.onnx_decoder import OnnxDecoder
    config, _ = _params(variant)
    session = ort_session(files(variant, graph, "int4"))
    ids = _tokens((2, 7), 21)
    full = session.run(["logits"], ort_feed(config, ids, graph=graph))[0]
    assert full.shape == (2, 7, VOCAB)
    for n in (1, 3):
        kept = session.run(["logits"], ort_feed(config, ids, graph=graph, logits_to_keep=n))[0]
        assert kept.shape == (2, n, VOCAB)
        assert _record(f"logits_to_keep_{graph}", np.abs(kept - full[:, -n:]).max()) < TOL
    if graph == "fused":
        decoder = OnnxDecoder(session, config, batch=2)
        np.testing.assert_allclose(decoder.prefill(ids), full[:, -1], atol=TOL)
        np.testing.assert_allclose(decoder.prefill(ids, all_logits=True), full, atol=TOL)
