"""geb_jax parameters -> one ONNX decoder graph for prefill and decode, with a KV cache.

Why hand-built with onnx.helper (not torch.onnx): the graph is exactly our block (float32
RMSNorm, rotate-half RoPE from precomputed float32 tables, GQA without repeated KV weights,
SwiGLU, pre/post norm, tied/untied head), small, and free of tracing artefacts.

Interface (the names optimum and onnxruntime-genai use for Llama decoders):
  inputs   input_ids [B, T] int64, attention_mask [B, P+T] int64 (0 = padding, left padding
           allowed), position_ids [B, T] int64, past_key_values.{i}.key / .value [B, K, P, H]
           float32 (P = 0 for a prefill)
  outputs  logits [B, T, V] float32, present.{i}.key / .value [B, K, P+T, H]
A token at cache slot s attends to slots <= s whose attention_mask is 1. Masked scores are set
to float32's lowest value (not -inf), so a padding row that sees nothing gets finite
garbage instead of NaN, which would otherwise leak into real rows through 0 * NaN.

Read `build_onnx_model` first; `export_onnx` adds metadata, writes atomically and checks the
written file with onnxruntime against the numpy engine. File names and metadata keys live in
geb_jax/infer/onnx_file.py (the jax-free reader). Shapes: B T S D N K G H F V as in
model/config.py, P past length, G = N / K.

Memory: export_onnx reads the parameter tree lazily (`_ParamTreeTensors`) and streams every
initializer of >= 1 KiB into the .data file as soon as it is made (`stream_to=`), so building
and saving hold the caller's parameters plus about one tensor, not the ~4.7 copies that
protobuf costs (the initializer list, make_graph's copy, make_model's, the save).
"""
from __future__ import annotations

import base64
import collections
import collections.abc
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_model

import geb_jax
from geb_jax.data import chat
from geb_jax.data.tokenizer_bundle import bundle, unbundle
from geb_jax.data.tokenizer_files import load_tokenizer
from geb_jax.infer import onnx_file as fmt
from geb_jax.infer.config import InferConfig
from geb_jax.infer.engine import Engine, rope_tables
from geb_jax.infer.weights import Weights, WeightsError, param_leaf

DEFAULT_OPSET = 17  # widely supported; the ops used here exist unchanged from 17 to 21
SUPPORTED_OPSETS = range(17, 22)
# Initializer bytes above which weights go to an external .data file: protobuf cannot
# serialise a message over 2 GiB, and the graph, metadata and tokenizer need some room.
EXTERNAL_DATA_THRESHOLD = 2 ** 31 - 2 ** 27
EXTERNAL_MIN_BYTES = 1024  # smaller initializers (shapes, axes, scalars) stay in the .onnx
EXTERNAL_ALIGN = 4096  # page-aligned offsets, as onnx.save aligns, so onnxruntime can mmap them
QUANT_BITS = {"int8": 8, "int4": 4}
# MatMulNBits accuracy_level: 0 dequantizes the weights to float32 and multiplies in float32
# (exact to the dequantized weights, slow for 8 bits); 4 quantizes each activation block to
# int8 and multiplies in int8 (llama.cpp's scheme: q8_0 activations); 4-5x faster for 4 bits
# and ~40x for 8 bits at batch 1 on 2 AVX2 cores (experiments/probe_matmulnbits.py).
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
DEFAULT_ACCURACY_LEVEL = 4
VERIFY_TEXT = "The quick brown fox jumps over the lazy dog."
VERIFY_TOLERANCE = 1e-3  # times max(1, max |logit|): summation-order noise is ~1e-6 of that
# With int8 activations (accuracy_level 4) a float-compute twin is checked to the tolerance
# above (graph and packing); the file itself only to this sanity bound, which catches a kernel
# returning garbage: rounding activations moved logits by 3-10 % of their scale on random test
# models (init std 0.02 to 0.2), which is the scheme's error, not a bug.
VERIFY_INT8_ACTIVATION_TOLERANCE = 0.5
CHAT_TEMPLATE_NAME = "geb_jax-role-tokens-v1"
CHAT_TEMPLATE_DESCRIPTION = (
    "<s> then each message as its role token (<|system|>, <|user|>, <|assistant|>), its text "
    "and <|end|>, with no other glue; a generation prompt ends with <|assistant|> and the "
    "reply ends at <|end|>. geb_jax spells role-token strings typed inside message text with "
    "byte pieces (geb_jax/data/chat.py); a plain Jinja render cannot.")


