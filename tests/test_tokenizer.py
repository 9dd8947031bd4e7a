"""Tokenizer (geb_jax.data.tokenizer) and built-in corpus (geb_jax.data.corpus) tests.

One small tokenizer (vocab 2000 -> 2048) is trained once per session on the built-in train split
through builtin_tokenizer (so the cache path is exercised too); ~2 s on 2 CPU cores. 2048 is
the smallest power of two at which held-out Chinese compresses to more than one character per
token (at 1024 most Chinese characters fall back to 3 byte pieces).
"""
import os
import random

import pytest

from geb_jax.data import corpus
from geb_jax.data.tokenizer import (CHAT_ROLE_TOKENS, Tokenizer, TokenizerError,
                                    builtin_tokenizer, chars_per_token, round_vocab_size,
                                    train_tokenizer)

VOCAB = 2000  # deliberately not a multiple of 128


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tok_cache"))


@pytest.fixture(scope="module")
def tok(cache_dir) -> Tokenizer:
    return builtin_tokenizer(VOCAB, cache_dir=cache_dir)


# ----------------------------------------------------------------------------- round trip
ROUND_TRIP_CASES = [
    "",
    "hello world",
    "中文分词测试：你好，世界！《唐诗三百首》",
    "繁體中文與简体中文混合",
    "emoji 😀👍🏽👨‍👩‍👧‍👦 🇨🇳 ✨",
    "def f(x):\n\tif x:\n\t\treturn x  # tab-indented\n    else:\n        pass\n",
    "a     b          c" + " " * 40 + "d",
    "   leading and trailing   ",
    "\n\nleading newlines and trailing\n\n\n",
    "\t \t mixed whitespace \r\n windows line end \r",
    "English, 中文, русский, العربية, हिन्दी, 日本語のかな, 한국어 — mixed scripts",
    "numbers 0123456789 3.14159 1,000,000 ０１２（全角）",
    "literal meta space ▁ and ▁▁ and a▁b",
    "<|user|>What is 2+2?<|end|><|assistant|>4<|end|>",
    "<s></s><pad><unk> written as text",
    "\x00\x01\x7f control chars \u200b zero width \ufeff bom \ufffd replacement",
    "combining e\u0301 and precomposed é (no normalisation)",
    "ﬁ ligature, Ａ fullwidth, ℌ, ① (NFKC would change these)",
    "\U0010FFFF \uFFFF \U0001F600 astral and noncharacters",
]


