"""The lm-evaluation-harness adapter (geb_jax.eval.lm_eval_adapter) against a float64 reference.

A tiny random model (init_std 0.2, so logits span several units and 1e-4 means something) is
exported with save_npz_model. Every number the adapter returns is recomputed from the same
parameters with tests/numpy_reference.py (float64, loops over heads): continuation
log-likelihoods and greedy flags, whole-document log-likelihoods in rolling windows, and greedy
decoding. lm_eval itself then runs offline (HF_*_OFFLINE=1) on the task YAMLs shipped in
tests/lm_eval_tasks/, and its acc / acc_norm / exact_match / perplexities must equal the values
computed by hand from the reference.
"""
import dataclasses
import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from geb_jax.data.tokenizer import TokenizerError, train_tokenizer
from geb_jax.infer import save_npz_model
from geb_jax.model import ModelConfig

from tests import numpy_reference
from tests.conftest import REPO_ROOT

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402  pylint: disable=wrong-import-position

from geb_jax.eval.lm_eval_adapter import (GebJaxLM, ModelArgsError,  # noqa: E402
                                          weights_from_checkpoint)

TASK_DIR = os.path.join(REPO_ROOT, "tests", "lm_eval_tasks")
TOL = 1e-4
GEN_TOKENS = 8  # geb_gen3.yaml's max_gen_toks
CORPUS = ("The quick brown fox jumps over the lazy dog. What color is the sky? The sky is blue. "
          "How many legs does a cat have? A cat has four legs. Which animal barks? A dog barks. "
          "Water freezes at zero degrees and boils at one hundred degrees. Paris is the capital "
          "of France. Small models learn fast when the data is clean.\n")


# ---- model, tokenizer, reference ------------------------------------------------------------

def _random_params(c: ModelConfig, seed: int = 0) -> dict:
    """Random parameters in the model's tree layout; norm scales around 1 so they matter."""
    rng = np.random.default_rng(seed)
    L, D, N, K, H, F, V = (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff,
                           c.vocab_size)

    def normal(*shape):
        return (rng.standard_normal(shape) * c.init_std).astype(np.float32)

    def norm(*shape):
        return (1.0 + 0.3 * rng.standard_normal(shape)).astype(np.float32)

    return {"embedding": normal(V, D), "final_norm": {"scale": norm(D)}, "lm_head": normal(D, V),
            "layers": {"attn": {"q": normal(L, D, N, H), "k": normal(L, D, K, H),
                                "v": normal(L, D, K, H), "o": normal(L, N, H, D)},
                       "mlp": {"gate": normal(L, D, F), "up": normal(L, D, F),
                               "down": normal(L, F, D)},
                       "attn_norm": {"scale": norm(L, D)}, "mlp_norm": {"scale": norm(L, D)}}}


