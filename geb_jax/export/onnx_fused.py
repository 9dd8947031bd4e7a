"""The "fused" decoder graph: the same model as onnx_graph's plain graph, composed of
onnxruntime's CPU contrib kernels the way onnxruntime-genai's model builder composes a Llama
(src/python/py/models/builders/base.py: make_layer, make_attention_mask_reformatting_for_gqa).

Per layer (pre-norm):
  SimplifiedLayerNormalization (layer 0) or com.microsoft SkipSimplifiedLayerNormalization
      (the previous layer's MLP output + the residual; its 4th output is the new residual)
  one packed QKV MatMul (D, (N + 2K) H)                     MatMulNBits when quantized
  com.microsoft GroupQueryAttention: packed QKV in, rotary inside (do_rotary=1, half-split
      rotate like ours: rotary_interleaved=0, cos_cache / sin_cache (max_seq_len, H/2)),
      past / present KV in BNSH (B, K, S, H), scale 1/sqrt(H)
  o MatMul
  SkipSimplifiedLayerNormalization (attention output + residual -> mlp input, new residual)
  one packed gate/up MatMul (D, 2F), Split, Sigmoid, Mul, Mul (silu(gate) * up), down MatMul
and after the last layer one SkipSimplifiedLayerNormalization (the final norm). A post-norm
model (norm(x + f(x))) is the same chain with each SkipSimplifiedLayerNormalization's first
output as the new residual and a SimplifiedLayerNormalization for the final norm.

GroupQueryAttention takes the mask as the builder derives it: seqlens_k = ReduceSum(mask) - 1
(int32, per row) and total_sequence_length = Shape(mask)[1] (int32 scalar); and, beyond the
builder, query_seqlens = the sum of the mask's last T columns (each row's count of new tokens),
without which the kernel refuses more than one new token per row with a past unless the batch
is 1. That is the kernel's convention: row b's cache holds its tokens at slots
0 .. seqlens_k[b], so a batch must be padded on the RIGHT (onnxruntime-genai pads batches on the
right too); a prompt padded on the left gets wrong logits in its shorter rows, and
geb_jax.export.onnx_export.ort_feed(graph="fused") refuses one. Each later step's mask is the
previous one with the new tokens' ones appended (as for the plain graph); only row sums count.
Positions come from the cache slots too (P_b + t, which is what ort_feed's default
position_ids are for such a batch): the position_ids input is kept, so that one feed drives
either graph, but the fused graph does not read it.

Inputs and outputs otherwise keep the plain graph's names, dtypes and layouts (input_ids,
attention_mask, position_ids [B, T] int64, past_key_values.{i}.key / .value and
present.{i}.key / .value [B, K, S, H], which is GroupQueryAttention's BNSH, logits_to_keep,
logits [B, T or logits_to_keep, V]); the metadata geb_jax.onnx_graph = "fused" tells the two
apart
(onnx_export.ort_graph(session), onnx_file.read_onnx_info(path).graph). Decoding through
onnxruntime IOBinding with one preallocated cache per layer that is both past and present:
geb_jax/infer/onnx_decoder.py.

Quantized (int8 / int4) exports use MatMulNBits for every linear (symmetric blocks, no zero
points; 32 rows per block at int8, 128 at int4: onnx_graph.DEFAULT_BLOCK_SIZES) and an 8-bit
head (onnx_graph.HEAD_BITS), as the plain graph does, a tied head included (the plain graph
keeps a tied head float32). The embedding table is quantized too by default, at the head's
8 bits (com.microsoft GatherBlockQuantized, blocks along D, Quant.for_head); a tied model's
head then is a MatMulNBits over the very same uint8 blocks: only the scales are stored twice,
in the two shapes the two kernels accept.

SimplifiedLayerNormalization sits in the ONNX domain, where onnxruntime registers it (and where
the builder's models use it), so onnx.checker.check_model rejects the file; onnxruntime is its
checker (export_onnx verifies it against the numpy engine).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from geb_jax.export.onnx_graph import (DEFAULT_ACCURACY_LEVEL, DEFAULT_OPSET, Graph, Quant,
                                       graph_setup, last_positions, linear, make_model,
                                       quantize_nbits)
from geb_jax.infer.engine import rope_tables
from geb_jax.infer.onnx_file import META_GRAPH
from geb_jax.infer.weights import Weights

MS = "com.microsoft"


def build_fused_model(weights: Weights, *, quantize: str | None = None,
                      block_size: int | None = None,
                      accuracy_level: int = DEFAULT_ACCURACY_LEVEL, opset: int = DEFAULT_OPSET,
                      stream_to: str | None = None,
                      quantize_embedding: bool | None = None) -> onnx.ModelProto:
    """The fused decoder graph of float32 `weights` (no metadata); see the module docstring.

    Arguments as onnx_graph.build_onnx_model's. quantize_embedding (quantized exports only,
    default True): the embedding table as 8-bit GatherBlockQuantized blocks (a tied head then
    shares them), or float32 (a tied head then gets its own 8-bit MatMulNBits copy of the
    table). The table costs decode no speed either way (a lookup reads only the tokens' rows)
    but float32 costs memory: V x D x 4 bytes, 531 MB for GEB-1.3B against 133 MB at 8 bits.
    Held-out perplexity of SmolLM2-135M (tied), 16 documents of the built-in valid split:
    float32 28.12, the 8-bit table +0.4 % at int8; at int4 +29.1 % (+28.7 % with a float32
    table) against llama.cpp q4_0's +35.8 % on the same text (docs/benchmarks.md, "int4
    format")."""
    with graph_setup(quantize, block_size, accuracy_level, opset, stream_to) as (quant, g):
        model = _build(weights, quant, g, quantize_embedding is not False)
    model.doc_string = ("geb_jax Llama-family decoder with KV cache (prefill and decode), fused: "
                        "GroupQueryAttention, SkipSimplifiedLayerNormalization; batches padded "
                        "on the right")
    # even without export_onnx's metadata the graph says what it is (OnnxDecoder checks it)
    onnx.helper.set_model_props(model, {META_GRAPH: "fused"})
    return model


def _build(weights: Weights, quant: Quant, g: Graph, quantize_embedding: bool):
    c = weights.config
    named = weights.to_named_tensors()  # HF names, torch [out, in] layouts
    table = named["model.embed_tokens.weight"]  # (V, D)
    head_quant = quant.for_head(c.d_model)
    quantized_table = (quant.bits is not None and quantize_embedding
                       and c.d_model % head_quant.block_size == 0)
    if quantized_table:
        x, head_blocks = _quantized_embedding(g, table, head_quant, c.tie_embeddings)
    else:
        x = g.op("Gather", [g.weight("model.embed_tokens.weight", table), "input_ids"],
                 "/model/embed_tokens", axis=0)  # (B, T, D)
        head_blocks = None
    cos_table, sin_table = rope_tables(c.max_seq_len, c.head_dim, c.rope_theta)  # (max, H/2)
    rope = (g.weight("rope.cos_cache", cos_table), g.weight("rope.sin_cache", sin_table))
    lengths = _gqa_lengths(g)
    eps = float(c.norm_eps)
    pre = c.norm_position == "pre"
    residual = x
    pending = None  # pre-norm: the sublayer output not yet added to the residual
    for i in range(c.n_layers):
        scope, p = f"/model/layers.{i}", f"model.layers.{i}."
        attn_norm = g.weight(p + "input_layernorm.weight", named[p + "input_layernorm.weight"])
        mlp_norm = g.weight(p + "post_attention_layernorm.weight",
                            named[p + "post_attention_layernorm.weight"])
        if pre:
            if pending is None:
                h = g.op("SimplifiedLayerNormalization", [residual, attn_norm],
                         scope + "/input_layernorm", axis=-1, epsilon=eps)
            else:
                h, residual = _skip_norm(g, pending, residual, attn_norm, eps,
                                         scope + "/input_layernorm")
            a = _attention(g, h, i, named, c, rope, lengths, quant, scope + "/attn")
            h, residual = _skip_norm(g, a, residual, mlp_norm, eps,
                                     scope + "/post_attention_layernorm")
            pending = _mlp(g, h, i, named, c, quant, scope + "/mlp")
        else:  # post-norm: x = norm(x + attn(x)); x = norm(x + mlp(x))
            a = _attention(g, residual, i, named, c, rope, lengths, quant,
                           scope + "/attn")
            residual, _ = _skip_norm(g, a, residual, attn_norm, eps,
                                     scope + "/input_layernorm", with_sum=False)
            m = _mlp(g, residual, i, named, c, quant, scope + "/mlp")
            residual, _ = _skip_norm(g, m, residual, mlp_norm, eps,
                                     scope + "/post_attention_layernorm", with_sum=False)
    final = g.weight("model.norm.weight", named["model.norm.weight"])
    if pre:
        x, _ = _skip_norm(g, pending, residual, final, eps, "/model/norm", with_sum=False)
    else:
        x = g.op("SimplifiedLayerNormalization", [residual, final], "/model/norm", axis=-1,
                 epsilon=eps)
    logits = _head(g, last_positions(g, x), c, named, head_quant, head_blocks)
    g.nodes.append(onnx.helper.make_node("Identity", [logits], ["logits"],
                                         name="/lm_head/logits"))
    return make_model(g, c)


def _head(g: Graph, x: str, c, named, quant: Quant, head_blocks) -> str:
    """The lm head (quant: Quant.for_head's): its own linear when untied; tied, MatMulNBits
    over the quantized table's blocks, its own quantized copy of a float32 table, or the
    float32 table read in place."""
    if not c.tie_embeddings:
        return linear(g, x, named["lm_head.weight"].T, "lm_head", quant, "/lm_head")
    if head_blocks is not None:  # MatMulNBits over the embedding's own uint8 blocks
        packed, scales = head_blocks
        return g.op("MatMulNBits", [x, packed, scales], "/lm_head", domain=MS, K=c.d_model,
                    N=c.vocab_size, bits=quant.bits, block_size=quant.block_size,
                    accuracy_level=quant.accuracy_level)
    if quant.bits is not None:  # a float32 table, its own quantized copy as the head
        return linear(g, x, named["model.embed_tokens.weight"].T, "lm_head", quant, "/lm_head")
    # x (B, T, D) @ table (V, D)^T, reading the table in place
    return g.op("FusedMatMul", [x, "model.embed_tokens.weight"], "/lm_head", domain=MS,
                transB=1, alpha=1.0)


def _skip_norm(g: Graph, x: str, skip: str, scale: str, eps: float, scope: str,
               with_sum: bool = True):
    """(rms_norm(x + skip) * scale, x + skip): SkipSimplifiedLayerNormalization's outputs 0
    and 3 (the sum only when with_sum; outputs 1, 2 are training statistics, not asked for)."""
    name = f"{scope}/SkipSimplifiedLayerNormalization"
    out, total = f"{name}/output_0", f"{name}/output_3"
    g.nodes.append(onnx.helper.make_node(
        "SkipSimplifiedLayerNormalization", [x, skip, scale],
        [out, "", "", total] if with_sum else [out], name=name, domain=MS, epsilon=eps))
    return out, (total if with_sum else None)


def _gqa_lengths(g: Graph) -> tuple[str, str, str]:
    """GroupQueryAttention's length inputs, from attention_mask (B, P + T):
    seqlens_k [B] int32 = sum(mask) - 1 and total_sequence_length int32 scalar = P + T (the
    builder's make_attention_mask_reformatting_for_gqa), and query_seqlens [B] int32 = the sum
    of the mask's last T columns: each row's count of new tokens, which lets the kernel append
    several tokens to a batch of caches (without it, more than one new token with a past
    needs batch 1) and pad the new tokens on the right."""
    scope = "/model/attn_mask_reformat"
    axis = g.const([1])
    total_b = g.op("ReduceSum", ["attention_mask", axis], scope, keepdims=0)
    seqlens_k = g.op("Cast", [g.op("Sub", [total_b, g.const(1)], scope)], scope,
                     to=TensorProto.INT32)
    width = g.op("Gather", [g.op("Shape", ["attention_mask"], scope), g.const(1)], scope,
                 axis=0)
    total = g.op("Cast", [width], scope, to=TensorProto.INT32)
    new = g.op("Shape", ["input_ids"], scope, start=1, end=2)  # [T]
    new_mask = g.op("Slice", ["attention_mask", g.op("Neg", [new], scope),
                              g.const([np.iinfo(np.int64).max]), axis], scope)
    query_seqlens = g.op("Cast", [g.op("ReduceSum", [new_mask, axis], scope, keepdims=0)],
                         scope, to=TensorProto.INT32)
    return seqlens_k, total, query_seqlens


def _attention(g: Graph, x: str, i: int, named, c, rope, lengths: tuple[str, str, str],
               quant: Quant, scope: str) -> str:
    """Packed QKV projection, GroupQueryAttention (rotary inside), o projection; names the
    present.{i}.key / .value graph outputs."""
    p = f"model.layers.{i}.self_attn."
    qkv = np.concatenate([named[p + f"{x}_proj.weight"] for x in "qkv"], axis=0).T  # (D, ...)
    y = linear(g, x, qkv, p + "qkv_proj", quant, scope + "/qkv_proj")
    del qkv
    outs = [f"{scope}/GroupQueryAttention/output_0", f"present.{i}.key", f"present.{i}.value"]
    g.nodes.append(onnx.helper.make_node(
        "GroupQueryAttention",
        [y, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", lengths[0],
         lengths[1], rope[0], rope[1]] + [""] * 7 + [lengths[2]],  # 16: query_seqlens
        outs, name=f"{scope}/GroupQueryAttention", domain=MS, num_heads=c.n_heads,
        kv_num_heads=c.n_kv_heads, do_rotary=1, rotary_interleaved=0,
        scale=float(1.0 / np.sqrt(c.head_dim))))
    return linear(g, outs[0], named[p + "o_proj.weight"].T, p + "o_proj", quant,
                   scope + "/o_proj")


def _mlp(g: Graph, x: str, i: int, named, c, quant: Quant, scope: str) -> str:
    """down(silu(gate(x)) * up(x)) with one packed gate/up projection."""
    p = f"model.layers.{i}.mlp."
    gate_up = np.concatenate([named[p + "gate_proj.weight"], named[p + "up_proj.weight"]],
                             axis=0).T  # (D, 2F): gate columns, then up columns
    y = linear(g, x, gate_up, p + "gate_up_proj", quant, scope + "/gate_up_proj")
    del gate_up
    gate, up = g.op("Split", [y, g.const([c.d_ff, c.d_ff])], scope, outputs=2, axis=-1)
    act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate], scope)], scope), up], scope)
    return linear(g, act, named[p + "down_proj.weight"].T, p + "down_proj", quant,
                   scope + "/down_proj")


