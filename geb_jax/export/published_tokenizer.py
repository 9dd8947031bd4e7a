"""A published model's tokenizer back into a GGUF: the tokenizer.* keys llama.cpp reads.

A tokenizer that came from a GGUF (or a SentencePiece tokenizer.model, mapped as llama.cpp's
converter maps it) kept those keys in gguf_tokenizer.json (geb_jax.data.hf_tokenizer), so they
are written back unchanged: llama.cpp then tokenizes the export exactly as the original.

A Hugging Face tokenizer.json without them (a byte-level BPE from the Hub) is converted as
llama.cpp's convert_hf_to_gguf.py does: tokens in id order, merges, token types (control for
special added tokens, user-defined for the others) and the pre-tokenizer name. The converter
picks that name from a hash of the tokenizer's output on a probe text; we pick the first name
whose llama.cpp-equivalent tokenizer (geb_jax.data.gguf_vocab) gives the same ids as the
tokenizer.json on the probe, which is the property the hash stands for.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import gguf
import numpy as np

from geb_jax.data import gguf_vocab
from geb_jax.data.hf_tokenizer import HFTokenizer, load_tokenizer
from geb_jax.data.tokenizer import TokenizerError

# llama.cpp's convert_hf_to_gguf.py probe text (get_vocab_base_pre's chktxt), shortened: runs of
# spaces, tabs and newlines, digits, emoji, CJK, accents, apostrophes and code.
PROBE = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶‍🌫️ (multiple emojis "
         "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
         "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
         "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
         "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL def f(x):\n\treturn x")


def gguf_tokenizer_keys(folder: str, model_vocab: int) -> dict[str, Any]:
    """The tokenizer.* keys for a published model's tokenizer folder (see module docstring)."""
    tok = load_tokenizer(folder)
    if not isinstance(tok, HFTokenizer):
        raise TokenizerError(f"{folder} holds a geb_jax SentencePiece tokenizer: export it "
                             f"from its tokenizer.model")
    keys = tok.gguf_metadata or _keys_from_tokenizer_json(tok, folder)
    n = len(keys["tokenizer.ggml.tokens"])
    if n != model_vocab:
        raise TokenizerError(f"tokenizer {folder} has {n} tokens but the model's vocab_size is "
                             f"{model_vocab}; export with the tokenizer the model came with.")
    if tok.chat_template and "tokenizer.chat_template" not in keys:
        keys = dict(keys, **{"tokenizer.chat_template": tok.chat_template})
    return keys


def _keys_from_tokenizer_json(tok: HFTokenizer, folder: str) -> dict[str, Any]:
    with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as f:
        spec = json.load(f)
    model = spec.get("model", {})
    if model.get("type") != "BPE" or not _is_byte_level(spec):
        raise TokenizerError(
            f"{folder}/tokenizer.json is a {model.get('type')} tokenizer without byte-level "
            f"pre-tokenization; only byte-level BPE (GPT-2 style) tokenizer.json files and "
            f"SentencePiece tokenizer.model files can be written to GGUF.")
    n = tok.vocab_size
    tokens = [tok.id_to_piece(i) for i in range(n)]
    types = np.full(n, int(gguf.TokenType.NORMAL), np.int32)
    for added in spec.get("added_tokens", []):
        types[added["id"]] = int(gguf.TokenType.CONTROL if added.get("special")
                                 else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    keys: dict[str, Any] = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
                            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
                            "tokenizer.ggml.add_bos_token": tok.add_bos,
                            "tokenizer.ggml.add_eos_token": tok.add_eos}
    for key, value in (("bos", tok.bos_id), ("eos", tok.eos_id), ("unknown", tok.unk_id),
                       ("padding", tok.pad_id)):
        if value is not None:
            keys[f"tokenizer.ggml.{key}_token_id"] = int(value)
    keys["tokenizer.ggml.pre"] = _matching_pre(keys, tok, folder)
    return keys


def _is_byte_level(spec: Mapping) -> bool:
    text = json.dumps(spec.get("pre_tokenizer")) + json.dumps(spec.get("decoder"))
    return "ByteLevel" in text


def _matching_pre(keys: dict, tok: HFTokenizer, folder: str) -> str:
    want = tok.encode(PROBE, parse_special=False)
    for pre in gguf_vocab.supported_pre_tokenizers():
        candidate = gguf_vocab.build_tokenizer(
            gguf_vocab.vocab_from_metadata(dict(keys, **{"tokenizer.ggml.pre": pre}), folder))
        if candidate.encode(PROBE, add_special_tokens=False).ids == want:
            return pre
    raise TokenizerError(f"{folder}/tokenizer.json splits text like none of the pre-tokenizers "
                         f"llama.cpp knows ({', '.join(gguf_vocab.supported_pre_tokenizers())}); "
                         f"it cannot be written to GGUF faithfully.")


def add_tokenizer_keys(w: gguf.GGUFWriter, keys: Mapping[str, Any]) -> None:
    """Write tokenizer.* keys with the GGUF value types llama.cpp expects."""
    for key, value in keys.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, (int, np.integer)):
            w.add_uint32(key, int(value))
        elif isinstance(value, (float, np.floating)):
            w.add_float32(key, float(value))
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, _array(key, value))


def _array(key: str, value) -> list:
    """Python lists: gguf types an array by its first element (int -> INT32, float -> FLOAT32)."""
    if key.endswith(".scores"):
        return [float(v) for v in value]
    if key.endswith(".token_type"):
        return [int(v) for v in value]
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in value]
