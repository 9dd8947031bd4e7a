"""geb_jax.eval against independent references: a float64 numpy forward pass
(tests/numpy_reference.py), Hugging Face's perplexity-guide loop, brute-force enumeration,
hand-derived values and the numpy inference engine."""
import dataclasses
import itertools
import json
import math
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
from scipy.special import comb, logsumexp

from geb_jax.data.tokenizer import builtin_tokenizer
from geb_jax.eval import (EngineLanguageModel, EvalConfig, JaxLanguageModel, TaskFileError,
                          choice_predictions, evaluate_during_training, evaluate_multiple_choice,
                          evaluate_sft_generation, few_shot_prompt, load_task_file, maj_at_k,
                          majority_vote, pass_at_k, perplexity, preference_accuracy,
                          rolling_windows, run_suite)
from geb_jax.eval.__main__ import main as eval_main
from geb_jax.eval.scorer import encode_pair
from geb_jax.infer import Engine, Weights, save_npz_model
from geb_jax.model import ModelConfig, abstract_params
from tests import numpy_reference

CONFIG = ModelConfig(vocab_size=384, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                     head_dim=8, d_ff=64, max_seq_len=64)
TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "def add(a, b):\n    return a + b\n",
         "In the beginning God created the heaven and the earth."]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return builtin_tokenizer(384, cache_dir=str(tmp_path_factory.mktemp("tok")))


