"""Writes, checks and runs geb_jax's ONNX decoder files: export_onnx (the graph from
geb_jax/export/onnx_graph.py or, graph="fused", geb_jax/export/onnx_fused.py, plus metadata, the
tokenizer beside it, an atomic write and an onnxruntime check against the numpy engine), and
the helpers that feed a session (ort_feed, ort_session, ort_graph). File names and metadata
keys live in geb_jax/infer/onnx_file.py (the jax-free reader); decoding with a preallocated
cache through IOBinding in geb_jax/infer/onnx_decoder.py.

Memory: export_onnx reads the parameter tree lazily (`_ParamTreeTensors`) and streams every
initializer of >= 1 KiB into the .data file as soon as it is made, so building and saving hold
the caller's parameters plus about one tensor.
"""
from __future__ import annotations

import base64
import collections.abc
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx.external_data_helper import load_external_data_for_model

from geb_jax.data import chat
from geb_jax.data.tokenizer_bundle import bundle, unbundle
from geb_jax.data.tokenizer_files import load_tokenizer
from geb_jax.export.onnx_graph import (  # noqa: F401  (OnnxExportError: re-exported)
    DEFAULT_ACCURACY_LEVEL, DEFAULT_OPSET, OnnxExportError, build_onnx_model, check_quantize,
    resolved_block_size)
from geb_jax.infer import onnx_file as fmt
from geb_jax.infer.config import InferConfig, config_dict
from geb_jax.infer.engine import Engine
from geb_jax.infer.onnx_decoder import right_padding_error
from geb_jax.infer.weights import param_leaf

# Initializer bytes above which weights go to an external .data file: protobuf cannot
# serialise a message over 2 GiB, and the graph, metadata and tokenizer need some room.
EXTERNAL_DATA_THRESHOLD = 2 ** 31 - 2 ** 27
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


# ---- metadata ----------------------------------------------------------------------------

def chat_template_jinja() -> str:
    """The chat template of geb_jax/data/chat.py as a Hugging Face style Jinja template."""
    roles = ", ".join(f"'{role}': '{token}'" for role, token in chat.ROLE_TOKENS.items())
    return ("{% set role_tokens = {" + roles + "} %}{{ bos_token }}"
            "{% for message in messages %}{{ role_tokens[message['role']] }}"
            "{{ message['content'] }}" + chat.END_TOKEN + "{% endfor %}"
            "{% if add_generation_prompt %}" + chat.ROLE_TOKENS["assistant"] + "{% endif %}")


def _config_dict(model_config: Any) -> dict:
    try:
        return config_dict(model_config)
    except TypeError as e:
        raise OnnxExportError(f"model_config: {e}") from None


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
             graph: str = "plain", logits_to_keep: int = 0) -> dict[str, np.ndarray]:
    """onnxruntime inputs for new tokens (B, T). attention_mask (B, P+T) defaults to ones;
    position_ids default to cumsum(mask) - 1 over the new slots (padding gets 0); past is a
    previous run's present.* outputs by name (empty when None); logits_to_keep: the logits of
    the last n positions only (0: all T).

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
        problem = right_padding_error(mask, p)
        if problem:
            raise OnnxExportError(problem + " Pad on the right, or use the plain graph.")
    if position_ids is None:
        position_ids = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, p:]
    feed = {"input_ids": ids, "attention_mask": mask,
            "position_ids": np.asarray(position_ids, np.int64),
            fmt.LOGITS_TO_KEEP: np.array([logits_to_keep], np.int64)}
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
                quantize: str | None = None, block_size: int | None = None,
                accuracy_level: int = DEFAULT_ACCURACY_LEVEL, opset: int = DEFAULT_OPSET,
                external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
                overwrite: bool = False, verify: bool = True, graph: str = "plain",
                quantize_embedding: bool | None = None) -> str:
    """Write `out_path` (.onnx), plus `out_path`.data when the weights exceed
    external_data_threshold bytes, and tokenizer.model beside it. Returns out_path.

    params: the model's parameter tree (numpy or jax arrays); model_config: ModelConfig,
    ConfigDict or dict; quantize: None, "int8" or "int4" (every linear as symmetric
    MatMulNBits with `block_size` rows per block, default 32 at int8 and 128 at int4; the
    untied head at 8 bits; the embedding and a tied head stay float32 in the plain graph);
    accuracy_level: MatMulNBits' compute type (4: int8 activations, 0: float32). graph:
    "plain" (this module's standard-op graph) or "fused" (geb_jax/export/onnx_fused.py:
    onnxruntime's GroupQueryAttention and SkipSimplifiedLayerNormalization, packed QKV and
    gate/up; batches padded on the right), whose quantized form also quantizes a tied head
    and, unless quantize_embedding=False, the embedding table (both 8-bit, shared blocks;
    onnx_fused.build_fused_model says why).
    Files are written to a temporary folder, checked with
    onnxruntime against the numpy engine (verify=True), then renamed into place, the .onnx
    last.
    """
    out_path = os.path.abspath(os.fspath(out_path))
    if not out_path.endswith(".onnx"):
        raise OnnxExportError(f"out_path {out_path} must end with .onnx")
    block_size = resolved_block_size(check_quantize(quantize, block_size, accuracy_level),
                                     block_size)
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
