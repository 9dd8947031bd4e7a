"""Read a geb_jax ONNX export back into numpy `Weights`, with the `onnx` package only.

Why: the numpy engine must serve the same file that onnxruntime runs, without onnxruntime or
jax installed. This module also owns the file format's names (metadata keys, initializer
names) so the exporter (geb_jax/export/onnx_export.py) and the reader cannot drift apart.

Format, as written by `export_onnx`:
* metadata_props: ``producer`` = "geb_jax", ``geb_jax.format_version``, the model config JSON,
  the SentencePiece model (base64) and its sha256, the chat template (Jinja, under the
  Hugging Face key ``chat_template``) with a name and description, the quantization.
* initializers named after the Hugging Face tensors, but in MatMul layout (in, out):
  ``model.layers.{i}.self_attn.q_proj.MatMul.weight`` ... and ``lm_head.MatMul.weight``;
  the embedding table ``model.embed_tokens.weight`` (V, D) and the norms keep HF layouts.
* quantized linears are com.microsoft MatMulNBits nodes whose B input is
  ``<linear>.MatMul.weight_Q4`` / ``_Q8`` (uint8 (out, blocks, bytes per block)), with
  ``_scales`` (out, blocks) and, optionally, packed uint8 ``_zero_points`` (geb_jax writes
  symmetric blocks without them; the reader takes either).
* ``geb_jax.onnx_graph`` = "fused" (geb_jax/export/onnx_fused.py; absent or "plain" otherwise):
  q/k/v are one ``model.layers.{i}.self_attn.qkv_proj`` linear (q columns, then k, then v) and
  gate/up one ``mlp.gate_up_proj`` (gate, then up), each read once and split back here; a
  quantized file may hold the embedding as a com.microsoft GatherBlockQuantized node on
  ``input_ids`` (uint8 ``model.embed_tokens.weight_Q4`` / ``_Q8`` blocks along D), dequantized
  here like the MatMulNBits weights. A tied model whose table is float32 in a quantized fused
  file has its head as its own MatMulNBits ``lm_head.MatMul.weight_Q4`` / ``_Q8`` (the table,
  quantized), read here as Weights.lm_head in place of the table's view.

MatMulNBits weights are dequantized to float32 on load: their layout does not map onto
geb_jax.infer.quantize (int8 here has one scale per 32-row block, Int8Matrix one per column;
int4 has integer zero points and float32 scales, Int4Matrix float16 minimum and scale), so
`load_model(path, quantize=...)` re-quantizes for the numpy engine when asked.
"""
from __future__ import annotations

import base64
import collections.abc
import dataclasses
import functools
import hashlib
import json
import math
import os

import numpy as np

from geb_jax.infer.config import InferConfig, InferConfigError
from geb_jax.infer.weights import ModelFileError, Weights, WeightsError

PRODUCER = "geb_jax"
FORMAT_VERSION = "2"  # 2: the logits_to_keep input
META_PRODUCER = "producer"
META_FORMAT = "geb_jax.format_version"
META_CONFIG = "geb_jax.model_config"
META_TOKENIZER = "geb_jax.tokenizer_model_base64"
META_TOKENIZER_SHA256 = "geb_jax.tokenizer_model_sha256"
META_CHAT_TEMPLATE = "chat_template"  # the Hugging Face tokenizer_config key: a Jinja template
META_CHAT_NAME = "geb_jax.chat_template_name"
META_CHAT_DESCRIPTION = "geb_jax.chat_template_description"
META_QUANTIZATION = "geb_jax.quantization"  # "none", "int8" or "int4"
META_BLOCK_SIZE = "geb_jax.block_size"
META_ACCURACY_LEVEL = "geb_jax.accuracy_level"  # MatMulNBits compute: "0" float32, "4" int8
META_GRAPH = "geb_jax.onnx_graph"  # "plain" (absent in older files) or "fused"
GRAPHS = ("plain", "fused")
LOGITS_TO_KEEP = "logits_to_keep"  # graph input (format 2): the head on the last n positions
MATMUL_SUFFIX = ".MatMul.weight"  # float (in, out); MatMulNBits adds _Q4 / _Q8, _scales, ...
TOKENIZER_FILE = "tokenizer.model"  # written beside the .onnx by the exporter (ours)
TOKENIZER_FOLDER = "tokenizer"  # or a published model's tokenizer.json + tokenizer_config.json