class OnnxExportError(ValueError):
    """An export request that cannot be met; the message names the argument and the fix."""


# ---- graph building ----------------------------------------------------------------------

class _ExternalDataWriter:
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


class _Graph:
    """Collects nodes and initializers; op() names outputs after the node's scope."""

    def __init__(self, opset: int, writer: _ExternalDataWriter | None = None):
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
class _Quant:
    bits: int | None  # None: float32 MatMul
    block_size: int
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL  # MatMulNBits compute type (see above)


def _quantize_nbits(w_kn: np.ndarray, bits: int, block_size: int):
    """onnxruntime's own MatMulNBits quantizer kernel (the one MatMulNBitsQuantizer calls).

    int8 is symmetric (default zero point 128), int4 asymmetric with uint4 zero points (16
    levels fitted to each block's [min, max]), like the numpy engine's int8 / int4."""
    # pylint: disable=import-outside-toplevel,no-name-in-module
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits
    k, n = w_kn.shape
    blocks = -(-k // block_size)
    w = np.zeros((blocks * block_size, n), np.float32)
    w[:k] = w_kn
    packed = np.zeros((n, blocks, block_size * bits // 8), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zero_points = np.zeros((n, -(-blocks * bits // 8)), np.uint8)
    symmetric = bits == 8
    kernel = quantize_matmul_8bits if bits == 8 else quantize_matmul_4bits
    kernel(packed, w, scales, zero_points, block_size, n, blocks * block_size, symmetric)
    return packed, scales, None if symmetric else zero_points


def _linear(g: _Graph, x: str, w_kn: np.ndarray, name: str, quant: _Quant, scope: str) -> str:
    """x [..., in] @ W (in, out): a MatMul, or com.microsoft MatMulNBits when quantizing."""
    base = name + fmt.MATMUL_SUFFIX
    if quant.bits is None:
        return g.op("MatMul", [x, g.weight(base, w_kn)], scope)
    packed, scales, zero_points = _quantize_nbits(w_kn, quant.bits, quant.block_size)
    inputs = [x, g.weight(f"{base}_Q{quant.bits}", packed), g.weight(f"{base}_scales", scales)]
    if zero_points is not None:
        inputs.append(g.weight(f"{base}_zero_points", zero_points))
    k, n = w_kn.shape
    return g.op("MatMulNBits", inputs, scope, domain="com.microsoft", K=k, N=n,
                bits=quant.bits, block_size=quant.block_size,
                accuracy_level=quant.accuracy_level)


def _rms_norm(g: _Graph, x: str, scale_name: str, scale: np.ndarray, eps: float,
              scope: str) -> str:
    """x / sqrt(mean(x^2) + eps) * scale over D, in float32 (as model/layers.py)."""
    ms = g.reduce_mean_last(g.op("Mul", [x, x], scope), scope)
    rms = g.op("Sqrt", [g.op("Add", [ms, g.const(eps, np.float32)], scope)], scope)
    return g.op("Mul", [g.op("Div", [x, rms], scope), g.weight(scale_name, scale)], scope)


def _rope(g: _Graph, x: str, cos: str, sin: str, half: int, scope: str) -> str:
    """Rotate halves of x [B, heads, T, H]: (x1 cos - x2 sin, x2 cos + x1 sin)."""
    axis = g.const([-1])
    x1 = g.op("Slice", [x, g.const([0]), g.const([half]), axis], scope)
    x2 = g.op("Slice", [x, g.const([half]), g.const([2 * half]), axis], scope)
    first = g.op("Sub", [g.op("Mul", [x1, cos], scope), g.op("Mul", [x2, sin], scope)], scope)
    second = g.op("Add", [g.op("Mul", [x2, cos], scope), g.op("Mul", [x1, sin], scope)], scope)
    return g.op("Concat", [first, second], scope, axis=-1)


def _attention(g: _Graph, x: str, i: int, weights: Weights, named: Mapping[str, np.ndarray],
               cos: str, sin: str, allowed: str, quant: _Quant, scope: str) -> str:
    """GQA over past + new keys; appends present.{i}.key / .value to the graph outputs."""
    c = weights.config
    n, k, h = c.n_heads, c.n_kv_heads, c.head_dim
    p = f"model.layers.{i}.self_attn."

    def proj(which: str, heads: int) -> str:  # [B, T, D] -> [B, heads, T, H]
        y = _linear(g, x, named[p + f"{which}_proj.weight"].T, p + f"{which}_proj", quant,
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
    return _linear(g, ctx, named[p + "o_proj.weight"].T, p + "o_proj", quant, f"{scope}/o_proj")


def _mlp(g: _Graph, x: str, i: int, named, quant: _Quant, scope: str) -> str:
    """down(silu(gate(x)) * up(x))."""
    p = f"model.layers.{i}.mlp."
    gate = _linear(g, x, named[p + "gate_proj.weight"].T, p + "gate_proj", quant,
                   f"{scope}/gate_proj")
    up = _linear(g, x, named[p + "up_proj.weight"].T, p + "up_proj", quant, f"{scope}/up_proj")
    act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate], scope)], scope), up], scope)
    return _linear(g, act, named[p + "down_proj.weight"].T, p + "down_proj", quant,
                   f"{scope}/down_proj")


