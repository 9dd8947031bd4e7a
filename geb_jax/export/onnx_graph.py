"""geb_jax parameters -> one ONNX decoder graph for prefill and decode, with a KV cache (the
"plain" graph of standard ops), and the pieces every geb_jax graph builder shares (the fused
graph, geb_jax/export/onnx_fused.py, uses them too): node/initializer collection, streaming of
initializers to an external-data file, MatMulNBits quantization, the graph's interface.

Why hand-built with onnx.helper (not torch.onnx): the graph is exactly our block (float32
RMSNorm, rotate-half RoPE from precomputed float32 tables, GQA without repeated KV weights,
SwiGLU, pre/post norm, tied/untied head), small, and free of tracing artefacts.

Interface (the names optimum and onnxruntime-genai use for Llama decoders):
  inputs   input_ids [B, T] int64, attention_mask [B, P+T] int64 (0 = padding, left padding
           allowed), position_ids [B, T] int64, past_key_values.{i}.key / .value [B, K, P, H]
           float32 (P = 0 for a prefill)
           logits_to_keep [1] int64: n > 0 computes the head for the last n positions only,
           0 for all T (format 2; ort_feed feeds 0)
  outputs  logits [B, T or n, V] float32, present.{i}.key / .value [B, K, P+T, H]
A token at cache slot s attends to slots <= s whose attention_mask is 1. Masked scores are set
to float32's lowest value (not -inf), so a padding row that sees nothing gets finite
garbage instead of NaN, which would otherwise leak into real rows through 0 * NaN.

Read `build_onnx_model` first; geb_jax/export/onnx_export.py writes the file (metadata, atomic
write, the onnxruntime check against the numpy engine). Shapes: B T S D N K G H F V as in
model/config.py, P past length, G = N / K.

Memory: every initializer of >= 1 KiB can be streamed into the .data file as soon as it is made
(`stream_to=`), so building holds the caller's parameters plus about one tensor, not the ~4.7
copies that protobuf costs (the initializer list, make_graph's copy, make_model's, the save).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
from typing import Iterator, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import geb_jax
from geb_jax.infer import onnx_file as fmt
from geb_jax.infer.config import InferConfig
from geb_jax.infer.engine import rope_tables
from geb_jax.infer.weights import Weights

DEFAULT_OPSET = 17  # widely supported; the ops used here exist unchanged from 17 to 21
SUPPORTED_OPSETS = range(17, 22)
EXTERNAL_MIN_BYTES = 1024  # smaller initializers (shapes, axes, scalars) stay in the .onnx
EXTERNAL_ALIGN = 4096  # page-aligned offsets, as onnx.save aligns, so onnxruntime can mmap them
QUANT_BITS = {"int8": 8, "int4": 4}
# MatMulNBits accuracy_level: 0 dequantizes the weights to float32 and multiplies in float32
# (exact to the dequantized weights, slow for 8 bits); 4 quantizes each activation block to
# int8 and multiplies in int8 (llama.cpp's scheme: q8_0 activations); 4-5x faster for 4 bits
# and ~40x for 8 bits at batch 1 on 2 AVX2 cores (experiments/probe_matmulnbits.py).
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
DEFAULT_ACCURACY_LEVEL = 4
# Rows of K per MatMulNBits block (one float32 scale each), by bits, chosen by measurement
# (docs/benchmarks.md, "int4 format"): int4 blocks of 128 decode GEB-1.3B ~1.3x faster than
# blocks of 32 (onnxruntime's int8-compute kernel spends per block, not per byte) and lose
# less held-out perplexity on SmolLM2-135M than llama.cpp's q4_0 once the head is 8-bit;
# int8 keeps 32 (128 cost +1.2 % perplexity against +0.4 %).
DEFAULT_BLOCK_SIZES = {8: 32, 4: 128}
# The lm head (and a quantized embedding table, which a tied head shares) of every quantized
# export is 8-bit: at int4 the head carried most of the perplexity loss (SmolLM2-135M, 16
# held-out documents: +38.6 % with an int4 head, +28.0 % with an int8 one).
HEAD_BITS = 8


class OnnxExportError(ValueError):
    """An export request that cannot be met; the message names the argument and the fix."""


# ---- graph building ----------------------------------------------------------------------

class ExternalDataWriter:
    """Writes initializers of >= EXTERNAL_MIN_BYTES to one external-data file as they come and
    returns a TensorProto that only refers to them (onnx's convention: data_location EXTERNAL,
    external_data location / offset / length), so no weight is ever copied into protobuf."""

    def __init__(self, path: str):
        self.location = os.path.basename(path)
        self._file = open(path, "wb")  # pylint: disable=consider-using-with

    def tensor(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        array = np.ascontiguousarray(array)
        if array.nbytes < EXTERNAL_MIN_BYTES:
            return numpy_helper.from_array(array, name)
        offset = -(-self._file.tell() // EXTERNAL_ALIGN) * EXTERNAL_ALIGN
        self._file.seek(offset)
        self._file.write(memoryview(array).cast("B"))
        tensor = TensorProto(name=name, dims=array.shape, data_location=TensorProto.EXTERNAL,
                             data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        for key, value in (("location", self.location), ("offset", offset),
                           ("length", array.nbytes)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        return tensor

    def close(self) -> None:
        self._file.close()


class Graph:
    """Collects nodes and initializers; op() names outputs after the node's scope."""

    def __init__(self, opset: int, writer: ExternalDataWriter | None = None):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._writer = writer
        self._names: collections.Counter = collections.Counter()
        self._consts: dict[tuple, str] = {}

    def weight(self, name: str, array: np.ndarray) -> str:
        if self._writer is not None:
            self.initializers.append(self._writer.tensor(name, array))
        else:  # inline: the graph is small enough for one protobuf
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, values, dtype=np.int64) -> str:
        """A small constant (shapes, axes, scalars), shared by every node that uses it."""
        array = np.asarray(values, dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(f"const/{len(self._consts)}", array)
        return self._consts[key]

    def op(self, op_type: str, inputs, scope: str, outputs: int = 1, domain: str = "",
           **attrs):
        base = f"{scope}/{op_type}"
        self._names[base] += 1
        name = base if self._names[base] == 1 else f"{base}_{self._names[base] - 1}"
        outs = [f"{name}/output_{j}" for j in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name,
                                           domain=domain or None, **attrs))
        return outs[0] if outputs == 1 else outs

    def unsqueeze(self, x: str, axes, scope: str) -> str:
        return self.op("Unsqueeze", [x, self.const(axes)], scope)

    def reduce_mean_last(self, x: str, scope: str) -> str:
        if self.opset >= 18:  # axes became an input in opset 18
            return self.op("ReduceMean", [x, self.const([-1])], scope, keepdims=1)
        return self.op("ReduceMean", [x], scope, axes=[-1], keepdims=1)


