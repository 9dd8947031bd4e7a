"""Tokenizers of published models (GGUF files, Hugging Face folders) behind geb_jax's interface.

`HFTokenizer` wraps a `tokenizers.Tokenizer` and has the method names of our SentencePiece
`geb_jax.data.tokenizer.Tokenizer`, so training / serving code takes either. Its contract:

* `encode(text, add_bos=False, add_eos=False, parse_special=True)` adds no specials by itself;
  special-token texts written in `text` (e.g. "<|im_start|>") become their ids, as llama.cpp's
  `llama_tokenize(..., parse_special=true)` does; with parse_special=False they are tokenized
  as ordinary text (user-defined tokens such as "<think>" still match whole, like llama.cpp).
* `decode(ids)`: bos, eos and pad ids vanish; every other special token keeps its text (llama.cpp's
  detokenize with special=true, less bos/eos). No "clean up" of spaces, so for text without
  special tokens decode(encode(text)) == text.
* Where the tokenizer comes from:
  - `from_gguf(path)`: built from the file's `tokenizer.ggml.*` metadata (gguf_vocab.py), giving
    llama.cpp's ids;
  - `from_folder(folder)`: a Hugging Face tokenizer.json (+ tokenizer_config.json,
    special_tokens_map.json, generation_config.json), or a folder with only a SentencePiece
    tokenizer.model (LLaMA, TinyLlama). The latter is not run through sentencepiece: its pieces,
    scores and types are exactly what llama.cpp's converter puts into a GGUF, so we build the
    same `tokenizers` BPE as for a "llama" GGUF and get llama.cpp's ids for that model;
  - `load_tokenizer(path)` picks the right one (and our own SentencePiece `Tokenizer` for
    geb_jax models, including GGUFs our exporter wrote).
* `save(folder)` writes tokenizer.json + tokenizer_config.json that transformers'
  `AutoTokenizer.from_pretrained(folder)` loads into a tokenizer giving the same ids.

No JAX here: the numpy-only inference engine uses this module.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

from geb_jax.atomic_io import atomic_file
from geb_jax.data import gguf_vocab
from geb_jax.data.tokenizer import Tokenizer, TokenizerError, check_vocab_fits

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# The GGUF tokenizer.* keys a tokenizer was built from (a GGUF file's, or what llama.cpp's
# converter writes for a SentencePiece model), kept beside tokenizer.json so that exporting
# back to GGUF writes the original vocabulary and llama.cpp tokenizes exactly as before.
GGUF_TOKENIZER_JSON = "gguf_tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"


class TokenizerNotFoundError(TokenizerError, FileNotFoundError):
    """The tokenizer path does not exist (both a TokenizerError and a FileNotFoundError)."""


class HFTokenizer:
    """A `tokenizers.Tokenizer` plus the special ids and flags a model file states."""

    def __init__(self, tokenizer, *, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None, unk_id: int | None = None, add_bos: bool = False,
                 add_eos: bool = False, stop_ids: Iterable[int] = (),
                 chat_template: str | None = None, path: str | None = None,
                 model_max_length: int | None = None, gguf_metadata: dict | None = None):
        self._tok = tokenizer
        self._tok.encode_special_tokens = False
        self._literal = None  # a copy that leaves special-token texts alone (parse_special=False)
        self._raw: dict[int, str] | None = None  # see _raw_added
        self.bos_id, self.eos_id, self.unk_id = bos_id, eos_id, unk_id
        self.pad_id = pad_id if pad_id is not None else eos_id
        self.add_bos, self.add_eos = bool(add_bos), bool(add_eos)
        others = sorted({int(i) for i in stop_ids if i is not None} - {eos_id})
        self.stop_ids = tuple(([] if eos_id is None else [eos_id]) + others)
        self.chat_template = chat_template
        self.path = path
        self.model_max_length = model_max_length
        self.gguf_metadata = gguf_metadata  # GGUF tokenizer.* keys, when built from them

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> "HFTokenizer":
        """llama.cpp's tokenizer for a GGUF file (any size: only the header is read)."""
        path = os.fspath(path)
        return cls.from_gguf_metadata(gguf_vocab.read_gguf_metadata(path), path)

    @classmethod
    def _from_vocab(cls, tok, vocab: gguf_vocab.GGUFVocab, path: str,
                    metadata: dict | None = None) -> "HFTokenizer":
        return cls(tok, bos_id=vocab.bos_id, eos_id=vocab.eos_id, pad_id=vocab.pad_id,
                   unk_id=vocab.unk_id, add_bos=vocab.add_bos, add_eos=vocab.add_eos,
                   stop_ids=vocab.stop_ids, chat_template=vocab.chat_template, path=path,
                   model_max_length=vocab.context_length,
                   gguf_metadata=_tokenizer_keys(metadata))

    @classmethod
    def from_gguf_metadata(cls, metadata: dict, path: str) -> "HFTokenizer":
        """From GGUF tokenizer.* keys (a file's, or a saved gguf_tokenizer.json)."""
        vocab = gguf_vocab.vocab_from_metadata(metadata, path)
        return cls._from_vocab(gguf_vocab.build_tokenizer(vocab), vocab, path, metadata)

    @classmethod
    def from_sentencepiece(cls, model_file: str | os.PathLike,
                           config: dict | None = None) -> "HFTokenizer":
        """A SentencePiece .model mapped as llama.cpp's converter + SPM tokenizer see it."""
        path = os.fspath(model_file)
        hf = cls.from_gguf_metadata(_sentencepiece_metadata(path), path)
        return _apply_config(hf, config or {})

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "HFTokenizer":
        """A Hugging Face tokenizer folder: tokenizer.json, else a lone tokenizer.model."""
        folder = os.fspath(folder)
        config = _folder_config(folder)
        stash = os.path.join(folder, GGUF_TOKENIZER_JSON)
        if os.path.isfile(stash):  # saved by `save`: rebuild exactly what llama.cpp reads
            hf = cls.from_gguf_metadata(_read_json(stash), folder)
            return _apply_config(hf, config)
        if os.path.isfile(os.path.join(folder, TOKENIZER_JSON)):
            return _from_tokenizer_json(cls, folder, config)
        if os.path.isfile(os.path.join(folder, SENTENCEPIECE_FILE)):
            hf = cls.from_sentencepiece(os.path.join(folder, SENTENCEPIECE_FILE), config)
            hf.path = folder
            return hf
        raise TokenizerError(f"{folder} has neither {TOKENIZER_JSON} nor {SENTENCEPIECE_FILE}")

    # -- ids ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Rows the model's embedding needs: model vocabulary plus added tokens."""
        added = self._tok.get_added_tokens_decoder()
        return max(self._tok.get_vocab_size(with_added_tokens=True),
                   max(added, default=-1) + 1)

    @property
    def special_ids(self) -> set[int]:
        """Ids of special (control) tokens, including bos/eos/pad/unk."""
        ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        return ids | {i for i in (self.bos_id, self.eos_id, self.pad_id, self.unk_id)
                      if i is not None}

    def id_to_piece(self, i: int) -> str:
        piece = self._tok.id_to_token(int(i))
        if piece is None:
            raise IndexError(f"token id {i} is out of range (vocab_size {self.vocab_size})")
        return piece

    def piece_to_id(self, piece: str) -> int:
        """The id of a vocabulary entry; unknown pieces -> unk_id (KeyError if there is none)."""
        i = self._tok.token_to_id(piece)
        if i is not None:
            return i
        if self.unk_id is None:
            raise KeyError(f"{piece!r} is not in the vocabulary and there is no unk token")
        return self.unk_id

    # -- encode / decode ------------------------------------------------------------------
    def _encoder(self, parse_special: bool):
        if parse_special:
            return self._tok
        if self._literal is None:  # built once: toggling the flag per call is not thread-safe
            from tokenizers import Tokenizer as _T
            literal = _T.from_str(self._tok.to_str())
            literal.encode_special_tokens = True
            self._literal = literal
        return self._literal

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            if self.bos_id is None:
                raise TokenizerError(f"{self!r} has no bos token, cannot add_bos")
            ids.insert(0, self.bos_id)
        if add_eos:
            if self.eos_id is None:
                raise TokenizerError(f"{self!r} has no eos token, cannot add_eos")
            ids.append(self.eos_id)
        return ids

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False,
               parse_special: bool = True) -> list[int]:
        """Text -> ids; bos/eos only when asked (see the module docstring for specials)."""
        ids = self._encoder(parse_special).encode(text, add_special_tokens=False).ids
        return self._wrap(list(ids), add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False,
                     parse_special: bool = True) -> list[list[int]]:
        """Many texts at once (tokenizers' parallel path)."""
        encs = self._encoder(parse_special).encode_batch(list(texts), add_special_tokens=False)
        return [self._wrap(list(e.ids), add_bos, add_eos) for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text: bos/eos/pad vanish, other special tokens keep their text."""
        vanish = {self.bos_id, self.eos_id, self.pad_id}
        keep = [int(i) for i in ids if int(i) not in vanish]
        raw = self._raw_added()
        if not any(i in raw for i in keep):
            return self._tok.decode(keep, skip_special_tokens=False)
        parts, run = [], []
        for i in keep + [None]:
            if i is None or i in raw:
                if run:
                    parts.append(self._decode_run(run, at_start=not parts))
                    run = []
                parts.append(raw.get(i, ""))
            else:
                run.append(i)
        return "".join(parts)

    def _raw_added(self) -> dict[int, str]:
        """Added tokens the decoder would mangle, e.g. a user-defined "ø" that a byte-level
        decoder reads as byte 0xF8; like llama.cpp we copy their text as it is."""
        if self._raw is None:
            self._raw = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items()
                         if self._tok.decode([i], skip_special_tokens=False) != t.content}
        return self._raw

    def _decode_run(self, ids: list[int], at_start: bool) -> str:
        """Decode ids that continue a text: behind an anchor token, so that decoders which
        strip the text's leading space (SentencePiece's prefix space) leave this one alone."""
        anchor = None if at_start else self._tok.token_to_id("a")
        if anchor is None:
            return self._tok.decode(ids, skip_special_tokens=False)
        text = self._tok.decode([anchor] + ids, skip_special_tokens=False)
        return text[1:] if text.startswith("a") else self._tok.decode(ids)

    # -- consistency with the model ---------------------------------------------------------
    def check_matches_model(self, model_vocab_size: int, allow_padding: bool = False) -> None:
        """Raise TokenizerError unless the model's vocab_size fits (see Tokenizer's method)."""
        check_vocab_fits(self.vocab_size, model_vocab_size, allow_padding,
                         self.path or "<in-memory tokenizer>")

    # -- saving -----------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> str:
        """Write tokenizer.json + tokenizer_config.json (Hugging Face layout) into `folder`.

        Each file is written to a temporary name and renamed, so a reader never sees half a
        file; other files in the folder are left alone. The tokenizer.json gets a post-processor
        adding bos/eos as this tokenizer's add_bos/add_eos say, so `AutoTokenizer(text)` equals
        `encode(text, add_bos=self.add_bos, add_eos=self.add_eos)`.
        """
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        _write_atomic(os.path.join(folder, TOKENIZER_JSON), self._tokenizer_json())
        _write_atomic(os.path.join(folder, TOKENIZER_CONFIG),
                      json.dumps(self._config(), indent=2, ensure_ascii=False) + "\n")
        if self.gguf_metadata is not None:
            _write_atomic(os.path.join(folder, GGUF_TOKENIZER_JSON),
                          json.dumps(_jsonable(self.gguf_metadata), ensure_ascii=False))
        return folder

    def _piece(self, i: int | None) -> str | None:
        return None if i is None else self._tok.id_to_token(i)

    def _tokenizer_json(self) -> str:
        spec = json.loads(self._tok.to_str())
        parts = ([self._piece(self.bos_id)] if self.add_bos else []) + ["$A"] + (
            [self._piece(self.eos_id)] if self.add_eos else [])
        if parts != ["$A"]:
            special = {t: {"id": t, "ids": [self._tok.token_to_id(t)], "tokens": [t]}
                       for t in parts if t != "$A"}
            single = [{"SpecialToken": {"id": t, "type_id": 0}} if t != "$A"
                      else {"Sequence": {"id": "A", "type_id": 0}} for t in parts]
            pair = single + [{"SpecialToken": {"id": t, "type_id": 1}} if t != "$A"
                             else {"Sequence": {"id": "B", "type_id": 1}} for t in parts]
            spec["post_processor"] = {"type": "TemplateProcessing", "single": single,
                                      "pair": pair, "special_tokens": special}
        return json.dumps(spec, ensure_ascii=False)

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self._piece(self.bos_id), "eos_token": self._piece(self.eos_id),
            "pad_token": self._piece(self.pad_id), "unk_token": self._piece(self.unk_id),
            "add_bos_token": self.add_bos, "add_eos_token": self.add_eos,
            "clean_up_tokenization_spaces": False, "chat_template": self.chat_template}
        if self.model_max_length:
            config["model_max_length"] = int(self.model_max_length)
        return {k: v for k, v in config.items() if v is not None}

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, path={self.path!r})"


# ---- folders ----------------------------------------------------------------------------------


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e
    return data if isinstance(data, dict) else {}


def _folder_config(folder: str) -> dict:
    """tokenizer_config.json, with special_tokens_map.json / chat_template.jinja filling gaps."""
    config = _read_json(os.path.join(folder, TOKENIZER_CONFIG))
    for k, v in _read_json(os.path.join(folder, "special_tokens_map.json")).items():
        config.setdefault(k, v)
    jinja = os.path.join(folder, "chat_template.jinja")
    if "chat_template" not in config and os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            config["chat_template"] = f.read()
    eos = _read_json(os.path.join(folder, "generation_config.json")).get("eos_token_id")
    config["_generation_eos_ids"] = eos if isinstance(eos, list) else [eos] if eos else []
    return config


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _config_id(tok, config: dict, key: str) -> int | None:
    text = _token_text(config.get(key))
    return None if text is None else tok.token_to_id(text)


def _from_tokenizer_json(cls, folder: str, config: dict) -> HFTokenizer:
    from tokenizers import Tokenizer as _T

    path = os.path.join(folder, TOKENIZER_JSON)
    try:
        tok = _T.from_file(path)
    except Exception as e:  # tokenizers raises plain Exception on a bad file
        raise TokenizerError(f"{path} is not a valid tokenizers file: {e}") from e
    bos, eos = _config_id(tok, config, "bos_token"), _config_id(tok, config, "eos_token")
    unk = _config_id(tok, config, "unk_token")
    if unk is None and getattr(tok.model, "unk_token", None):
        unk = tok.token_to_id(tok.model.unk_token)
    hf = cls(tok, bos_id=bos, eos_id=eos, pad_id=_config_id(tok, config, "pad_token"),
             unk_id=unk,
             add_bos=config.get("add_bos_token", _post_processor_adds(tok, bos, first=True)),
             add_eos=config.get("add_eos_token", _post_processor_adds(tok, eos, first=False)),
             stop_ids=[*config["_generation_eos_ids"],
                       *gguf_vocab.eog_ids_by_text(tok.token_to_id)],
             chat_template=_chat_template(config), path=folder,
             model_max_length=_max_length(config))
    return hf


def _post_processor_adds(tok, token_id: int | None, first: bool) -> bool:
    """Whether tokenizer.json's own post-processor puts `token_id` first (last)."""
    if token_id is None or tok.post_processor is None:
        return False
    ids = tok.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0 if first else -1] == token_id


