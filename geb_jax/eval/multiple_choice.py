"""Multiple-choice scoring, zero- and few-shot, with lm-evaluation-harness' metrics.

For each question the model scores every choice as a continuation of the prompt
(tasks.few_shot_prompt; the continuation is " " + choice string, split from the context the way
lm-eval does, scorer.encode_pair). With ll_i the summed log-probability of choice i and s_i its
choice string (the letter in style "letter", the option text in style "text"):

    acc       = [argmax_i ll_i == gold]
    acc_norm  = [argmax_i ll_i / len(s_i) == gold]           len in characters, as lm-eval
                                                            0.4 computes it (`completion_len`)
    acc_bytes = [argmax_i ll_i / len(s_i.encode()) == gold]  len in UTF-8 bytes

averaged over questions (ties go to the first choice, np.argmax). With letters every s_i has
length 1, so acc_norm == acc, as in lm-eval's MMLU.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from geb_jax.eval.scorer import LanguageModel, encode_pair
from geb_jax.eval.tasks import (MultipleChoiceItem, choice_strings, few_shot_prompt,
                                select_shots)


def choice_predictions(lls: Sequence[float], choices: Sequence[str]) -> dict[str, int]:
    """The predicted index under each metric's normalisation."""
    lls = np.asarray(lls, np.float64)
    chars = np.array([len(c) for c in choices], np.float64)
    n_bytes = np.array([len(c.encode("utf-8")) for c in choices], np.float64)
    return {"acc": int(np.argmax(lls)), "acc_norm": int(np.argmax(lls / chars)),
            "acc_bytes": int(np.argmax(lls / n_bytes))}


def evaluate_multiple_choice(model: LanguageModel, items: Sequence[MultipleChoiceItem], *,
                             shots: int = 0, fewshot_pool: Sequence[MultipleChoiceItem] | None = None,
                             layout: str = "mmlu", style: str = "letter") -> dict:
    """{"acc", "acc_norm", "acc_bytes", "questions", "subjects": {subject: acc}}.

    Few-shot examples are the first `shots` items of the same subject in `fewshot_pool`
    (default: `items` itself, never the question being asked), like MMLU's dev split.
    """
    if not items:
        raise ValueError("evaluate_multiple_choice needs at least one question")
    pool = items if fewshot_pool is None else fewshot_pool
    requests, spans = [], []
    for item in items:
        prompt = few_shot_prompt(item, select_shots(item, pool, shots), layout, style)
        start = len(requests)
        requests.extend(encode_pair(model.tokenizer, prompt, " " + c)
                        for c in choice_strings(item, style))
        spans.append((start, len(requests)))
    lls = [ll for ll, _ in model.loglikelihood(requests)]
    hits = {"acc": [], "acc_norm": [], "acc_bytes": []}
    by_subject: dict[str, list[float]] = {}
    for item, (a, b) in zip(items, spans):
        predicted = choice_predictions(lls[a:b], choice_strings(item, style))
        for metric, index in predicted.items():
            hits[metric].append(float(index == item.answer))
        by_subject.setdefault(item.subject or "", []).append(hits["acc"][-1])
    out = {metric: float(np.mean(v)) for metric, v in hits.items()}
    out["questions"] = len(items)
    out["subjects"] = {s: float(np.mean(v)) for s, v in sorted(by_subject.items())}
    return out
