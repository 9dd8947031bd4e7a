"""GGUF files (llama.cpp / ollama) -> numpy-engine Weights, and the format facts both ways.

Read this first: GGUF stores each matrix as torch's [out, in] rows under llama.cpp names
(`GGUF_TENSOR_NAMES`), and llama.cpp rotates interleaved pairs (2i, 2i+1) where geb_jax and
Hugging Face rotate halves (i, i + H/2). So the q and k rows of every head are permuted on the
way out (`rope_rows_to_interleaved`, as llama.cpp's convert_hf_to_gguf.py does) and back on the
way in. geb_jax/export/gguf_export.py writes the files; `load_gguf` reads ours or any plain
llama GGUF. Numpy and the `gguf` package only: no jax, so the serving package can import it.

What the numpy engine keeps in memory, per GGUF tensor type (`load_gguf`, keep_quantized=True):

    GGUF type                        in memory           how
    -------------------------------  ------------------  ----------------------------------------
    Q4_1 (matrix)                    Int4Matrix          repacked, not requantized: Q4_1 is
                                                         q * d + m with f16 d, m per 32 inputs,
                                                         exactly Int4Matrix's scale / minimum
    Q4_0 (matrix)                    Int4Matrix          repacked: q * d - 8d, so scale = d and
                                                         minimum = -8d (exact in float16; a block
                                                         where -8d overflows float16 makes that
                                                         matrix float32 instead)
    F32, F16, BF16, Q8_0, Q5_0,      float32             gguf.quants.dequantize (gguf's reference
    Q5_1, K-quants (Q2_K..Q6_K),                         code); none of our formats holds these
    IQ*, TQ*, MXFP4, ... : every                         values exactly (Int8Matrix has one scale
    other type the installed gguf                        per output column, Q8_0 one per 32
    can dequantize                                       inputs)
    1-D tensors (norms), any type    float32             dequantized
    anything else (Q8_1, Q8_K, I8,   refused             GGUFFileError naming tensor, type, fix
    F64, ...)

Int4 matrices dequantize bit-for-bit to gguf's values (tests/test_gguf_read.py; a Q4_0 zero
comes back as +0.0 where gguf gives -0.0 for a negative d). Where q, k, v (or gate, up) are
fused into one matrix they stay int4 only if all parts are int4; else the fused matrix is
float32. A tied Q4 token_embd is one Int4Matrix (D, V) of token columns serving as table and
lm head (see Weights.embed). keep_quantized=False makes everything float32. Weights.quantization
is "int4" when any matrix was kept as int4, else None.

The container (header parsing, layout checks, tokenizer checksum) is geb_jax/gguf_header.py,
shared with the tokenizer reader; its names are importable from here too.
"""
from __future__ import annotations

import base64
import dataclasses
import os
from typing import Any, Iterable

import numpy as np

# TOKENIZER_SHA256_KEY and tokenizer_sha256_of_writer: re-exported for the exporter and tests.
from geb_jax.gguf_header import (SENTENCEPIECE_MODEL_KEY, TOKENIZER_SHA256_KEY, GGUFFileError,
                                 GGUFHeader, TensorInfo, read_gguf_header,
                                 read_tokenizer_metadata, readable_types,
                                 tokenizer_sha256_of_writer)
from geb_jax.infer.config import InferConfig, InferConfigError
from geb_jax.infer.quantize import Int4Matrix
from geb_jax.infer.weights import LayerWeights, Weights

ARCHITECTURE = "llama"
INT4_TYPES = ("Q4_0", "Q4_1")  # held exactly by Int4Matrix


# Per-layer tensors: Hugging Face suffix (after "model.layers.{i}.") -> GGUF name (after
# "blk.{i}."); then the global ones. Every name ends in ".weight" in both.
LAYER_TENSOR_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
GLOBAL_TENSOR_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm",
                       "lm_head": "output"}

