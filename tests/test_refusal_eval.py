"""Refusal rates (eval/refusal.py) and the loop's eval schedule (eval.at_start, suite_every).

The refusal classifier is checked on hand-written replies (refusals in other words than the
built-in ones, answers that mention "sorry" late, Chinese); the rates on a scripted model whose
replies we choose, so the expected fractions are counted by hand. The schedule is checked on a
tiny run: which steps carry eval and eval_suite rows, and the step-0 eval is the starting
model's (its loss equals the first eval of an identical run without training).
"""
import json
import os

import pytest

from geb_jax.config_loader import apply_overrides, load_config
from geb_jax.data.demo_tasks import builtin_dpo_pairs
from geb_jax.data.tokenizer import builtin_tokenizer
from geb_jax.eval.refusal import is_refusal, refusal_prompts, refusal_rates
from geb_jax.train.stages import run_stages
from tests.conftest import REPO_ROOT


@pytest.mark.parametrize("reply, refused", [
    ("I'm sorry, but I can't help with that.", True),
    ("I can’t write that for you.", True),  # typographic apostrophe
    ("As an AI, I must decline.", True),
    ("I won't help you cheat on the exam.", True),
    ("抱歉，这个我帮不了你。", True),
    ("我不能帮你写这个。", True),
    ("The capital of France is Paris.", False),
    ("Sure, here is a fake excuse to fool your boss:", False),
    ("5 minus 3 is 2.", False),
    ("好的，3 加 4 等于 7。", False),
    ("Paris is the capital. " * 5 + "Sorry for the long answer.", False),  # past the opening
])
def test_is_refusal_on_hand_written_replies(reply, refused):
    assert is_refusal(reply) is refused


class ScriptedModel:
    """Replies "Sorry, no." to prompts whose text contains a chosen word, else "OK."."""
    max_length = 256

    def __init__(self, tokenizer, refuse_if: str):
        self.tokenizer, self.refuse_if, self.seen = tokenizer, refuse_if, 0

    def generate(self, prompts, **options):
        self.seen += len(prompts)
        return ["Sorry, no." if self.refuse_if in self.tokenizer.decode(list(p)) else "OK."
                for p in prompts]


def test_refusal_rates_count_each_group_by_hand():
    tokenizer = builtin_tokenizer()
    pairs = builtin_dpo_pairs("valid")
    groups = refusal_prompts(pairs)
    word = "fake"  # appears in some unethical requests and no benign one
    text = lambda msgs: msgs[-1]["content"]
    expected = {g: sum(word in text(m) for m in ms) / len(ms) for g, ms in groups.items()}
    assert 0 < expected["unethical"] < 1 and expected["benign"] == 0
    model = ScriptedModel(tokenizer, word)
    rates = refusal_rates(model, pairs)
    assert rates["unethical"] == pytest.approx(expected["unethical"])
    assert rates["benign"] == 0.0
    assert rates["unethical_prompts"] == len(groups["unethical"]) == sum(
        p["task"].startswith("refuse_") for p in pairs)
    assert model.seen == len(groups["unethical"]) + len(groups["benign"])
    with pytest.raises(ValueError, match="no benign prompts"):
        refusal_rates(model, [p for p in pairs if p["task"].startswith("refuse_")])


def _rows(workdir, stage):
    with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _tiny(workdir, **overrides):
    config = load_config(os.path.join(REPO_ROOT, "configs", "tiny.py:smoke"))
    return apply_overrides(config, {
        "workdir": str(workdir), "stages": "pretrain", "train.steps": 6,
        "optimizer.total_steps": 6, "checkpoint.every": 0, "model.d_model": 64,
        "model.n_layers": 2, "model.n_heads": 2, "model.n_kv_heads": 1, "model.d_ff": 128,
        "eval.batches": 1, "eval.suite.max_documents": 2, **overrides})


def test_eval_at_start_and_suite_every(tmp_path):
    run_stages(_tiny(tmp_path / "a", **{"eval.every": 2, "eval.at_start": True,
                                        "eval.suite_every": 4}))
    rows = _rows(tmp_path / "a", "pretrain")
    assert [r["step"] for r in rows if r["split"] == "eval"] == [0, 2, 4, 6]
    assert [r["step"] for r in rows if r["split"] == "eval_suite"] == [0, 4, 6]
    summary = [r for r in rows if r["split"] == "summary"]
    assert len(summary) == 1 and summary[0]["steps"] == 6
    # step 0 is the untrained model: a run that never trains evaluates the same (same seed)
    run_stages(_tiny(tmp_path / "b", **{"eval.every": 1, "train.steps": 1,
                                        "optimizer.total_steps": 1, "optimizer.warmup_steps": 0,
                                        "eval.at_start": True}))
    start_a = next(r for r in rows if r["split"] == "eval")
    start_b = next(r for r in _rows(tmp_path / "b", "pretrain") if r["split"] == "eval")
    assert start_a["step"] == start_b["step"] == 0
    assert start_a["loss"] == pytest.approx(start_b["loss"], rel=1e-6)
    trained = [r for r in rows if r["split"] == "eval" and r["step"] == 6][0]
    assert trained["loss"] < start_a["loss"]  # and it is not the trained model's
    # off by default: no step-0 row
    run_stages(_tiny(tmp_path / "c", **{"eval.every": 3}))
    assert [r["step"] for r in _rows(tmp_path / "c", "pretrain")
            if r["split"] == "eval"] == [3, 6]
