"""GGUF export (geb_jax/export/gguf_export.py) and reading back (geb_jax/infer/gguf_file.py).

References: gguf.GGUFReader for the bytes on disk, the format definitions written out here
(q8_0 = 32-value blocks of an f16 scale max|x|/127 and 32 int8; llama.cpp's interleaved RoPE
row order built index by index), jinja2 for the chat template, and llama.cpp itself through
llama-cpp-python where it is installed. Parameters are drawn with large q/k weights so that
attention is far from uniform and a wrong RoPE row order shows in the logits.
"""
import os

import gguf
import jax
import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from geb_jax.data.chat import chat_prompt, render_chat
from geb_jax.data.tokenizer import Tokenizer, builtin_tokenizer
from geb_jax.export.gguf_export import CHAT_TEMPLATE, export_gguf
from geb_jax.export.hf import hf_state_dict_from_params
from geb_jax.infer import Engine, Weights
from geb_jax.infer.gguf_file import GGUFFileError, load_gguf
from geb_jax.model import ModelConfig, abstract_params, init_params
from geb_jax.errors import ConfigError
from tests import llama_cpp_runner

TOKENIZER_VOCAB = 512
F16_REL = 2.0 ** -11  # half an ulp of float16's 10-bit mantissa
F16_TINY = 2.0 ** -25  # half the spacing of float16 subnormals
# q8_0 engine bound, relative to the largest logit: each weight moves by <= 0.56 x (block
# max / 127) (test_q8_0_tensors_within_block_scale_bound), ~0.4% of its block's largest value;
# independent errors add up over 7 matmuls per layer and are amplified by the fairly sharp
# attention of these test weights: measured 1.6-1.9% over 3 seeds. 5% leaves room without
# hiding a layout bug (q/k rows left in llama.cpp's order move the logits by 50-70%).
Q8_ENGINE_REL = 5e-2
# q4_0 steps are max|x|/8 instead of max|x|/127 (16x coarser): measured 28 % here, as the
# sharp attention of these test weights amplifies it. A loose sanity bound only: the precise
# check of q4_0 is test_q4_0_tensors_within_block_scale_bound (and llama.cpp's 1.4 %).
Q4_ENGINE_REL = 0.5


def _config(**changes) -> ModelConfig:
    base = dict(vocab_size=TOKENIZER_VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                head_dim=16, d_ff=128, max_seq_len=64, rope_theta=10000.0, norm_eps=1e-5)
    return ModelConfig(**{**base, **changes})


def _params(config: ModelConfig, seed: int = 0) -> dict:
    """Random float32 parameters, q/k large enough that attention is sharp."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name.endswith("scale"):
            return (1.0 + 0.2 * rng.standard_normal(leaf.shape)).astype(np.float32)
        fan_in = {"layers/attn/o": config.n_heads * config.head_dim,
                  "layers/mlp/down": config.d_ff}.get(name, config.d_model)
        std = 0.15 if name.endswith(("/q", "/k")) else (
            1.0 if name == "embedding" else fan_in ** -0.5)
        return (std * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract_params(config))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return builtin_tokenizer(TOKENIZER_VOCAB, cache_dir=str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def model():
    config = _config()
    return config, _params(config)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer, model):
    """{dtype: path} of the module's model exported once per dtype."""
    config, params = model
    folder = tmp_path_factory.mktemp("gguf")
    return {dt: export_gguf(params, config, tokenizer.path, str(folder / f"m-{dt}.gguf"),
                            dtype=dt) for dt in ("f32", "f16", "q8_0", "q4_0")}


def _prompt(tokenizer: Tokenizer) -> list[int]:
    return tokenizer.encode("def add(a, b):\n    return a + b  # 加法 sum", add_bos=True)


def _logits(weights: Weights, ids: list[int]) -> np.ndarray:
    return Engine(weights).prefill([ids], all_logits=True)[0]  # (T, V)


