"""geb_jax models -> one GGUF file that llama.cpp and ollama run as a "llama" model.

Read geb_jax/infer/gguf_file.py first: it holds the format facts shared with the reader (tensor
names, the q/k row permutation for llama.cpp's interleaved RoPE). Here we follow what
llama.cpp's convert_hf_to_gguf.py does for a Llama with a SentencePiece tokenizer:

* tensors come from `hf_state_dict_from_params` ([out, in] rows); 1-D norms stay float32 in
  every mode; matrices are f32, f16, q8_0 or q4_0 (gguf's reference `gguf.quants.quantize`;
  q4_0 quantizes every matrix, the output too, where llama-quantize keeps output at q6_K), and
  a matrix whose rows are not a multiple of the 32-value block falls back to f16, as the
  converter does. A tied model has no `output.weight` (llama.cpp then reuses token_embd).
* the vocabulary (pieces, scores, types) is read from the SentencePiece proto; a model vocab
  larger than the tokenizer's is padded with unused "[PADi]" tokens. add_space_prefix mirrors
  the tokenizer's add_dummy_prefix (ours: off), BOS is added, EOS is not, and `<|end|>` is
  the end-of-turn token so chat generation stops after a reply.
* the chat template is `CHAT_TEMPLATE`, the Jinja form of geb_jax.data.chat.render_chat
  (no BOS inside: llama.cpp adds it). It cannot reproduce one detail of encode_chat: a
  role-token string typed inside a message is escaped to byte pieces by geb_jax but becomes the
  special token in llama.cpp.
* a published model's tokenizer (a folder from geb_jax.data.hf_tokenizer) goes back as the
  tokenizer.* keys it came with (export/published_tokenizer.py), chat template included.
* `geb_jax.tokenizer.sha256` checksums every tokenizer key (definition in geb_jax/gguf_header.py),
  so a changed or damaged vocabulary is refused on load instead of mis-tokenizing.

The file is written to a temporary sibling, read back with gguf.GGUFReader and checked (names,
types, shapes, a CRC of every tensor's bytes), then renamed into place.
"""
from __future__ import annotations

import base64
import dataclasses
import os
import zlib
from typing import Any, Mapping

import gguf
import numpy as np
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2

from geb_jax.atomic_io import atomic_path
from geb_jax.export import published_tokenizer
from geb_jax.export.hf import hf_state_dict_from_params
from geb_jax.infer.gguf_file import (ARCHITECTURE, SENTENCEPIECE_MODEL_KEY, TOKENIZER_SHA256_KEY,
                                     gguf_tensor_name, rope_rows_to_interleaved,
                                     tokenizer_sha256_of_writer)
from geb_jax.errors import ConfigError
from geb_jax.model.config import ModelConfig

