"""GGUF `tokenizer.ggml.*` metadata -> a `tokenizers.Tokenizer` that gives llama.cpp's ids.

The `tokenizers` library does the BPE work; this module only maps llama.cpp's description of a
vocabulary (src/llama-vocab.cpp, src/unicode.cpp) onto `tokenizers` building blocks:

* model "gpt2" (byte-level BPE): the file's merges in rank order; the text is first cut by
  llama.cpp's pre-tokenizer regexes for `tokenizer.ggml.pre` (`PRE_TOKENIZERS`), each regex a
  `Split(..., "isolated")` applied to the pieces of the previous one, exactly as
  `unicode_regex_split` applies its list; then bytes are spelled in GPT-2's byte alphabet.
  Pre-tokenizers llama.cpp marks `ignore_merges` look a whole piece up in the vocabulary first.
* model "llama" (SentencePiece as llama.cpp runs it, `llm_tokenizer_spm`): no pre-splitting;
  spaces become U+2581 and, when `add_space_prefix` (default true), one is put in front of every
  text fragment that starts the text or follows a special token; adjacent symbols are merged
  highest-score-first whenever their concatenation is a token; characters that are not tokens
  become <0xXX> byte tokens. That is a BPE whose merge ranks are the token scores: we list every
  (left, right) split of every token whose halves are tokens, best score first.
* token types: CONTROL and UNKNOWN tokens become special added tokens (matched in the text only
  when the caller asks to parse specials, like llama.cpp's parse_special), USER_DEFINED tokens
  become plain added tokens (always matched whole, as llama.cpp does), with llama.cpp's fix-ups
  (e.g. "<|im_end|>" / "<|endoftext|>" are always control).

Regexes: llama.cpp runs most of its regexes with std::regex after mapping every non-ASCII
whitespace character to "\\v", so "\\s" there means exactly llama.cpp's whitespace set
(`_WS`); we spell that set out instead of "\\s" (Oniguruma's "\\s" differs, e.g. on U+001C-1F),
and remove it from the explicit character ranges that contain it, since llama.cpp's mapping
takes those characters out of such ranges. The contractions are written '[sS] etc. because
Oniguruma's case folding would also match U+017F after an apostrophe; llama.cpp's does not.

Known differences, all in corner cases no test vocabulary or sample text exercises:
* special-token matching: llama.cpp matches the longest special token text first everywhere,
  `tokenizers` takes the leftmost-longest match; they differ only when two special tokens'
  texts overlap in the input.
* SPM ties: two different tokens with the same score - llama.cpp merges the leftmost pair
  first, we merge the lower token id first.
* a merge whose result is not in the vocabulary is dropped (llama.cpp would merge and then
  spell the result byte by byte).
* Unicode categories come from Oniguruma's tables, llama.cpp's from its own generated table;
  characters whose category changed between Unicode versions may split differently.

Reading: `read_gguf_metadata` goes through geb_jax.gguf_header, the one GGUF parser (checks
and tokenizer checksum included). gguf.GGUFReader parses every string of every array into its
own numpy view - 2 s for SmolLM2's 49k tokens + 49k merges, 9 s for Llama 3's 128k + 280k -
while that takes a few tens of ms.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Sequence

import numpy as np

from geb_jax.data.tokenizer import TokenizerError
from geb_jax.gguf_header import (SENTENCEPIECE_MODEL_KEY, GGUFFileError, GGUFTruncatedError,
                                 read_gguf_header)

# llama_token_type (gguf.TokenType); SentencePiece's piece types use the same numbers.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # "▁": SentencePiece's stand-in for a space

# ---- reading the GGUF header ------------------------------------------------------------------


def read_gguf_metadata(path: str | os.PathLike,
                       prefixes: Sequence[str] | None = None) -> dict[str, Any]:
    """{key: value} of a GGUF file's metadata (only keys starting with `prefixes`, if given).

    Strings -> str, string arrays -> list[str], numeric arrays -> numpy arrays. Parsed and
    checked by geb_jax.gguf_header, as the model reader does (layout, tokenizer checksum), so a
    damaged or tampered file is refused here too; any problem is a TokenizerError. Only the
    header is read (memory-mapped), so a multi-GB model file costs no more than its vocab.
    """
    path = os.fspath(path)
    try:
        header = read_gguf_header(path)
    except GGUFTruncatedError as e:
        raise TokenizerError(f"{path}: GGUF file truncated or corrupt: {e.detail}") from e
    except GGUFFileError as e:
        raise TokenizerError(str(e)) from e
    except OSError as e:
        raise TokenizerError(f"cannot read GGUF file {path}: {e}") from e
    prefixes = tuple(prefixes) if prefixes else None
    out: dict[str, Any] = {}
    for key, value in header.fields.items():
        if prefixes is not None and not key.startswith(prefixes):
            continue
        array = header.array(key)
        out[key] = _valid_text(value) if array is None else array
    return out


def _valid_text(value: Any) -> Any:
    """The header keeps a token that is not UTF-8 as surrogate escapes (its exact bytes);
    `tokenizers` needs valid text, so such strings get U+FFFD instead."""
    if isinstance(value, str):
        probe, items = value, None
    elif isinstance(value, list) and value and isinstance(value[0], str):
        probe, items = "".join(value), value
    else:
        return value
    try:
        probe.encode("utf-8")  # one pass over all of them: the usual case is valid
        return value
    except UnicodeEncodeError:
        pass

    def fix(text: str) -> str:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return fix(value) if items is None else [fix(t) for t in items]


# ---- the vocabulary as llama.cpp sees it ---------------------------------------------------------


@dataclasses.dataclass
class GGUFVocab:
    """What llama.cpp's `llama_vocab::load` takes from the metadata (after its defaults)."""

    path: str
    model: str  # "gpt2" or "llama"
    pre: str  # tokenizer.ggml.pre (gpt2: "default" when absent; unused for SPM)
    tokens: list[str]
    scores: np.ndarray
    types: np.ndarray  # per-token llama_token_type, with llama.cpp's text-based fix-ups
    merges: list[tuple[str, str]]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    eot_id: int | None
    eom_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | None
    name: str
    context_length: int | None = None  # <architecture>.context_length, if stated
    rstrip_ids: frozenset = frozenset()  # special tokens that swallow following spaces
    stop_ids: tuple[int, ...] = ()  # eos + llama.cpp's other end-of-generation ids