def _interleave_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's rope pairs rows (2i, 2i+1) of a head; ours pairs (i, i + H/2)."""
    h = w.shape[0] // n_heads
    order = [head * h + (j // 2) + (h // 2) * (j % 2) for head in range(n_heads) for j in range(h)]
    return w[order]


def _read(path: str) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _expected_hf_tensors(config, params) -> dict:
    """Our model's tensors under GGUF names, in llama.cpp's row order, float64."""
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
             "output_norm.weight", "lm_head.weight": "output.weight"}
    layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    out = {}
    for name, value in hf_state_dict_from_params(params, config).items():
        if name in names:
            out[names[name]] = value.astype(np.float64)
            continue
        _, _, i, rest = name.split(".", 3)
        stem = rest.removesuffix(".weight")
        if stem == "self_attn.q_proj":
            value = _interleave_rows(value, config.n_heads)
        elif stem == "self_attn.k_proj":
            value = _interleave_rows(value, config.n_kv_heads)
        out[f"blk.{i}.{layer[stem]}.weight"] = value.astype(np.float64)
    return out


def _shape(t) -> tuple:
    return tuple(int(s) for s in reversed(t.shape))


# ---- tensors on disk ------------------------------------------------------------------------

def test_f32_tensors_equal_ours_in_llama_cpp_row_order(exported, model):
    config, params = model
    expected = _expected_hf_tensors(config, params)
    found = _read(exported["f32"])
    assert set(found) == set(expected)
    for name, want in expected.items():
        t = found[name]
        assert gguf.GGMLQuantizationType(t.tensor_type) == gguf.GGMLQuantizationType.F32, name
        np.testing.assert_array_equal(np.asarray(t.data).reshape(_shape(t)), want, err_msg=name)


def test_f16_tensors_within_f16_rounding_and_norms_stay_f32(exported, model):
    config, params = model
    for name, want in _expected_hf_tensors(config, params).items():
        t = _read(exported["f16"])[name]
        kind = gguf.GGMLQuantizationType(t.tensor_type)
        got = np.asarray(t.data).reshape(_shape(t)).astype(np.float64)
        if want.ndim == 1:
            assert kind == gguf.GGMLQuantizationType.F32, name
            np.testing.assert_array_equal(got, want)
        else:
            assert kind == gguf.GGMLQuantizationType.F16, name
            assert np.all(np.abs(got - want) <= np.abs(want) * F16_REL + F16_TINY), name


def _decode_q8_0(raw: np.ndarray, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """From the format definition: per 32 values, 2 bytes f16 scale d then 32 int8 q; x = d q."""
    blocks = np.asarray(raw, dtype=np.uint8).reshape(-1, 34)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float64)  # (n_blocks, 1)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float64)  # (n_blocks, 32)
    return (d * q).reshape(shape), d[:, 0]


def test_q8_0_tensors_within_block_scale_bound(exported, model):
    config, params = model
    found = _read(exported["q8_0"])
    for name, want in _expected_hf_tensors(config, params).items():
        t = found[name]
        if want.ndim == 1:
            assert gguf.GGMLQuantizationType(t.tensor_type) == gguf.GGMLQuantizationType.F32
            continue
        assert gguf.GGMLQuantizationType(t.tensor_type) == gguf.GGMLQuantizationType.Q8_0, name
        got, d = _decode_q8_0(t.data, want.shape)
        block_max = np.abs(want).reshape(-1, 32).max(axis=1)
        scale = block_max / 127  # the format's scale, before its f16 rounding
        np.testing.assert_allclose(d, scale, rtol=F16_REL, atol=F16_TINY, err_msg=name)
        # rounding to the nearest step (d/2) plus the f16 error of d times |q| <= 127
        bound = scale / 2 + 127 * (scale * F16_REL + F16_TINY)
        err = np.abs(got - want).reshape(-1, 32).max(axis=1)
        assert np.all(err <= bound * (1 + 1e-6)), name
        assert err.max() > 0  # it really was quantized


def _decode_q4_0(raw: np.ndarray, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """From the format definition: per 32 values, 2 bytes f16 scale d then 16 bytes; byte j
    holds value j in its low nibble and value j + 16 in its high one; x = d (nibble - 8)."""
    blocks = np.asarray(raw, dtype=np.uint8).reshape(-1, 18)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float64)  # (n_blocks, 1)
    packed = blocks[:, 2:]
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float64) - 8
    return (d * q).reshape(shape), d[:, 0]