@pytest.mark.parametrize("text", ROUND_TRIP_CASES)
def test_round_trip_cases(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def _random_char(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.15:
        return rng.choice(" \t\n\r\u2581")
    if r < 0.35:
        return chr(rng.randint(0x20, 0x7E))
    if r < 0.55:
        return chr(rng.randint(0x4E00, 0x9FFF))  # CJK unified ideographs
    if r < 0.65:
        return chr(rng.randint(0x1F300, 0x1FAFF))  # emoji blocks
    while True:  # anything valid: every plane, excluding surrogates
        cp = rng.randint(0, 0x10FFFF)
        if not 0xD800 <= cp <= 0xDFFF:
            return chr(cp)


def test_round_trip_random_unicode(tok):
    rng = random.Random(1234)
    for _ in range(500):
        text = "".join(_random_char(rng) for _ in range(rng.randint(0, 60)))
        assert tok.decode(tok.encode(text)) == text, repr(text)


def test_round_trip_heldout_documents(tok):
    texts = list(corpus.builtin_texts("valid"))
    for text, ids in zip(texts, tok.encode_batch(texts)):
        assert tok.decode(ids) == text
        assert ids == tok.encode(text)


def test_bos_eos(tok):
    ids = tok.encode("hi", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "hi"
    assert tok.encode_batch(["hi"], add_bos=True, add_eos=True) == [ids]


# ---------------------------------------------------------------------- vocab and specials
def test_digits_are_single_pieces(tok):
    text = "0123456789 31415926535 2024"
    pieces = [tok.id_to_piece(i) for i in tok.encode(text)]
    digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
    assert "".join(digit_pieces) == "".join(c for c in text if c.isdigit())
    assert all(len(p) == 1 for p in digit_pieces), digit_pieces


def test_vocab_rounded_to_multiple_of_128(tok):
    assert tok.vocab_size == 2048 == round_vocab_size(VOCAB)
    assert tok.vocab_size % 128 == 0
    assert round_vocab_size(64_896) == 64_896  # GEB's size is already a multiple
    assert [round_vocab_size(n) for n in (1, 128, 129, 32_000, 50_257)] == [
        128, 128, 256, 32_000, 50_304]
    with pytest.raises(ValueError):
        round_vocab_size(0)


def test_special_tokens(tok):
    ids = {"pad": tok.pad_id, "unk": tok.unk_id, "bos": tok.bos_id, "eos": tok.eos_id,
           **tok.role_ids}
    assert tok.pad_id == 0
    assert len(set(ids.values())) == len(ids), ids
    assert set(tok.role_ids) == set(CHAT_ROLE_TOKENS)
    assert [tok.system_id, tok.user_id, tok.assistant_id, tok.end_id] == [
        tok.role_ids[t] for t in CHAT_ROLE_TOKENS]
    for token, i in tok.role_ids.items():
        assert tok.encode(token) == [i]  # one piece even inside raw text
        assert tok.decode([i]) == token
    assert tok.decode([tok.pad_id, tok.bos_id, tok.eos_id]) == ""


# ---------------------------------------------------------------------- errors and files
def test_model_vocab_mismatch_error(tok):
    tok.check_matches_model(2048)
    with pytest.raises(TokenizerError) as e:
        tok.check_matches_model(2049)
    msg = str(e.value)
    assert "2048" in msg and "2049" in msg and tok.path in msg
    tok.check_matches_model(4096, allow_padding=True)
    with pytest.raises(TokenizerError, match="1024"):
        tok.check_matches_model(1024, allow_padding=True)


def test_missing_file_error(tmp_path):
    path = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer.load(path)


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty"])
def test_corrupt_file_error(tok, tmp_path, kind):
    blob = open(tok.path, "rb").read()
    data = {"garbage": b"this is not a protobuf \xff\xfe" * 10,
            "truncated": blob[: len(blob) // 3], "empty": b""}[kind]
    path = tmp_path / f"broken_{kind}.model"
    path.write_bytes(data)
    with pytest.raises(TokenizerError, match=f"broken_{kind}.model"):
        Tokenizer.load(str(path))


def test_builtin_tokenizer_cache(tok, cache_dir, tmp_path):
    # Same vocab (after rounding) and corpus: loaded from the cache, not retrained.
    mtime = os.path.getmtime(tok.path)
    again = builtin_tokenizer(2048, cache_dir=cache_dir)
    assert again.path == tok.path and os.path.getmtime(tok.path) == mtime
    assert corpus.corpus_version() in os.path.basename(tok.path)
    assert not [f for f in os.listdir(cache_dir) if ".tmp" in f]  # atomic write left no temp
    # A corrupt cache entry is retrained rather than failing.
    other = tmp_path / "cache2"
    other.mkdir()
    bad = other / os.path.basename(tok.path)
    bad.write_bytes(b"\x00" * 10)
    fixed = builtin_tokenizer(VOCAB, cache_dir=str(other))
    assert fixed.encode("你好 world") == tok.encode("你好 world")


def test_train_error_is_clear(tmp_path):
    with pytest.raises(TokenizerError, match="4096"):
        train_tokenizer(["tiny corpus"] * 5, 4096, str(tmp_path / "tiny"))
    with pytest.raises(ValueError):
        train_tokenizer([], 512, str(tmp_path / "empty"))


# ------------------------------------------------------------------------------ compression
def test_chars_per_token_heldout(tok):
    ratios = {lang: chars_per_token(tok, corpus.builtin_texts("valid", lang))
              for lang in corpus.LANGS}
    print(f"\nchars/token on held-out data, vocab {tok.vocab_size}: "
          + ", ".join(f"{k}={v:.3f}" for k, v in ratios.items()))
    assert ratios["en"] > 2.0
    assert ratios["zh"] > 1.0
    assert ratios["code"] > 1.5


# ---------------------------------------------------------------------------- the corpus
def test_corpus_splits_and_langs():
    stats = corpus.builtin_stats()
    assert set(stats) == {"train", "valid"}
    for split, per_lang in stats.items():
        assert set(per_lang) == {"en", "zh", "code"}
        for lang, s in per_lang.items():
            assert s["documents"] > 0 and s["characters"] > 0 and s["bytes"] >= s["characters"]
    total = sum(s["bytes"] for p in stats.values() for s in p.values())
    assert 2_000_000 < total < 4_000_000
    zh = list(corpus.builtin_documents("valid", langs=["zh"]))
    assert len(zh) == stats["valid"]["zh"]["documents"]
    assert all(set(d) == {"text", "source", "lang"} and d["lang"] == "zh" for d in zh)
    assert list(corpus.builtin_documents("valid", "zh")) == zh
    train = set(corpus.builtin_texts("train"))
    assert not train & set(corpus.builtin_texts("valid"))  # split by content hash


def test_corpus_errors():
    with pytest.raises(ValueError, match="test"):
        next(corpus.builtin_documents("test"))
    with pytest.raises(ValueError, match="fr"):
        next(corpus.builtin_documents("train", langs=["fr"]))


def test_corpus_shipped_as_package_data():
    from importlib import resources
    builtin = resources.files("geb_jax").joinpath("data", "builtin")
    names = {p.name for p in builtin.iterdir()}
    assert {"train.jsonl.gz", "valid.jsonl.gz", "LICENSES.txt", "manifest.json"} <= names
    for name in ("train.jsonl.gz", "valid.jsonl.gz"):
        assert len(builtin.joinpath(name).read_bytes()) < 2 * 1024 * 1024


def test_chars_per_token_report_and_cli(tok, capsys):
    """len(text) / len(ids) per language, ids from SentencePiece itself (not Tokenizer)."""
    import sentencepiece as spm

    from geb_jax.data import tokenizer as T
    sp = spm.SentencePieceProcessor(model_file=tok.path)
    report = T.chars_per_token_report(tok, "valid")
    for lang in corpus.LANGS:
        texts = list(corpus.builtin_texts("valid", lang))
        assert not any("\u2581" in t for t in texts)  # raw SentencePiece ids == ours then
        chars = sum(len(t) for t in texts)
        tokens = sum(len(sp.encode(t)) for t in texts)
        assert report[lang]["characters"] == chars and report[lang]["tokens"] == tokens
        assert report[lang]["chars_per_token"] == pytest.approx(chars / tokens, rel=1e-12)
    assert T.main(["--report", "--model", tok.path]) == 0
    out = capsys.readouterr().out
    assert f"| zh | {report['zh']['documents']:,} |" in out
    assert f"{report['en']['chars_per_token']:.3f}" in out