# llama.cpp (llama_vocab::impl::load) makes tokens with these texts control tokens, and the
# first group end-of-generation tokens.
_EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~["))
_FIM_TEXTS = {  # metadata key suffix -> texts that stand for it when the key is absent
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>",
                "<PRE>", "\u2581<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>",
                "<SUF>", "\u2581<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>",
                "<MID>", "\u2581<MID>", "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_ALWAYS_USER_DEFINED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss


def load_gguf_vocab(path: str | os.PathLike) -> GGUFVocab:
    """Read a GGUF's tokenizer metadata with llama.cpp's defaults for absent keys."""
    path = os.fspath(path)
    return vocab_from_metadata(read_gguf_metadata(path), path)


def vocab_from_metadata(meta: dict[str, Any], path: str = "<metadata>") -> GGUFVocab:
    """`GGUFVocab` from `read_gguf_metadata` output (see llama_vocab::impl::load)."""
    def g(key: str, default=None):
        return meta.get("tokenizer.ggml." + key, default)

    model = g("model")
    if model not in ("gpt2", "llama"):
        raise TokenizerError(
            f"{path}: tokenizer.ggml.model is {model!r}; geb_jax reads only 'gpt2' (byte-level "
            f"BPE) and 'llama' (SentencePiece) vocabularies")
    tokens = g("tokens")
    if not tokens:
        raise TokenizerError(f"{path}: no tokenizer.ggml.tokens in the GGUF metadata")
    n = len(tokens)
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]  # as llama.cpp does
    scores = np.asarray(g("scores", np.zeros(n, np.float32)), np.float32)
    types = np.asarray(g("token_type", np.full(n, NORMAL)), np.int32).copy()
    if len(scores) < n or len(types) < n:
        raise TokenizerError(f"{path}: {len(scores)} scores / {len(types)} token types for "
                             f"{n} tokens")
    if model == "gpt2":
        pre = g("pre") or "default"
        _check_pre(pre, path)
        defaults = dict(bos=11, eos=11, unk=None, pad=None)
        add_bos, add_eos, space = PRE_TOKENIZERS[pre].add_bos, False, False
    else:
        pre = g("pre") or ""  # informational: llama.cpp's SPM tokenizer has no pre-tokenizer
        defaults = dict(bos=1, eos=2, unk=0, pad=None)
        add_bos, add_eos, space = True, False, True
    ids = {k: _token_id(meta, key, defaults.get(k), n)
           for k, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                          ("unk", "unknown_token_id"), ("pad", "padding_token_id"),
                          ("eot", "eot_token_id"), ("eom", "eom_token_id"))}
    index = {t: i for i, t in enumerate(tokens)}
    _fix_types(types, index, meta)
    stop_ids = _eog_ids(types, index, meta, ids)
    return GGUFVocab(
        path=path, model=model, pre=pre, tokens=tokens, scores=scores[:n], types=types[:n],
        merges=_parse_merges(g("merges") or []), bos_id=ids["bos"], eos_id=ids["eos"],
        unk_id=ids["unk"], pad_id=ids["pad"], eot_id=ids["eot"], eom_id=ids["eom"],
        add_bos=bool(g("add_bos_token", add_bos)), add_eos=bool(g("add_eos_token", add_eos)),
        add_space_prefix=bool(g("add_space_prefix", space)),
        chat_template=meta.get("tokenizer.chat_template"), name=meta.get("general.name", ""),
        context_length=_context_length(meta),
        rstrip_ids=_rstrip_ids(meta.get("general.name", ""), tokens, types, index),
        stop_ids=stop_ids)