# What other architectures have that the Llama blocks geb_jax runs do not; the file's own
# tensors that show it are named next to it (`_architecture_error`).
ARCHITECTURE_DIFFERENCES = {
    "qwen2": "attention q/k/v biases",
    "qwen2moe": "mixture-of-experts MLPs and attention q/k/v biases",
    "qwen3": "per-head q/k RMSNorms",
    "qwen3moe": "mixture-of-experts MLPs and per-head q/k RMSNorms",
    "gemma": "embeddings scaled by sqrt(d_model) and a GELU-gated MLP",
    "gemma2": "embeddings scaled by sqrt(d_model), a GELU-gated MLP, post-attention/post-MLP "
              "norms, logit soft-capping and sliding-window attention",
    "gemma3": "embeddings scaled by sqrt(d_model), a GELU-gated MLP, per-head q/k norms, "
              "post-attention/post-MLP norms and sliding-window attention",
    "phi2": "LayerNorms with biases, partial rotary embeddings and a parallel GELU MLP",
    "phi3": "a fused qkv projection, a fused gate/up matrix and LongRoPE scaling",
    "falcon": "LayerNorms, a fused qkv projection and a parallel GELU MLP",
    "gpt2": "learned position embeddings, LayerNorms and a GELU MLP",
    "starcoder2": "LayerNorms and linear layers with biases and a GELU MLP",
    "stablelm": "LayerNorms and partial rotary embeddings",
    "mixtral": "mixture-of-experts MLPs",
    "deepseek2": "multi-head latent attention and mixture-of-experts MLPs",
    "granite": "embedding, residual, attention and logit multipliers",
    "olmo2": "post-attention/post-MLP norms and q/k norms",
    "mamba": "state-space (Mamba) blocks instead of attention",
    "bert": "a bidirectional encoder with LayerNorms and position embeddings",
}




