"""The IOBinding decoder (geb_jax/infer/onnx_decoder.py: one preallocated past/present cache per
layer, GroupQueryAttention writing into it in place) against the session.run path that feeds
the cache as numpy arrays (geb_jax.export.onnx_export.ort_feed), on the same fused file, and
against the plain graph (standard ops, no shared buffer) as the independent reference.

Random tiny models of tests/test_onnx_fused.py (logits span several units, so 1e-4 means
something). Same file, same kernels, same inputs: the two drivers of one fused file agree to
summation noise (measured: bit-identical); the plain graph to TOL.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from geb_jax.data.tokenizer import builtin_tokenizer
from geb_jax.export.onnx_export import export_onnx, ort_feed, ort_session
from geb_jax.infer.engine import ContextLengthError
from geb_jax.infer.onnx_decoder import OnnxDecoder, OnnxDecoderError

from tests.conftest import REPO_ROOT
from tests.test_onnx_fused import TOL, VARIANTS, VOCAB, _pad, _params, _tokens

SAME = 1e-5  # the two drivers of one file: same kernels on the same inputs


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("decoder")
    tokenizer = builtin_tokenizer(VOCAB)
    cache = {}

    def get(variant, graph="fused", quantize=None):
        key = (variant, graph, quantize)
        if key not in cache:
            config, params = _params(variant)
            cache[key] = export_onnx(params, config, tokenizer.path,
                                     str(folder / ("-".join(map(str, key)) + ".onnx")),
                                     quantize=quantize, graph=graph, verify=False)
        return cache[key]
    return get


class _SessionRun:
    """The session.run path: past fed as numpy arrays, present returned as new ones."""

    def __init__(self, path, config, graph):
        self.session, self.config, self.graph = ort_session(path), config, graph
        self.names = [o.name for o in self.session.get_outputs()]
        self.past = None
        self.mask = None

    def __call__(self, ids, mask=None):
        ids = np.asarray(ids)
        new = np.ones(ids.shape, np.int64) if mask is None else mask
        self.mask = new if self.past is None else np.concatenate([self.mask, new], axis=1)
        feed = ort_feed(self.config, ids, attention_mask=self.mask, past=self.past,
                        graph=self.graph)
        out = dict(zip(self.names, self.session.run(None, feed)))
        self.past = out
        return out["logits"]


@pytest.mark.parametrize("quantize", [None, "int4"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bound_decode_equals_session_run_and_plain(files, variant, quantize):
    """Prefill 7 tokens, then 8 greedy single-token steps: the bound decoder's logits at
    every step equal the session.run path's on the same fused file and, in float32, the plain
    graph's to TOL (int4 at accuracy_level 4: only the same-file comparison is exact)."""
    config, _ = _params(variant)
    path = files(variant, quantize=quantize)
    decoder = OnnxDecoder(ort_session(path), config, max_len=32)
    reference = _SessionRun(path, config, "fused")
    plain = _SessionRun(files(variant, "plain"), config, "plain") if quantize is None else None
    prompt = _tokens((1, 7), 1)
    got = decoder.prefill(prompt)
    expected = reference(prompt)[:, -1]
    tokens = []
    for step in range(9):
        assert np.abs(got - expected).max() <= SAME * max(1, np.abs(expected).max()), step
        if plain is not None:
            assert np.abs(got - (plain(prompt) if step == 0 else plain(token))[:, -1]).max() \
                < TOL, step
        token = np.argmax(got, axis=-1)[:, None]
        tokens.append(int(token[0, 0]))
        got = decoder.decode(token[:, 0])
        expected = reference(token)[:, -1]
    assert decoder.length == 7 + 9
    assert len(set(tokens)) > 1  # a real stream, not one repeated token


def test_prefill_append_decode_batch2_right_padded(files):
    """Rows of 9 and 4 tokens padded on the right, a 3-token append to both rows, then
    single-token decodes: every logit equals the session.run path's with the same masks."""
    variant = "gqa-untied-pre"
    config, _ = _params(variant)
    path = files(variant)
    decoder = OnnxDecoder(ort_session(path), config, max_len=24, batch=2)
    reference = _SessionRun(path, config, "fused")
    ids, mask = _pad([list(_tokens(9, 2)), list(_tokens(4, 3))], "right")
    got = decoder.prefill(ids, mask, all_logits=True)
    expected = reference(ids, mask)
    real = mask.astype(bool)
    assert np.abs(got[real] - expected[real]).max() < SAME
    last = decoder.prefill(ids, mask)  # the last real token of each row (a fresh prefill)
    assert np.abs(last - expected[[0, 1], [8, 3]]).max() < SAME
    block = _tokens((2, 3), 4)
    assert np.abs(decoder.append(block) - reference(block)).max() < SAME
    for step in range(4):
        token = _tokens((2, 1), 10 + step)
        assert np.abs(decoder.decode(token[:, 0]) - reference(token)[:, -1]).max() < SAME
    assert decoder.length == 9 + 3 + 4


def test_context_end_fills_the_cache_then_refuses(files):
    """max_len = the model's max_seq_len (64, the rotary tables' length): a 60-token prompt
    and 4 decodes fill the cache to the last slot with the plain graph's logits of the whole
    sequence; a 65th token raises ContextLengthError and leaves the decoder usable."""
    variant = "mqa-tied-post"
    config, _ = _params(variant)
    decoder = OnnxDecoder(ort_session(files(variant)), config)
    assert decoder.max_len == config.max_seq_len == 64
    sequence = _tokens((1, 64), 5)
    full = _SessionRun(files(variant, "plain"), config, "plain")(sequence)[0]
    got = [decoder.prefill(sequence[:, :60])[0]]
    got += [decoder.decode(sequence[:, t])[0] for t in range(60, 63)]
    assert np.abs(np.stack(got) - full[59:63]).max() < TOL
    decoder.decode(sequence[:, 63])
    assert decoder.length == 64
    with pytest.raises(ContextLengthError, match="max_len=64"):
        decoder.decode([7])
    with pytest.raises(ContextLengthError):
        decoder.prefill(_tokens((1, 65), 6))
    again = decoder.prefill(sequence[:, :10])  # reset by prefill
    assert np.abs(again[0] - full[9]).max() < TOL


def test_refuses_plain_graph_left_padding_and_bad_sizes(files):
    config, _ = _params("gqa-untied-pre")
    with pytest.raises(OnnxDecoderError, match="fused ONNX graph"):
        OnnxDecoder(ort_session(files("gqa-untied-pre", "plain")), config)
    session = ort_session(files("gqa-untied-pre"))
    with pytest.raises(OnnxDecoderError, match="max_len=65"):
        OnnxDecoder(session, config, max_len=65)
    decoder = OnnxDecoder(session, config, max_len=16, batch=2)
    ids, mask = _pad([[5, 6, 7], [8]], "left")
    with pytest.raises(OnnxDecoderError, match="padded on the right"):
        decoder.prefill(ids, mask)
    with pytest.raises(OnnxDecoderError, match="batch=2"):
        decoder.prefill([[5, 6, 7]])


def test_import_alone_in_a_fresh_process():
    """The module imports without jax or the exporter (geb_jax.infer stays numpy-only)."""
    code = ("import sys, geb_jax.infer.onnx_decoder as d; "
            "assert 'jax' not in sys.modules and 'geb_jax.export' not in sys.modules; "
            "print(d.OnnxDecoder.__name__)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=REPO_ROOT))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "OnnxDecoder"
