"""Sampling and streaming text generation on top of the numpy Engine.

`generate(engine, tokenizer, prompt_ids, **options)` returns a `Generation`: an iterator of
text pieces, yielded as soon as they decode cleanly, whose concatenation is the generated text.

Options (`SamplingParams`; an unknown name raises SamplingOptionError naming it):
  max_new_tokens (>= 1), temperature (>= 0; 0 = greedy argmax), top_k (>= 0; 0 = off),
  top_p (in (0, 1]; 1 = off), repetition_penalty (> 0; 1 = off), seed (int or None),
  stop (strings), stop_token_ids (ids; default: the tokenizer's eos).
Order of the logit processors, as in Hugging Face generate: repetition penalty (CTRL: over the
distinct ids of prompt + generated tokens, a positive logit is divided by the penalty and a
negative one multiplied), temperature, top-k (exactly the k largest), top-p (the smallest set of
most probable tokens whose probability reaches top_p, always at least one), then one draw from
the renormalised distribution with a numpy Generator seeded by `seed`.

Streaming: the generated ids are detokenized incrementally (the vLLM scheme: decode a window
from a prefix offset and emit only the new suffix), holding text back while it ends in U+FFFD,
i.e. while a character spelled by several byte-fallback pieces (<0xE4><0xB8><0xAD>) is
incomplete. Stop strings are matched on the decoded text; the output ends right before the
first stop string; only text whose end could still begin a stop string is held back.
Generation ends at a stop token (not included in the text), a stop string, or max_new_tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from geb_jax.infer.engine import ContextLengthError, Engine


class SamplingOptionError(ValueError):
    """An unknown sampling option or a value out of its range."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None  # None: the tokenizer's eos id

    def __post_init__(self):
        def bad(name, why):
            raise SamplingOptionError(f"sampling option {name}={getattr(self, name)!r} {why}")

        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids))
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            bad("max_new_tokens", "must be an integer >= 1")
        if not _is_number(self.temperature) or not self.temperature >= 0:
            bad("temperature", "must be >= 0 (0 means greedy)")
        if not _is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (0 disables top-k)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1] (1 disables nucleus sampling)")
        if not _is_number(self.repetition_penalty) or not self.repetition_penalty > 0:
            bad("repetition_penalty", "must be > 0 (1 disables it)")
        if self.seed is not None and not _is_int(self.seed):
            bad("seed", "must be an integer or None")
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "must be non-empty strings")

    @classmethod
    def from_options(cls, **options) -> "SamplingParams":
        known = [f.name for f in dataclasses.fields(cls)]
        for name in options:
            if name not in known:
                raise SamplingOptionError(f"unknown sampling option {name!r}; known options: "
                                          f"{', '.join(known)}")
        return cls(**options)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


# ---- logit processing ----------------------------------------------------------------------

def apply_repetition_penalty(logits: np.ndarray, previous_ids: Sequence[int],
                             penalty: float) -> np.ndarray:
    """CTRL / Hugging Face: for each distinct previous id, logit / penalty if positive else
    logit * penalty. Returns a new float64 array."""
    out = np.array(logits, dtype=np.float64)
    if penalty != 1.0 and len(previous_ids):
        ids = np.unique(np.asarray(previous_ids, dtype=np.int64))
        seen = out[ids]
        out[ids] = np.where(seen > 0, seen / penalty, seen * penalty)
    return out


def next_token_distribution(logits: np.ndarray, previous_ids: Sequence[int],
                            params: SamplingParams) -> np.ndarray:
    """The exact distribution (V,) float64 the next token is drawn from (one-hot if greedy)."""
    scores = apply_repetition_penalty(logits, previous_ids, params.repetition_penalty)
    probs = np.zeros_like(scores)
    if params.temperature == 0:
        probs[int(np.argmax(scores))] = 1.0
        return probs
    scores /= params.temperature
    candidates = np.arange(scores.shape[0])
    if 0 < params.top_k < scores.shape[0]:
        candidates = np.argpartition(-scores, params.top_k - 1)[:params.top_k]
    cand = scores[candidates]
    p = np.exp(cand - cand.max())
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cumulative_before = np.cumsum(p[order]) - p[order]
        keep = order[cumulative_before < params.top_p]  # always keeps the most probable one
        candidates, p = candidates[keep], p[keep]
        p = p / p.sum()
    probs[candidates] = p
    return probs