def gguf_tensor_name(hf_name: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight' (and the globals)."""
    stem = hf_name.removesuffix(".weight")
    if stem in GLOBAL_TENSOR_NAMES:
        return GLOBAL_TENSOR_NAMES[stem] + ".weight"
    parts = stem.split(".", 3)  # model, layers, i, suffix
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() \
            and parts[3] in LAYER_TENSOR_NAMES:
        return f"blk.{parts[2]}.{LAYER_TENSOR_NAMES[parts[3]]}.weight"
    raise KeyError(f"no GGUF name for tensor {hf_name!r}")


def hf_tensor_name(gguf_name: str) -> str:
    """The inverse of `gguf_tensor_name`; KeyError for tensors a Llama does not have."""
    stem = gguf_name.removesuffix(".weight")
    for hf, gg in GLOBAL_TENSOR_NAMES.items():
        if stem == gg:
            return hf + ".weight"
    parts = stem.split(".", 2)
    inverse = {gg: hf for hf, gg in LAYER_TENSOR_NAMES.items()}
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in inverse \
            and gguf_name.endswith(".weight"):
        return f"model.layers.{parts[1]}.{inverse[parts[2]]}.weight"
    raise KeyError(f"GGUF tensor {gguf_name!r} is not part of a llama model geb_jax can run")


# ---- rotary layout -----------------------------------------------------------------------

def rope_rows_to_interleaved(w_rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k projection (N*H, D): half layout (i, i+H/2) -> llama.cpp pairs (2i, 2i+1).

    Within each head, output row 2i is input row i and row 2i+1 is input row i + H/2.
    """
    rows = w_rows.shape[0]
    h = rows // n_heads
    return (w_rows.reshape(n_heads, 2, h // 2, *w_rows.shape[1:])  # (N, 2, H/2, D)
            .swapaxes(1, 2)  # (N, H/2, 2, D)
            .reshape(w_rows.shape))


def rope_rows_from_interleaved(w_rows: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `rope_rows_to_interleaved`."""
    rows = w_rows.shape[0]
    h = rows // n_heads
    return (w_rows.reshape(n_heads, h // 2, 2, *w_rows.shape[1:])  # (N, H/2, 2, D)
            .swapaxes(1, 2)  # (N, 2, H/2, D)
            .reshape(w_rows.shape))


# ---- tensors -------------------------------------------------------------------------------

def _check_readable(t: TensorInfo, path: str) -> None:
    if t.type_name not in readable_types():
        raise GGUFFileError(
            f"{path}: tensor {t.name!r} is {t.type_name}, which gguf's reference code cannot "
            f"dequantize; the numpy engine reads {', '.join(readable_types())}. Re-quantize the "
            f"model with llama-quantize (e.g. to Q8_0 or Q4_K_M) or upgrade the gguf package.")


def _dense(h: GGUFHeader, t: TensorInfo) -> np.ndarray:
    """A tensor as float32 in numpy (rows, cols) order, dequantized by gguf's reference code;
    a copy, not a view of the file."""
    import gguf  # pylint: disable=import-outside-toplevel

    _check_readable(t, h.path)
    qtype = gguf.GGMLQuantizationType(t.ggml_type)
    rows = int(np.prod(t.shape[:-1], dtype=np.int64)) if len(t.shape) > 1 else 1
    raw = h.raw(t).reshape(rows, -1)
    value = gguf.quants.dequantize(raw, qtype)
    value = value.astype(np.float32, copy=np.may_share_memory(value, raw))
    return value.reshape(t.shape)


def _int4(h: GGUFHeader, t: TensorInfo) -> Int4Matrix | None:
    """A Q4_0 / Q4_1 matrix repacked as Int4Matrix (out = rows, in = cols), values unchanged;
    None where that cannot be exact (Q4_0 with -8d beyond float16)."""
    rows, cols = t.shape
    blocks = h.raw(t).reshape(rows, cols // 32, -1)
    scale = np.ascontiguousarray(blocks[:, :, 0:2]).view(np.float16)[:, :, 0]
    if t.type_name == "Q4_1":
        minimum = np.ascontiguousarray(blocks[:, :, 2:4]).view(np.float16)[:, :, 0]
        qs = blocks[:, :, 4:]
    else:  # Q4_0: (q - 8) d = q d + (-8 d)
        with np.errstate(over="ignore", invalid="ignore"):
            minimum = (scale * np.float16(-8)).astype(np.float16)
        if not np.array_equal(minimum.astype(np.float32), scale.astype(np.float32) * -8,
                              equal_nan=True):
            return None
        qs = blocks[:, :, 2:]
    # GGML block: byte j = value j (low nibble) | value j + 16 (high). Ours: byte j of a row
    # = input j (low) | input j + cols/2 (high), codes out-major.
    codes = np.empty((rows, cols // 32, 32), np.uint8)
    np.bitwise_and(qs, 15, out=codes[:, :, :16])
    np.right_shift(qs, 4, out=codes[:, :, 16:])
    codes = codes.reshape(rows, cols)
    half = cols // 2
    packed = codes[:, :half] | (codes[:, half:] << 4)
    return Int4Matrix(packed, np.ascontiguousarray(scale), np.ascontiguousarray(minimum))


def _load(h: GGUFHeader, t: TensorInfo, keep_quantized: bool):
    """float32 (rows, cols) ndarray, or an Int4Matrix for a kept Q4 matrix."""
    if keep_quantized and t.type_name in INT4_TYPES and len(t.ne) == 2:
        kept = _int4(h, t)
        if kept is not None:
            return kept
    return _dense(h, t)


# ---- matrices in GGUF row order (out-major), float32 or int4 --------------------------------

def _rows(m) -> np.ndarray:
    return m.dequantize().T if isinstance(m, Int4Matrix) else m


def _permute_rope(m, n_heads: int):
    if isinstance(m, Int4Matrix):
        return Int4Matrix(*(np.ascontiguousarray(rope_rows_from_interleaved(a, n_heads))
                            for a in (m.packed, m.scale, m.minimum)))
    return rope_rows_from_interleaved(m, n_heads)


def _stack(mats: list):
    """Concatenate along the output rows: int4 if every part is, else float32."""
    if all(isinstance(m, Int4Matrix) for m in mats):
        return Int4Matrix(*(np.concatenate([getattr(m, a) for m in mats])
                            for a in ("packed", "scale", "minimum")))
    return np.concatenate([_rows(m) for m in mats])


def _matrix(m):
    """Out-major rows -> the engine's (in, out) matrix."""
    return m if isinstance(m, Int4Matrix) else np.ascontiguousarray(m.T, dtype=np.float32)


# ---- model config and architecture ---------------------------------------------------------

def _foreign_tensors(names: Iterable[str]) -> list[str]:
    """Tensors a Llama does not have, in file order."""
    out = []
    for name in names:
        try:
            hf_tensor_name(name)
        except KeyError:
            out.append(name)
    return out


def _first_few(names: list[str], limit: int = 4) -> str:
    """The tensors of layer 0 and the global ones first: they show the pattern."""
    shown = [n for n in names if not n.startswith("blk.") or n.startswith("blk.0.")][:limit]
    shown = shown or names[:limit]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f", ... ({more} more)" if more > 0 else "")


def _architecture_error(arch: Any, tensor_names: list[str], path: str) -> GGUFFileError:
    foreign = _foreign_tensors(tensor_names)
    what = ARCHITECTURE_DIFFERENCES.get(str(arch), "a model type the numpy engine does not know")
    evidence = f" ({_first_few(foreign)})" if foreign else ""
    return GGUFFileError(
        f"{path}: general.architecture is {arch!r}: {arch}: {what}{evidence} are not part of "
        f"the Llama architecture geb_jax runs. The numpy engine loads 'llama' GGUFs only "
        f"(Llama, Mistral, SmolLM, TinyLlama ... convert as 'llama').")


def _check_tensor_names(h: GGUFHeader) -> None:
    names = [t.name for t in h.tensors]
    arch = h.fields.get("general.architecture")
    if arch != ARCHITECTURE:
        raise _architecture_error(arch, names, h.path)
    split = h.fields.get("split.count", 1)
    if split != 1:
        raise GGUFFileError(f"{h.path} is part {h.fields.get('split.no', 0) + 1} of a GGUF split "
                            f"into {split} files; merge them first (llama-gguf-split --merge).")
    foreign = [n for n in _foreign_tensors(names) if n != "rope_freqs.weight"]
    if foreign:
        raise GGUFFileError(f"{h.path}: tensor(s) {_first_few(foreign)} are not part of a llama "
                            f"model geb_jax can run (biases, q/k norms, experts or fused "
                            f"projections belong to other architectures).")


def _config(meta: dict[str, Any], tensors: dict[str, TensorInfo], path: str) -> InferConfig:
    """The model shape from the llama.* metadata; vocab from token_embd's rows, tied when
    there is no output.weight."""
    if "token_embd.weight" not in tensors or len(tensors["token_embd.weight"].ne) != 2:
        raise GGUFFileError(f"{path}: tensor 'token_embd.weight' (2-D) is missing.")
    n_vocab = int(tensors["token_embd.weight"].ne[1])

    def need(key: str):
        if f"llama.{key}" not in meta:
            raise GGUFFileError(f"{path}: metadata key 'llama.{key}' is missing.")
        return meta[f"llama.{key}"]

    if int(meta.get("llama.vocab_size", n_vocab)) != n_vocab:
        raise GGUFFileError(f"{path}: llama.vocab_size={meta['llama.vocab_size']} but "
                            f"'token_embd.weight' has {n_vocab} rows.")
    d, n = int(need("embedding_length")), int(need("attention.head_count"))
    if n <= 0 or d % n and "llama.attention.key_length" not in meta:
        raise GGUFFileError(f"{path}: llama.embedding_length={d} is not a multiple of "
                            f"llama.attention.head_count={n} and no key_length is given.")
    head_dim = int(meta.get("llama.attention.key_length", d // n))
    rope_dims = int(meta.get("llama.rope.dimension_count", head_dim))
    if rope_dims != head_dim or int(meta.get("llama.attention.value_length", head_dim)) != head_dim:
        raise GGUFFileError(f"{path}: partial rotary embeddings or key/value head sizes that "
                            f"differ (rope.dimension_count={rope_dims}, head size {head_dim}) "
                            f"are not supported by the numpy engine.")
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", "linear") or float(meta.get("llama.rope.scaling.factor", 1.0)) \
            not in (0.0, 1.0) or "rope_freqs.weight" in tensors:
        raise GGUFFileError(f"{path}: RoPE scaling ({scaling!r} / rope_freqs) is not supported; "
                            f"the numpy engine implements plain RoPE only.")
    try:
        return InferConfig(
            vocab_size=n_vocab, d_model=d, n_layers=int(need("block_count")), n_heads=n,
            n_kv_heads=int(meta.get("llama.attention.head_count_kv", n)), head_dim=head_dim,
            d_ff=int(need("feed_forward_length")), max_seq_len=int(need("context_length")),
            rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
            norm_eps=float(need("attention.layer_norm_rms_epsilon")),
            tie_embeddings="output.weight" not in tensors)
    except InferConfigError as e:
        raise GGUFFileError(f"{path}: the llama.* metadata describe no valid model: {e}") from None


def _expected_shapes(c: InferConfig) -> dict[str, tuple[int, ...]]:
    """GGUF name -> numpy (rows, cols) shape from the config."""
    d, h, f = c.d_model, c.head_dim, c.d_ff
    shapes = {"token_embd.weight": (c.vocab_size, d), "output_norm.weight": (d,)}
    if not c.tie_embeddings:
        shapes["output.weight"] = (c.vocab_size, d)
    per_layer = {"attn_q": (c.n_heads * h, d), "attn_k": (c.n_kv_heads * h, d),
                 "attn_v": (c.n_kv_heads * h, d), "attn_output": (d, c.n_heads * h),
                 "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f),
                 "attn_norm": (d,), "ffn_norm": (d,)}
    for i in range(c.n_layers):
        shapes.update({f"blk.{i}.{k}.weight": s for k, s in per_layer.items()})
    return shapes


def _check_shapes(tensors: dict[str, TensorInfo], c: InferConfig, path: str) -> None:
    want = _expected_shapes(c)
    for name, shape in want.items():
        if name not in tensors:
            raise GGUFFileError(f"{path}: tensor {name!r} (shape {shape}) is missing.")
        if tensors[name].shape != shape:
            raise GGUFFileError(
                f"{path}: tensor {name!r} has shape {tensors[name].shape}, expected {shape} from "
                f"the llama.* metadata (d_model {c.d_model}, heads {c.n_heads}/{c.n_kv_heads} "
                f"of {c.head_dim}, d_ff {c.d_ff}, vocab {c.vocab_size}).")
    extra = [n for n in tensors if n not in want]
    if extra:
        raise GGUFFileError(f"{path}: tensor(s) {_first_few(extra)} are not described by the "
                            f"metadata (llama.block_count={c.n_layers}).")


# ---- assembly ------------------------------------------------------------------------------

def _layer(get, c: InferConfig, i: int) -> LayerWeights:
    p = f"blk.{i}."
    q = _permute_rope(get(p + "attn_q.weight"), c.n_heads)
    k = _permute_rope(get(p + "attn_k.weight"), c.n_kv_heads)
    return LayerWeights(
        attn_norm=get(p + "attn_norm.weight"), mlp_norm=get(p + "ffn_norm.weight"),
        qkv=_matrix(_stack([q, k, get(p + "attn_v.weight")])),
        o=_matrix(get(p + "attn_output.weight")),
        gate_up=_matrix(_stack([get(p + "ffn_gate.weight"), get(p + "ffn_up.weight")])),
        down=_matrix(get(p + "ffn_down.weight")))


def _weights(h: GGUFHeader, tensors: dict[str, TensorInfo], c: InferConfig,
             keep_quantized: bool) -> Weights:
    for t in tensors.values():  # every type checked before the slow part starts
        if not (keep_quantized and t.type_name in INT4_TYPES):
            _check_readable(t, h.path)

    def get(name: str):
        t = tensors[name]
        return _dense(h, t) if len(t.ne) == 1 else _load(h, t, keep_quantized)

    layers = [_layer(get, c, i) for i in range(c.n_layers)]
    table = get("token_embd.weight")
    embedding = table if isinstance(table, Int4Matrix) else np.ascontiguousarray(table)
    if c.tie_embeddings:
        lm_head = embedding if isinstance(table, Int4Matrix) else embedding.T
    else:
        lm_head = _matrix(get("output.weight"))
    mats = [embedding, lm_head] + [m for layer in layers
                                   for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    int4 = any(isinstance(m, Int4Matrix) for m in mats)
    return Weights(c, embedding, layers, get("output_norm.weight"), lm_head,
                   quantization="int4" if int4 else None)


# ---- reading -------------------------------------------------------------------------------

_BIG_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
               "tokenizer.ggml.merges")


@dataclasses.dataclass
class GGUFModel:
    """What `load_gguf` returns. `sentencepiece_model` is the serialized SentencePiece proto
    that geb_jax's exporter embeds, or None for GGUFs written by other tools; `metadata` every
    key but the big token arrays; `tokenizer` the tokenizer.* fields (read_tokenizer_metadata);
    `tensor_types` each tensor's GGUF type name."""
    weights: Weights
    sentencepiece_model: bytes | None
    metadata: dict[str, Any]
    tokenizer: dict[str, Any] = dataclasses.field(default_factory=dict)
    tensor_types: dict[str, str] = dataclasses.field(default_factory=dict)


def load_gguf(path: str | os.PathLike, keep_quantized: bool = True) -> GGUFModel:
    """A llama GGUF -> numpy-engine Weights (module docstring: per-type memory table).

    q/k rows are put back into the rotate-half layout; the config comes from the llama.*
    metadata (tied embeddings when there is no `output.weight`). A truncated or corrupt file,
    another architecture or an unsupported tensor type raises GGUFFileError naming the file.
    keep_quantized=False dequantizes Q4_0 / Q4_1 matrices to float32 too.
    """
    h = read_gguf_header(path)
    _check_tensor_names(h)
    tensors = {t.name: t for t in h.tensors}
    config = _config(h.fields, tensors, h.path)
    _check_shapes(tensors, config, h.path)
    weights = _weights(h, tensors, config, keep_quantized)
    meta = {k: v for k, v in h.fields.items() if k not in _BIG_ARRAYS}
    sp_model = meta.get(SENTENCEPIECE_MODEL_KEY)
    return GGUFModel(weights, base64.b64decode(sp_model) if sp_model else None, meta,
                     read_tokenizer_metadata(h), {t.name: t.type_name for t in h.tensors})


def gguf_config(path: str | os.PathLike) -> InferConfig:
    """The model shape of a llama GGUF from its header alone (no tensor data is read)."""
    h = read_gguf_header(path)
    _check_tensor_names(h)
    return _config(h.fields, {t.name: t for t in h.tensors}, h.path)