def _context_length(meta: dict) -> int | None:
    n = meta.get(f"{meta.get('general.architecture', '')}.context_length")
    return int(n) if n else None


def _token_id(meta: dict, key: str, default: int | None, n: int) -> int | None:
    """A special token id from the metadata, else llama.cpp's default; out-of-range -> None."""
    value = meta.get("tokenizer.ggml." + key)
    if value is not None and 0 <= int(value) < n:
        return int(value)
    return default if default is not None and default < n else None


def _fix_types(types: np.ndarray, index: dict[str, int], meta: dict) -> None:
    """llama.cpp's text-based fix-ups: end-of-turn/FIM look-alikes are control tokens."""
    texts = set(_EOG_TEXTS)
    for kind, names in _FIM_TEXTS.items():
        if meta.get(f"tokenizer.ggml.{kind}_token_id") is None:
            texts.update(names)
    for text in texts:
        if text in index and types[index[text]] != CONTROL:
            types[index[text]] = CONTROL
    for text in _ALWAYS_USER_DEFINED:
        if text in index:
            types[index[text]] = USER_DEFINED


def _eog_ids(types: np.ndarray, index: dict[str, int], meta: dict,
             ids: dict) -> tuple[int, ...]:
    """llama.cpp's end-of-generation set: eos, eot, eom, FIM pad/repo/sep, and tokens with
    end-of-turn texts; gpt-oss style files ("<|return|>" + "<|call|>") make "<|end|>" an
    ordinary user-defined token instead."""
    fim = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("fim_pad", "fim_rep", "fim_sep")}
    eog = [ids["eos"], ids["eot"], ids["eom"], *eog_ids_by_text(index.get, fim)]
    texts = {t for t in _EOG_TEXTS if t in index}
    if "<|end|>" in texts and ({"<|return|>", "<|call|>"} <= texts
                               or {"<|calls|>", "<|flush|>"} <= texts):
        types[index["<|end|>"]] = USER_DEFINED
        eog = [i for i in eog if i != index["<|end|>"]]
    return tuple(sorted({int(i) for i in eog if i is not None and 0 <= int(i) < len(types)}))


def eog_ids_by_text(token_id, fim_ids: dict | None = None) -> list[int]:
    """Ids llama.cpp makes end-of-generation by their text: end-of-turn look-alikes and the
    FIM pad/repo/file-separator tokens (unless `fim_ids` states those). token_id: text -> id."""
    fim_ids = fim_ids or {}
    out = [token_id(t) for t in sorted(_EOG_TEXTS)]
    for kind in ("fim_pad", "fim_rep", "fim_sep"):
        if fim_ids.get(kind) is not None:
            out.append(fim_ids[kind])
        else:
            out.append(next((i for i in map(token_id, _FIM_TEXTS[kind]) if i is not None), None))
    return [int(i) for i in out if i is not None]