class Sampler:
    """Draws next tokens for one sequence with its own seeded numpy Generator."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, previous_ids: Sequence[int]) -> int:
        p = self.params
        if p.temperature == 0:
            if p.repetition_penalty == 1.0:
                return int(np.argmax(logits))
            return int(np.argmax(apply_repetition_penalty(logits, previous_ids,
                                                          p.repetition_penalty)))
        probs = next_token_distribution(logits, previous_ids, p)
        cumulative = np.cumsum(probs)
        u = self.rng.random() * cumulative[-1]
        index = int(np.searchsorted(cumulative, u, side="right"))
        index = min(index, probs.shape[0] - 1)
        while probs[index] == 0:  # u landed on a flat step (float rounding): step back
            index -= 1
        return index


# ---- streaming text ------------------------------------------------------------------------

class IncrementalDetokenizer:
    """Turns a stream of ids into text pieces that each decode cleanly (no dangling bytes).

    Keeps two offsets into the ids: text is decoded from `prefix` to the end and compared with
    the decode of `prefix:read`; the difference is new text, emitted unless it ends in U+FFFD
    (an incomplete multi-byte character). `flush` emits whatever remains, replacement
    characters included, so the pieces always concatenate to tokenizer.decode(all ids).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        old = self.tokenizer.decode(self.ids[self.prefix:self.read])
        new = self.tokenizer.decode(self.ids[self.prefix:])
        if len(new) > len(old) and not new.endswith("\ufffd") and new.startswith(old):
            self.prefix, self.read = self.read, len(self.ids)
            return new[len(old):]
        return ""

    def flush(self) -> str:
        old = self.tokenizer.decode(self.ids[self.prefix:self.read])
        new = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return new[len(old):] if new.startswith(old) else new


class StopStringMatcher:
    """Holds back decoded text only while its end could still begin a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.emitted = 0

    def _held(self) -> int:
        """Length of the longest suffix of the unemitted text that is a proper prefix of a
        stop string (any later match must start inside it)."""
        tail, held = self.text[self.emitted:], 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(tail)), held, -1):
                if tail.endswith(stop[:k]):
                    held = k
                    break
        return held

    def push(self, piece: str) -> tuple[str, bool]:
        """Add decoded text -> (text safe to emit, whether a stop string was found)."""
        self.text += piece
        hits = [i for i in (self.text.find(s, self.emitted) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            out, self.emitted = self.text[self.emitted:end], end
            return out, True
        safe = len(self.text) - self._held()
        if safe > self.emitted:
            out, self.emitted = self.text[self.emitted:safe], safe
            return out, False
        return "", False

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out


class Generation:
    """Iterator of text pieces. After it is exhausted: `text` (everything yielded),
    `token_ids` (generated ids, stop token excluded) and `finish_reason` ("eos" for a stop
    token, "stop" for a stop string, "length" for max_new_tokens)."""

    def __init__(self, engine: Engine, tokenizer, prompt_ids: Sequence[int],
                 params: SamplingParams):
        self.engine, self.tokenizer, self.params = engine, tokenizer, params
        self.prompt_ids = [int(i) for i in prompt_ids]
        if not self.prompt_ids:
            raise ValueError("generate needs a non-empty prompt (e.g. just the bos id)")
        needed = len(self.prompt_ids) + params.max_new_tokens
        if needed > engine.max_len:
            limit = engine.config.max_seq_len
            where = "" if engine.max_len == limit else f" (engine max_len {engine.max_len})"
            raise ContextLengthError(
                f"prompt ({len(self.prompt_ids)} tokens) + max_new_tokens "
                f"({params.max_new_tokens}) = {needed} exceeds the model's max_seq_len "
                f"{limit}{where}; shorten the prompt or lower max_new_tokens.")
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self._pieces = self._run()

    def __iter__(self) -> "Generation":
        return self

    def __next__(self) -> str:
        piece = next(self._pieces)
        self.text += piece
        return piece

    def _run(self) -> Iterator[str]:
        p, engine = self.params, self.engine
        stop_ids = set(p.stop_token_ids if p.stop_token_ids is not None
                       else (self.tokenizer.eos_id,))
        sampler = Sampler(p)
        detok = IncrementalDetokenizer(self.tokenizer)
        matcher = StopStringMatcher(p.stop)
        history = list(self.prompt_ids)
        logits = engine.prefill_reusing_cache(self.prompt_ids)[0]
        reason = "length"
        for step in range(p.max_new_tokens):
            token = sampler(logits, history)
            if token in stop_ids:
                reason = "eos"
                break
            self.token_ids.append(token)
            history.append(token)
            piece = detok.add(token)
            if piece:
                out, hit = matcher.push(piece)
                if out:
                    yield out
                if hit:
                    self.finish_reason = "stop"
                    return
            if step + 1 < p.max_new_tokens:
                logits = engine.decode_step([token], copy=False)[0]
        out, hit = matcher.push(detok.flush())
        if out:
            yield out
        if hit:
            self.finish_reason = "stop"
            return
        rest = matcher.flush()
        if rest:
            yield rest
        self.finish_reason = reason


def generate(engine: Engine, tokenizer, prompt_ids: Sequence[int],
             params: SamplingParams | None = None, **options) -> Generation:
    """Stream a continuation of `prompt_ids`; options as in SamplingParams (see module doc)."""
    if params is not None and options:
        raise SamplingOptionError("pass either params= or keyword options, not both")
    params = params or SamplingParams.from_options(**options)
    return Generation(engine, tokenizer, prompt_ids, params)