Q = gguf.GGMLQuantizationType
# dtype argument -> (ggml type of the matrices, general.file_type)
DTYPES = {"f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
          "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
          "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
          "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0)}
END_OF_TURN = "<|end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>' }}"
    "{% else %}{{ raise_exception('unknown role ' + message['role'] + "
    "': expected system, user or assistant') }}{% endif %}"
    "{{ message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


class GGUFExportError(ValueError):
    """The model or tokenizer cannot be written as a llama GGUF, or the written file is wrong."""


@dataclasses.dataclass
class _Vocab:
    tokens: list[bytes]
    scores: list[float]
    types: list[int]  # SentencePiece piece types; their numbers equal gguf.TokenType's
    add_space_prefix: bool
    special_ids: dict[str, int]  # bos, eos, unk, pad, eot
    serialized: bytes


def _read_vocab(tokenizer_path: str, model_vocab: int) -> _Vocab:
    """Pieces, scores and types from the SentencePiece proto, padded to the model's vocab."""
    try:
        with open(tokenizer_path, "rb") as f:
            blob = f.read()
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(blob)
    except (OSError, DecodeError) as e:
        raise GGUFExportError(f"tokenizer {tokenizer_path} is not a readable SentencePiece "
                              f"model: {e}") from None
    n = len(proto.pieces)
    if n == 0 or n > model_vocab:
        raise GGUFExportError(f"tokenizer {tokenizer_path} has {n} pieces but the model's "
                              f"vocab_size is {model_vocab}; export with the tokenizer the model "
                              f"was trained with.")
    tokens = [p.piece.encode("utf-8") for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]
    for i in range(n, model_vocab):  # unused embedding rows, as convert_hf_to_gguf pads them
        tokens.append(f"[PAD{i}]".encode("utf-8"))
        scores.append(-10000.0)
        types.append(int(gguf.TokenType.UNUSED))
    spec = proto.trainer_spec
    pieces = {p.piece: i for i, p in enumerate(proto.pieces)}
    special = {"bos": spec.bos_id, "eos": spec.eos_id, "unk": spec.unk_id, "pad": spec.pad_id}
    if END_OF_TURN in pieces:
        special["eot"] = pieces[END_OF_TURN]
    return _Vocab(tokens, scores, types, bool(proto.normalizer_spec.add_dummy_prefix),
                  {k: v for k, v in special.items() if v >= 0}, blob)


def _add_metadata(w: gguf.GGUFWriter, c: ModelConfig, vocab: _Vocab | dict, name: str,
                  file_type: int) -> None:
    """The llama.* shape keys, then the tokenizer: ours (a SentencePiece _Vocab) or a published
    model's tokenizer.* keys as they came in (a dict)."""
    w.add_name(name)
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(c.vocab_size)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.d_model)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.d_ff)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_key_length(c.head_dim)  # llama.cpp assumes d_model / n_heads unless told
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(float(c.rope_theta))
    w.add_layer_norm_rms_eps(float(c.norm_eps))
    if isinstance(vocab, dict):
        published_tokenizer.add_tokenizer_keys(w, vocab)
    else:
        _add_sentencepiece_vocab(w, vocab)
    w.add_string(TOKENIZER_SHA256_KEY, tokenizer_sha256_of_writer(w))  # last: covers the above


def _add_sentencepiece_vocab(w: gguf.GGUFWriter, vocab: _Vocab) -> None:
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id,
              "pad": w.add_pad_token_id, "eot": w.add_eot_token_id}
    for key, token_id in vocab.special_ids.items():
        adders[key](token_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(vocab.add_space_prefix)
    w.add_chat_template(CHAT_TEMPLATE)
    w.add_string(SENTENCEPIECE_MODEL_KEY, base64.b64encode(vocab.serialized).decode("ascii"))


def _ggml_type(array_shape: tuple[int, ...], matrix_type: Q) -> Q:
    """Norms stay f32; q8_0 / q4_0 need rows that are whole 32-value blocks (else f16, as
    llama.cpp's converter falls back)."""
    if len(array_shape) == 1:
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[matrix_type][0]
    if matrix_type in (Q.Q8_0, Q.Q4_0) and array_shape[-1] % block:
        return Q.F16
    return matrix_type


def _llama_cpp_layout(hf_name: str, value: np.ndarray, c: ModelConfig) -> np.ndarray:
    if hf_name.endswith("self_attn.q_proj.weight"):
        return rope_rows_to_interleaved(value, c.n_heads)
    if hf_name.endswith("self_attn.k_proj.weight"):
        return rope_rows_to_interleaved(value, c.n_kv_heads)
    return value


def _encode(value: np.ndarray, qtype: Q) -> np.ndarray:
    """float32 (rows, cols) -> the bytes-bearing array gguf writes (f32, f16 or q8_0/q4_0
    uint8)."""
    return np.ascontiguousarray(gguf.quants.quantize(value.astype(np.float32), qtype))


def _stored_shape(shape: tuple[int, ...], qtype: Q) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape as add_tensor_info wants it, numpy dtype, bytes) without computing the data."""
    if qtype == Q.F32:
        return shape, np.dtype(np.float32), int(np.prod(shape)) * 4
    if qtype == Q.F16:
        return shape, np.dtype(np.float16), int(np.prod(shape)) * 2
    byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


def _verify(path: str, expected: Mapping[str, tuple[Q, tuple[int, ...], int]]) -> None:
    """Re-read the written file: every tensor present with its type, shape and bytes' CRC."""
    reader = gguf.GGUFReader(path, "r")
    found = {t.name: t for t in reader.tensors}
    if set(found) != set(expected):
        raise GGUFExportError(f"{path}: tensors read back {sorted(set(found) ^ set(expected))} "
                              f"differ from those written")
    for name, (qtype, shape, crc) in expected.items():
        t = found[name]
        got_shape = tuple(int(s) for s in reversed(t.shape))
        got_crc = zlib.crc32(np.asarray(t.data).tobytes())
        if Q(t.tensor_type) != qtype or got_shape != shape or got_crc != crc:
            raise GGUFExportError(
                f"{path}: tensor {name!r} read back as {Q(t.tensor_type).name} {got_shape} "
                f"(crc {got_crc}), written as {qtype.name} {shape} (crc {crc})")