@dataclasses.dataclass(frozen=True)
class Quant:
    bits: int | None  # None: float32 MatMul
    block_size: int
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL  # MatMulNBits compute type (see above)

    def block_for(self, k: int) -> int:
        """The block size of a (K, N) weight: the largest power of two <= block_size that
        divides K (no padded rows; SmolLM2-135M's K = 576 takes 64 at int4), at least 16."""
        block = self.block_size
        while block > 16 and k % block:
            block //= 2
        return block

    def for_head(self, d_model: int) -> "Quant":
        """The lm head's (and a quantized table's) quantization: HEAD_BITS in d_model's
        blocks (block_for), which GatherBlockQuantized can read as a table's blocks too."""
        if self.bits is None:
            return self
        return Quant(HEAD_BITS, self.block_for(d_model), self.accuracy_level)


def quantize_nbits(w_kn: np.ndarray, bits: int, block_size: int):
    """onnxruntime's own MatMulNBits quantizer kernel (the one MatMulNBitsQuantizer calls),
    symmetric: (packed codes, scales), no zero points (the default 2^(bits - 1)).

    Each block's largest |w| maps to the lowest code, as llama.cpp's q4_0 / q8_0 do. At int4
    this lost less perplexity than onnxruntime's asymmetric (min/max, uint4 zero point)
    blocks (SmolLM2-135M, blocks of 32: +34.4 % against +38.6 %), and its kernel skips the
    zero points."""
    # pylint: disable=import-outside-toplevel,no-name-in-module
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits
    k, n = w_kn.shape
    blocks = -(-k // block_size)
    w = np.zeros((blocks * block_size, n), np.float32)
    w[:k] = w_kn
    packed = np.zeros((n, blocks, block_size * bits // 8), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    unused_zero_points = np.zeros((n, -(-blocks * bits // 8)), np.uint8)
    kernel = quantize_matmul_8bits if bits == 8 else quantize_matmul_4bits
    kernel(packed, w, scales, unused_zero_points, block_size, n, blocks * block_size, True)
    return packed, scales


def linear(g: Graph, x: str, w_kn: np.ndarray, name: str, quant: Quant, scope: str) -> str:
    """x [..., in] @ W (in, out): a MatMul, or com.microsoft MatMulNBits when quantizing."""
    base = name + fmt.MATMUL_SUFFIX
    if quant.bits is None:
        return g.op("MatMul", [x, g.weight(base, w_kn)], scope)
    k, n = w_kn.shape
    block = quant.block_for(k)
    packed, scales = quantize_nbits(w_kn, quant.bits, block)
    inputs = [x, g.weight(f"{base}_Q{quant.bits}", packed), g.weight(f"{base}_scales", scales)]
    return g.op("MatMulNBits", inputs, scope, domain="com.microsoft", K=k, N=n,
                bits=quant.bits, block_size=block,
                accuracy_level=quant.accuracy_level)


def _rms_norm(g: Graph, x: str, scale_name: str, scale: np.ndarray, eps: float,
              scope: str) -> str:
    """x / sqrt(mean(x^2) + eps) * scale over D, in float32 (as model/layers.py)."""
    ms = g.reduce_mean_last(g.op("Mul", [x, x], scope), scope)
    rms = g.op("Sqrt", [g.op("Add", [ms, g.const(eps, np.float32)], scope)], scope)
    return g.op("Mul", [g.op("Div", [x, rms], scope), g.weight(scale_name, scale)], scope)


def _rope(g: Graph, x: str, cos: str, sin: str, half: int, scope: str) -> str:
    """Rotate halves of x [B, heads, T, H]: (x1 cos - x2 sin, x2 cos + x1 sin)."""
    axis = g.const([-1])
    x1 = g.op("Slice", [x, g.const([0]), g.const([half]), axis], scope)
    x2 = g.op("Slice", [x, g.const([half]), g.const([2 * half]), axis], scope)
    first = g.op("Sub", [g.op("Mul", [x1, cos], scope), g.op("Mul", [x2, sin], scope)], scope)
    second = g.op("Add", [g.op("Mul", [x2, cos], scope), g.op("Mul", [x1, sin], scope)], scope)
    return g.op("Concat", [first, second], scope, axis=-1)


def _attention(g: Graph, x: str, i: int, weights: Weights, named: Mapping[str, np.ndarray],
               cos: str, sin: str, allowed: str, quant: Quant, scope: str) -> str:
    """GQA over past + new keys; appends present.{i}.key / .value to the graph outputs."""
    c = weights.config
    n, k, h = c.n_heads, c.n_kv_heads, c.head_dim
    p = f"model.layers.{i}.self_attn."

    def proj(which: str, heads: int) -> str:  # [B, T, D] -> [B, heads, T, H]
        y = linear(g, x, named[p + f"{which}_proj.weight"].T, p + f"{which}_proj", quant,
                    f"{scope}/{which}_proj")
        y = g.op("Reshape", [y, g.const([0, 0, heads, h])], scope)  # (B, T, heads, H)
        return g.op("Transpose", [y], scope, perm=[0, 2, 1, 3])  # (B, heads, T, H)

    q = _rope(g, proj("q", n), cos, sin, h // 2, f"{scope}/rope_q")
    new_k = _rope(g, proj("k", k), cos, sin, h // 2, f"{scope}/rope_k")
    new_v = proj("v", k)
    present_k = g.op("Concat", [f"past_key_values.{i}.key", new_k], scope, axis=2)
    present_v = g.op("Concat", [f"past_key_values.{i}.value", new_v], scope, axis=2)
    g.nodes.append(helper.make_node("Identity", [present_k], [f"present.{i}.key"],
                                    name=f"{scope}/present_key"))
    g.nodes.append(helper.make_node("Identity", [present_v], [f"present.{i}.value"],
                                    name=f"{scope}/present_value"))
    # Query heads n = kv * G + g share KV head kv: (B, N, T, H) -> (B, K, G, T, H), and the
    # cache gets a broadcast G axis, so no KV head is ever copied.
    q = g.op("Mul", [q, g.const(1.0 / np.sqrt(h), np.float32)], scope)
    q5 = g.op("Reshape", [q, g.const([0, k, n // k, -1, h])], scope)  # (B, K, G, T, H)
    k_t = g.op("Transpose", [present_k], scope, perm=[0, 1, 3, 2])  # (B, K, H, S)
    scores = g.op("MatMul", [q5, g.unsqueeze(k_t, [2], scope)], scope)  # (B, K, G, T, S)
    lowest = g.const(np.finfo(np.float32).min, np.float32)
    scores = g.op("Where", [allowed, scores, lowest], scope)
    probs = g.op("Softmax", [scores], scope, axis=-1)
    ctx = g.op("MatMul", [probs, g.unsqueeze(present_v, [2], scope)], scope)  # (B,K,G,T,H)
    ctx = g.op("Transpose", [ctx], scope, perm=[0, 3, 1, 2, 4])  # (B, T, K, G, H)
    ctx = g.op("Reshape", [ctx, g.const([0, 0, n * h])], scope)  # (B, T, N*H)
    return linear(g, ctx, named[p + "o_proj.weight"].T, p + "o_proj", quant, f"{scope}/o_proj")


def _mlp(g: Graph, x: str, i: int, named, quant: Quant, scope: str) -> str:
    """down(silu(gate(x)) * up(x))."""
    p = f"model.layers.{i}.mlp."
    gate = linear(g, x, named[p + "gate_proj.weight"].T, p + "gate_proj", quant,
                   f"{scope}/gate_proj")
    up = linear(g, x, named[p + "up_proj.weight"].T, p + "up_proj", quant, f"{scope}/up_proj")
    act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate], scope)], scope), up], scope)
    return linear(g, act, named[p + "down_proj.weight"].T, p + "down_proj", quant,
                   f"{scope}/down_proj")


def _attention_mask(g: Graph) -> str:
    """allowed [B, 1, 1, T, S] bool: key slot s <= query slot P + t, and attention_mask[b, s]."""
    scope = "/model/attn_mask"
    past = g.op("Shape", ["past_key_values.0.key"], scope, start=2, end=3)  # [P]
    new = g.op("Shape", ["input_ids"], scope, start=1, end=2)  # [T]
    total = g.op("Squeeze", [g.op("Add", [past, new], scope), g.const([0])], scope)  # S
    past = g.op("Squeeze", [past, g.const([0])], scope)
    one, zero = g.const(1), g.const(0)
    q_slots = g.op("Range", [past, total, one], scope)  # (T,)
    k_slots = g.op("Range", [zero, total, one], scope)  # (S,)
    causal = g.op("LessOrEqual", [g.unsqueeze(k_slots, [0], scope),
                                  g.unsqueeze(q_slots, [1], scope)], scope)  # (T, S)
    keys = g.op("Cast", ["attention_mask"], scope, to=TensorProto.BOOL)  # (B, S)
    return g.op("And", [g.unsqueeze(causal, [0, 1, 2], scope),
                        g.unsqueeze(keys, [1, 2, 3], scope)], scope)


def build_onnx_model(weights: Weights, *, quantize: str | None = None,
                     block_size: int | None = None,
                     accuracy_level: int = DEFAULT_ACCURACY_LEVEL, opset: int = DEFAULT_OPSET,
                     stream_to: str | None = None) -> onnx.ModelProto:
    """The decoder graph of float32 `weights` (no metadata); see the module docstring.

    weights: anything with `.config` (InferConfig) and `.to_named_tensors()` (a mapping of HF
    names to [out, in] float32 arrays, each read once). stream_to: an external-data file path;
    each initializer of >= EXTERNAL_MIN_BYTES is written there as soon as it is made and the
    model only refers to it (by base name: save the .onnx in the same folder).
    """
    with graph_setup(quantize, block_size, accuracy_level, opset, stream_to) as (quant, g):
        return _build(weights, quant, g)


@contextlib.contextmanager
def graph_setup(quantize: str | None, block_size: int | None, accuracy_level: int, opset: int,
                stream_to: str | None) -> Iterator[tuple["Quant", "Graph"]]:
    """The checked arguments every graph builder starts from: (Quant, an empty Graph that
    streams initializers to `stream_to` when given); the data file is closed on exit.
    block_size None (or 0): DEFAULT_BLOCK_SIZES for the bits."""
    bits = check_quantize(quantize, block_size, accuracy_level)
    block_size = resolved_block_size(bits, block_size)
    if opset not in SUPPORTED_OPSETS:
        raise OnnxExportError(f"opset={opset} is not supported; choose one of "
                              f"{SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}.")
    writer = None if stream_to is None else ExternalDataWriter(stream_to)
    try:
        yield Quant(bits, block_size, accuracy_level), Graph(opset, writer)
    finally:
        if writer is not None:
            writer.close()


def _build(weights: Weights, quant: Quant, g: Graph) -> onnx.ModelProto:
    """Embedding, RoPE tables, mask, blocks, final norm and head, in that order."""
    c = weights.config
    named = weights.to_named_tensors()  # HF names, torch [out, in] layouts
    x = g.op("Gather", [g.weight("model.embed_tokens.weight", named["model.embed_tokens.weight"]),
                        "input_ids"], "/model/embed_tokens", axis=0)  # (B, T, D)
    cos_table, sin_table = rope_tables(c.max_seq_len, c.head_dim, c.rope_theta)  # (max, H/2)
    rope = "/model/rope"
    cos = g.unsqueeze(g.op("Gather", [g.weight("rope.cos_cache", cos_table), "position_ids"],
                           rope, axis=0), [1], rope)  # (B, 1, T, H/2)
    sin = g.unsqueeze(g.op("Gather", [g.weight("rope.sin_cache", sin_table), "position_ids"],
                           rope, axis=0), [1], rope)
    allowed = _attention_mask(g)
    for i in range(c.n_layers):
        scope, p = f"/model/layers.{i}", f"model.layers.{i}."
        attn_norm, mlp_norm = p + "input_layernorm.weight", p + "post_attention_layernorm.weight"
        if c.norm_position == "pre":
            h = _rms_norm(g, x, attn_norm, named[attn_norm], c.norm_eps, scope + "/attn_norm")
            x = g.op("Add", [x, _attention(g, h, i, weights, named, cos, sin, allowed, quant,
                                           scope + "/attn")], scope)
            h = _rms_norm(g, x, mlp_norm, named[mlp_norm], c.norm_eps, scope + "/mlp_norm")
            x = g.op("Add", [x, _mlp(g, h, i, named, quant, scope + "/mlp")], scope)
        else:  # post-norm: norm(x + f(x))
            a = _attention(g, x, i, weights, named, cos, sin, allowed, quant, scope + "/attn")
            x = _rms_norm(g, g.op("Add", [x, a], scope), attn_norm, named[attn_norm],
                          c.norm_eps, scope + "/attn_norm")
            m = _mlp(g, x, i, named, quant, scope + "/mlp")
            x = _rms_norm(g, g.op("Add", [x, m], scope), mlp_norm, named[mlp_norm],
                          c.norm_eps, scope + "/mlp_norm")
    x = last_positions(g, _rms_norm(g, x, "model.norm.weight", named["model.norm.weight"],
                                    c.norm_eps, "/model/norm"))
    if c.tie_embeddings:  # Gemm(transB) reads the (V, D) table in place: no transposed copy
        flat = g.op("Reshape", [x, g.const([-1, c.d_model])], "/lm_head")
        logits = g.op("Gemm", [flat, "model.embed_tokens.weight"], "/lm_head", transB=1)
        out_shape = g.op("Concat", [g.op("Shape", [x], "/lm_head", end=2),
                                    g.const([c.vocab_size])], "/lm_head", axis=0)
        logits = g.op("Reshape", [logits, out_shape], "/lm_head")
    else:  # 8-bit when quantized (HEAD_BITS): at V x D it is ~10-25% of the bytes per token
        logits = linear(g, x, named["lm_head.weight"].T, "lm_head", quant.for_head(c.d_model),
                        "/lm_head")
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="/lm_head/logits"))
    return make_model(g, c)


LOGITS_TO_KEEP = fmt.LOGITS_TO_KEEP


def last_positions(g: Graph, x: str) -> str:
    """x [B, T, D] -> its last logits_to_keep positions (all T when it is 0): a prompt's
    next-token logits need the head on one position, not T. On GEB-1.3B a 512-token prefill
    spends ~10 % of its multiply-adds in the V x D head, SmolLM2-135M ~20 %. (transformers'
    `logits_to_keep` argument.) A required input: one that is also an initializer (the ONNX
    way to give an input a default) makes onnxruntime warn at every session start."""
    start = g.op("Neg", [LOGITS_TO_KEEP], "/model/logits_to_keep")  # -0 = 0: every position
    return g.op("Slice", [x, start, g.const([np.iinfo(np.int64).max]), g.const([1])],
                "/model/logits_to_keep")


def make_model(g: Graph, c: InferConfig) -> onnx.ModelProto:
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    kv = ["batch_size", c.n_kv_heads, None, c.head_dim]
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", i64,
                                            ["batch_size", "total_sequence_length"]),
              helper.make_tensor_value_info("position_ids", i64,
                                            ["batch_size", "sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", "logits_length",
                                                             c.vocab_size])]
    for i in range(c.n_layers):
        for which in ("key", "value"):
            kv[2] = "past_sequence_length"
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{which}", f32, kv))
            kv[2] = "total_sequence_length"
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{which}", f32, kv))
    inputs.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, i64, [1]))
    graph = helper.make_graph(g.nodes, "geb_jax_decoder", inputs, outputs)
    opsets = [helper.make_opsetid("", g.opset)]
    if any(node.domain == "com.microsoft" for node in g.nodes):
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name=fmt.PRODUCER,
                              producer_version=geb_jax.__version__,
                              ir_version=helper.find_min_ir_version_for(opsets, True))
    model.doc_string = "geb_jax Llama-family decoder with KV cache (prefill and decode)"
    for j, tensor in enumerate(g.initializers):  # append copies: drop each original at once
        model.graph.initializer.append(tensor)
        g.initializers[j] = None
    return model