def _attention_mask(g: _Graph) -> str:
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


def build_onnx_model(weights: Weights, *, quantize: str | None = None, block_size: int = 32,
                     accuracy_level: int = DEFAULT_ACCURACY_LEVEL, opset: int = DEFAULT_OPSET,
                     stream_to: str | None = None) -> onnx.ModelProto:
    """The decoder graph of float32 `weights` (no metadata); see the module docstring.

    weights: anything with `.config` (InferConfig) and `.to_named_tensors()` (a mapping of HF
    names to [out, in] float32 arrays, each read once). stream_to: an external-data file path;
    each initializer of >= EXTERNAL_MIN_BYTES is written there as soon as it is made and the
    model only refers to it (by base name: save the .onnx in the same folder).
    """
    bits = _check_quantize(quantize, block_size, accuracy_level)
    if opset not in SUPPORTED_OPSETS:
        raise OnnxExportError(f"opset={opset} is not supported; choose one of "
                              f"{SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}.")
    quant = _Quant(bits, block_size, accuracy_level)
    writer = None if stream_to is None else _ExternalDataWriter(stream_to)
    try:
        return _build(weights, quant, _Graph(opset, writer))
    finally:
        if writer is not None:
            writer.close()


def _build(weights: Weights, quant: _Quant, g: _Graph) -> onnx.ModelProto:
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
    x = _rms_norm(g, x, "model.norm.weight", named["model.norm.weight"], c.norm_eps,
                  "/model/norm")
    if c.tie_embeddings:  # Gemm(transB) reads the (V, D) table in place: no transposed copy
        flat = g.op("Reshape", [x, g.const([-1, c.d_model])], "/lm_head")
        logits = g.op("Gemm", [flat, "model.embed_tokens.weight"], "/lm_head", transB=1)
        out_shape = g.op("Concat", [g.op("Shape", ["input_ids"], "/lm_head"),
                                    g.const([c.vocab_size])], "/lm_head", axis=0)
        logits = g.op("Reshape", [logits, out_shape], "/lm_head")
    else:  # quantized like the layers: at V x D it is ~10-25% of the bytes read per token
        logits = _linear(g, x, named["lm_head.weight"].T, "lm_head", quant, "/lm_head")
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="/lm_head/logits"))
    return _make_model(g, c)


def _make_model(g: _Graph, c: InferConfig) -> onnx.ModelProto:
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    kv = ["batch_size", c.n_kv_heads, None, c.head_dim]
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", i64,
                                            ["batch_size", "total_sequence_length"]),
              helper.make_tensor_value_info("position_ids", i64,
                                            ["batch_size", "sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", "sequence_length",
                                                             c.vocab_size])]
    for i in range(c.n_layers):
        for which in ("key", "value"):
            kv[2] = "past_sequence_length"
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{which}", f32, kv))
            kv[2] = "total_sequence_length"
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{which}", f32, kv))
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