def _chat_template(config: dict) -> str | None:
    t = config.get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    return t if isinstance(t, str) else None


def _max_length(config: dict) -> int | None:
    n = config.get("model_max_length")
    return int(n) if isinstance(n, (int, float)) and 0 < n < 1e12 else None


def _apply_config(hf: HFTokenizer, config: dict) -> HFTokenizer:
    """tokenizer_config.json next to a tokenizer.model overrides the proto's flags."""
    if "add_bos_token" in config:
        hf.add_bos = bool(config["add_bos_token"])
    if "add_eos_token" in config:
        hf.add_eos = bool(config["add_eos_token"])
    hf.chat_template = _chat_template(config) or hf.chat_template
    hf.model_max_length = _max_length(config) or hf.model_max_length
    return hf


def _tokenizer_keys(metadata: dict | None) -> dict | None:
    """The tokenizer.* keys of a GGUF metadata dict (what a GGUF export writes back)."""
    if metadata is None:
        return None
    return {k: v for k, v in metadata.items() if k.startswith("tokenizer.")
            and k != gguf_vocab.SENTENCEPIECE_MODEL_KEY}


def _jsonable(metadata: dict) -> dict:
    return {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in metadata.items()}


def _sentencepiece_metadata(path: str) -> dict:
    """The tokenizer.* keys llama.cpp's converter would write for a SentencePiece model."""
    import numpy as np
    from sentencepiece import sentencepiece_model_pb2

    try:
        with open(path, "rb") as f:
            proto = sentencepiece_model_pb2.ModelProto.FromString(f.read())
    except FileNotFoundError:
        raise TokenizerNotFoundError(f"tokenizer model file not found: {path}") from None
    except Exception as e:  # protobuf's DecodeError, OSError
        raise TokenizerError(f"{path} is not a valid SentencePiece model: {e}") from e
    if not proto.pieces:
        raise TokenizerError(f"{path}: SentencePiece model with an empty vocabulary")
    spec = proto.trainer_spec
    ids = {k: (v if 0 <= v < len(proto.pieces) else None) for k, v in (
        ("bos", spec.bos_id), ("eos", spec.eos_id), ("unk", spec.unk_id), ("pad", spec.pad_id))}
    meta = {"tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": [p.piece for p in proto.pieces],
            "tokenizer.ggml.scores": np.array([p.score for p in proto.pieces], np.float32),
            "tokenizer.ggml.token_type": np.array([p.type for p in proto.pieces], np.int32),
            "tokenizer.ggml.add_space_prefix": bool(proto.normalizer_spec.add_dummy_prefix)}
    for key, name in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                      ("unk", "unknown_token_id"), ("pad", "padding_token_id")):
        if ids[key] is not None:
            meta["tokenizer.ggml." + name] = ids[key]
    return meta