def _rstrip_ids(name: str, tokens: list[str], types: np.ndarray,
                index: dict[str, int]) -> frozenset:
    """Phi-3 files: special tokens swallow the whitespace after them (llama.cpp's RSTRIP)."""
    if "phi-3" not in name.lower() and "phi3" not in name.lower():
        return frozenset()
    ids = {int(i) for i in np.flatnonzero(np.isin(types, (CONTROL, USER_DEFINED, UNKNOWN)))}
    ids |= {index["</s>"]} if "</s>" in index else set()
    return frozenset(ids - {index.get(t) for t in ("<unk>", "<s>", "<|endoftext|>")})


def _parse_merges(merges: Iterable[str]) -> list[tuple[str, str]]:
    """"a b" -> ("a", "b"), splitting at the first space after the first character."""
    out = []
    for m in merges:
        pos = m.find(" ", 1)
        out.append((m[:pos], m[pos + 1:]) if pos >= 0 else ("", ""))
    return out


# ---- pre-tokenizers (llama-vocab.cpp, llm_tokenizer_bpe) -----------------------------------

# llama.cpp's whitespace set (unicode_set_whitespace; std::regex's "\s" after its mapping).
_WS = r"\t\n\x0B\f\r \x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000}"
_CONTRACTIONS = "'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD]"


def _ws(pattern: str) -> str:
    """Spell llama.cpp's whitespace set for \\s / \\S (inside or outside a class)."""
    return (pattern.replace("[^\\s", "[^" + _WS).replace("\\s", "[" + _WS + "]")
            .replace("\\S", "[^" + _WS + "]"))