def test_q4_0_tensors_within_block_scale_bound(exported, model):
    """q4_0: d = -m / 8 for the block's value m of largest magnitude (m itself is exact), codes
    clipped to 0..15, so -m lands on 7 d: every error is within one step |d| = max|x| / 8."""
    config, params = model
    found = _read(exported["q4_0"])
    for name, want in _expected_hf_tensors(config, params).items():
        t = found[name]
        if want.ndim == 1:
            continue
        assert gguf.GGMLQuantizationType(t.tensor_type) == gguf.GGMLQuantizationType.Q4_0, name
        got, d = _decode_q4_0(t.data, want.shape)
        blocks = want.reshape(-1, 32)
        m = blocks[np.arange(len(blocks)), np.abs(blocks).argmax(axis=1)]
        np.testing.assert_allclose(d, -m / 8, rtol=F16_REL, atol=F16_TINY, err_msg=name)
        step = np.abs(m) / 8
        bound = step + 8 * (step * F16_REL + F16_TINY)
        err = np.abs(got - want).reshape(-1, 32).max(axis=1)
        assert np.all(err <= bound * (1 + 1e-6)), name
        assert err.max() > step.min() / 4  # really 16 levels, not more


# ---- metadata -------------------------------------------------------------------------------

def _fields(path: str) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}


def test_metadata_keys_and_values(exported, model, tokenizer):
    config, _ = model
    for dtype, file_type in (("f32", 0), ("f16", 1), ("q8_0", 7), ("q4_0", 2)):
        meta = _fields(exported[dtype])
        assert meta["general.file_type"] == file_type
    meta = _fields(exported["f32"])
    assert meta["general.architecture"] == "llama"
    assert meta["general.name"] == "geb_jax"
    assert meta["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    want = {"llama.context_length": 64, "llama.embedding_length": 64, "llama.block_count": 2,
            "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
            "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16,
            "llama.attention.key_length": 16, "llama.attention.value_length": 16}
    assert {k: meta[k] for k in want} == want
    assert meta["llama.rope.freq_base"] == pytest.approx(config.rope_theta)
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.norm_eps)
    assert meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.ggml.bos_token_id"] == tokenizer.bos_id
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_id
    assert meta["tokenizer.ggml.unknown_token_id"] == tokenizer.unk_id
    assert meta["tokenizer.ggml.padding_token_id"] == tokenizer.pad_id
    assert meta["tokenizer.ggml.eot_token_id"] == tokenizer.end_id
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.ggml.add_space_prefix"] is False  # our add_dummy_prefix=False
    assert meta["tokenizer.chat_template"] == CHAT_TEMPLATE


def test_vocabulary_is_the_sentencepiece_proto(exported, tokenizer):
    meta = _fields(exported["f32"])
    proto = sentencepiece_model_pb2.ModelProto()
    with open(tokenizer.path, "rb") as f:
        proto.ParseFromString(f.read())
    assert meta["tokenizer.ggml.tokens"] == [p.piece for p in proto.pieces]
    np.testing.assert_array_equal(meta["tokenizer.ggml.scores"],
                                  np.array([p.score for p in proto.pieces], np.float32))
    types = [gguf.TokenType(t) for t in meta["tokenizer.ggml.token_type"]]
    T = gguf.TokenType
    assert types[tokenizer.unk_id] == T.UNKNOWN
    assert {types[i] for i in (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)} == {T.CONTROL}
    assert {types[i] for i in tokenizer.role_ids.values()} == {T.USER_DEFINED}
    assert types[tokenizer.piece_to_id("<0x41>")] == T.BYTE
    assert types.count(T.BYTE) == 256
    assert types[-1] == T.NORMAL


def test_chat_template_renders_like_chat_py():
    jinja2 = pytest.importorskip("jinja2")

    def raise_exception(message):
        raise ValueError(message)

    env = jinja2.Environment()
    env.globals["raise_exception"] = raise_exception
    template = env.from_string(CHAT_TEMPLATE)
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "你好\n  x"}],
    ]
    for messages in conversations:
        for gen in (False, True):
            assert template.render(messages=messages, add_generation_prompt=gen) == \
                render_chat(messages, add_generation_prompt=gen)
    with pytest.raises(ValueError, match="unknown role"):
        template.render(messages=[{"role": "tool", "content": "x"}])


# ---- reading back into the numpy engine -----------------------------------------------------

