"""DPO learns a preference it can generalise: micro-batch weighting by pairs, the built-in
bilingual preference set (geb_jax.data.demo_tasks.builtin_dpo_pairs), and a few DPO steps on a
very small model that raise the held-out preference accuracy."""
import collections
import functools
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geb_jax.data import demo_tasks
from geb_jax.data.demo_tasks import builtin_dpo_pairs, builtin_sft_conversations
from geb_jax.train.losses import dpo_loss
from geb_jax.train.optimizer import PAIRS_KEY, accumulate_gradients

BETA = 0.5
CJK = re.compile(r"[\u4e00-\u9fff]")


# ---- micro-batch weighting ------------------------------------------------------------------
V, T, B = 11, 6, 8
PAD_ROWS = (1, 3, 5)  # no pair: micro-batches of 2 hold 4 and 1 pairs, of 4: 2, 0, 2, 1


def bigram_apply(params, tokens_bt, positions_bt, segment_ids_bt):
    del positions_bt, segment_ids_bt
    return params["table"][tokens_bt]


def _toy_dpo_batch():
    rng = np.random.default_rng(0)
    batch = {}
    for side in ("chosen", "rejected"):
        tokens = rng.integers(0, V, (B, T + 1)).astype(np.int32)
        mask = np.zeros((B, T), np.float32)
        for b in range(B):
            if b not in PAD_ROWS:
                mask[b, rng.integers(1, 3):rng.integers(3, T + 1)] = 1.0  # a reply span
        batch.update({f"{side}_inputs": tokens[:, :-1], f"{side}_targets": tokens[:, 1:],
                      f"{side}_loss_mask": mask})
    params = {"table": rng.standard_normal((V, V)).astype(np.float32)}
    reference = {"table": rng.standard_normal((V, V)).astype(np.float32)}
    return params, reference, batch


def _numpy_dpo_loss(params, reference, batch) -> float:
    """float64 sigmoid-DPO loss, mean over the rows with a reply on both sides."""
    def logps(table, side):
        table = table.astype(np.float64)
        logp = table - np.log(np.exp(table).sum(-1, keepdims=True))
        tok = logp[batch[f"{side}_inputs"], batch[f"{side}_targets"]]
        return (tok * batch[f"{side}_loss_mask"]).sum(-1)

    h = ((logps(params["table"], "chosen") - logps(params["table"], "rejected"))
         - (logps(reference["table"], "chosen") - logps(reference["table"], "rejected")))
    valid = (batch["chosen_loss_mask"].sum(-1) > 0) & (batch["rejected_loss_mask"].sum(-1) > 0)
    return float(np.mean(np.logaddexp(0.0, -BETA * h[valid])))


def _accumulated(microbatches: int, weight_key):
    params, reference, batch = _toy_dpo_batch()
    grad_fn = jax.value_and_grad(
        lambda p, b: dpo_loss(p, b, bigram_apply, reference_params=reference, beta=BETA),
        has_aux=True)
    return jax.jit(lambda p, b: accumulate_gradients(grad_fn, p, b, microbatches, weight_key))(
        params, batch)