def linear_names(n_layers: int, tie_embeddings: bool) -> list[str]:
    """Hugging Face names of every linear layer (torch [out, in] weights) in graph order."""
    names = []
    for i in range(n_layers):
        p = f"model.layers.{i}."
        names += [p + f"self_attn.{x}_proj" for x in "qkvo"]
        names += [p + f"mlp.{x}_proj" for x in ("gate", "up", "down")]
    return names if tie_embeddings else names + ["lm_head"]


# The fused graph's packed linears: a part -> (the packed linear, index of the part).
PACKED_PARTS = {"self_attn.q_proj": ("self_attn.qkv_proj", 0),
                "self_attn.k_proj": ("self_attn.qkv_proj", 1),
                "self_attn.v_proj": ("self_attn.qkv_proj", 2),
                "mlp.gate_proj": ("mlp.gate_up_proj", 0), "mlp.up_proj": ("mlp.gate_up_proj", 1)}


@dataclasses.dataclass
class OnnxModelInfo:
    """What the metadata of an export says (no weights)."""
    path: str
    config: InferConfig
    config_dict: dict  # the ModelConfig fields as exported (training-only fields included)
    tokenizer_bytes: bytes
    quantization: str | None  # None, "int8" or "int4"
    chat_template: str
    metadata: dict
    graph: str = "plain"  # "plain" or "fused" (geb_jax/export/onnx_fused.py)