def resolved_block_size(bits: int | None, block_size: int | None) -> int:
    """The MatMulNBits block size an export uses: the one asked for, else the default for
    its bits (0 for a float32 export, which has no blocks)."""
    return block_size or DEFAULT_BLOCK_SIZES.get(bits, 0)


def check_quantize(quantize: str | None, block_size: int | None,
                   accuracy_level: int = DEFAULT_ACCURACY_LEVEL) -> int | None:
    if accuracy_level not in ACCURACY_LEVELS:
        raise OnnxExportError(f"accuracy_level={accuracy_level!r} is not one of "
                              f"{ACCURACY_LEVELS} (0: float32 compute, 4: int8 compute)")
    if quantize in (None, "none", "float32"):
        return None
    if quantize not in QUANT_BITS:
        raise OnnxExportError(f"quantize={quantize!r} is not one of None, 'int8', 'int4'.")
    if block_size and (block_size < 16 or block_size & (block_size - 1)):
        raise OnnxExportError(f"block_size={block_size} must be a power of two >= 16 "
                              f"(com.microsoft MatMulNBits), or 0 for the default "
                              f"({DEFAULT_BLOCK_SIZES[8]} at int8, {DEFAULT_BLOCK_SIZES[4]} "
                              f"at int4).")
    return QUANT_BITS[quantize]