def _write_atomic(path: str, text: str) -> None:
    with atomic_file(path, "w", encoding="utf-8") as f:
        f.write(text)


# ---- choosing the tokenizer for a path -------------------------------------------------------


def load_tokenizer(path: str | os.PathLike) -> Tokenizer | HFTokenizer:
    """The tokenizer stored at `path`, whatever its kind.

    * a folder: tokenizer.json -> HFTokenizer; else tokenizer.model -> our Tokenizer if it is a
      geb_jax SentencePiece model, else HFTokenizer (llama.cpp's reading of it);
    * a .model file: the same choice as for tokenizer.model;
    * a tokenizer.json file: its folder;
    * a .gguf file: our Tokenizer when our exporter stored the SentencePiece model in it
      ("geb_jax.tokenizer.sentencepiece_model"), else HFTokenizer.from_gguf.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise TokenizerNotFoundError(f"tokenizer path does not exist: {path}")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, TOKENIZER_JSON)):
            return HFTokenizer.from_folder(path)
        if os.path.isfile(os.path.join(path, SENTENCEPIECE_FILE)):
            return _load_sentencepiece(os.path.join(path, SENTENCEPIECE_FILE), path)
    elif path.endswith(".model"):
        return _load_sentencepiece(path, None)
    elif os.path.basename(path) == TOKENIZER_JSON:
        return HFTokenizer.from_folder(os.path.dirname(os.path.abspath(path)))
    elif path.endswith(".gguf"):
        return _load_gguf(path)
    raise TokenizerError(
        f"cannot tell which tokenizer {path} holds: expected a folder with {TOKENIZER_JSON} or "
        f"{SENTENCEPIECE_FILE}, a SentencePiece .model file, a {TOKENIZER_JSON} file, or a "
        f".gguf file")


def _load_sentencepiece(model_file: str, folder: str | None) -> Tokenizer | HFTokenizer:
    """Our Tokenizer for a geb_jax model, else llama.cpp's reading of a published one."""
    import sentencepiece as spm

    with open(model_file, "rb") as f:
        blob = f.read()
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(blob)
    except Exception as e:
        raise TokenizerError(f"{model_file} is not a valid SentencePiece model "
                             f"({len(blob)} bytes): {e}") from e
    try:
        return Tokenizer(sp, model_file)
    except TokenizerError:  # a SentencePiece model, but not one of ours
        pass
    if folder is not None:
        return HFTokenizer.from_folder(folder)
    return HFTokenizer.from_sentencepiece(model_file)


def _load_gguf(path: str) -> Tokenizer | HFTokenizer:
    import base64

    import sentencepiece as spm

    meta = gguf_vocab.read_gguf_metadata(path)
    blob = meta.get(gguf_vocab.SENTENCEPIECE_MODEL_KEY)
    if not blob:
        return HFTokenizer.from_gguf_metadata(meta, path)
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(base64.b64decode(blob))
    except Exception as e:
        raise TokenizerError(f"{path}: {gguf_vocab.SENTENCEPIECE_MODEL_KEY} is not a valid "
                             f"base64 SentencePiece model: {e}") from e
    return Tokenizer(sp, path)
