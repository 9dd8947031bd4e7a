"""`LanguageModel` on the numpy inference engine, for exported models (geb_jax.infer).

Scoring is `Engine.score` (left-padded batches, float64 log-softmax); generation is
`geb_jax.infer.generate` one prompt at a time with the KV cache. Request i is sampled with
seed + i, so greedy results equal the JAX backend's and sampled ones are reproducible (but
drawn from a different random stream than the JAX backend's).
"""
from __future__ import annotations

from typing import Sequence

from geb_jax.eval.scorer import (Request, RollingLoglikelihood, check_generation_room,
                                 truncate_request)
from geb_jax.infer import Engine, generate


class EngineLanguageModel(RollingLoglikelihood):
    def __init__(self, engine: Engine, tokenizer, batch_size: int = 8):
        self.engine, self.tokenizer, self.batch_size = engine, tokenizer, int(batch_size)
        self.max_length = engine.max_len

    def loglikelihood(self, requests: Sequence[Request]) -> list[tuple[float, bool]]:
        pairs = [truncate_request(c, x, self.max_length, i)
                 for i, (c, x) in enumerate(requests)]
        return self.engine.score([c for c, _ in pairs], [x for _, x in pairs],
                                 batch_size=self.batch_size)

    def generate(self, prompts: Sequence[Sequence[int]], *, max_tokens: int,
                 stop: Sequence[str] = (), stop_token_ids: Sequence[int] | None = None,
                 temperature: float = 0.0, seed: int = 0) -> list[str]:
        room = check_generation_room(max_tokens, self.max_length)
        texts = []
        for i, prompt in enumerate(prompts):
            ids = [int(t) for t in prompt][-room:]
            generation = generate(
                self.engine, self.tokenizer, ids, max_new_tokens=max_tokens,
                temperature=float(temperature), seed=int(seed) + i, stop=tuple(stop),
                stop_token_ids=None if stop_token_ids is None else tuple(stop_token_ids))
            texts.append("".join(generation))
        return texts