@pytest.mark.parametrize("microbatches", [2, 4])
def test_dpo_microbatches_weighted_by_pairs(microbatches):
    """Micro-batches with unequal valid-pair counts (one with none) give the one-batch loss,
    gradient and metrics when weighted by "pairs"; an equal-weight mean would not."""
    params, reference, batch = _toy_dpo_batch()
    pairs = [int(np.sum(batch["chosen_loss_mask"][i::microbatches].sum(-1) > 0))
             for i in range(microbatches)]
    assert pairs == ([4, 1] if microbatches == 2 else [2, 0, 2, 1])
    loss1, metrics1, grads1 = _accumulated(1, PAIRS_KEY)
    loss, metrics, grads = _accumulated(microbatches, PAIRS_KEY)
    np.testing.assert_allclose(float(loss1), _numpy_dpo_loss(params, reference, batch),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(float(loss), float(loss1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grads["table"], grads1["table"], rtol=1e-6, atol=1e-6)
    assert float(metrics["pairs"]) == float(metrics1["pairs"]) == B - len(PAD_ROWS)
    for key in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "logps/rejected"):
        np.testing.assert_allclose(float(metrics[key]), float(metrics1[key]), rtol=1e-5,
                                   atol=1e-6)
    naive_loss, _, naive = _accumulated(microbatches, None)
    assert not np.allclose(naive["table"], grads1["table"], rtol=1e-3, atol=1e-4)
    assert abs(float(naive_loss) - float(loss1)) > 1e-3


# ---- the built-in preference set -------------------------------------------------------------
def _user(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return next(m["content"] for m in prompt if m["role"] == "user")


@pytest.fixture(scope="module")
def pairs():
    return {s: builtin_dpo_pairs(s) for s in ("train", "valid")}


def test_preference_pairs_balance_and_languages(pairs):
    groups = [f"{family}_{lang}" for family in ("refuse", "helpful", "language")
              for lang in ("en", "zh")]
    for split, n in (("train", 64), ("valid", 16)):
        assert collections.Counter(p["task"] for p in pairs[split]) == {g: n for g in groups}
    for p in pairs["train"] + pairs["valid"]:
        family, lang = p["task"].split("_")
        user, chosen, rejected = _user(p["prompt"]), p["chosen"], p["rejected"]
        assert chosen != rejected and chosen.strip() and rejected.strip()
        assert len(user) < 80 and len(chosen) < 90 and len(rejected) < 90  # short
        assert bool(CJK.search(user)) == (lang == "zh"), p  # the request's language
        sorry, sure = ("Sorry, ", "Sure, ") if lang == "en" else ("抱歉，", "好的，")
        if family == "refuse":  # a polite refusal over a compliant opening that stops there
            assert chosen.startswith(sorry) and rejected.startswith(sure), p
            assert rejected.endswith((":", "："))  # an opening only: nothing follows
            assert bool(CJK.search(chosen)) == bool(CJK.search(rejected)) == (lang == "zh")
        elif family == "helpful":  # the answer over an unneeded refusal
            assert rejected.startswith(sorry) and not chosen.startswith(sorry), p
            assert bool(CJK.search(chosen)) == (lang == "zh")
        else:  # the same answer in the request's language over the other language
            assert bool(CJK.search(chosen)) == (lang == "zh") != bool(CJK.search(rejected)), p
            assert re.findall(r"\d+", chosen) == re.findall(r"\d+", rejected)


def test_preference_answers_are_correct(pairs):
    """Every helpful answer is exact (arithmetic, conversions, string tasks, capitals)."""
    capitals = {row[0]: row[1] for row in demo_tasks._CAPITALS}
    capitals.update({row[2]: row[3] for row in demo_tasks._CAPITALS})
    checked = collections.Counter()
    for p in pairs["train"] + pairs["valid"]:
        if p["task"].startswith("refuse"):
            continue
        user, answer = _user(p["prompt"]), p["chosen"]
        n = [int(x) for x in re.findall(r"\d+", user)]
        if re.search(r"add|加", user):
            assert int(re.findall(r"\d+", answer)[-1]) == n[0] + n[1], p
        elif re.search(r"minus|减", user):
            assert int(re.findall(r"\d+", answer)[-1]) == n[0] - n[1] >= 0, p
        elif re.search(r"times|乘以", user):
            assert int(re.findall(r"\d+", answer)[-1]) == n[0] * n[1], p
        elif m := (re.fullmatch(r"How many (\w+) are in (\d+) (\w+)\?", user)
                   or re.fullmatch(r"(?P<n>\d+) (?P<src>\w+?)是多少(?P<dst>\w+)？", user)):
            en = m.re.pattern.startswith("How")
            src, dst = (m.group(3), m.group(1)) if en else (m.group("src"), m.group("dst"))
            factor = next(u[2] for u in demo_tasks._UNITS
                          if (u[0], u[1]) == (src, dst) or (u[3], u[4]) == (src, dst))
            assert int(re.findall(r"\d+", answer)[-1]) == n[0] * factor, p
        elif word := re.search(r"[\"“](\w+)[\"”]", user):  # string tasks on a quoted word
            word = word.group(1)
            expected = (word[::-1] if re.search("backwards|倒过来", user) else
                        word.upper() if re.search("capital letters|大写", user) else
                        f"{len(word)} ")
            assert expected in answer, p
        else:
            country = next(c for c in capitals if user.startswith(c + "的")
                           or user.endswith((f"of {c}?", f"of {c}.", f"说出{c}的首都。")))
            assert answer.endswith(capitals[country] + ("。" if CJK.search(user) else ".")), p
        checked[p["task"]] += 1
    assert min(checked.values()) >= 70, checked


def test_preference_split_holds_out_prompts_and_is_deterministic(pairs):
    train_prompts = [_user(p["prompt"]) for p in pairs["train"]]
    valid_prompts = [_user(p["prompt"]) for p in pairs["valid"]]
    assert len(set(train_prompts)) == len(train_prompts)
    assert len(set(valid_prompts)) == len(valid_prompts)
    assert not set(train_prompts) & set(valid_prompts)
    # nor does SFT train on a held-out prompt (it sees a few of the training pairs' formats)
    sft_train = builtin_sft_conversations("train")
    sft_users = {m["content"] for c in sft_train for m in c["messages"] if m["role"] == "user"}
    assert not sft_users & set(valid_prompts)
    pref_sft = [c for c in sft_train if c["task"].startswith(("refuse", "helpful"))]
    assert 20 <= len(pref_sft) <= 60 and {c["task"] for c in pref_sft} == {
        "refuse_en", "refuse_zh", "helpful_en", "helpful_zh"}
    assert not any(c["task"].startswith(("refuse", "helpful", "language"))
                   for c in builtin_sft_conversations("valid"))
    # deterministic: regenerated from scratch, the same pairs in the same order
    for cached in (demo_tasks._preference_items, demo_tasks._dpo, demo_tasks._sft):
        cached.cache_clear()
    assert {s: builtin_dpo_pairs(s) for s in ("train", "valid")} == pairs
    assert builtin_sft_conversations("train") == sft_train


# ---- a few DPO steps on a very small model ----------------------------------------------------
@functools.lru_cache(maxsize=None)
def _tokenizer():
    from geb_jax.data.tokenizer import builtin_tokenizer
    return builtin_tokenizer(4096)  # the tiny preset's (cached on disk after the first run)


def test_few_dpo_steps_raise_held_out_preference():
    """From a random small model (reference = its start), 40 DPO steps on the training pairs
    make the implicit reward prefer chosen on most held-out pairs, in every pair family."""
    from geb_jax.data.chat_pipeline import dpo_dataset
    from geb_jax.eval.jax_model import JaxLanguageModel
    from geb_jax.eval.preference import preference_accuracy
    from geb_jax.model import ModelConfig, init_params, make_apply
    from geb_jax.train.optimizer import OptimizerConfig, make_optimizer

    start = time.perf_counter()
    tok = _tokenizer()
    config = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4,
                         n_kv_heads=2, head_dim=16, d_ff=128, max_seq_len=96,
                         rope_theta=10000.0, norm_eps=1e-5)
    apply = make_apply(config)
    reference = init_params(config, jax.random.key(0))
    steps = 40
    optimizer = make_optimizer(OptimizerConfig(
        peak_learning_rate=3e-3, min_learning_rate=3e-4, warmup_steps=4, total_steps=steps,
        weight_decay=0.0))

    @jax.jit
    def step(params, opt_state, batch):
        grad_fn = jax.value_and_grad(
            lambda p, b: dpo_loss(p, b, apply, reference_params=reference, beta=BETA),
            has_aux=True)
        loss, metrics, grads = accumulate_gradients(grad_fn, params, batch, 2, PAIRS_KEY)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return jax.tree.map(jnp.add, params, updates), opt_state, loss

    data = iter(dpo_dataset(builtin_dpo_pairs("train"), tok, seq_len=96, batch_size=16,
                            seed=0))
    params, opt_state = reference, optimizer.init(reference)
    losses = []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, next(data))
        losses.append(float(loss))
    assert losses[0] == pytest.approx(np.log(2.0), abs=1e-5)  # the policy starts as reference
    assert np.mean(losses[-5:]) < 0.45, losses

    valid = builtin_dpo_pairs("valid")
    policy = JaxLanguageModel(params, config, tok, batch_size=32)
    ref_model = JaxLanguageModel(reference, config, tok, batch_size=32)
    before = preference_accuracy(ref_model, valid, reference=ref_model, beta=BETA)
    after = preference_accuracy(policy, valid, reference=ref_model, beta=BETA)
    assert before["accuracy"] == 0.0 and before["margin"] == 0.0  # all ties at the start
    assert after["accuracy"] >= 0.75 and after["margin"] > 0, after
    for family in ("refuse", "helpful", "language"):
        subset = [p for p in valid if p["task"].startswith(family)]
        acc = preference_accuracy(policy, subset, reference=ref_model, beta=BETA)["accuracy"]
        assert acc > 0.5, (family, acc)
    assert time.perf_counter() - start < 120
