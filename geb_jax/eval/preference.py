"""Preference accuracy on held-out DPO pairs: does the policy rank chosen above rejected?

Each pair is laid out as in training (geb_jax.data.chat_pipeline.dpo_example): the reply (content
and its closing <|end|>, chat.encode_reply) continues chat_prompt(prompt). With logp the summed
log-probability of a reply:

    with a reference model (DPO):  reward = beta * (logp_policy - logp_reference), the implicit
                                    reward of train/losses.dpo_loss; accuracy = mean[r_c > r_r]
                                    (TRL's rewards/accuracies), margin = mean(r_c - r_r)
    without one (e.g. after SFT):  accuracy = mean[logp_c > logp_r], margin = mean(logp_c - logp_r)

Prompts longer than the model's context are cut from the left (scorer.truncate_request),
where training keeps the bos; replies longer than it are cut on the right, as in training.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from geb_jax.data.chat import chat_prompt, encode_reply, validate_messages
from geb_jax.eval.scorer import LanguageModel


def pair_requests(tokenizer, pairs: Sequence[dict], max_length: int
                  ) -> list[tuple[list[int], list[int]]]:
    """[(prompt, chosen), (prompt, rejected), ...] ids, two per pair. Replies longer than the
    model's context less 2 prompt tokens are cut on the right, as training's dpo_example does."""
    requests = []
    for i, pair in enumerate(pairs):
        prompt = pair["prompt"]
        messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                    else validate_messages(prompt, what=f"pair {i} prompt"))
        ids = chat_prompt(tokenizer, messages)
        room = max_length - 1  # (bos, <|assistant|>) + reply <= max_length + 1 ids
        requests += [(ids, encode_reply(tokenizer, pair["chosen"], messages)[:room]),
                     (ids, encode_reply(tokenizer, pair["rejected"], messages)[:room])]
    return requests


def preference_accuracy(policy: LanguageModel, pairs: Sequence[dict], *,
                        reference: LanguageModel | None = None, beta: float = 0.1) -> dict:
    """{"accuracy", "margin", "pairs", "uses_reference"} (see the module docstring)."""
    if not pairs:
        raise ValueError("preference_accuracy needs at least one pair")
    requests = pair_requests(policy.tokenizer, pairs, policy.max_length)
    scores = np.array([ll for ll, _ in policy.loglikelihood(requests)], np.float64)
    if reference is not None:
        scores = beta * (scores - np.array([ll for ll, _ in reference.loglikelihood(requests)],
                                           np.float64))
    chosen, rejected = scores[0::2], scores[1::2]
    return {"accuracy": float(np.mean(chosen > rejected)),
            "margin": float(np.mean(chosen - rejected)), "pairs": len(pairs),
            "uses_reference": reference is not None}