def dequantize_matmul_nbits(packed: np.ndarray, scales: np.ndarray,
                            zero_points: np.ndarray | None, k: int, n: int, bits: int,
                            block_size: int) -> np.ndarray:
    """MatMulNBits' B as a float32 (K, N) matrix: (code - zero_point) * scale per block.

    packed: uint8 (N, blocks, block_size * bits / 8), codes low bits first along K;
    scales: (N, blocks) or flat; zero_points: uint8 (N, ceil(blocks * bits / 8)) packed the
    same way, or None for the symmetric default 2^(bits - 1)."""
    if bits not in (4, 8):
        raise ValueError(f"MatMulNBits bits={bits} is not supported (4 or 8)")
    blocks = -(-k // block_size)
    packed = np.asarray(packed, np.uint8).reshape(n, blocks, block_size * bits // 8)
    if bits == 4:
        codes = np.stack([packed & 15, packed >> 4], axis=-1).reshape(n, blocks, block_size)
    else:
        codes = packed
    if zero_points is None:
        zero = np.full((n, blocks), 2 ** (bits - 1), np.float32)
    else:
        zp = np.asarray(zero_points, np.uint8).reshape(n, -1)
        if bits == 4:
            zp = np.stack([zp & 15, zp >> 4], axis=-1).reshape(n, -1)
        zero = zp[:, :blocks].astype(np.float32)
    scale = np.asarray(scales, np.float32).reshape(n, blocks)
    w_nbk = (codes.astype(np.float32) - zero[:, :, None]) * scale[:, :, None]
    return np.ascontiguousarray(w_nbk.reshape(n, blocks * block_size)[:, :k].T)


def _load_proto(path: str):
    import onnx  # pylint: disable=import-outside-toplevel
    from google.protobuf.message import DecodeError  # pylint: disable=import-outside-toplevel

    if not os.path.isfile(path):
        raise ModelFileError(f"ONNX model file not found: {path}")
    try:
        return onnx.load_model(path, load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise ModelFileError(f"{path} is not a readable ONNX file (truncated or corrupt?): "
                             f"{type(e).__name__}: {e}") from None


def _info(path: str, model) -> OnnxModelInfo:
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get(META_PRODUCER) != PRODUCER or META_CONFIG not in meta:
        raise ModelFileError(
            f"{path} is not an ONNX model exported by geb_jax (no '{META_PRODUCER}: "
            f"{PRODUCER}' metadata; the file may also be truncated). Export one with "
            f"geb_jax.export.onnx_export.export_onnx.")
    if meta.get(META_FORMAT) != FORMAT_VERSION:
        raise ModelFileError(f"{path} has geb_jax ONNX format {meta.get(META_FORMAT)!r}; this "
                             f"version reads format {FORMAT_VERSION!r}. Re-export the model.")
    try:
        config_dict = json.loads(meta[META_CONFIG])
        config = InferConfig.from_dict(config_dict)
        tokenizer = base64.b64decode(meta[META_TOKENIZER], validate=True)
    except (KeyError, ValueError, TypeError, InferConfigError) as e:
        raise ModelFileError(f"{path}: damaged geb_jax metadata: {type(e).__name__}: {e}") \
            from None
    if hashlib.sha256(tokenizer).hexdigest() != meta.get(META_TOKENIZER_SHA256):
        raise ModelFileError(f"{path}: the embedded tokenizer does not match its sha256")
    quantization = meta.get(META_QUANTIZATION, "none")
    graph = meta.get(META_GRAPH, "plain")
    if graph not in GRAPHS:
        raise ModelFileError(f"{path}: unknown {META_GRAPH} {graph!r} (this version reads "
                             f"{', '.join(GRAPHS)}); update geb_jax or re-export the model.")
    return OnnxModelInfo(path, config, config_dict, tokenizer,
                         None if quantization == "none" else quantization,
                         meta.get(META_CHAT_TEMPLATE, ""), meta, graph)


def read_onnx_info(path: str) -> OnnxModelInfo:
    """The metadata of a geb_jax export: config, tokenizer bytes, chat template, quantization."""
    path = os.fspath(path)
    return _info(path, _load_proto(path))


def read_onnx_weights(path: str) -> tuple[Weights, OnnxModelInfo]:
    """A geb_jax .onnx (external data beside it, if any) -> float32 Weights and its metadata.

    Why lazily: each tensor is read from its own slice of the external file only when
    Weights.from_named_tensors asks for it, so the file's bytes never sit in the proto and
    each layer's originals are freed once merged; the peak stays near one copy of the weights
    (onnx's load_external_data_for_model plus to_array held ~2.7)."""
    path = os.fspath(path)
    model = _load_proto(path)
    info = _info(path, model)
    try:
        initializers = _Initializers(model, os.path.dirname(os.path.abspath(path)))
        nbits = {node.input[1]: node for node in model.graph.node
                 if node.op_type == "MatMulNBits"}
        c = info.config
        names = ["model.norm.weight"]
        names += [f"model.layers.{i}.{norm}.weight" for i in range(c.n_layers)
                  for norm in ("input_layernorm", "post_attention_layernorm")]
        tensors = _LazyTensors({name: functools.partial(initializers.array, name)
                                for name in names})
        tensors.readers["model.embed_tokens.weight"] = functools.partial(
            _embedding, initializers, model.graph.node)
        packed = _PackedReader(initializers, nbits, c)
        for linear in linear_names(c.n_layers, c.tie_embeddings):
            tensors.readers[linear + ".weight"] = functools.partial(packed.weight, linear)
        weights = Weights.from_named_tensors(tensors, c)
        if c.tie_embeddings and any(f"lm_head{MATMUL_SUFFIX}_Q{bits}" in nbits
                                    for bits in (4, 8)):  # a fused file's own quantized head
            weights = dataclasses.replace(weights, lm_head=np.ascontiguousarray(
                _linear_weight("lm_head", initializers, nbits).T))
    except (WeightsError, ValueError, OSError) as e:  # OSError: external data file missing
        raise ModelFileError(f"{path}: cannot read the weights ({type(e).__name__}: {e}); "
                             f"the file (or its external data) is truncated or was not "
                             f"written by geb_jax's exporter") from None
    return weights, info


class _LazyTensors(collections.abc.Mapping):
    """name -> array, each read (and re-read) only when asked for: from_named_tensors merges
    q/k/v and gate/up per layer, so keeping every original alive would double the peak."""

    def __init__(self, readers: dict):
        self.readers = readers  # name -> () -> np.ndarray in torch (out, in) layout

    def __getitem__(self, name: str) -> np.ndarray:
        return self.readers[name]()

    def __contains__(self, name) -> bool:  # Mapping's default would read the tensor
        return name in self.readers

    def __iter__(self):
        return iter(self.readers)

    def __len__(self) -> int:
        return len(self.readers)


class _Initializers:
    """The model's initializers as numpy arrays; external ones read from their own slice of
    the data file beside the .onnx (the proto was loaded without external data)."""

    def __init__(self, model, folder: str):
        self.tensors = {t.name: t for t in model.graph.initializer}
        self.folder = folder

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def array(self, name: str) -> np.ndarray:
        from onnx import TensorProto, numpy_helper  # pylint: disable=import-outside-toplevel

        if name not in self.tensors:
            raise WeightsError(f"initializer {name!r} is missing")
        tensor = self.tensors[name]
        if tensor.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(tensor)
        return _read_external(tensor, self.folder)


def _read_external(tensor, folder: str) -> np.ndarray:
    """One external tensor, read with np.fromfile from offset..offset+length of its file."""
    from onnx import helper  # pylint: disable=import-outside-toplevel
    from onnx.external_data_helper import (  # pylint: disable=import-outside-toplevel
        ExternalDataInfo)

    ext = ExternalDataInfo(tensor)  # validates offset and length >= 0
    folder = os.path.realpath(folder)
    file = os.path.realpath(os.path.join(folder, ext.location))
    if not ext.location or os.path.isabs(ext.location) or \
            os.path.commonpath([folder, file]) != folder:
        raise ValueError(f"initializer {tensor.name!r} has external data location "
                         f"{ext.location!r} outside the model's folder {folder}")
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    count = math.prod(tensor.dims)
    size = os.path.getsize(file)  # OSError names the file when it is missing
    offset = ext.offset or 0
    length = size - offset if ext.length is None else ext.length
    if length != count * dtype.itemsize or offset + length > size:
        raise ValueError(f"initializer {tensor.name!r} needs bytes {offset}..{offset + length} "
                         f"({count} x {dtype}) of {file}, which holds {size} bytes")
    with open(file, "rb") as f:
        f.seek(offset)
        flat = np.fromfile(f, dtype=dtype, count=count)
    if flat.size != count:  # the file shrank since getsize
        raise ValueError(f"{file} ended inside initializer {tensor.name!r}")
    return flat.astype(dtype.newbyteorder("="), copy=False).reshape(tensor.dims)


class _PackedReader:
    """Linear weights by name, a fused file's q/k/v and gate/up cut from their packed linear;
    the last packed matrix is kept, so q, k and v (read in turn) cost one read."""

    def __init__(self, initializers: _Initializers, nbits, config: InferConfig):
        self.initializers, self.nbits = initializers, nbits
        c = config
        nh, kh = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        self.splits = {"self_attn.qkv_proj": (0, nh, nh + kh, nh + 2 * kh),
                       "mlp.gate_up_proj": (0, c.d_ff, 2 * c.d_ff)}
        self._last: tuple[str, np.ndarray] | None = None

    def _stored(self, linear: str) -> bool:
        name = linear + MATMUL_SUFFIX
        return name in self.initializers or any(f"{name}_Q{bits}" in self.nbits
                                                for bits in (4, 8))

    def weight(self, linear: str) -> np.ndarray:
        """The torch (out, in) float32 matrix of `linear` (a view into a packed one)."""
        prefix, _, part = linear.rpartition(".layers.")
        layer, _, name = part.partition(".")
        if name not in PACKED_PARTS or self._stored(linear):
            return _linear_weight(linear, self.initializers, self.nbits)
        packed_name, index = PACKED_PARTS[name]
        packed = f"{prefix}.layers.{layer}.{packed_name}"
        if self._last is None or self._last[0] != packed:
            self._last = None  # drop the previous one before reading the next
            self._last = (packed, _linear_weight(packed, self.initializers, self.nbits))
        bounds = self.splits[packed_name]
        matrix = self._last[1]
        if matrix.shape[0] != bounds[-1]:
            raise WeightsError(f"packed linear {packed!r} has {matrix.shape[0]} outputs, "
                               f"expected {bounds[-1]} from the config")
        return matrix[bounds[index]:bounds[index + 1]]


def _embedding(initializers: _Initializers, nodes) -> np.ndarray:
    """The (V, D) float32 table: the float initializer, or a fused file's
    GatherBlockQuantized on input_ids, dequantized."""
    name = "model.embed_tokens.weight"
    if name in initializers:
        return initializers.array(name)
    for node in nodes:
        if node.op_type == "GatherBlockQuantized" and node.input[1] == "input_ids":
            attrs = {a.name: a.i for a in node.attribute}
            zero = node.input[3] if len(node.input) > 3 and node.input[3] else None
            return dequantize_gather_block_quantized(
                initializers.array(node.input[0]), initializers.array(node.input[2]),
                None if zero is None else initializers.array(zero), attrs.get("bits", 4),
                attrs.get("block_size", 128), attrs.get("gather_axis", 0),
                attrs.get("quantize_axis", 1))
    raise WeightsError(f"initializer {name!r} is missing (and no GatherBlockQuantized reads "
                       f"input_ids)")


def dequantize_gather_block_quantized(data: np.ndarray, scales: np.ndarray,
                                      zero_points: np.ndarray | None, bits: int,
                                      block_size: int, gather_axis: int = 0,
                                      quantize_axis: int = -1) -> np.ndarray:
    """com.microsoft GatherBlockQuantized's uint8 `data` (V, ...) quantized along its last axis
    as the float32 table (V, rest): (code - zero_point) * scale per block of block_size codes.
    Codes of bits < 8 are packed low bits first along the last axis, zero points too (one
    logical element per scale); the zero point defaults to 2^(bits - 1)."""
    data = np.asarray(data, np.uint8)
    if bits not in (4, 8) or gather_axis != 0 or quantize_axis not in (-1, data.ndim - 1):
        raise WeightsError(f"GatherBlockQuantized with bits={bits}, gather_axis={gather_axis}, "
                           f"quantize_axis={quantize_axis} on rank {data.ndim} data is not a "
                           f"layout geb_jax writes (bits 4 or 8, gather 0, quantize last)")

    def unpack(a: np.ndarray) -> np.ndarray:  # (..., n) bytes -> (..., n * 8 / bits) codes
        return a if bits == 8 else np.stack([a & 15, a >> 4], axis=-1).reshape(
            *a.shape[:-1], -1)

    v = data.shape[0]
    codes = unpack(data).reshape(v, -1).astype(np.float32)  # (V, D) along the quantized axis
    scales = np.asarray(scales, np.float32)
    if scales.shape[-1] * block_size != unpack(data).shape[-1] or \
            scales.shape[:-1] != data.shape[:-1]:
        raise WeightsError(f"GatherBlockQuantized scales {scales.shape} do not fit data "
                           f"{data.shape} in blocks of {block_size}")
    if zero_points is None:
        zero = np.full(scales.shape, 2 ** (bits - 1), np.float32)
    else:
        zero = unpack(np.asarray(zero_points, np.uint8))[..., :scales.shape[-1]]
        zero = zero.astype(np.float32)
    table = (codes.reshape(v, -1, block_size) - zero.reshape(v, -1, 1)) * \
        scales.reshape(v, -1, 1)
    return np.ascontiguousarray(table.reshape(v, -1))


def _linear_weight(linear: str, initializers: _Initializers, nbits) -> np.ndarray:
    """The torch (out, in) float32 matrix of one linear layer, dequantized if MatMulNBits."""
    name = linear + MATMUL_SUFFIX
    array = initializers.array
    if name in initializers:
        return array(name).T
    for bits in (4, 8):
        node = nbits.get(f"{name}_Q{bits}")
        if node is None:
            continue
        attrs = {a.name: a.i for a in node.attribute}
        zero = array(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        return dequantize_matmul_nbits(array(node.input[1]), array(node.input[2]), zero,
                                       attrs["K"], attrs["N"], attrs.get("bits", 4),
                                       attrs["block_size"]).T
    raise WeightsError(f"linear layer {linear!r} has neither {name!r} nor a MatMulNBits "
                       f"weight {name}_Q4 / _Q8")


def tokenizer_file_for(info: OnnxModelInfo, cache_dir: str | None = None) -> str:
    """A path holding the embedded tokenizer: tokenizer.model (or tokenizer/) beside the .onnx
    when it matches, else a copy extracted (atomically) into the geb_jax cache, named by its
    sha256."""
    from geb_jax.data.tokenizer_bundle import (bundle, is_folder_bundle,  # pylint: disable=import-outside-toplevel
                                               unbundle)
    folder = is_folder_bundle(info.tokenizer_bytes)
    beside = os.path.join(os.path.dirname(os.path.abspath(info.path)),
                          TOKENIZER_FOLDER if folder else TOKENIZER_FILE)
    if os.path.exists(beside) and bundle(beside) == info.tokenizer_bytes:
        return beside
    if cache_dir is None:
        from geb_jax.data import tokenizer  # pylint: disable=import-outside-toplevel
        cache_dir = os.path.join(tokenizer.default_cache_dir(), "onnx-tokenizers")
    sha = hashlib.sha256(info.tokenizer_bytes).hexdigest()
    target = os.path.join(cache_dir, sha[:24] + ("" if folder else ".model"))
    if not os.path.exists(target):
        unbundle(info.tokenizer_bytes, target)
    return target


def load_onnx_model(path: str) -> tuple[Weights, str]:
    """For loading.load_model: (float32 Weights, path of the model's tokenizer file)."""
    weights, info = read_onnx_weights(path)
    return weights, tokenizer_file_for(info)