def random_params(seed, config=CONFIG):
    """Numpy parameters in init_params' tree and shapes (no compilation), with larger weights
    than the default init so that next-token distributions are far from uniform."""
    rng = np.random.default_rng(seed)
    shapes = abstract_params(config)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: (1.0 + 0.1 * rng.standard_normal(s.shape) if "scale" in str(path[-1])
                         else 0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def params():
    return random_params(0)


@pytest.fixture(scope="module")
def jax_model(params, tokenizer):
    return JaxLanguageModel(params, CONFIG, tokenizer)


@pytest.fixture(scope="module")
def engine_model(params, tokenizer):
    return EngineLanguageModel(Engine(Weights.from_params(params, dataclasses.asdict(CONFIG))),
                               tokenizer)


# ---- float64 reference -------------------------------------------------------------------
def ref_logprobs(params, ids):
    """float64 log p(ids[t] | ids[:t]) for t = 1..len(ids)-1, from the numpy reference."""
    x = np.asarray(ids[:-1])[None]
    logits = numpy_reference.forward(params, CONFIG, x, np.arange(x.shape[1])[None],
                                     np.ones_like(x))[0]
    return logits[np.arange(len(ids) - 1), ids[1:]] - logsumexp(logits, axis=-1)


def ref_loglikelihood(params, context, continuation, max_length=CONFIG.max_seq_len):
    whole = (list(context) + list(continuation))[-(max_length + 1):]  # lm-eval's truncation
    return float(ref_logprobs(params, whole)[-len(continuation):].sum())


def hf_guide_windows(n, max_length, stride):
    """Hugging Face's perplexity-guide loop, transliterated, with a window of max_length + 1
    ids: (begin, end, trg_len), targets the last trg_len ids of ids[begin:end]."""
    window, prev_end, out = max_length + 1, 0, []
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n:
            break
    return out


# ---- perplexity and bits per byte ------------------------------------------------------------
@pytest.mark.parametrize("n,max_length,stride", [(2, 4, 4), (10, 4, 4), (10, 4, 2), (11, 4, 3),
                                                 (37, 8, 1), (5, 8, 3)])
def test_rolling_windows_are_hf_guide_windows(n, max_length, stride):
    ours = rolling_windows(n, max_length, stride)
    ref = [(b, max(e - t, b + 1), e) for b, e, t in hf_guide_windows(n, max_length, stride)]
    assert ours == [w for w in ref if w[1] < w[2]]
    targets = [t for _, s, e in ours for t in range(s, e)]
    assert targets == list(range(1, n))  # every id but the bos scored exactly once
    assert all(e - 1 - b <= max_length for b, _, e in ours)


def test_perplexity_matches_float64_reference_when_documents_fit(params, tokenizer, jax_model):
    docs = [[tokenizer.bos_id] + tokenizer.encode(t) for t in TEXTS]
    assert max(map(len, docs)) <= CONFIG.max_seq_len
    nll = -sum(ref_logprobs(params, d).sum() for d in docs)
    tokens = sum(len(d) - 1 for d in docs)
    n_bytes = sum(len(t.encode("utf-8")) for t in TEXTS)
    for stride in (None, 8):  # a document that fits gets the same score with any stride
        got = perplexity(jax_model, TEXTS, stride=stride)
        assert got["tokens"] == tokens and got["bytes"] == n_bytes
        np.testing.assert_allclose(got["perplexity"], math.exp(nll / tokens), rtol=2e-5)
        np.testing.assert_allclose(got["bits_per_byte"], nll / (math.log(2) * n_bytes),
                                   rtol=2e-5)


def test_strided_perplexity_matches_reference_windows(params, tokenizer):
    text = " ".join(TEXTS)
    ids = [tokenizer.bos_id] + tokenizer.encode(text)
    max_length = 16
    assert len(ids) > 3 * max_length
    short = JaxLanguageModel(params, CONFIG, tokenizer, max_length=max_length)
    for stride in (5, max_length):  # overlapping windows, and disjoint ones (the default)
        nll = 0.0
        for begin, end, trg_len in hf_guide_windows(len(ids), max_length, stride):
            logp = ref_logprobs(params, ids[begin:end])  # predicts ids[begin+1:end]
            nll -= logp[-min(trg_len, end - begin - 1):].sum()
        got = perplexity(short, [text], stride=None if stride == max_length else stride)
        assert got["tokens"] == len(ids) - 1
        np.testing.assert_allclose(got["bits_per_byte"],
                                   nll / (math.log(2) * len(text.encode("utf-8"))), rtol=2e-5)


# ---- backends ------------------------------------------------------------------------------
def test_jax_backend_equals_engine_backend_and_reference(params, tokenizer, jax_model,
                                                         engine_model):
    bos = tokenizer.bos_id
    long_context = [bos] + tokenizer.encode(" ".join(TEXTS) * 2)
    requests = [([bos], tokenizer.encode("Hello")),
                ([bos] + tokenizer.encode("2 + 2 ="), tokenizer.encode(" 4")),
                (long_context, tokenizer.encode(" the end")),  # cut from the left
                ([bos, 5], [])]
    ours, engine = jax_model.loglikelihood(requests), engine_model.loglikelihood(requests)
    assert ours[3] == (0.0, True)
    for (a, ga), (b, gb) in zip(ours, engine):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
        assert ga == gb
    for (ll, _), (c, x) in zip(ours[:3], requests):
        np.testing.assert_allclose(ll, ref_loglikelihood(params, c, x), rtol=1e-5)
    docs = [[bos] + tokenizer.encode(t) for t in TEXTS]
    np.testing.assert_allclose(jax_model.loglikelihood_rolling(docs, 7),
                               engine_model.loglikelihood_rolling(docs, 7), rtol=1e-5)
    prompts = [[bos] + tokenizer.encode(p) for p in ("Once upon", "1 + 1 =", "床前")]
    greedy = jax_model.generate(prompts, max_tokens=12, stop_token_ids=())
    assert greedy == engine_model.generate(prompts, max_tokens=12, stop_token_ids=())
    stop = greedy[0][3:6]  # a stop string in the middle of the first reply
    cut = jax_model.generate(prompts[:1], max_tokens=12, stop=[stop], stop_token_ids=())
    assert cut == engine_model.generate(prompts[:1], max_tokens=12, stop=[stop],
                                        stop_token_ids=())
    assert cut == [greedy[0][:greedy[0].find(stop)]]


def test_scoring_with_jax_and_decoding_with_the_engine_changes_no_result(params, tokenizer,
                                                                         jax_model):
    """The training-time suite's model (JAX scores, engine KV-cache decoding) gives the JAX
    model's greedy replies and its log-likelihoods unchanged."""
    from geb_jax.eval.jax_model import JaxScoringEngineDecoding
    hybrid = JaxScoringEngineDecoding(params, CONFIG, tokenizer, batch_size=4)
    bos = tokenizer.bos_id
    prompts = [[bos] + tokenizer.encode(p) for p in ("Once upon", "1 + 1 =", "床前", "def")]
    assert hybrid.generate(prompts, max_tokens=16, stop_token_ids=()) == \
        jax_model.generate(prompts, max_tokens=16, stop_token_ids=())
    requests = [([bos], tokenizer.encode("Hello there")), ([bos, 7], tokenizer.encode(" 4"))]
    for (a, ga), (b, gb) in zip(hybrid.loglikelihood(requests),
                                jax_model.loglikelihood(requests)):
        assert ga == gb and a == pytest.approx(b, rel=1e-6)  # batch sizes differ: float order


def test_sampling_is_seeded_and_tends_to_greedy(jax_model, tokenizer):
    prompts = [[tokenizer.bos_id] + tokenizer.encode("Once upon")] * 3
    a = jax_model.generate(prompts, max_tokens=10, temperature=1.0, seed=3, stop_token_ids=())
    assert a == jax_model.generate(prompts, max_tokens=10, temperature=1.0, seed=3,
                                   stop_token_ids=())
    assert len(set(a)) > 1  # the same prompt gets different samples in one call
    assert jax_model.generate(prompts[:1], max_tokens=10, temperature=1e-6, stop_token_ids=()
                              ) == jax_model.generate(prompts[:1], max_tokens=10,
                                                      stop_token_ids=())


# ---- multiple choice -----------------------------------------------------------------------
def test_few_shot_prompt_layouts(repo_root):
    items = load_task_file(os.path.join(repo_root, "tests", "data", "mc_tiny.jsonl"))
    assert [i.answer for i in items] == [1, 2, 0, 0, 0]
    expected = ("The following are multiple choice questions (with answers) about elementary "
                "mathematics.\n\n"
                "What is 2 + 3?\nA. 4\nB. 5\nC. 6\nD. 23\nAnswer: B\n\n"
                "Which number is prime?\nA. 9\nB. 15\nC. 7\nD. 21\nAnswer:")
    assert few_shot_prompt(items[1], [items[0]], "mmlu") == expected
    assert few_shot_prompt(items[4], [], "cmmlu") == (
        "以下是关于中国古诗的单项选择题，请直接给出正确答案的选项。\n\n"
        "床前明月光的下一句是？\nA. 疑是地上霜\nB. 举头望明月\nC. 低头思故乡\nD. 春眠不觉晓\n答案：")
    assert few_shot_prompt(items[3], [items[2]], "ceval", style="text") == (
        "以下是中国关于general knowledge的单项选择题，请选出其中的正确答案。\n\n"
        "What color is a clear sky?\n答案： blue\n\n"
        "Water freezes at how many degrees Celsius?\n答案：")


def test_acc_norm_and_acc_bytes_hand_computed():
    # lls / chars = -2, -1.5, -3 ; lls / bytes = -2, -1.5, -1 (3 Chinese characters = 9 bytes)
    assert choice_predictions([-4.0, -6.0, -9.0], ["ab", "abcd", "中文字"]) == {
        "acc": 0, "acc_norm": 1, "acc_bytes": 2}


@pytest.mark.parametrize("style", ["letter", "text"])
def test_multiple_choice_matches_float64_argmax(params, tokenizer, jax_model, repo_root, style):
    items = load_task_file(os.path.join(repo_root, "tests", "data", "mc_tiny.jsonl"))[:4]
    got = evaluate_multiple_choice(jax_model, items, shots=0, style=style)
    hits = {"acc": [], "acc_norm": []}
    for item in items:
        prompt = few_shot_prompt(item, [], "mmlu", style)
        strings = ("ABCD"[:len(item.choices)] if style == "letter" else item.choices)
        lls = np.array([ref_loglikelihood(params, *encode_pair(tokenizer, prompt, " " + s))
                        for s in strings])
        lengths = np.array([len(s) for s in strings], float)
        hits["acc"].append(np.argmax(lls) == item.answer)
        hits["acc_norm"].append(np.argmax(lls / lengths) == item.answer)
    assert got["acc"] == pytest.approx(np.mean(hits["acc"]))
    assert got["acc_norm"] == pytest.approx(np.mean(hits["acc_norm"]))
    assert got["questions"] == 4


BAD_LINES = {
    "missing answer": ('{"question": "q", "choices": ["a", "b"]}', "missing 'answer'"),
    "answer letter outside": ('{"question": "q", "choices": ["a", "b"], "answer": "C"}',
                              "outside the 2 choices"),
    "answer index outside": ('{"question": "q", "choices": ["a", "b"], "answer": 2}',
                             "outside the 2 choices"),
    "empty choices": ('{"question": "q", "choices": [], "answer": 0}', "'choices' is empty"),
    "invalid json": ('{"question": "q", "choices": ["a", "b"], "answer": 0', "invalid JSON"),
    "no question": ('{"choices": ["a", "b"], "answer": 0}', "'question'"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_task_file_names_file_and_line(tmp_path, case):
    line, message = BAD_LINES[case]
    good = '{"question": "ok", "choices": ["x", "y"], "answer": "A"}'
    path = tmp_path / "task.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n", encoding="utf-8")  # the bad line is line 3
    with pytest.raises(TaskFileError) as e:
        load_task_file(path)
    assert f"{path}:3:" in str(e.value) and message in str(e.value)


# ---- generation metrics ----------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 5, 6])
def test_pass_at_k_equals_enumeration_over_subsets(n):
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(samples, k))
            brute = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
    assert pass_at_k(200, 3, 100) == pytest.approx(1 - comb(197, 100) / comb(200, 100),
                                                   rel=1e-9)


def test_majority_vote_and_maj_at_k():
    answers = ["5", "7", "7", "5", "9"]
    assert maj_at_k(answers, "7", 3) == 1.0  # 7, 7 beat 5
    assert majority_vote(answers[:4]) == "5"  # 2-2 tie: the first to appear
    assert maj_at_k(answers, "7", 4) == 0.0
    assert maj_at_k(answers, "9", 1) == 0.0


class ScriptedModel:
    """A LanguageModel whose replies are scripted per prompt (greedy, then samples)."""
    max_length = 512

    def __init__(self, tokenizer, greedy, sampled):
        self.tokenizer, self.greedy, self.sampled, self.calls = tokenizer, greedy, sampled, []

    def generate(self, prompts, *, max_tokens, stop=(), stop_token_ids=None, temperature=0.0,
                 seed=0):
        self.calls.append(stop_token_ids)
        if temperature == 0:
            return [self.greedy[tuple(p)] for p in prompts]
        out, seen = [], {}
        for p in prompts:
            k = seen[tuple(p)] = seen.get(tuple(p), -1) + 1
            out.append(self.sampled[tuple(p)][k])
        return out


def test_sft_exact_match_pass_at_k_and_maj(tokenizer):
    from geb_jax.data.chat import chat_prompt
    from geb_jax.data.demo_tasks import builtin_sft_conversations
    convs = builtin_sft_conversations("valid")[:4]
    prompts = [tuple(chat_prompt(tokenizer, c["messages"][:-1])) for c in convs]
    refs = [c["messages"][-1]["content"] for c in convs]
    greedy = {prompts[0]: f"  {refs[0]}\n", prompts[1]: "wrong", prompts[2]: refs[2],
              prompts[3]: refs[3] + "!"}
    # samples per problem: correct counts 0, 1, 3, 2 of 4; majorities: wrong, wrong, right, tie
    sampled = {prompts[0]: ["a", "b", "a", "c"], prompts[1]: ["x", refs[1], "x", "y"],
               prompts[2]: [refs[2], "z", refs[2], refs[2]],
               prompts[3]: ["q", refs[3], refs[3], "q"]}
    model = ScriptedModel(tokenizer, greedy, sampled)
    got = evaluate_sft_generation(model, convs, samples=4)
    assert got["exact_match"] == 0.5 and got["problems"] == 4
    for k in (1, 2, 4):
        expected = np.mean([pass_at_k(4, c, k) for c in (0, 1, 3, 2)])
        assert got[f"pass@{k}"] == pytest.approx(expected)
    assert got["pass@1"] == pytest.approx((0 + 1 + 3 + 2) / 16)
    assert got["maj1@4"] == 0.25  # problem 3 ties 2-2 and "q" came first
    assert model.calls[0] == (tokenizer.end_id, tokenizer.eos_id)


# ---- preference ---------------------------------------------------------------------------
PAIRS = [{"prompt": "What is 2 + 2?", "chosen": "2 + 2 = 4", "rejected": "2 + 2 = 5"},
         {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."},
         {"prompt": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Say hi"}], "chosen": "Hi!",
          "rejected": "No."},
         {"prompt": "续写：床前明月光", "chosen": "疑是地上霜", "rejected": "春眠不觉晓"}]


def test_preference_accuracy_matches_float64_reference(params, tokenizer, jax_model):
    from geb_jax.data.chat import chat_prompt, encode_reply
    ref_params = random_params(1)
    beta = 0.3

    def logps(p):
        out = []
        for pair in PAIRS:
            msgs = ([{"role": "user", "content": pair["prompt"]}]
                    if isinstance(pair["prompt"], str) else pair["prompt"])
            prompt = chat_prompt(tokenizer, msgs)
            out.append([ref_loglikelihood(p, prompt, encode_reply(tokenizer, pair[k]))
                        for k in ("chosen", "rejected")])
        return np.array(out)

    policy, reference = logps(params), logps(ref_params)
    rewards = beta * (policy - reference)
    with_ref = preference_accuracy(jax_model, PAIRS, beta=beta, reference=JaxLanguageModel(
        ref_params, CONFIG, tokenizer))
    assert with_ref["accuracy"] == np.mean(rewards[:, 0] > rewards[:, 1])
    np.testing.assert_allclose(with_ref["margin"], np.mean(rewards[:, 0] - rewards[:, 1]),
                               rtol=1e-4, atol=1e-6)
    plain = preference_accuracy(jax_model, PAIRS)
    assert plain["accuracy"] == np.mean(policy[:, 0] > policy[:, 1])
    np.testing.assert_allclose(plain["margin"], np.mean(policy[:, 0] - policy[:, 1]), rtol=1e-4)
    assert not plain["uses_reference"] and with_ref["uses_reference"]


# ---- inside training, and the CLI ---------------------------------------------------------
def test_evaluate_during_training_under_the_training_mesh(params, tokenizer, jax_model):
    from geb_jax.config_base import base_config
    from geb_jax.parallel.mesh import LOGICAL_AXIS_RULES, make_mesh
    config = {"tasks": "perplexity,dpo_preference", "max_documents": 2, "max_examples": 3}
    mesh = make_mesh(base_config().mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        flat = evaluate_during_training(params, CONFIG, tokenizer, config)
    direct = run_suite(jax_model, EvalConfig(**config))
    assert flat["perplexity/bits_per_byte"] == pytest.approx(
        direct["perplexity"]["bits_per_byte"], rel=1e-6)
    assert flat["dpo_preference/accuracy"] == direct["dpo_preference"]["accuracy"]
    assert all(isinstance(v, float) for v in flat.values())


def _save_stage(workdir, stage, params, tokenizer_path):
    """A checkpoint as the training loop writes it (TrainState, run config; step 1) and
    workdir/tokenizer.model."""
    import jax.numpy as jnp
    from geb_jax.checkpoint import Checkpointer
    from geb_jax.config_base import base_config
    from geb_jax.run_config import run_config
    from geb_jax.train.optimizer import make_optimizer
    from geb_jax.train.state import TrainState
    config = base_config()
    config.model.update(dataclasses.asdict(CONFIG))
    config.train.seq_len = CONFIG.max_seq_len  # a stage's rows fit the context (run_config checks)
    optimizer = make_optimizer(run_config(config).optimizer)
    params = jax.tree.map(jnp.asarray, params)
    zero_f, zero_i = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
    state = TrainState(step=zero_i + 1, params=params, opt_state=optimizer.init(params),
                       rng=jax.random.key_data(jax.random.key(0)), loss_ema=zero_f,
                       grad_norm_ema=zero_f, ema_count=zero_i, skipped=zero_i)
    with Checkpointer(os.path.join(workdir, stage, "checkpoints"), save_every=0,
                      async_save=False) as checkpointer:
        checkpointer.maybe_save(1, state, {}, config.to_dict(), force=True)
    shutil.copyfile(tokenizer_path, os.path.join(workdir, "tokenizer.model"))


def test_cli_on_checkpoint_and_export_and_mismatch(tmp_path, params, tokenizer, repo_root,
                                                    capsys):
    workdir = str(tmp_path / "run")
    _save_stage(workdir, "sft", params, tokenizer.path)
    texts = tmp_path / "held_out.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    task = os.path.join(repo_root, "tests", "data", "mc_tiny.jsonl")
    tasks = f"perplexity,mc:{task}"
    args = ["--tasks", tasks, "--texts", str(texts), "--shots", "1"]
    assert eval_main(["--workdir", workdir, "--stage", "sft", *args]) == 0
    table = capsys.readouterr().out
    assert "bits_per_byte" in table and "acc_norm" in table
    with open(os.path.join(workdir, "sft", "eval.json"), encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["step"] == 1
    expected = run_suite(JaxLanguageModel(params, CONFIG, tokenizer),
                         EvalConfig(tasks=tasks, shots=1), texts=TEXTS)
    assert saved["results"]["perplexity"]["bits_per_byte"] == pytest.approx(
        expected["perplexity"]["bits_per_byte"], rel=1e-6)
    assert saved["results"][f"mc:{task}"] == expected[f"mc:{task}"]

    export = save_npz_model(str(tmp_path / "export"), params, CONFIG, tokenizer.path)
    out = str(tmp_path / "export_eval.json")
    assert eval_main(["--model", export, "--output", out, *args]) == 0
    with open(out, encoding="utf-8") as f:
        exported = json.load(f)["results"]
    assert exported["perplexity"]["bits_per_byte"] == pytest.approx(
        expected["perplexity"]["bits_per_byte"], rel=1e-5)

    other = builtin_tokenizer(512, cache_dir=str(tmp_path / "tok512"))  # not the run's
    capsys.readouterr()
    assert eval_main(["--workdir", workdir, "--stage", "sft", "--tokenizer", other.path,
                      "--tasks", "perplexity"]) == 2
    err = capsys.readouterr().err
    assert "do not match" in err and other.path in err and "512" in err and "384" in err
    assert eval_main(["--workdir", workdir, "--stage", "dpo", "--tasks", "perplexity"]) == 2
    assert "stage 'dpo' has not been trained" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": "Z"}\n', encoding="utf-8")
    assert eval_main(["--model", export, "--tasks", f"mc:{bad}"]) == 2
    assert f"{bad}:1:" in capsys.readouterr().err