class Reference:
    """float64 scores of the exported model, tokenized with the same SentencePiece model."""

    def __init__(self, params, config, tokenizer):
        self.params, self.config, self.tok = params, config, tokenizer

    def logprobs(self, ids):
        """log p(ids[i+1] | ids[:i+1]) and whether ids[i+1] is the argmax, for each i."""
        ids = np.asarray(ids)
        t = len(ids) - 1
        logits = numpy_reference.forward(self.params, self.config, ids[None, :t],
                                         np.arange(t)[None], np.zeros((1, t), np.int64))[0]
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        return logits[np.arange(t), ids[1:]] - logz, logits.argmax(-1) == ids[1:]

    def loglikelihood(self, context: str, continuation: str, max_length: int):
        """lm_eval's definition: trailing spaces of the context belong to the continuation;
        continuation ids are those of bos+context+continuation after bos+context's; the
        context is cut from the left so that the pair fits max_length + 1 tokens."""
        if context:
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            ctx = self.tok.encode(context, add_bos=True)
            cont = self.tok.encode(context + continuation, add_bos=True)[len(ctx):]
        else:
            ctx, cont = [self.tok.bos_id], self.tok.encode(continuation)
        ids = (ctx + cont)[-(max_length + 1):]
        logp, greedy = self.logprobs(ids)
        return float(logp[-len(cont):].sum()), bool(greedy[-len(cont):].all())

    def rolling(self, text: str, max_length: int) -> float:
        """Each token of bos+text scored once, in chunks of max_length tokens, each chunk with
        the max_length tokens that end just before its last token as the model's input."""
        seq = [self.tok.bos_id] + self.tok.encode(text)
        total, done = 0.0, 0
        while done < len(seq) - 1:
            end = min(len(seq) - 1, done + max_length)  # predict seq[done + 1 .. end]
            start = max(0, end - max_length)  # model input seq[start:end]
            logp, _ = self.logprobs(seq[start:end + 1])
            total += float(logp[done - start:].sum())
            done = end
        return total

    def greedy_ids(self, context: str, max_new: int) -> list[int]:
        """Greedy decoding from bos+context until eos/<|end|> or max_new tokens."""
        ids = self.tok.encode(context, add_bos=True)
        new = []
        for _ in range(max_new):
            seq = ids + new
            t = len(seq)
            logits = numpy_reference.forward(self.params, self.config, np.asarray([seq]),
                                             np.arange(t)[None], np.zeros((1, t), np.int64))
            token = int(logits[0, -1].argmax())
            if token in (self.tok.eos_id, self.tok.end_id):
                break
            new.append(token)
        return new

    def greedy(self, context: str, max_new: int, stops=()) -> str:
        """The greedy text, cut before the first stop string."""
        text = self.tok.decode(self.greedy_ids(context, max_new))
        cuts = [text.find(s) for s in stops if s in text]
        return text[:min(cuts)] if cuts else text


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer = train_tokenizer([CORPUS] * 20, 384, str(root / "tok"))
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4,
                         n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=64, init_std=0.2,
                         tie_embeddings=False)
    params = _random_params(config)
    model_dir = save_npz_model(str(root / "export"), params, config, tokenizer.path)
    return {"root": root, "dir": model_dir, "params": params, "config": config,
            "tokenizer": tokenizer, "ref": Reference(params, config, tokenizer)}


@pytest.fixture(scope="module")
def lm(setup):
    return GebJaxLM(pretrained=setup["dir"], batch_size=3)


def _requests(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _jsonl(name):
    with open(os.path.join(TASK_DIR, name)) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---- registration -----------------------------------------------------------------------------

def test_registered_next_to_the_builtin_models():
    from lm_eval.api.registry import get_model
    assert get_model("geb_jax") is GebJaxLM
    assert get_model("dummy").__name__ == "DummyLM"  # built-ins still resolve


# ---- loglikelihood ----------------------------------------------------------------------------

def test_loglikelihood_equals_float64_reference(setup, lm):
    ref, tok = setup["ref"], setup["tokenizer"]
    # A continuation the model itself would produce (random models favour byte pieces, whose
    # text may re-encode differently: keep a context whose greedy text round-trips).
    greedy = None
    for context in ("Question:", "The sky is", "Water", "A dog", "Paris is"):
        ids = ref.greedy_ids(context, 3)
        text = tok.decode(ids)
        if tok.encode(context + text, add_bos=True)[len(tok.encode(context, True)):] == ids:
            greedy = (context, text)
            break
    assert greedy is not None, "no greedy continuation re-encodes to itself"
    long_context = "What color is the sky? The sky is blue. " * 8  # > max_seq_len tokens
    pairs = [("Question: What is 2 + 3?\nAnswer:", " 5"), ("Which animal barks?", " a dog"),
             ("", "The cat sat"), ("The sky is ", "blue"), greedy,
             (long_context, " The sky is blue.")]
    assert len(setup["tokenizer"].encode(long_context)) > lm.max_length
    got = lm.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    want = [ref.loglikelihood(c, x, lm.max_length) for c, x in pairs]
    for (c, x), (ll, is_greedy), (ll_ref, greedy_ref) in zip(pairs, got, want):
        assert ll == pytest.approx(ll_ref, abs=TOL, rel=TOL), (c, x)
        assert is_greedy == greedy_ref, (c, x)
    assert {g for _, g in want} == {True, False}, "both greedy flags must be exercised"


def test_loglikelihood_rolling_is_the_whole_document_in_windows(setup, lm):
    ref = setup["ref"]
    docs = ["The cat sat on the mat.", CORPUS]
    assert len(setup["tokenizer"].encode(CORPUS)) > lm.max_length  # several windows
    got = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(d,) for d in docs]),
                                   disable_tqdm=True)
    # A document that fits: the plain sum of log p(token | everything before), after bos.
    logp, _ = ref.logprobs([setup["tokenizer"].bos_id] + setup["tokenizer"].encode(docs[0]))
    assert got[0] == pytest.approx(float(logp.sum()), abs=TOL, rel=TOL)
    assert got[1] == pytest.approx(ref.rolling(CORPUS, lm.max_length), abs=TOL, rel=TOL)

    doc = "Small models learn fast when the data is clean, and they forget slowly."
    n = len(setup["tokenizer"].encode(doc))
    assert n > 2 * 12 and n % 12, n  # three or more windows, the last one partial
    short = GebJaxLM(pretrained=setup["dir"], max_length=12)
    got = short.loglikelihood_rolling(_requests("loglikelihood_rolling", [(doc,)]),
                                      disable_tqdm=True)
    assert got[0] == pytest.approx(ref.rolling(doc, 12), abs=TOL, rel=TOL)