def _check_quantize(quantize: str | None, block_size: int,
                    accuracy_level: int = DEFAULT_ACCURACY_LEVEL) -> int | None:
    if accuracy_level not in ACCURACY_LEVELS:
        raise OnnxExportError(f"accuracy_level={accuracy_level!r} is not one of "
                              f"{ACCURACY_LEVELS} (0: float32 compute, 4: int8 compute)")
    if quantize in (None, "none", "float32"):
        return None
    if quantize not in QUANT_BITS:
        raise OnnxExportError(f"quantize={quantize!r} is not one of None, 'int8', 'int4'.")
    if block_size < 16 or block_size & (block_size - 1):
        raise OnnxExportError(f"block_size={block_size} must be a power of two >= 16 "
                              f"(com.microsoft MatMulNBits); 32 is the usual choice.")
    return QUANT_BITS[quantize]


# ---- metadata ----------------------------------------------------------------------------

def chat_template_jinja() -> str:
    """The chat template of geb_jax/data/chat.py as a Hugging Face style Jinja template."""
    roles = ", ".join(f"'{role}': '{token}'" for role, token in chat.ROLE_TOKENS.items())
    return ("{% set role_tokens = {" + roles + "} %}{{ bos_token }}"
            "{% for message in messages %}{{ role_tokens[message['role']] }}"
            "{{ message['content'] }}" + chat.END_TOKEN + "{% endfor %}"
            "{% if add_generation_prompt %}" + chat.ROLE_TOKENS["assistant"] + "{% endif %}")


def _config_dict(model_config: Any) -> dict:
    if dataclasses.is_dataclass(model_config) and not isinstance(model_config, type):
        return dataclasses.asdict(model_config)
    if hasattr(model_config, "to_dict"):  # ml_collections.ConfigDict
        return dict(model_config.to_dict())
    if isinstance(model_config, Mapping):
        return dict(model_config)
    raise OnnxExportError(f"model_config must be a ModelConfig, ConfigDict or dict, got "
                          f"{type(model_config).__name__}")


def _set_metadata(model: onnx.ModelProto, config: dict, tokenizer_bytes: bytes,
                  quantize: str | None, block_size: int, accuracy_level: int,
                  chat_template: str | None = None, graph: str = "plain") -> None:
    """geb_jax's metadata; the chat template is the model's own, or ours (trained here)."""
    values = {
        fmt.META_PRODUCER: fmt.PRODUCER,
        fmt.META_FORMAT: fmt.FORMAT_VERSION,
        fmt.META_CONFIG: json.dumps(config, sort_keys=True),
        fmt.META_TOKENIZER: base64.b64encode(tokenizer_bytes).decode("ascii"),
        fmt.META_TOKENIZER_SHA256: hashlib.sha256(tokenizer_bytes).hexdigest(),
        fmt.META_CHAT_TEMPLATE: chat_template or chat_template_jinja(),
        fmt.META_CHAT_NAME: "model" if chat_template else CHAT_TEMPLATE_NAME,
        fmt.META_CHAT_DESCRIPTION: ("the published model's own template" if chat_template
                                    else CHAT_TEMPLATE_DESCRIPTION),
        fmt.META_QUANTIZATION: quantize or "none",
        fmt.META_BLOCK_SIZE: str(block_size),
        fmt.META_ACCURACY_LEVEL: str(accuracy_level),
    }
    if graph != "plain":  # a plain file stays byte-for-byte what it was
        values[fmt.META_GRAPH] = graph
    helper.set_model_props(model, values)


# ---- running and checking ----------------------------------------------------------------

