"""Generation evals: exact match on the built-in SFT tasks, pass@k and maj1@k.

Each held-out conversation is cut before its last assistant reply; the model continues
chat_prompt(...) until <|end|> (or eos, or max_tokens), and the reply is compared with the
reference after stripping surrounding whitespace. The built-in tasks have one checkable
answer each (arithmetic results, the next verse, a definition, an author).

    exact_match   greedy decoding, the fraction of exact replies
    pass@k        with n samples per problem of which c are exact, the unbiased estimator of
                  Chen et al. 2021 (Codex): 1 - C(n - c, k) / C(n, k), averaged over problems
    maj1@k        the LLaMA / Minerva metric: majority vote over k samples (the most common
                  reply; ties go to the one that appeared first) is exact
"""
from __future__ import annotations

import collections
from typing import Sequence

import numpy as np

from geb_jax.data.chat import chat_prompt, reply_stop_ids
from geb_jax.eval.scorer import LanguageModel


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k), as the product 1 - prod_{i=n-c+1}^{n} (1 - k / i) (stable)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def majority_vote(answers: Sequence[str]) -> str:
    """The most common answer; among equally common ones, the first to appear."""
    if not answers:
        raise ValueError("majority_vote needs at least one answer")
    counts = collections.Counter(answers)
    best = max(counts.values())
    return next(a for a in answers if counts[a] == best)


def maj_at_k(answers: Sequence[str], reference: str, k: int) -> float:
    """1.0 if the majority vote over the first k answers equals the reference."""
    if not 1 <= k <= len(answers):
        raise ValueError(f"maj@k needs 1 <= k <= {len(answers)} answers, got k={k}")
    return float(majority_vote(answers[:k]) == reference)


def normalize(text: str) -> str:
    return text.strip()


def sft_problems(conversations: Sequence[dict]) -> list[tuple[list[dict], str, str]]:
    """[(prompt messages, reference reply, task)]: each conversation cut before its last
    assistant message."""
    problems = []
    for i, conv in enumerate(conversations):
        messages = conv["messages"] if isinstance(conv, dict) else conv
        last = max((j for j, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None or last == 0:
            raise ValueError(f"conversation {i} has no assistant reply after a prompt")
        problems.append((list(messages[:last]), messages[last]["content"],
                         conv.get("task", "") if isinstance(conv, dict) else ""))
    return problems


def evaluate_sft_generation(model: LanguageModel, conversations: Sequence[dict], *,
                            max_tokens: int = 64, samples: int = 0, temperature: float = 0.8,
                            seed: int = 0) -> dict:
    """{"exact_match", "problems", "tasks": {task: exact_match}} and, with samples = n > 0,
    "pass@k" for k in 1, 2, 4, .. <= n and "maj1@n"."""
    tok = model.tokenizer
    problems = sft_problems(conversations)
    if not problems:
        raise ValueError("evaluate_sft_generation needs at least one conversation")
    prompts = [chat_prompt(tok, messages) for messages, _, _ in problems]
    refs = [normalize(r) for _, r, _ in problems]
    options = dict(max_tokens=max_tokens, stop_token_ids=reply_stop_ids(tok))
    greedy = [normalize(t) for t in model.generate(prompts, temperature=0.0, **options)]
    exact = [float(g == r) for g, r in zip(greedy, refs)]
    by_task: dict[str, list[float]] = {}
    for (_, _, task), e in zip(problems, exact):
        by_task.setdefault(task, []).append(e)
    out = {"exact_match": float(np.mean(exact)), "problems": len(problems),
           "tasks": {t: float(np.mean(v)) for t, v in sorted(by_task.items())}}
    if samples > 0:
        repeated = [p for p in prompts for _ in range(samples)]
        texts = [normalize(t) for t in model.generate(repeated, temperature=temperature,
                                                      seed=seed, **options)]
        per_problem = [texts[i * samples:(i + 1) * samples] for i in range(len(prompts))]
        correct = [sum(t == r for t in answers) for answers, r in zip(per_problem, refs)]
        k = 1
        while k <= samples:
            out[f"pass@{k}"] = float(np.mean([pass_at_k(samples, c, k) for c in correct]))
            k *= 2
        out[f"maj1@{samples}"] = float(np.mean([maj_at_k(a, r, samples)
                                                for a, r in zip(per_problem, refs)]))
    return out
