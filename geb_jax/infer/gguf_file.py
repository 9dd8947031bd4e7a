"""GGUF files (llama.cpp / ollama) -> numpy-engine Weights, and the format facts both ways.

Read this first: GGUF stores each matrix as torch's [out, in] rows under llama.cpp names
(`GGUF_TENSOR_NAMES`), and llama.cpp rotates interleaved pairs (2i, 2i+1) where geb_jax and
Hugging Face rotate halves (i, i + H/2). So the q and k rows of every head are permuted on the
way out (`rope_rows_to_interleaved`, as llama.cpp's convert_hf_to_gguf.py does) and back on the
way in. geb_jax/export/gguf_export.py writes the files; `load_gguf` reads ours or any plain
llama GGUF in f32 / f16 / q8_0 / q4_0 (dequantized with gguf's reference `gguf.quants.dequantize`).
Numpy and the `gguf` package only: no jax, so the serving package can import it.
"""
from __future__ import annotations

import base64
import dataclasses
import os
from typing import Any

import numpy as np

from geb_jax.infer.config import InferConfig
from geb_jax.infer.weights import Weights, WeightsError

ARCHITECTURE = "llama"
# The exporter also stores the original SentencePiece model (base64 of the serialized proto)
# under this key, so the numpy engine gets back the exact tokenizer; llama.cpp ignores it.
SENTENCEPIECE_MODEL_KEY = "geb_jax.tokenizer.sentencepiece_model"
SUPPORTED_TYPES = ("F32", "F16", "Q8_0", "Q4_0")

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


class GGUFFileError(ValueError):
    """A GGUF file that is truncated, corrupt, or holds a model the numpy engine cannot run."""


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


# ---- reading -----------------------------------------------------------------------------

@dataclasses.dataclass
class GGUFModel:
    """What `load_gguf` returns. `sentencepiece_model` is the serialized SentencePiece proto
    that geb_jax's exporter embeds, or None for GGUFs written by other tools."""
    weights: Weights
    sentencepiece_model: bytes | None
    metadata: dict[str, Any]


def _open(path: str):
    import gguf  # pylint: disable=import-outside-toplevel

    if not os.path.isfile(path):
        raise GGUFFileError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError / struct.error / IndexError ...
        raise GGUFFileError(f"{path} is not a readable GGUF file (truncated or corrupt? "
                            f"re-export it): {type(e).__name__}: {e}") from None
    size = os.path.getsize(path)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise GGUFFileError(f"{path} is truncated: tensor {t.name!r} needs bytes up to "
                                f"{t.data_offset + t.n_bytes} but the file has {size}; "
                                f"re-export or re-download it.")
    return reader


_BIG_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
               "tokenizer.ggml.merges")


def _metadata(reader) -> dict[str, Any]:
    """Scalar and string fields as Python values (token arrays are skipped: they are big)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in _BIG_ARRAYS:
            continue
        out[key] = field.contents()
    return out


def _config(meta: dict[str, Any], tensor_names: set[str], n_vocab: int, path: str
            ) -> InferConfig:
    arch = meta.get("general.architecture")
    if arch != ARCHITECTURE:
        raise GGUFFileError(f"{path}: general.architecture={arch!r}; only {ARCHITECTURE!r} "
                            f"GGUF models can be loaded into the numpy engine.")

    def need(key: str):
        if f"llama.{key}" not in meta:
            raise GGUFFileError(f"{path}: metadata key 'llama.{key}' is missing.")
        return meta[f"llama.{key}"]

    d, n = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(meta.get("llama.attention.key_length", d // n))
    rope_dims = int(meta.get("llama.rope.dimension_count", head_dim))
    if rope_dims != head_dim or int(meta.get("llama.attention.value_length", head_dim)) != head_dim:
        raise GGUFFileError(f"{path}: partial rotary embeddings or key/value head sizes that "
                            f"differ (rope.dimension_count={rope_dims}, head size {head_dim}) "
                            f"are not supported by the numpy engine.")
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", "linear") or float(meta.get("llama.rope.scaling.factor", 1.0)) \
            not in (0.0, 1.0) or "rope_freqs.weight" in tensor_names:
        raise GGUFFileError(f"{path}: RoPE scaling ({scaling!r} / rope_freqs) is not supported; "
                            f"the numpy engine implements plain RoPE only.")
    return InferConfig(
        vocab_size=n_vocab, d_model=d, n_layers=int(need("block_count")), n_heads=n,
        n_kv_heads=int(meta.get("llama.attention.head_count_kv", n)), head_dim=head_dim,
        d_ff=int(need("feed_forward_length")), max_seq_len=int(need("context_length")),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in tensor_names)


def _dense(tensor, path: str) -> np.ndarray:
    """A tensor as float32 in numpy (rows, cols) order, dequantized by gguf's reference code."""
    import gguf  # pylint: disable=import-outside-toplevel

    kind = gguf.GGMLQuantizationType(tensor.tensor_type).name
    if kind not in SUPPORTED_TYPES:
        raise GGUFFileError(f"{path}: tensor {tensor.name!r} is {kind}; the numpy engine reads "
                            f"{', '.join(SUPPORTED_TYPES)} (re-quantize with llama-quantize or "
                            f"re-export with dtype f32/f16/q8_0/q4_0).")
    shape = tuple(int(s) for s in reversed(tensor.shape))  # ggml ne is (cols, rows)
    return gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type
                                  ).astype(np.float32).reshape(shape)


def load_gguf(path: str | os.PathLike) -> GGUFModel:
    """A llama GGUF (f32 / f16 / q8_0 / q4_0 tensors) -> float32 numpy-engine Weights.

    q/k rows are put back into the rotate-half layout; the config comes from the llama.*
    metadata (tied embeddings when there is no `output.weight`). A truncated or corrupt file,
    another architecture or an unsupported tensor type raises GGUFFileError naming the file.
    """
    path = os.fspath(path)
    reader = _open(path)
    meta = _metadata(reader)
    by_name = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in by_name:
        raise GGUFFileError(f"{path}: tensor 'token_embd.weight' is missing.")
    n_vocab = int(by_name["token_embd.weight"].shape[1])
    config = _config(meta, set(by_name), n_vocab, path)
    tensors = {}
    for name, tensor in by_name.items():
        try:
            hf = hf_tensor_name(name)
        except KeyError as e:
            raise GGUFFileError(f"{path}: {e.args[0]}") from None
        value = _dense(tensor, path)
        if hf.endswith("q_proj.weight"):
            value = rope_rows_from_interleaved(value, config.n_heads)
        elif hf.endswith("k_proj.weight"):
            value = rope_rows_from_interleaved(value, config.n_kv_heads)
        tensors[hf] = value
    try:
        weights = Weights.from_named_tensors(tensors, config)
    except WeightsError as e:
        raise GGUFFileError(f"{path}: {e}") from None
    sp_model = meta.get(SENTENCEPIECE_MODEL_KEY)
    return GGUFModel(weights, base64.b64decode(sp_model) if sp_model else None, meta)