def ort_feed(config: InferConfig, input_ids, attention_mask=None, position_ids=None,
             past: Mapping[str, np.ndarray] | None = None,
             graph: str = "plain") -> dict[str, np.ndarray]:
    """onnxruntime inputs for new tokens (B, T). attention_mask (B, P+T) defaults to ones;
    position_ids default to cumsum(mask) - 1 over the new slots (padding gets 0); past is a
    previous run's present.* outputs by name (empty when None).

    Both graphs take the same inputs. graph="fused" (see `ort_graph`) checks what the fused
    graph's GroupQueryAttention needs: the new tokens' mask columns of each row are ones then
    zeros (a batch is padded on the RIGHT; the plain graph takes either side), and it ignores
    position_ids (each token's position is its cache slot, which these defaults equal)."""
    ids = np.asarray(input_ids, np.int64)
    b, t = ids.shape
    past = dict(past or {})
    p = past["present.0.key"].shape[2] if past else 0
    mask = np.ones((b, p + t), np.int64) if attention_mask is None else np.asarray(
        attention_mask, np.int64)
    if graph not in fmt.GRAPHS:
        raise OnnxExportError(f"graph={graph!r} is not one of {fmt.GRAPHS}")
    if graph == "fused" and attention_mask is not None:
        new = mask[:, p:] != 0
        if (new[:, 1:] > new[:, :-1]).any() or not mask.sum(axis=1).all():
            raise OnnxExportError(
                "the fused ONNX graph (GroupQueryAttention) needs each row's new tokens padded "
                "on the right (mask ones, then zeros) and at least one token per row; this "
                "attention_mask pads on the left. Pad on the right, or use the plain graph.")
    if position_ids is None:
        position_ids = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, p:]
    feed = {"input_ids": ids, "attention_mask": mask,
            "position_ids": np.asarray(position_ids, np.int64)}
    empty = np.zeros((b, config.n_kv_heads, 0, config.head_dim), np.float32)
    for i in range(config.n_layers):
        for which in ("key", "value"):
            feed[f"past_key_values.{i}.{which}"] = past.get(f"present.{i}.{which}", empty)
    return feed


def ort_session(path: str):
    """A CPU onnxruntime session on an exported file (external data found beside it)."""
    import onnxruntime as ort  # pylint: disable=import-outside-toplevel
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def ort_graph(session) -> str:
    """"plain" or "fused": which decoder graph an onnxruntime session runs (its metadata), for
    ort_feed's `graph`."""
    return session.get_modelmeta().custom_metadata_map.get(fmt.META_GRAPH, "plain")


def _verify(path: str, tokenizer) -> float:
    """Last-token logits of a fixed prompt: onnxruntime on the file vs the numpy engine on
    the weights read back from it. Returns the max abs difference; raises past tolerance.

    With int8 activations (MatMulNBits accuracy_level > 0) the file is checked twice: a twin
    at accuracy_level 0 (same weights, float32 compute) must match to summation noise, which
    proves the graph and the packing; the file itself within the int8-activation tolerance."""
    info = fmt.read_onnx_info(path)
    c = info.config
    ids = tokenizer.encode(VERIFY_TEXT, add_bos=True)[:c.max_seq_len]
    weights, _ = fmt.read_onnx_weights(path)
    expected = Engine(weights, max_len=len(ids)).prefill([ids])[0]
    del weights  # one side at a time: two copies of the weights, not three
    scale = max(1.0, float(np.abs(expected).max()))
    exact_twin = _float_compute_twin(path)
    checks = [(exact_twin or path, VERIFY_TOLERANCE)]
    if exact_twin:
        checks.append((path, VERIFY_INT8_ACTIVATION_TOLERANCE))
    try:
        for checked, tolerance in checks:
            session = ort_session(checked)
            names = [o.name for o in session.get_outputs()]
            got = dict(zip(names, session.run(None, ort_feed(c, [ids], graph=info.graph))))[
                "logits"][0, -1]
            del session
            diff = float(np.abs(got - expected).max())
            if not diff <= tolerance * scale:
                what = "at accuracy_level 0 " if checked == exact_twin else ""
                raise OnnxExportError(
                    f"{path}: onnxruntime logits {what}differ from the numpy engine by "
                    f"{diff:.3g} (> {tolerance * scale:.3g}) on a fixed prompt; the export is "
                    f"wrong and was not put in place.")
    finally:
        if exact_twin:
            os.remove(exact_twin)
    return diff


def _float_compute_twin(path: str) -> str | None:
    """A copy of the graph at `path` with every MatMulNBits at accuracy_level 0, beside it
    (sharing its external data file); None when it has no int8-compute MatMulNBits."""
    model = onnx.load(path, load_external_data=False)
    changed = False
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "MatMulNBits" and attr.name == "accuracy_level" and attr.i:
                attr.i, changed = 0, True
    if not changed:
        return None
    twin = os.path.join(os.path.dirname(path), "float-compute-twin.onnx")
    onnx.save_model(model, twin)
    return twin