# ---- generate_until ---------------------------------------------------------------------------

def test_generate_until_honours_until_and_max_gen_toks(setup, lm):
    ref = setup["ref"]
    prompt = "The opposite of hot is"
    full = ref.greedy(prompt, 10)
    assert len(full) >= 6, f"the random model stopped early ({full!r}); pick another prompt"
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = full[:full.find(stop)]
    args = [(prompt, {"until": [], "max_gen_toks": 10}),
            (prompt, {"until": [stop], "max_gen_toks": 10, "do_sample": False}),
            (prompt, {"until": stop, "max_gen_toks": 3, "temperature": 0.0})]
    got = lm.generate_until(_requests("generate_until", args), disable_tqdm=True)
    assert got[0] == full
    assert got[1] == cut and len(cut) < len(full)
    assert got[2] == ref.greedy(prompt, 3, [stop]) != full  # 3 tokens, not 10


def test_bad_arguments_fail_with_the_name(setup, lm):
    with pytest.raises(ModelArgsError, match="unknown --model_args.*'temprature'"):
        GebJaxLM(pretrained=setup["dir"], temprature=0.5)
    with pytest.raises(ValueError, match=r"generation_kwargs \['num_beams'\]"):
        lm.generate_until(_requests("generate_until", [("Hi", {"num_beams": 4})]),
                          disable_tqdm=True)


# ---- training workdir -------------------------------------------------------------------------

def test_workdir_stage_checkpoint_loads_the_saved_parameters(setup, lm):
    import jax
    import jax.numpy as jnp

    from geb_jax.checkpoint import Checkpointer
    from geb_jax.config_base import base_config
    from geb_jax.run_config import run_config
    from geb_jax.train.optimizer import make_optimizer
    from geb_jax.train.state import TrainState

    workdir = setup["root"] / "workdir"
    run = base_config()
    run.model.update(dataclasses.asdict(setup["config"]))
    run.train.seq_len = setup["config"].max_seq_len  # rows fit the context (run_config checks)
    jparams = jax.tree.map(jnp.asarray, setup["params"])
    optimizer = make_optimizer(run_config(run).optimizer)
    zero = jnp.zeros((), jnp.float32)
    state = TrainState(step=jnp.int32(7), params=jparams, opt_state=optimizer.init(jparams),
                       rng=jnp.zeros((2,), jnp.uint32), loss_ema=zero, grad_norm_ema=zero,
                       ema_count=jnp.int32(0), skipped=jnp.int32(0))
    with Checkpointer(workdir / "sft" / "checkpoints", save_every=0, keep=None) as ckpt:
        ckpt.maybe_save(7, state, {"batches_drawn": 0}, run.to_dict(), force=True)

    with pytest.raises(ModelArgsError, match=r"add stage=<one of \['sft'\]>"):
        GebJaxLM(pretrained=str(workdir))
    with pytest.raises(ModelArgsError, match="tokenizer file .*tokenizer.model not found"):
        GebJaxLM(pretrained=str(workdir), stage="sft")
    syllables = " ".join(a + b + c for a in "bcdfgklmnprst" for b in "aeiou" for c in "nrstlm")
    wrong = train_tokenizer([CORPUS * 3 + syllables] * 5, 512, str(workdir / "tokenizer"))
    with pytest.raises(TokenizerError, match=f"tokenizer {re.escape(wrong.path)} has vocab_size "
                                             f"512 but the model has vocab_size 384"):
        GebJaxLM(pretrained=str(workdir), stage="sft")
    shutil.copyfile(setup["tokenizer"].path, workdir / "tokenizer.model")

    from_ckpt = GebJaxLM(pretrained=str(workdir), stage="sft", batch_size=2)
    assert from_ckpt.get_model_info()["checkpoint_step"] == 7
    np.testing.assert_array_equal(from_ckpt.engine.weights.lm_head, lm.engine.weights.lm_head)
    np.testing.assert_array_equal(from_ckpt.engine.weights.layers[1].qkv,
                                  lm.engine.weights.layers[1].qkv)
    pairs = _requests("loglikelihood", [("Which animal barks?", " a dog")])
    assert from_ckpt.loglikelihood(pairs, disable_tqdm=True) == lm.loglikelihood(
        pairs, disable_tqdm=True)
    with pytest.raises(ModelArgsError, match=r"step=3.*committed steps: \[7\]"):
        weights_from_checkpoint(str(workdir / "sft"), 3)

    meta_file = workdir / "sft" / "checkpoints" / "7" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["checksums"]["params/lm_head"][1] ^= 1  # as if the stored lm_head had changed
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ModelArgsError, match=r"No usable checkpoint.*step 7: restored values "
                                             r"differ from the checksums recorded at save time "
                                             r"\(leaves \['params/lm_head'\]\)"):
        weights_from_checkpoint(str(workdir / "sft"))


