"""What every evaluation needs from a model: the `LanguageModel` protocol, lm-eval style.

Read this first. Evaluations (perplexity, multiple choice, generation, preference) only call
the three methods below, so they run unchanged on the JAX model (`jax_model.JaxLanguageModel`:
live training parameters or a restored checkpoint) and on the numpy engine
(`engine_model.EngineLanguageModel`: exported models). The semantics follow
lm-evaluation-harness:

* `loglikelihood([(context_ids, continuation_ids), ...])` -> [(sum of log p(continuation |
  context), is_greedy)], where is_greedy means every continuation token is the argmax. A pair
  longer than the model's context is cut from the left: the model reads
  (context + continuation)[-(max_length + 1):][:-1], as lm-eval's HFLM does.
* `loglikelihood_rolling(documents, stride)`: the summed log-probability of every token of
  each document but its first (the bos), in sliding windows (see `rolling_windows`).
* `generate(prompts, max_tokens=, stop=, stop_token_ids=, temperature=, seed=)` -> texts that
  end before the first stop string or stop token. The prompt is cut from the left to leave
  room for max_tokens, as lm-eval's generate_until does.
"""
from __future__ import annotations

from typing import Protocol, Sequence

Request = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


class LanguageModel(Protocol):
    max_length: int  # positions the model reads at once (its max_seq_len)
    tokenizer: object  # geb_jax.data.tokenizer.Tokenizer

    def loglikelihood(self, requests: Sequence[Request]) -> list[tuple[float, bool]]:
        ...

    def loglikelihood_rolling(self, documents: Sequence[Sequence[int]],
                              stride: int | None = None) -> list[float]:
        ...

    def generate(self, prompts: Sequence[Sequence[int]], *, max_tokens: int,
                 stop: Sequence[str] = (), stop_token_ids: Sequence[int] | None = None,
                 temperature: float = 0.0, seed: int = 0) -> list[str]:
        ...


def rolling_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows (begin, target_start, end) over a sequence of n_tokens ids.

    The window reads ids[begin:end - 1] (at most max_length of them) and scores the targets
    ids[target_start:end], each predicted from everything before it in the window. Together
    the targets cover ids[1:] exactly once (ids[0], the bos, is only context). This is Hugging
    Face's perplexity-guide scheme with a window of max_length + 1 ids: the first window is
    as long as the model allows, each next one moves `stride` ids on, so every later target
    sees at least max_length - stride ids of context. stride == max_length gives disjoint
    windows (lm-eval's loglikelihood_rolling).
    """
    if max_length < 1 or not 1 <= stride <= max_length:
        raise ValueError(f"need 1 <= stride ({stride}) <= max_length ({max_length})")
    windows, begin, done = [], 0, 1
    while done < n_tokens:
        end = min(begin + max_length + 1, n_tokens)
        windows.append((begin, done, end))
        begin, done = begin + stride, end
    return windows


def loglikelihood_rolling(model: LanguageModel, documents: Sequence[Sequence[int]],
                          stride: int | None = None) -> list[float]:
    """Summed log p of ids[1:] for each document, through `model.loglikelihood` on windows."""
    stride = model.max_length if stride is None else int(stride)
    requests, owners = [], []
    for d, ids in enumerate(documents):
        ids = [int(t) for t in ids]
        for begin, start, end in rolling_windows(len(ids), model.max_length, stride):
            requests.append((ids[begin:start], ids[start:end]))
            owners.append(d)
    totals = [0.0] * len(documents)
    for d, (logp, _) in zip(owners, model.loglikelihood(requests)):
        totals[d] += logp
    return totals


class RollingLoglikelihood:
    """Mixin: `loglikelihood_rolling` through the model's own `loglikelihood` (above), for
    backends that have no faster way to score whole documents."""

    def loglikelihood_rolling(self, documents: Sequence[Sequence[int]],
                              stride: int | None = None) -> list[float]:
        return loglikelihood_rolling(self, documents, stride)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(bos + context ids, continuation ids) the way lm-eval's `_encode_pair` splits them.

    Trailing spaces of the context move to the continuation; the continuation ids are those of
    encode(context + continuation) after encode(context), so they are tokenized in context.
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    return [tokenizer.bos_id] + context_ids, whole[len(context_ids):]


def truncate_request(context: Sequence[int], continuation: Sequence[int], max_length: int,
                     index: int) -> tuple[list[int], list[int]]:
    """Cut a (context, continuation) pair from the left to max_length + 1 ids (lm-eval)."""
    context, continuation = [int(t) for t in context], [int(t) for t in continuation]
    if not context:
        raise ValueError(f"loglikelihood request {index} has an empty context; start it with "
                         f"the bos id")
    if len(continuation) > max_length:
        raise ValueError(f"loglikelihood request {index}: the continuation has "
                         f"{len(continuation)} tokens but the model reads at most {max_length}; "
                         f"score it with loglikelihood_rolling")
    whole = (context + continuation)[-(max_length + 1):]
    return whole[:len(whole) - len(continuation)], continuation


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[:min(hits)] if hits else text


def check_generation_room(max_tokens: int, max_length: int) -> int:
    """Prompt room left after max_tokens new tokens (lm-eval cuts prompts to fit)."""
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if max_tokens >= max_length:
        raise ValueError(f"max_tokens={max_tokens} leaves no room for the prompt in the model's "
                         f"{max_length} positions; lower max_tokens")
    return max_length - max_tokens