# ---- export ------------------------------------------------------------------------------

class _ParamTreeTensors(collections.abc.Mapping):
    """Our parameter tree seen as build_onnx_model's `weights`: HF names, [out, in] layouts,
    each tensor a view made when asked for (Weights.from_params would be a second copy of
    the model, and its to_named_tensors a third). Shapes are checked up front, as
    Weights.from_params checks them, with the same WeightsError."""

    def __init__(self, params: Mapping, config: dict):
        c = self.config = InferConfig.from_dict(config)
        d, n, k, h, f, L = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff, c.n_layers
        shapes = {"layers/attn/q": (L, d, n, h), "layers/attn/k": (L, d, k, h),
                  "layers/attn/v": (L, d, k, h), "layers/attn/o": (L, n, h, d),
                  "layers/mlp/gate": (L, d, f), "layers/mlp/up": (L, d, f),
                  "layers/mlp/down": (L, f, d), "layers/attn_norm/scale": (L, d),
                  "layers/mlp_norm/scale": (L, d), "embedding": (c.vocab_size, d),
                  "final_norm/scale": (d,)}
        if not c.tie_embeddings:
            shapes["lm_head"] = (d, c.vocab_size)
        self._leaves = {path: _param(params, path, shape) for path, shape in shapes.items()}
        self._index = self._names()

    def to_named_tensors(self) -> "_ParamTreeTensors":
        return self

    def _names(self) -> dict[str, tuple]:
        """HF name -> (our leaf, layer or None)."""
        names = {"model.embed_tokens.weight": ("embedding", None),
                 "model.norm.weight": ("final_norm/scale", None)}
        if not self.config.tie_embeddings:
            names["lm_head.weight"] = ("lm_head", None)
        for i in range(self.config.n_layers):
            p = f"model.layers.{i}."
            names.update({p + f"self_attn.{x}_proj.weight": (f"layers/attn/{x}", i)
                          for x in "qkvo"})
            names.update({p + f"mlp.{x}_proj.weight": (f"layers/mlp/{x}", i)
                          for x in ("gate", "up", "down")})
            names[p + "input_layernorm.weight"] = ("layers/attn_norm/scale", i)
            names[p + "post_attention_layernorm.weight"] = ("layers/mlp_norm/scale", i)
        return names

    def __getitem__(self, name: str) -> np.ndarray:
        path, i = self._index[name]
        leaf = self._leaves[path] if i is None else self._leaves[path][i]
        if path in ("layers/attn/q", "layers/attn/k", "layers/attn/v"):  # (D, heads, H)
            return leaf.reshape(leaf.shape[0], -1).T  # -> (heads*H, D)
        if path == "layers/attn/o":  # (N, H, D) -> (D, N*H)
            return leaf.reshape(-1, leaf.shape[-1]).T
        if path in ("layers/mlp/gate", "layers/mlp/up", "layers/mlp/down", "lm_head"):
            return leaf.T  # (in, out) -> (out, in)
        return leaf

    def __iter__(self):
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


_param = param_leaf  # one leaf, shape-checked (geb_jax/infer/weights.py)