def _quantized_embedding(g: Graph, table: np.ndarray, quant: Quant, tied: bool):
    """input_ids -> (B, T, D) through GatherBlockQuantized on the table quantized as
    MatMulNBits quantizes a (K=D, N=V) weight (symmetric, the default zero point): uint8
    (V, blocks, bytes per block), stored once. GatherBlockQuantized reads it as rank-3 data
    quantized along its last axis, so it needs (V, blocks, 1) scales; MatMulNBits (the tied
    head) takes the (V, blocks) originals. Returns (embedded, the head's (data, scales) names
    when tied, else None)."""
    v, d = table.shape
    bits, bs = quant.bits, quant.block_size
    packed, scales = quantize_nbits(np.ascontiguousarray(table.T), bits, bs)
    blocks = packed.shape[1]
    base = "model.embed_tokens.weight"
    data = g.weight(f"{base}_Q{bits}", packed)
    gather_scales = g.weight(f"{base}_gather_scales", scales.reshape(v, blocks, 1))
    head = (data, g.weight(f"{base}_scales", scales)) if tied else None
    scope = "/model/embed_tokens"
    y = g.op("GatherBlockQuantized", [data, "input_ids", gather_scales], scope, domain=MS,
             bits=bits, block_size=bs, gather_axis=0, quantize_axis=2)  # (B, T, blocks, bs)
    return g.op("Reshape", [y, g.const([0, 0, d])], scope), head


def graph_ops(model: onnx.ModelProto) -> dict[str, dict[str, int]]:
    """Node counts by op type, per scope: "layer" (/model/layers.0/...) and "other"."""
    out: dict[str, dict[str, int]] = {"layer": {}, "other": {}}
    for node in model.graph.node:
        where = "layer" if node.name.startswith("/model/layers.0/") else (
            None if node.name.startswith("/model/layers.") else "other")
        if where:
            out[where][node.op_type] = out[where].get(node.op_type, 0) + 1
    return out

