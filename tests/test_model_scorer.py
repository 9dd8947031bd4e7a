"""The perplexity filter scored by a geb_jax model (geb_jax/data/clean/model_scorer.py, backends
in geb_jax/eval/filter_scorer.py).

A tiny model (d 32, 2 layers, context 32) is trained for a few dozen Adam steps on one repeated
sentence and saved the way a training stage is (workdir/pretrain/checkpoints + workdir/
tokenizer.model) and as an exported numpy model. Its bits per byte must equal a float64 numpy
forward pass (tests/numpy_reference.py) for both backends, and the chain's
perplexity_model="model:<path>" must keep the sentence and drop random strings.
"""
import dataclasses
import math
import random
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from geb_jax.checkpoint import Checkpointer
from geb_jax.config_base import base_config
from geb_jax.data.clean import CleaningConfigError, clean, default_cleaning_config
from geb_jax.data.clean.model_scorer import ModelScorer, ModelScorerError
from geb_jax.eval.filter_scorer import engine_row_nll, load_model_scorer
from geb_jax.data.tokenizer import builtin_tokenizer
from geb_jax.infer import save_npz_model
from geb_jax.model import ModelConfig, init_params, make_apply
from geb_jax.train.optimizer import make_optimizer
from geb_jax.run_config import run_config
from geb_jax.train.state import TrainState
from tests import numpy_reference

SENTENCE = "The quick brown fox jumps over the lazy dog. "
CONTEXT = 32


def random_string(seed: int, n: int = 120) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789 ,.;") for _ in range(n))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return builtin_tokenizer(384, cache_dir=str(tmp_path_factory.mktemp("tok384")))


@pytest.fixture(scope="module")
def model_config(tok):
    return ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4,
                       n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=CONTEXT,
                       attention_impl="xla")


def train_on_sentence(config: ModelConfig, tok, steps: int = 60):
    """Adam on random CONTEXT-token windows of the repeated sentence; returns params."""
    stream = np.asarray(tok.encode(SENTENCE * 40), np.int32)
    apply = make_apply(config)
    params = init_params(config, jax.random.key(0))
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, rows):
        def loss(p):
            logits = apply(p, rows[:, :-1])
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), rows[:, 1:, None],
                                                 axis=-1))
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, value

    rng = np.random.default_rng(0)
    for _ in range(steps):
        starts = rng.integers(0, len(stream) - CONTEXT - 1, size=8)
        rows = np.stack([stream[s:s + CONTEXT + 1] for s in starts])
        params, opt_state, value = step(params, opt_state, rows)
    assert float(value) < 0.5, f"training did not fit the sentence (loss {float(value)})"
    return params


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tok, model_config):
    """(params, stage_dir, export_dir): saved like a finished stage and like an export."""
    params = train_on_sentence(model_config, tok)
    workdir = tmp_path_factory.mktemp("run")
    config = base_config()
    config.model.update({k: getattr(model_config, k) for k in config.model.keys()})
    config.train.seq_len = CONTEXT  # a stage's rows fit the model's context (run_config checks)
    optimizer = make_optimizer(run_config(config).optimizer)
    zero = jnp.zeros((), jnp.int32)  # TrainState built directly: create_state would re-init
    state = TrainState(step=zero, params=params, opt_state=optimizer.init(params),
                       rng=jax.random.key_data(jax.random.key(0)), loss_ema=zero * 0.0,
                       grad_norm_ema=zero * 0.0, ema_count=zero, skipped=zero)
    with Checkpointer(workdir / "pretrain" / "checkpoints", save_every=0) as ckpt:
        ckpt.maybe_save(60, state, {}, config.to_dict(), force=True)
    shutil.copyfile(tok.path, workdir / "tokenizer.model")
    export = save_npz_model(str(workdir / "export"), jax.device_get(params), model_config,
                            tok.path)
    return jax.device_get(params), str(workdir / "pretrain"), export


def reference_bits_per_byte(params, config, tok, text: str) -> float:
    """float64 numpy: bos + ids, targets cut into CONTEXT-token rows, each restarting at 0."""
    ids = [tok.bos_id] + tok.encode(text)
    nats = 0.0
    for k in range(0, len(ids) - 1, CONTEXT):
        y = ids[k + 1:k + 1 + CONTEXT]
        t = len(y)
        x = ids[k:k + t]
        logits = numpy_reference.forward(params, config, np.asarray([x]),
                                         np.arange(t)[None], np.ones((1, t), int))[0]
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nats += float(np.sum(logz - logits[np.arange(t), y]))
    return nats / math.log(2) / len(text.encode("utf-8"))