_GPT2 = _ws(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
_LLAMA3 = _ws(f"(?:{_CONTRACTIONS})" + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _ws(f"(?:{_CONTRACTIONS})" + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = _ws(f"(?:{_CONTRACTIONS})" + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
              r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CJK = "[[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]&&[^" + _WS + "]]+"
_DEEPSEEK_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1"
    "\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5"
    "\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a"
    "\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d"
    "\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3"
    "\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115"
    "\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149"
    "\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
    "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
    "\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943")


@dataclasses.dataclass(frozen=True)
class _Pre:
    regexes: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False  # llama.cpp's default when the file has no add_bos_token


_DEFAULT = _Pre((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"))
_GPT2_PRE = _Pre((_GPT2,))
_LLAMA3_PRE = _Pre((_LLAMA3,), ignore_merges=True, add_bos=True)
_STARCODER = _Pre((r"\p{N}", _GPT2))
_QWEN2_PRE = _Pre((_QWEN2,))

# tokenizer.ggml.pre -> how llama.cpp splits the text before BPE (llm_tokenizer_bpe).
PRE_TOKENIZERS: dict[str, _Pre] = {
    "default": _DEFAULT,
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2", "jina-v5-nano"), _LLAMA3_PRE),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _Pre((_LLAMA3,))),
    "deepseek-llm": _Pre(("[\r\n]", _ws(f"\\s?[{_DEEPSEEK_LETTERS}]+"),
                          _ws("\\s?[[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]"
                              "&&[^" + _WS + "]]+"),
                          _ws(r"\s+\z"), _CJK, r"\p{N}+")),
    "deepseek-coder": _Pre(("[\r\n]", _ws(r"\s?\p{L}+"), _ws(r"\s?\p{P}+"), _CJK, r"\p{N}")),
    "falcon": _Pre((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]")),
    **dict.fromkeys(("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone",
                     "minerva-7b", "mellum2"), _STARCODER),
    **dict.fromkeys(("gpt-2", "phi-2", "gigachat", "a.x-4.0", "mellum", "mpt", "olmo", "jais",
                     "trillion", "granite-docling", "exaone4"), _GPT2_PRE),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2",
                     "hunyuan", "solar-open"), _QWEN2_PRE),
    "qwen35": _Pre((_QWEN35,)),
    # Mistral's tekken: llama.cpp's stand-in for \p{Lu}/\p{Ll} (a letter not a-z / not A-Z),
    # which differs from the real categories on non-ASCII letters - we follow llama.cpp.
    "tekken": _Pre((_ws(r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
                        r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
                        r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"),),
                   ignore_merges=True, add_bos=True),
}


def supported_pre_tokenizers() -> list[str]:
    return sorted(PRE_TOKENIZERS)


def _check_pre(pre: str, path: str) -> None:
    if pre not in PRE_TOKENIZERS:
        raise TokenizerError(
            f"{path}: pre-tokenizer tokenizer.ggml.pre={pre!r} is not supported by geb_jax "
            f"(llama.cpp knows more than we mirror). Supported: "
            f"{', '.join(supported_pre_tokenizers())}")


# ---- building the tokenizers.Tokenizer ---------------------------------------------------------


def build_tokenizer(vocab: GGUFVocab):
    """A `tokenizers.Tokenizer` that tokenizes like llama.cpp for this vocabulary."""
    from tokenizers import Tokenizer

    spec = _bpe_spec(vocab) if vocab.model == "gpt2" else _spm_spec(vocab)
    spec["added_tokens"] = _added_tokens(vocab)
    return Tokenizer.from_str(json.dumps(spec))


def _skeleton(model: dict, normalizer, pre_tokenizer, decoder) -> dict:
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
            "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": None,
            "decoder": decoder, "model": model}


def _vocab_dict(vocab: GGUFVocab) -> dict[str, int]:
    return {t: i for i, t in enumerate(vocab.tokens)}


def _bpe_spec(vocab: GGUFVocab) -> dict:
    """Byte-level BPE: llama.cpp's regex splits, then GPT-2's byte alphabet, then merges."""
    pre = PRE_TOKENIZERS[vocab.pre]
    ids = _vocab_dict(vocab)
    merges = [list(m) for m in vocab.merges if m[0] in ids and m[1] in ids and m[0] + m[1] in ids]
    splits = [{"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False}
              for r in pre.regexes]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                  "use_regex": False}
    model = {"type": "BPE", "dropout": None, "unk_token": None,
             "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
             "byte_fallback": False, "ignore_merges": pre.ignore_merges, "vocab": ids,
             "merges": merges}
    return _skeleton(model, None, {"type": "Sequence", "pretokenizers": splits + [byte_level]},
                     {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                      "use_regex": False})


def spm_merges(tokens: Sequence[str], scores: Sequence[float]) -> list[list[str]]:
    """Every (left, right) whose halves and concatenation are tokens, best score first.

    llama.cpp's SPM tokenizer merges the adjacent pair whose concatenation has the highest
    score; a BPE with these ranks does the same.
    """
    ids = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for i, tok in enumerate(tokens):
        for k in range(1, len(tok)):
            if tok[:k] in ids and tok[k:] in ids:
                ranked.append((-float(scores[i]), i, k))
    ranked.sort()
    return [[tokens[i][:k], tokens[i][k:]] for _, i, k in ranked]


def _spm_spec(vocab: GGUFVocab) -> dict:
    """llama.cpp's SPM: escape spaces (+ prefix), whole-fragment score merges, byte fallback."""
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    normalizer = ({"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": SPACE}, replace]} if vocab.add_space_prefix else replace)
    unk = vocab.tokens[vocab.unk_id] if vocab.unk_id is not None else None
    model = {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True,
             "ignore_merges": False, "vocab": _vocab_dict(vocab),
             "merges": spm_merges(vocab.tokens, vocab.scores)}
    decoders = [{"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if vocab.add_space_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return _skeleton(model, normalizer, None, {"type": "Sequence", "decoders": decoders})


def _added_tokens(vocab: GGUFVocab) -> list[dict]:
    """Control/unknown -> special added tokens; user-defined -> always-matched added tokens."""
    out = []
    for i in np.flatnonzero(np.isin(vocab.types, (CONTROL, UNKNOWN, USER_DEFINED))):
        i = int(i)
        out.append({"id": i, "content": vocab.tokens[i], "single_word": False, "lstrip": False,
                    "rstrip": i in vocab.rstrip_ids, "normalized": False,
                    "special": int(vocab.types[i]) != USER_DEFINED})
    return out


def tokenizer_from_gguf(path: str | os.PathLike):
    """(tokenizers.Tokenizer, GGUFVocab) for a GGUF file."""
    vocab = load_gguf_vocab(path)
    return build_tokenizer(vocab), vocab