def export_gguf(params: Mapping, model_config: ModelConfig | Mapping[str, Any],
                tokenizer_path: str, out_path: str, *, dtype: str = "f32",
                name: str = "geb_jax") -> str:
    """Write `out_path` (.gguf) for llama.cpp / ollama; returns its absolute path.

    params: our float32 tree (geb_jax.model.init_params layout); model_config: ModelConfig or
    its dict; tokenizer_path: the SentencePiece .model the model was trained with, or a
    published model's tokenizer folder (its GGUF tokenizer keys are written back as they were);
    dtype: "f32", "f16", "q8_0" or "q4_0" for the matrices (norms stay f32).
    """
    if dtype not in DTYPES:
        raise GGUFExportError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}.")
    c = model_config if isinstance(model_config, ModelConfig) else \
        ModelConfig.from_dict(dict(model_config))
    if c.norm_position != "pre":
        raise ConfigError(
            f"model.norm_position={c.norm_position!r}: llama.cpp's llama architecture is "
            f"pre-norm and has no post-norm variant, so this model cannot be exported to GGUF. "
            f"Only norm_position='pre' models can be exported.")
    matrix_type, file_type = DTYPES[dtype]
    tokenizer_path = os.fspath(tokenizer_path)
    vocab = (published_tokenizer.gguf_tokenizer_keys(tokenizer_path, c.vocab_size)
             if os.path.isdir(tokenizer_path) else _read_vocab(tokenizer_path, c.vocab_size))
    state = hf_state_dict_from_params(params, c)  # also checks every shape against the config

    out_path = os.path.abspath(os.fspath(out_path))
    with atomic_path(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCHITECTURE)
        try:
            _add_metadata(writer, c, vocab, name, file_type)
            plan = []  # (hf name, gguf name, ggml type), in writing order
            for hf_name, value in state.items():
                qtype = _ggml_type(value.shape, matrix_type)
                gg_name = gguf_tensor_name(hf_name)
                shape, np_dtype, nbytes = _stored_shape(value.shape, qtype)
                writer.add_tensor_info(gg_name, shape, np_dtype, nbytes,
                                       raw_dtype=qtype if qtype in (Q.Q8_0, Q.Q4_0) else None)
                plan.append((hf_name, gg_name, qtype))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            expected = {}
            for hf_name, gg_name, qtype in plan:  # one tensor encoded at a time: bounded memory
                value = state.pop(hf_name)
                data = _encode(_llama_cpp_layout(hf_name, value, c), qtype)
                writer.write_tensor_data(data)
                expected[gg_name] = (qtype, value.shape, zlib.crc32(data.tobytes()))
        finally:
            writer.close()  # flushes (a second close is a no-op)
        _verify(tmp, expected)
    return out_path
