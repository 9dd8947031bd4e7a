"""In-memory weights of the numpy engine, laid out once for fast decoding.

Per layer every matmul is one C-contiguous (in, out) float32 matrix, so ``x @ W`` streams it
once: q, k and v are fused into ``qkv`` (D, (N + 2K) * H), gate and up into ``gate_up``
(D, 2F); ``o`` is (N * H, D) and ``down`` (F, D). The embedding table stays (V, D) for lookups;
``lm_head`` is (D, V) (a transposed view of the table when tied: BLAS reads it as fast as a
contiguous copy and it costs no memory). A matrix is either a float32 ndarray or a quantized
matrix from geb_jax.infer.quantize (anything with ``matmul(x, out)``, ``shape``, ``columns``,
``dequantize`` and ``nbytes``); a quantized table is stored as the (D, V) matrix whose columns
are the token vectors.

Builders:
* `Weights.from_params(params, config)`: our parameter tree (embedding, layers/attn/q ..., as
  geb_jax.model.init_params makes it, numpy or jax arrays).
* `Weights.from_named_tensors(tensors, config)`: Hugging Face Llama tensor names and layouts
  (torch Linear [out, in]), as geb_jax/export/hf.py writes them; for loaders (ONNX, safetensors)
  that end with a dict of named numpy arrays.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from geb_jax.infer.config import InferConfig

Matrix = Any  # np.ndarray (in, out) float32, or a quantized matrix (quantize.Int8Matrix, ...)


class WeightsError(ValueError):
    """A tensor is missing, unexpected, or has a shape the config does not describe."""


class ModelFileError(ValueError):
    """A model path that is missing, incomplete or of an unknown format (raised by every
    reader: loading.py, onnx_file.py; defined here, beside WeightsError, so they share it)."""


def param_leaf(params: Mapping, path: str, shape: tuple[int, ...]) -> np.ndarray:
    """One leaf ("layers/attn/q") as float32 numpy, shape-checked against the config; no copy
    for float32 numpy or (CPU) jax arrays."""
    node = params
    try:
        for key in path.split("/"):
            node = node[key]
    except (KeyError, TypeError):
        raise WeightsError(f"parameter {path} is missing from params") from None
    value = np.asarray(node, dtype=np.float32)
    if value.shape != shape:
        raise WeightsError(f"parameter {path} has shape {value.shape}, expected {shape} from "
                           f"the config")
    return value


def matmul(x: np.ndarray, w: Matrix, out: np.ndarray | None = None) -> np.ndarray:
    """x (rows, in) @ w (in, out), into `out` when given."""
    if isinstance(w, np.ndarray):
        return np.matmul(x, w, out=out)
    return w.matmul(x, out=out)


def matrix_nbytes(w: Matrix) -> int:
    return int(w.nbytes)


def dense(w: Matrix) -> np.ndarray:
    """The float32 (in, out) matrix (dequantized if needed)."""
    return w if isinstance(w, np.ndarray) else w.dequantize()


@dataclasses.dataclass
class LayerWeights:
    attn_norm: np.ndarray  # (D,)
    mlp_norm: np.ndarray  # (D,)
    qkv: Matrix  # (D, (N + 2K) * H): columns q heads, then k heads, then v heads
    o: Matrix  # (N * H, D)
    gate_up: Matrix  # (D, 2F): gate columns then up columns
    down: Matrix  # (F, D)


@dataclasses.dataclass
class Weights:
    config: InferConfig
    embedding: Matrix  # float32 table (V, D), or a quantized (D, V) matrix of token columns
    layers: list[LayerWeights]
    final_norm: np.ndarray  # (D,)
    lm_head: Matrix  # (D, V); a view of / the same object as `embedding` when tied
    quantization: str | None = None  # None (float32), "int8" or "int4"

    # -- use ----------------------------------------------------------------------------------
    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Token ids (any shape) -> float32 vectors (..., D)."""
        ids = np.asarray(ids)
        if np.any((ids < 0) | (ids >= self.config.vocab_size)):
            bad = ids[(ids < 0) | (ids >= self.config.vocab_size)].ravel()[0]
            raise ValueError(f"token id {int(bad)} is outside the vocabulary "
                             f"[0, {self.config.vocab_size})")
        if isinstance(self.embedding, np.ndarray):
            return self.embedding[ids]
        flat = ids.ravel()
        return self.embedding.columns(flat).T.reshape(*ids.shape, self.config.d_model)

    @property
    def nbytes(self) -> int:
        """Bytes of weights held (a tied table counted once)."""
        total = sum(int(a.nbytes) for a in (self.final_norm,))
        for layer in self.layers:
            total += layer.attn_norm.nbytes + layer.mlp_norm.nbytes
            total += sum(matrix_nbytes(m) for m in (layer.qkv, layer.o, layer.gate_up,
                                                    layer.down))
        total += matrix_nbytes(self.embedding)
        if not self.config.tie_embeddings:
            total += matrix_nbytes(self.lm_head)
        return total

    # -- builders -----------------------------------------------------------------------------
    @classmethod
    def from_params(cls, params: Mapping, config: Any) -> "Weights":
        """From our parameter tree; `config` is an InferConfig, a ModelConfig or their dict."""
        c = InferConfig.from_dict(config)
        d, n, k, h, f, v, L = (c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff,
                               c.vocab_size, c.n_layers)

        def get(path: str, shape: tuple[int, ...]) -> np.ndarray:
            return param_leaf(params, path, shape)

        q = get("layers/attn/q", (L, d, n, h))
        kk = get("layers/attn/k", (L, d, k, h))
        vv = get("layers/attn/v", (L, d, k, h))
        o = get("layers/attn/o", (L, n, h, d))
        gate = get("layers/mlp/gate", (L, d, f))
        up = get("layers/mlp/up", (L, d, f))
        down = get("layers/mlp/down", (L, f, d))
        attn_norm = get("layers/attn_norm/scale", (L, d))
        mlp_norm = get("layers/mlp_norm/scale", (L, d))
        layers = [LayerWeights(
            attn_norm=_c(attn_norm[i]), mlp_norm=_c(mlp_norm[i]),
            qkv=_c(np.concatenate([q[i].reshape(d, n * h), kk[i].reshape(d, k * h),
                                   vv[i].reshape(d, k * h)], axis=1)),
            o=_c(o[i].reshape(n * h, d)),
            gate_up=_c(np.concatenate([gate[i], up[i]], axis=1)),
            down=_c(down[i])) for i in range(L)]
        embedding = _c(get("embedding", (v, d)))
        lm_head = embedding.T if c.tie_embeddings else _c(get("lm_head", (d, v)))
        return cls(c, embedding, layers, _c(get("final_norm/scale", (d,))), lm_head)

    @classmethod
    def from_named_tensors(cls, tensors: Mapping[str, np.ndarray], config: Any) -> "Weights":
        """From Hugging Face Llama names ("model.layers.0.self_attn.q_proj.weight", ...) with
        torch [out, in] layouts. Every tensor must be used (rotary inv_freq buffers excepted);
        a tied model may carry an lm_head.weight only if it equals the embedding."""
        c = InferConfig.from_dict(config)
        d, n, k, h, f, v = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff, c.vocab_size
        used: set[str] = set()

        def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
            if name not in tensors:
                raise WeightsError(f"tensor {name!r} (shape {shape}) is missing")
            value = np.asarray(tensors[name], dtype=np.float32)
            if value.shape != shape:
                raise WeightsError(f"tensor {name!r} has shape {value.shape}, expected {shape} "
                                   f"from the config")
            used.add(name)
            return value

        layers = []
        for i in range(c.n_layers):
            p = f"model.layers.{i}."
            q = take(p + "self_attn.q_proj.weight", (n * h, d))
            kk = take(p + "self_attn.k_proj.weight", (k * h, d))
            vv = take(p + "self_attn.v_proj.weight", (k * h, d))
            layers.append(LayerWeights(
                attn_norm=_c(take(p + "input_layernorm.weight", (d,))),
                mlp_norm=_c(take(p + "post_attention_layernorm.weight", (d,))),
                qkv=_c(np.concatenate([q, kk, vv], axis=0).T),
                o=_c(take(p + "self_attn.o_proj.weight", (d, n * h)).T),
                gate_up=_c(np.concatenate([take(p + "mlp.gate_proj.weight", (f, d)),
                                           take(p + "mlp.up_proj.weight", (f, d))], axis=0).T),
                down=_c(take(p + "mlp.down_proj.weight", (d, f)).T)))
        embedding = _c(take("model.embed_tokens.weight", (v, d)))
        if c.tie_embeddings:
            if "lm_head.weight" in tensors:
                head = take("lm_head.weight", (v, d))
                if not np.array_equal(head, embedding):
                    raise WeightsError("tensor 'lm_head.weight' differs from "
                                       "'model.embed_tokens.weight' but the config ties them")
            lm_head = embedding.T
        else:
            lm_head = _c(take("lm_head.weight", (v, d)).T)
        final_norm = _c(take("model.norm.weight", (d,)))
        extra = sorted(name for name in tensors
                       if name not in used and not name.endswith("rotary_emb.inv_freq"))
        if extra:
            raise WeightsError(f"{len(extra)} unexpected tensor(s) the config does not describe: "
                               f"{extra[:8]}{' ...' if len(extra) > 8 else ''}")
        return cls(c, embedding, layers, final_norm, lm_head)

    def to_named_tensors(self) -> dict[str, np.ndarray]:
        """The inverse of from_named_tensors (dequantized): HF names, [out, in] float32."""
        c = self.config
        nh, kh, f = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.d_ff
        out = {}
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            qkv = dense(layer.qkv).T
            gate_up = dense(layer.gate_up).T
            out.update({
                p + "self_attn.q_proj.weight": _c(qkv[:nh]),
                p + "self_attn.k_proj.weight": _c(qkv[nh:nh + kh]),
                p + "self_attn.v_proj.weight": _c(qkv[nh + kh:]),
                p + "self_attn.o_proj.weight": _c(dense(layer.o).T),
                p + "mlp.gate_proj.weight": _c(gate_up[:f]),
                p + "mlp.up_proj.weight": _c(gate_up[f:]),
                p + "mlp.down_proj.weight": _c(dense(layer.down).T),
                p + "input_layernorm.weight": layer.attn_norm.copy(),
                p + "post_attention_layernorm.weight": layer.mlp_norm.copy()})
        table = self.embedding
        out["model.embed_tokens.weight"] = _c(table if isinstance(table, np.ndarray)
                                              else table.dequantize().T)
        out["model.norm.weight"] = self.final_norm.copy()
        if not c.tie_embeddings:
            out["lm_head.weight"] = _c(dense(self.lm_head).T)
        return out


def _c(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)