def test_engine_on_read_back_weights_matches_original(exported, model, tokenizer):
    config, params = model
    ids = _prompt(tokenizer)
    want = _logits(Weights.from_params(params, config), ids)
    scale = np.abs(want).max()
    f32 = load_gguf(exported["f32"])
    np.testing.assert_allclose(_logits(f32.weights, ids), want, rtol=0, atol=1e-5 * scale)
    # f16 weights: relative error 2^-11 per weight, a few times that in the logits
    f16 = _logits(load_gguf(exported["f16"]).weights, ids)
    assert np.abs(f16 - want).max() <= 1e-2 * scale
    q8 = _logits(load_gguf(exported["q8_0"]).weights, ids)
    assert 0 < np.abs(q8 - want).max() <= Q8_ENGINE_REL * scale
    q4 = _logits(load_gguf(exported["q4_0"]).weights, ids)
    assert np.abs(q8 - want).max() < np.abs(q4 - want).max() <= Q4_ENGINE_REL * scale


def test_reader_undoes_the_rope_permutation(exported, model, tokenizer):
    """Without the un-permutation the logits move far: the parity test above can fail."""
    config, params = model
    ids = _prompt(tokenizer)
    want = _logits(Weights.from_params(params, config), ids)
    tensors = load_gguf(exported["f32"]).weights.to_named_tensors()
    for i in range(config.n_layers):
        for proj, heads in (("q_proj", config.n_heads), ("k_proj", config.n_kv_heads)):
            name = f"model.layers.{i}.self_attn.{proj}.weight"
            tensors[name] = _interleave_rows(tensors[name], heads)
    wrong = _logits(Weights.from_named_tensors(tensors, config), ids)
    assert np.abs(wrong - want).max() > 0.1 * np.abs(want).max()


def test_read_back_tokenizer_is_the_original(exported, tokenizer):
    blob = load_gguf(exported["f16"]).sentencepiece_model
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(blob)
    again = Tokenizer(sp)
    text = "Hello  world\n\tdef f(x): 你好 🙂 <|user|>"
    assert again.encode(text) == tokenizer.encode(text)
    with open(tokenizer.path, "rb") as f:
        assert blob == f.read()


def test_tied_embeddings_have_no_output_tensor(tmp_path, tokenizer):
    config = _config(tie_embeddings=True)
    params = _params(config, seed=1)
    path = export_gguf(params, config, tokenizer.path, str(tmp_path / "tied.gguf"))
    names = set(_read(path))
    assert "output.weight" not in names and "token_embd.weight" in names
    back = load_gguf(path).weights
    assert back.config.tie_embeddings
    ids = _prompt(tokenizer)
    want = _logits(Weights.from_params(params, config), ids)
    np.testing.assert_allclose(_logits(back, ids), want, atol=1e-5 * np.abs(want).max())