def export_onnx(params: Mapping, model_config: Any, tokenizer_path: str, out_path: str, *,
                quantize: str | None = None, block_size: int = 32,
                accuracy_level: int = DEFAULT_ACCURACY_LEVEL, opset: int = DEFAULT_OPSET,
                external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
                overwrite: bool = False, verify: bool = True, graph: str = "plain",
                quantize_embedding: bool = True) -> str:
    """Write `out_path` (.onnx), plus `out_path`.data when the weights exceed
    external_data_threshold bytes, and tokenizer.model beside it. Returns out_path.

    params: the model's parameter tree (numpy or jax arrays); model_config: ModelConfig,
    ConfigDict or dict; quantize: None, "int8" or "int4" (every linear, the untied head too,
    as MatMulNBits with `block_size` rows per block; the embedding and a tied head stay
    float32 in the plain graph); accuracy_level: MatMulNBits' compute type (4: int8
    activations, 0: float32). graph: "plain" (this module's standard-op graph) or "fused"
    (geb_jax/export/onnx_fused.py: onnxruntime's GroupQueryAttention and
    SkipSimplifiedLayerNormalization, packed QKV and gate/up; batches padded on the right),
    whose quantized form also quantizes the embedding table (and a tied head) unless
    quantize_embedding=False. Files are written to a temporary folder, checked with
    onnxruntime against the numpy engine (verify=True), then renamed into place, the .onnx
    last.
    """
    out_path = os.path.abspath(os.fspath(out_path))
    if not out_path.endswith(".onnx"):
        raise OnnxExportError(f"out_path {out_path} must end with .onnx")
    _check_quantize(quantize, block_size, accuracy_level)
    if graph not in fmt.GRAPHS:
        raise OnnxExportError(f"graph={graph!r} is not one of {', '.join(fmt.GRAPHS)}")
    config = _config_dict(model_config)
    tensors = _ParamTreeTensors(params, config)
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer.check_matches_model(tensors.config.vocab_size, allow_padding=True)
    tokenizer_bytes = bundle(tokenizer_path)
    folder, name = os.path.split(out_path)
    data_name = name + ".data"
    tokenizer_name = fmt.TOKENIZER_FOLDER if os.path.isdir(tokenizer_path) else fmt.TOKENIZER_FILE
    tokenizer_target = os.path.join(folder, tokenizer_name)
    _check_targets(out_path, tokenizer_target, tokenizer_bytes, overwrite)

    os.makedirs(folder, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=folder)
    try:
        tmp_model, tmp_data = os.path.join(tmp, name), os.path.join(tmp, data_name)
        # Weights go straight to the .data file; only a model under the threshold (which
        # protobuf can hold) is read back to be saved as one self-contained .onnx.
        build = dict(quantize=quantize, block_size=block_size, accuracy_level=accuracy_level,
                     opset=opset, stream_to=tmp_data)
        if graph == "fused":
            from geb_jax.export.onnx_fused import (  # pylint: disable=import-outside-toplevel
                build_fused_model)
            model = build_fused_model(tensors, quantize_embedding=quantize_embedding, **build)
        else:
            model = build_onnx_model(tensors, **build)
        del tensors
        external = _initializer_bytes(model) > external_data_threshold
        if not external:
            load_external_data_for_model(model, tmp)
            os.remove(tmp_data)
        _set_metadata(model, config, tokenizer_bytes, quantize, block_size,
                      accuracy_level if quantize not in (None, "none", "float32") else 0,
                      getattr(tokenizer, "chat_template", None), graph)
        onnx.save_model(model, tmp_model)
        del model
        unbundle(tokenizer_bytes, os.path.join(tmp, tokenizer_name))
        if verify:
            _verify(tmp_model, tokenizer)
        if external:
            os.replace(os.path.join(tmp, data_name), os.path.join(folder, data_name))
        if os.path.isdir(tokenizer_target):
            shutil.rmtree(tokenizer_target)  # a folder is not replaced by os.replace
        os.replace(os.path.join(tmp, tokenizer_name), tokenizer_target)
        os.replace(tmp_model, out_path)
        if not external and os.path.exists(os.path.join(folder, data_name)):
            os.remove(os.path.join(folder, data_name))  # left by a replaced external export
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_path


def _initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializers, inline or external."""
    total = 0
    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            total += int({e.key: e.value for e in tensor.external_data}["length"])
        else:
            total += len(tensor.raw_data)
    return total


def _check_targets(out_path: str, tokenizer_target: str, tokenizer_bytes: bytes,
                   overwrite: bool) -> None:
    if overwrite:
        return
    if os.path.exists(out_path) or os.path.exists(out_path + ".data"):
        raise OnnxExportError(f"{out_path} already exists; pass overwrite=True to replace it")
    if os.path.exists(tokenizer_target):
        if bundle(tokenizer_target) != tokenizer_bytes:
            raise OnnxExportError(
                f"{tokenizer_target} exists with a different tokenizer; export into another "
                f"folder or pass overwrite=True")