TEXTS = [SENTENCE * 2, random_string(1, 30), "白日依山尽，黄河入海流。" * 3,
         SENTENCE * 5 + "and a tail"]  # the last one spans 3 windows of 32 tokens


@pytest.mark.parametrize("backend", ["stage", "export"])
def test_scores_equal_float64_reference(trained, tok, model_config, backend):
    params, stage_dir, export_dir = trained
    scorer = load_model_scorer(stage_dir if backend == "stage" else export_dir, batch_size=3)
    assert len(tok.encode(TEXTS[-1])) + 1 > 2 * CONTEXT  # really exercises the windows
    expected = [reference_bits_per_byte(params, model_config, tok, t) for t in TEXTS]
    np.testing.assert_allclose(scorer(TEXTS), expected, rtol=2e-4)


def test_zero_head_is_uniform(trained, tok, model_config):
    """Closed form: a zero lm_head gives logits 0, ln(V) nats a token: log2(V) * n / bytes."""
    from geb_jax.infer import Weights
    params = dict(trained[0], lm_head=np.zeros_like(trained[0]["lm_head"]))
    row_nll, max_len = engine_row_nll(Weights.from_params(params,
                                                          dataclasses.asdict(model_config)))
    scorer = ModelScorer(row_nll, tok, max_len)
    for text in TEXTS:
        expected = math.log2(tok.vocab_size) * len(tok.encode(text)) / len(text.encode())
        assert scorer([text])[0] == pytest.approx(expected, rel=1e-5)


def only_perplexity(model: str, ceiling: float) -> dict:
    cfg = {k: (False if isinstance(v, bool) else v) for k, v in
           default_cleaning_config().items()}
    cfg.update(perplexity=True, perplexity_model=model, perplexity_max_bpb_en=ceiling)
    return cfg


def test_chain_keeps_fluent_drops_random(trained):
    _, stage_dir, export_dir = trained
    fluent = [SENTENCE * n for n in (2, 3, 6)]
    noise = [random_string(s) for s in range(4)]
    docs = [{"text": t, "lang": "en"} for pair in zip(fluent + [""] * 1, noise) for t in pair]
    docs = [d for d in docs if d["text"]]
    scores = load_model_scorer(export_dir)([d["text"] for d in docs])  # numpy: no compile
    print("bits per byte:", [round(s, 2) for s in scores])
    kept, report = clean(docs, only_perplexity(f"model:{stage_dir}", ceiling=2.0))
    assert [d["text"] for d in kept] == fluent
    assert report.filters["perplexity"].dropped == len(noise)
    assert max(s for d, s in zip(docs, scores) if d["text"] in fluent) < 1.0
    assert min(s for d, s in zip(docs, scores) if d["text"] in noise) > 3.0


def test_bad_model_path_is_a_config_error(tmp_path, trained):
    with pytest.raises(CleaningConfigError, match="perplexity_model"):
        clean([], only_perplexity("model:", 2.0))
    with pytest.raises(CleaningConfigError, match=r"neither a finished training stage"):
        clean([], only_perplexity(f"model:{tmp_path}", 2.0))
    workdir = str(tmp_path.parent / trained[1].split("/")[-2])
    with pytest.raises(ModelScorerError, match=r"it is a workdir: name a stage.*pretrain"):
        load_model_scorer(workdir)


def test_data_clean_scores_through_the_protocol_alone(tmp_path):
    """In a fresh process the chain imports no model, checkpoint or serving code, and "model:"
    without a registered backend is one config error saying what to import."""
    code = textwrap.dedent(f"""
        import sys
        from geb_jax.data.clean import CleaningConfigError, clean, default_cleaning_config
        cfg = dict(default_cleaning_config(), perplexity=True, perplexity_model="model:{tmp_path}")
        try:
            clean([{{"text": "x", "lang": "en"}}], cfg)
        except CleaningConfigError as e:
            print("error:", e)
        print("loaded:", sorted(m for m in sys.modules if m.split(".")[:2] in (
            ["geb_jax", "infer"], ["geb_jax", "model"], ["geb_jax", "checkpoint"],
            ["geb_jax", "eval"]) or m == "jax"))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300).stdout
    assert "import geb_jax.eval.filter_scorer first" in out, out
    assert "loaded: []" in out, out