# ---- the lm_eval command line, offline ----------------------------------------------------------

def _samples(out_dir, task):
    (path,) = glob.glob(os.path.join(out_dir, "**", f"samples_{task}_*.jsonl"), recursive=True)
    with open(path) as f:
        return sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])


def test_lm_eval_cli_offline_on_the_shipped_tasks(setup, tmp_path):
    ref, out = setup["ref"], tmp_path / "out"
    tasks = ",".join(os.path.join("tests", "lm_eval_tasks", f"{t}.yaml")
                     for t in ("geb_mc6", "geb_gen3", "geb_ppl2"))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets"),
           "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "geb_jax.eval.lm_eval_adapter", "--model", "geb_jax",
               "--model_args", f"pretrained={setup['dir']}", "--tasks", tasks,
               "--batch_size", "4", "--output_path", str(out), "--log_samples"]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (results_file,) = glob.glob(os.path.join(out, "**", "results_*.json"), recursive=True)
    with open(results_file) as f:
        results = json.load(f)["results"]

    # multiple choice: acc and acc_norm from the reference log-likelihoods, by hand
    max_length = setup["config"].max_seq_len
    docs, samples = _jsonl("geb_mc6.jsonl"), _samples(out, "geb_mc6")
    acc = acc_norm = 0
    for doc, sample in zip(docs, samples):
        context = f"Question: {doc['question']}\nAnswer:"
        want = [ref.loglikelihood(context, " " + c, max_length) for c in doc["choices"]]
        lls = [ll for ll, _ in want]
        logged = sample["resps"]  # per choice [[loglikelihood, is_greedy]], as strings
        np.testing.assert_allclose([float(r[0][0]) for r in logged], lls, atol=TOL, rtol=TOL)
        assert [r[0][1] for r in logged] == [str(g) for _, g in want]
        acc += int(np.argmax(lls)) == doc["answer"]
        lengths = np.array([len(c) for c in doc["choices"]], float)
        acc_norm += int(np.argmax(np.array(lls) / lengths)) == doc["answer"]
    assert results["geb_mc6"]["acc,none"] == pytest.approx(acc / len(docs))
    assert results["geb_mc6"]["acc_norm,none"] == pytest.approx(acc_norm / len(docs))

    # generation: greedy text cut at "\n" after at most 8 tokens; exact match by hand
    docs, samples = _jsonl("geb_gen3.jsonl"), _samples(out, "geb_gen3")
    texts = [ref.greedy(d["prompt"], GEN_TOKENS, ["\n"]) for d in docs]
    assert [s["resps"][0][0] for s in samples] == texts
    matches = np.mean([t == d["answer"] for t, d in zip(texts, docs)])
    assert results["geb_gen3"]["exact_match,none"] == pytest.approx(matches)

    # rolling log-likelihood: perplexities from the reference document log-likelihoods
    docs = [d["text"] for d in _jsonl("geb_ppl2.jsonl")]
    lls = [ref.rolling(d, max_length) for d in docs]
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    r = results["geb_ppl2"]
    assert r["word_perplexity,none"] == pytest.approx(math.exp(-sum(lls) / words), rel=1e-5)
    assert r["byte_perplexity,none"] == pytest.approx(math.exp(-sum(lls) / n_bytes), rel=1e-5)
    assert r["bits_per_byte,none"] == pytest.approx(-sum(lls) / n_bytes / math.log(2),
                                                    rel=1e-5)