def test_padded_vocab_and_q8_0_fallback_for_odd_rows(tmp_path, tokenizer):
    """Model vocab > tokenizer's: [PADi] unused tokens. Rows of 48 values are no whole q8_0
    blocks, so those matrices fall back to f16 (as llama.cpp's converter does)."""
    config = _config(vocab_size=640, d_model=48, head_dim=12, d_ff=96)
    params = _params(config, seed=2)
    path = export_gguf(params, config, tokenizer.path, str(tmp_path / "pad.gguf"), dtype="q8_0")
    meta = _fields(path)
    assert len(meta["tokenizer.ggml.tokens"]) == 640
    assert meta["tokenizer.ggml.tokens"][600] == "[PAD600]"
    assert meta["tokenizer.ggml.token_type"][600] == gguf.TokenType.UNUSED
    kinds = {name: gguf.GGMLQuantizationType(t.tensor_type) for name, t in _read(path).items()}
    assert kinds["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16  # rows of d_model 48
    assert kinds["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0  # rows of d_ff 96
    ids = _prompt(tokenizer)
    want = _logits(Weights.from_params(params, config), ids)
    got = _logits(load_gguf(path).weights, ids)
    assert np.abs(got - want).max() <= Q8_ENGINE_REL * np.abs(want).max()


# ---- refusals and errors --------------------------------------------------------------------

def test_post_norm_is_refused(tmp_path, tokenizer):
    config = _config(norm_position="post")
    with pytest.raises(ConfigError, match="norm_position"):
        export_gguf(_params(config), config, tokenizer.path, str(tmp_path / "post.gguf"))
    assert os.listdir(tmp_path) == []


def test_bad_dtype_is_refused(tmp_path, model, tokenizer):
    config, params = model
    with pytest.raises(ValueError, match="dtype='q4_k'"):
        export_gguf(params, config, tokenizer.path, str(tmp_path / "x.gguf"), dtype="q4_k")


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_file_is_a_clear_error(tmp_path, exported, keep):
    with open(exported["f32"], "rb") as f:
        blob = f.read()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(blob[:int(len(blob) * keep)])
    with pytest.raises(GGUFFileError, match="truncated.gguf"):
        load_gguf(str(bad))


def test_export_replaces_atomically_and_leaves_no_temp_files(tmp_path, model, tokenizer):
    config, params = model
    path = tmp_path / "m.gguf"
    path.write_bytes(b"old")
    export_gguf(params, config, tokenizer.path, str(path), dtype="f16")
    assert os.listdir(tmp_path) == ["m.gguf"]
    assert load_gguf(str(path)).weights.config.d_model == config.d_model


# ---- llama.cpp itself -----------------------------------------------------------------------

def _llama_cpp_logits(path: str, ids: list[int]) -> np.ndarray:
    """llama.cpp in a child process (tests/llama_cpp_runner.py), float32 KV cache."""
    return llama_cpp_runner.logits(path, [ids])[0].astype(np.float64)


# Bounds relative to the largest logit. llama.cpp's CPU matmuls convert the activations to the
# weights' dot-product type: f32 stays f32 (measured 3e-7 to 6e-7), f16 rounds activations to
# f16 (2^-11 relative; measured 3e-4 to 6e-4), and q8_0 quantizes them to q8_0 blocks as well
# (~0.4% per matmul on top of the weights' own; measured 0.9% to 1.7% over 6 models; q4_0,
# whose dot product also takes q8_0 activations: 1.4%).
LLAMA_CPP_REL = {"f32": 1e-3, "f16": 3e-3, "q8_0": 3e-2, "q4_0": 3e-2}


def test_llama_cpp_logits_match_numpy_engine(exported, tokenizer, tmp_path):
    """llama.cpp on our file == the numpy engine on the weights read back from it."""
    ids = _prompt(tokenizer)
    cases = [(exported[dtype], dtype) for dtype in ("f32", "f16", "q8_0", "q4_0")]
    tied = _config(tie_embeddings=True)
    cases.append((export_gguf(_params(tied, seed=3), tied, tokenizer.path,
                              str(tmp_path / "tied.gguf")), "f32"))
    for path, dtype in cases:
        want = _logits(load_gguf(path).weights, ids)
        got = _llama_cpp_logits(path, ids)
        diff = np.abs(got - want).max() / np.abs(want).max()
        assert diff <= LLAMA_CPP_REL[dtype], (path, diff)


def test_llama_cpp_tokenizes_like_geb_jax(exported, tokenizer):
    texts = ["Hello world, hello again.", "def f(x):\n    return x  # 你好",
             "<|user|>hi<|end|><|assistant|>"]
    conversation = [{"role": "user", "content": "hi"}]
    rendered = render_chat(conversation, add_generation_prompt=True)
    got = llama_cpp_runner.tokenize(exported["f32"], texts + [rendered])
    bos = [tokenizer.bos_id]
    for text, ids in zip(texts, got):  # the runner adds no bos; llama.cpp would add ours
        assert bos + ids == tokenizer.encode(text, add_bos=True), text
    assert bos + got[-1] == chat_prompt(tokenizer, conversation)


def test_load_model_reads_our_gguf_with_its_embedded_tokenizer(tmp_path):
    """The engine's single entry point takes .gguf too; the tokenizer travels in the file."""
    from geb_jax.data.tokenizer import builtin_tokenizer
    from geb_jax.infer import Engine, ModelFileError, Weights, load_model
    config = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                         head_dim=16, d_ff=128, max_seq_len=64)
    params = jax.device_get(init_params(config, jax.random.key(3)))
    tokenizer = builtin_tokenizer(512)
    path = export_gguf(params, config, tokenizer.path, str(tmp_path / "m.gguf"), dtype="f32")
    weights, loaded_tok = load_model(path)
    ids = loaded_tok.encode("hello 你好", add_bos=True)
    assert ids == tokenizer.encode("hello 你好", add_bos=True)
    expected = Engine(Weights.from_params(params, config)).prefill([ids], all_logits=True)
    np.testing.assert_allclose(Engine(weights).prefill([ids], all_logits=True), expected,
                               atol=1e-5)
    (tmp_path / "cut.gguf").write_bytes(open(path, "rb").read()[:1000])
    with pytest.raises(ModelFileError, match="cut.gguf"):
        load_model(str(tmp_path / "cut.gguf"))
