"""Numpy-only forward pass with a preallocated KV cache: prefill, decode, continuation scoring.

The same Llama block as geb_jax/model (RMSNorm with float32 statistics, rotate-half RoPE with
float32 angles, grouped-query attention, SwiGLU, pre- or post-norm, tied or separate head),
written for CPU serving:

* Matmuls read the fused, pre-transposed (in, out) matrices of `Weights` (qkv, gate_up);
  quantized matrices are used the same way (geb_jax.infer.quantize).
* KV cache: one (L, 2, B, K, max_len, H) float32 array (k_cache / v_cache are its halves),
  allocated once per batch size, so a step writes a layer's new keys and values in one copy.
  Attention is GQA-aware without repeating KV heads: q is viewed as (B, K, N/K * T, H) so each
  KV head is multiplied with its group of query heads in one batched matmul.
* Decode (and prefill) run through per-row-count workspaces: every intermediate is a
  preallocated buffer written with ``out=``, and the views the layers read (q, k, v heads,
  RoPE halves) are made once per workspace, so a decode step allocates only a few tiny arrays.
  At one token per row the attention reads q straight from the qkv buffer and writes its
  context straight into the o projection's input (no transposing copies).
* RoPE: cos/sin tables are precomputed for the cache length as (cos, cos) / (-sin, sin) pairs,
  so rotating q and k is three in-place ops per layer on a view with the halves swapped; the
  query heads' factors also carry attention's 1/sqrt(H).
* Batches of different lengths are left-padded: row b's tokens sit at cache slots
  [pad_b, length) with RoPE positions counted from its first real token, and keys in its pad
  slots are masked, so each row computes exactly what it would alone (tests check 1e-4). All
  rows then decode in lockstep. Pad slots hold token 0 and produce meaningless logits.

Shapes: B batch, T new tokens, S keys, D model, N query heads, K KV heads, G = N / K, H head
dim, F FFN width, V vocab, L layers.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np

from geb_jax.infer.weights import Weights, matmul

SCORES_BUDGET_BYTES = 64 * 1024 * 1024  # prefill chunk is cut so attention scores fit this


class ContextLengthError(ValueError):
    """A prompt (plus the tokens to generate) does not fit the model's max_seq_len."""


def _context_error(needed: int, limit: int, model_limit: int, what: str) -> ContextLengthError:
    extra = "" if limit == model_limit else f" (engine cache max_len={limit})"
    return ContextLengthError(
        f"{what} needs {needed} positions but the model's max_seq_len is {model_limit}"
        f"{extra}; shorten the prompt or lower the number of new tokens (max_new_tokens).")


def rope_tables(max_len: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (max_len, H/2) float32, computed in float32 as the JAX model does."""
    half = head_dim // 2
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** (
        np.arange(half, dtype=np.float32) * np.float32(2.0) / np.float32(head_dim))))
    angles = np.arange(max_len, dtype=np.float32)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope_pairs(max_len: int, head_dim: int, theta: float) -> np.ndarray:
    """(max_len, 2, 2, H/2) float32: [(cos, cos), (-sin, sin)] per position. With a head's
    halves (x1, x2) and the same head with its halves swapped (x2, x1), the rotation is
    (x1, x2) * (cos, cos) + (x2, x1) * (-sin, sin) = (x1 cos - x2 sin, x2 cos + x1 sin)."""
    cos, sin = rope_tables(max_len, head_dim, theta)
    return np.stack([np.stack([cos, cos], 1), np.stack([-sin, sin], 1)], 1)


def _view(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """a reshaped without copying (raises if the memory layout does not allow it): the
    workspace's views must alias its buffers."""
    return np.reshape(a, shape, copy=False)


@functools.lru_cache(maxsize=None)
def _norm_constants(d: int, eps: float) -> tuple[np.float32, np.float32]:
    return np.float32(1.0 / d), np.float32(eps)


def _rms_norm(x: np.ndarray, scale: np.ndarray, eps: float, out: np.ndarray,
              ms: np.ndarray | None = None) -> np.ndarray:
    """out = x / sqrt(mean(x^2) + eps) * scale over the last axis (x: (R, D)); ms: an (R,)
    float32 scratch vector."""
    if ms is None:
        ms = np.empty(x.shape[0], np.float32)
    inv_d, eps32 = _norm_constants(x.shape[-1], eps)
    np.vecdot(x, x, out=ms)
    if x.shape[0] == 1:  # one row (decode): the same float32 arithmetic on a scalar
        np.divide(x, np.float32(math.sqrt(ms[0] * inv_d + eps32)), out=out)
    else:
        ms *= inv_d
        ms += eps32
        np.sqrt(ms, out=ms)
        np.divide(x, ms[:, None], out=out)
    np.multiply(out, scale, out=out)
    return out


class _Workspace:
    """Every per-layer intermediate for R = B * T rows (T new tokens per row), and the fixed
    views of them that the layers read and write."""

    def __init__(self, cfg, batch: int, tokens: int, max_len: int):
        b, t, r = batch, tokens, batch * tokens
        d, n, k, h, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
        g, half = n // k, h // 2
        self.batch, self.tokens = b, t
        e = np.empty
        self.x = e((r, d), np.float32)  # residual stream
        self.h = e((r, d), np.float32)  # normed input of a sublayer
        self.proj = e((r, d), np.float32)  # sublayer output
        self.ms = e((r,), np.float32)  # rms-norm statistics
        self.qkv = e((r, (n + 2 * k) * h), np.float32)
        # RoPE on the q and k heads in place: (R, N+K, 2, H/2) and the same with halves swapped
        self.qk = _view(self.qkv[:, :(n + k) * h], (r, n + k, 2, half))
        self.qk_swapped = self.qk[:, :, ::-1]
        self.rope_rows = e((r, 2, 2, half), np.float32)  # this step's rows of rope_pairs
        self.rope_rows_t = self.rope_rows.transpose(1, 0, 2, 3)[:, :, None]  # (2, R, 1, 2, H/2)
        self.rope = e((2, r, n + k, 2, half), np.float32)  # per head: (cos, cos), (-sin, sin)
        self.rope_tmp = e((r, n + k, 2, half), np.float32)
        # new keys and values: (2, B, K, T, H), as the cache holds them
        self.new_kv = _view(self.qkv[:, n * h:], (b, t, 2, k, h)).transpose(2, 0, 3, 1, 4)
        self.attn = e((r, n * h), np.float32)  # attention output, input of the o projection
        if t == 1:  # q and the context read / write qkv and attn directly, rows ordered (g)
            self.q = _view(self.qkv[:, :n * h], (b, k, g, h))
            self.ctx = _view(self.attn, (b, k, g, h))
        else:  # (B, K, G*T, H) copies, rows ordered (g, t)
            self.q = e((b, k, g * t, h), np.float32)
            self.ctx = e((b, k, g * t, h), np.float32)
            self.q_from_qkv = (_view(self.q, (b, k, g, t, h)), _view(
                self.qkv[:, :n * h], (b, t, k, g, h)).transpose(0, 2, 3, 1, 4))
            self.attn_from_ctx = (_view(self.attn, (b, t, k, g, h)), _view(
                self.ctx, (b, k, g, t, h)).transpose(0, 3, 1, 2, 4))
        self.scores = e((b * n * t * max_len,), np.float32)  # flat; viewed as (B,K,G*T,S)
        self.row_max = e((b, k, g * t, 1), np.float32)
        self.gate_up = e((r, 2 * f), np.float32)
        self.gate, self.up = self.gate_up[:, :f], self.gate_up[:, f:]
        self.act = e((r, f), np.float32)


class _Step:
    """What every layer of one forward step shares: the slots it writes, its attention
    scores buffer, the cache's keys / values up to its last slot, and the mask."""

    def __init__(self, engine: "Engine", ws: _Workspace):
        c = engine.config
        b, t = ws.batch, ws.tokens
        k, g = c.n_kv_heads, c.n_heads // c.n_kv_heads
        self.s0, self.s1 = s0, s1 = engine.length, engine.length + t
        self.kv_new = engine.kv_cache[:, :, :, :, s0:s1]  # (L, 2, B, K, T, H)
        self.keys_t = engine.k_cache[:, :, :, :s1].swapaxes(-1, -2)  # (L, B, K, H, S)
        self.values = engine.v_cache[:, :, :, :s1]  # (L, B, K, S, H)
        self.scores = ws.scores[:b * k * g * t * s1].reshape(b, k, g * t, s1)
        self.mask = engine._mask(s0, s1)  # pylint: disable=protected-access
        self.scores5 = self.scores.reshape(b, k, g, t, s1)


class Engine:
    """`Engine(weights).prefill(tokens)` then `decode_step(next_tokens)`; `score` for evals.

    max_len: KV-cache length (default and maximum: the model's max_seq_len).
    prefill_chunk: prompts are processed this many tokens at a time (bounds attention memory).
    threads: if given, numpy's BLAS is limited to that many threads (process-wide).
    """

    def __init__(self, weights: Weights, max_len: int | None = None, prefill_chunk: int = 256,
                 threads: int | None = None):
        if not isinstance(weights, Weights):
            raise TypeError(f"Engine expects Weights, got {type(weights).__name__}")
        cfg = weights.config
        self.weights, self.config = weights, cfg
        self.max_len = cfg.max_seq_len if max_len is None else int(max_len)
        if not 1 <= self.max_len <= cfg.max_seq_len:
            raise ValueError(f"max_len must be in [1, max_seq_len={cfg.max_seq_len}], got "
                             f"{max_len}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be positive, got {prefill_chunk}")
        self.prefill_chunk = int(prefill_chunk)
        if threads is not None:
            from geb_jax.infer._blas import set_blas_threads  # pylint: disable=import-outside-toplevel
            set_blas_threads(threads)
        self.cos, self.sin = rope_tables(self.max_len, cfg.head_dim, cfg.rope_theta)
        self._rope = rope_pairs(self.max_len, cfg.head_dim, cfg.rope_theta)
        # RoPE factors per head (q heads, then k heads): q's carry attention's 1/sqrt(H)
        head_scale = np.ones(cfg.n_heads + cfg.n_kv_heads, np.float32)
        head_scale[:cfg.n_heads] = np.float32(1.0 / math.sqrt(cfg.head_dim))
        self._rope_head_scale = head_scale[None, None, :, None, None]
        self._workspaces: dict[tuple[int, int], _Workspace] = {}
        self.batch = 0
        self.kv_cache = self.k_cache = self.v_cache = None
        self.pad = np.zeros(0, np.int64)  # left padding per row
        self.length = 0  # cache slots filled (same for every row, pads included)
        self.history: list[list[int]] = []  # real tokens whose K/V are cached, per row
        self._logits: np.ndarray | None = None

    # -- state --------------------------------------------------------------------------------
    @property
    def pad(self) -> np.ndarray:
        """Left padding per row (int64 (B,))."""
        return self._pad

    @pad.setter
    def pad(self, value) -> None:
        self._pad = np.asarray(value, np.int64)
        self._any_pad = bool(self._pad.any())

    def reset(self, batch: int) -> None:
        """Empty the cache for `batch` rows (buffers are reused when the batch size repeats)."""
        c = self.config
        if batch < 1:
            raise ValueError(f"batch must be positive, got {batch}")
        if self.batch != batch or self.k_cache is None:
            shape = (c.n_layers, 2, batch, c.n_kv_heads, self.max_len, c.head_dim)
            self.kv_cache = np.zeros(shape, np.float32)
            self.k_cache, self.v_cache = self.kv_cache[:, 0], self.kv_cache[:, 1]
            self._workspaces.clear()
            self._logits = np.empty((batch, c.vocab_size), np.float32)
            self.batch = batch
        self.pad = np.zeros(batch, np.int64)
        self.length = 0
        self.history = [[] for _ in range(batch)]

    def truncate(self, length: int) -> None:
        """Forget every cached position from `length` on (to reuse a shared prompt prefix)."""
        if not int(self.pad.max(initial=0)) <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} (padding "
                             f"{int(self.pad.max(initial=0))}) to {length}")
        for b in range(self.batch):
            del self.history[b][length - int(self.pad[b]):]
        self.length = length

    def _workspace(self, tokens: int) -> _Workspace:
        key = (self.batch, tokens)
        ws = self._workspaces.get(key)
        if ws is None:
            if len(self._workspaces) > 4:  # keep decode's and a few chunk sizes
                self._workspaces = {k: v for k, v in self._workspaces.items() if k[1] == 1}
            ws = self._workspaces[key] = _Workspace(self.config, self.batch, tokens,
                                                    self.max_len)
        return ws

    # -- public API ---------------------------------------------------------------------------
    def prefill(self, tokens, all_logits: bool = False) -> np.ndarray:
        """Start new sequences. `tokens`: (B, T) ints, or a list of B token lists of any lengths
        (left-padded). Returns the logits after each row's last token (B, V), or with
        all_logits=True the logits of every slot (B, T_max, V) (pad slots meaningless)."""
        batch_ids, pads = self._as_batch(tokens)
        width = batch_ids.shape[1]
        if width > self.max_len:
            raise _context_error(width, self.max_len, self.config.max_seq_len, "the prompt")
        self.reset(batch_ids.shape[0])
        self.pad = pads
        return self._append(batch_ids, all_logits)

    def append(self, tokens, all_logits: bool = False) -> np.ndarray:
        """Feed more tokens (B, T) to the current sequences (e.g. a next chat turn)."""
        if self.k_cache is None or self.batch == 0:
            raise RuntimeError("append() needs a prefill() first")
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] != self.batch or ids.shape[1] == 0:
            raise ValueError(f"append expects a non-empty ({self.batch}, T) array of token ids, "
                             f"got shape {ids.shape}")
        return self._append(ids, all_logits)

    def decode_step(self, tokens, copy: bool = True) -> np.ndarray:
        """Feed one token per row (B,) -> logits (B, V) for the next one. With copy=False the
        result is an internal buffer, overwritten by the next call."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if self.k_cache is None or ids.shape[0] != self.batch:
            raise ValueError(f"decode_step expects {self.batch} token(s) (one per row of the "
                             f"prefilled batch), got {ids.shape[0]}")
        self._check_room(1)
        ws = self._workspace(1)
        table = self.weights.embedding
        values = ids.tolist()
        if isinstance(table, np.ndarray) and min(values) >= 0 and max(values) < table.shape[0]:
            np.take(table, ids, axis=0, out=ws.x)
        else:
            np.copyto(ws.x, self.weights.embed(ids))  # quantized table, or an error message
        self._forward(ws)
        for row, token in zip(self.history, values):
            row.append(token)
        logits = self._head(ws.x, self._logits, scratch=ws.h)
        return logits.copy() if copy else logits

    def prefill_reusing_cache(self, ids: Sequence[int]) -> np.ndarray:
        """Single-sequence prefill that keeps the cached K/V of the longest common prefix with
        the previous sequence (multi-turn chat re-sends the history). Returns logits (1, V)."""
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) > self.max_len:
            raise _context_error(len(ids), self.max_len, self.config.max_seq_len, "the prompt")
        if self.batch == 1 and self.k_cache is not None and self.pad[0] == 0:
            cached = self.history[0]
            common = 0
            limit = min(len(cached), len(ids) - 1)  # recompute at least the last token
            while common < limit and cached[common] == ids[common]:
                common += 1
            if common:
                self.truncate(common)
                return self._append(np.asarray([ids[common:]], dtype=np.int64), False)
        return self.prefill([ids])

    def score(self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
              batch_size: int = 8) -> list[tuple[float, bool]]:
        """lm-eval loglikelihood: for each (prompt, continuation) the summed log-probability
        of the continuation tokens given the prompt, and whether each of them is the argmax
        (greedy). Pairs run in batches (longest first, left-padded); the cache is reset."""
        if len(prompts) != len(continuations):
            raise ValueError(f"score got {len(prompts)} prompts but {len(continuations)} "
                             f"continuations")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        results: list[tuple[float, bool] | None] = [None] * len(prompts)
        todo = []
        for i, (p, c) in enumerate(zip(prompts, continuations)):
            p, c = [int(t) for t in p], [int(t) for t in c]
            if not p:
                raise ValueError(f"score: prompt {i} is empty; start it with a token (e.g. bos)")
            if not c:
                results[i] = (0.0, True)
                continue
            if len(p) + len(c) - 1 > self.max_len:
                raise _context_error(len(p) + len(c) - 1, self.max_len,
                                     self.config.max_seq_len, f"score: pair {i}")
            todo.append((i, p, c))
        todo.sort(key=lambda item: -(len(item[1]) + len(item[2])))
        head = self.weights.lm_head
        for start in range(0, len(todo), batch_size):
            group = todo[start:start + batch_size]
            inputs = [(p + c)[:-1] for _, p, c in group]
            hidden = self._prefill_hidden(inputs)  # (B, T_max, D), final-normed
            width = hidden.shape[1]
            rows, targets, owners = [], [], []
            for b, (i, p, c) in enumerate(group):
                first = width - len(inputs[b]) + len(p) - 1  # slot predicting c[0]
                rows.append(hidden[b, first:first + len(c)])
                targets.extend(c)
                owners.extend([i] * len(c))
            logits = matmul(np.concatenate(rows), head).astype(np.float64)
            top = logits.max(axis=-1, keepdims=True)
            logprobs = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
            picked = logprobs[np.arange(len(targets)), targets]
            greedy = logits.argmax(axis=-1) == np.asarray(targets)
            owners_arr = np.asarray(owners)
            for i, _, _ in group:
                sel = owners_arr == i
                results[i] = (float(picked[sel].sum()), bool(greedy[sel].all()))
        return results  # type: ignore[return-value]

    # -- internals ----------------------------------------------------------------------------
    def _as_batch(self, tokens) -> tuple[np.ndarray, np.ndarray]:
        """(B, T) int64 left-padded with 0, and the pad count per row."""
        if isinstance(tokens, np.ndarray):
            ids = tokens.astype(np.int64)
            if ids.ndim == 1:
                ids = ids[None]
            if ids.ndim != 2 or ids.shape[1] == 0:
                raise ValueError(f"tokens must be (B, T) with T > 0, got shape {tokens.shape}")
            return ids, np.zeros(ids.shape[0], np.int64)
        rows = [[int(t) for t in row] for row in tokens]
        if not rows or any(len(r) == 0 for r in rows):
            raise ValueError("every sequence needs at least one token")
        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), np.int64)
        pads = np.zeros(len(rows), np.int64)
        for b, r in enumerate(rows):
            pads[b] = width - len(r)
            ids[b, pads[b]:] = r
        return ids, pads

    def _check_room(self, new: int) -> None:
        if self.length + new > self.max_len:
            longest = int(self.length - self.pad.min(initial=0))
            raise _context_error(longest + new, self.max_len, self.config.max_seq_len,
                                 "the sequence (prompt + generated tokens)")

    def _chunk(self, total: int) -> int:
        c = self.config
        per_token = self.batch * c.n_heads * self.max_len * 4
        return max(1, min(self.prefill_chunk, SCORES_BUDGET_BYTES // per_token, total))

    def _append(self, ids: np.ndarray, all_logits: bool) -> np.ndarray:
        """Run (B, T) new tokens through the model chunk by chunk; logits of last/all slots."""
        b, t = ids.shape
        self._check_room(t)
        chunk = self._chunk(t)
        out = np.empty((b, t, self.config.vocab_size), np.float32) if all_logits else None
        for s in range(0, t, chunk):
            part = ids[:, s:s + chunk]
            ws = self._workspace(part.shape[1])
            np.copyto(ws.x, self.weights.embed(part).reshape(ws.x.shape))
            self._forward(ws)
            if all_logits:
                self._head(ws.x, out[:, s:s + part.shape[1]].reshape(-1, out.shape[2]))
        for r in range(b):
            self.history[r].extend(int(v) for v in ids[r, max(0, int(self.pad[r]) - (
                self.length - t)):])
        if all_logits:
            return out
        last = np.ascontiguousarray(ws.x.reshape(b, part.shape[1], -1)[:, -1])
        return self._head(last, np.empty((b, self.config.vocab_size), np.float32))

    def _prefill_hidden(self, sequences: list[list[int]]) -> np.ndarray:
        """Reset, run the left-padded batch, return final-normed hidden states (B, T, D)."""
        ids, pads = self._as_batch(sequences)
        self.reset(ids.shape[0])
        self.pad = pads
        b, t = ids.shape
        self._check_room(t)
        hidden = np.empty((b, t, self.config.d_model), np.float32)
        chunk = self._chunk(t)
        w = self.weights
        for s in range(0, t, chunk):
            part = ids[:, s:s + chunk]
            ws = self._workspace(part.shape[1])
            np.copyto(ws.x, w.embed(part).reshape(ws.x.shape))
            self._forward(ws)
            _rms_norm(ws.x, w.final_norm, self.config.norm_eps, ws.h)
            hidden[:, s:s + part.shape[1]] = ws.h.reshape(b, part.shape[1], -1)
        self.history = [[] for _ in range(b)]  # scoring state is not meant to be continued
        return hidden

    def _head(self, x: np.ndarray, out: np.ndarray, scratch: np.ndarray | None = None
              ) -> np.ndarray:
        """Final norm then lm head: x (R, D) residual -> out (R, V)."""
        normed = np.empty_like(x) if scratch is None else scratch
        _rms_norm(x, self.weights.final_norm, self.config.norm_eps, normed)
        return matmul(normed, self.weights.lm_head, out=out)

    def _mask(self, s0: int, s1: int) -> np.ndarray | None:
        """Additive mask (B, 1, 1, T, S) for queries at slots [s0, s1): causal, and a row's pad
        slots hidden from its real tokens; None when nothing is masked (one token, no pads)."""
        if s1 - s0 == 1 and not self._any_pad:
            return None
        slot_q = np.arange(s0, s1)[None, :, None]
        slot_k = np.arange(s1)[None, None, :]
        pad = self.pad[:, None, None]
        allowed = (slot_k <= slot_q) & ((slot_k >= pad) | (slot_q < pad))
        return np.where(allowed, np.float32(0.0), np.float32(-np.inf))[:, None, None]

    def _rope_factors(self, ws: _Workspace, s0: int) -> None:
        """ws.rope <- the cos / sin factors of every row's q and k heads at this step.
        Position = slot - pad (pad slots get position 0)."""
        t = ws.tokens
        if t == 1:  # decoding: every row's slot is past its pads
            positions = np.subtract(s0, self.pad)
        else:
            positions = np.maximum(np.arange(s0, s0 + t)[None, :] - self.pad[:, None], 0)
        np.take(self._rope, positions.reshape(-1), axis=0, out=ws.rope_rows)
        np.multiply(ws.rope_rows_t, self._rope_head_scale, out=ws.rope)

    def _forward(self, ws: _Workspace) -> None:
        """ws.x (B*T, D) embeddings of tokens at slots [length, length + T) -> residual after
        the last layer, in place; K/V written to the cache; length advanced."""
        c = self.config
        step = _Step(self, ws)
        self._rope_factors(ws, step.s0)
        eps, pre = c.norm_eps, c.norm_position == "pre"
        with np.errstate(over="ignore"):
            for i, layer in enumerate(self.weights.layers):
                attn_in = _rms_norm(ws.x, layer.attn_norm, eps, ws.h, ws.ms) if pre else ws.x
                self._attention(ws, step, i, layer, attn_in)  # -> ws.proj
                if pre:
                    np.add(ws.x, ws.proj, out=ws.x)
                    mlp_in = _rms_norm(ws.x, layer.mlp_norm, eps, ws.h, ws.ms)
                else:
                    np.add(ws.x, ws.proj, out=ws.proj)
                    mlp_in = _rms_norm(ws.proj, layer.attn_norm, eps, ws.x, ws.ms)
                self._mlp(ws, layer, mlp_in)  # -> ws.proj
                if pre:
                    np.add(ws.x, ws.proj, out=ws.x)
                else:
                    np.add(ws.x, ws.proj, out=ws.proj)  # ws.x holds h (the mlp input)
                    _rms_norm(ws.proj, layer.mlp_norm, eps, ws.x, ws.ms)
        self.length = step.s1

    @staticmethod
    def _attention(ws: _Workspace, step: _Step, i: int, layer, x: np.ndarray) -> None:
        """ws.proj <- o(attention(x)) for layer i; its new keys and values go to the cache."""
        matmul(x, layer.qkv, out=ws.qkv)
        np.multiply(ws.qk_swapped, ws.rope[1], out=ws.rope_tmp)  # RoPE on q and k heads
        np.multiply(ws.qk, ws.rope[0], out=ws.qk)
        np.add(ws.qk, ws.rope_tmp, out=ws.qk)
        np.copyto(step.kv_new[i], ws.new_kv)
        if ws.tokens > 1:
            np.copyto(*ws.q_from_qkv)
        scores = step.scores
        np.matmul(ws.q, step.keys_t[i], out=scores)  # (B, K, G*T, S), q already scaled
        if step.mask is not None:
            np.add(step.scores5, step.mask, out=step.scores5)
        _softmax(scores, ws.row_max)
        np.matmul(scores, step.values[i], out=ws.ctx)  # (B, K, G*T, H)
        if ws.tokens > 1:
            np.copyto(*ws.attn_from_ctx)
        matmul(ws.attn, layer.o, out=ws.proj)

    @staticmethod
    def _mlp(ws: _Workspace, layer, x: np.ndarray) -> None:
        """ws.proj <- down(silu(gate(x)) * up(x)), silu(g) = g / (1 + exp(-g))."""
        matmul(x, layer.gate_up, out=ws.gate_up)
        np.negative(ws.gate, out=ws.act)
        np.exp(ws.act, out=ws.act)
        ws.act += np.float32(1.0)
        np.divide(ws.gate, ws.act, out=ws.act)
        np.multiply(ws.act, ws.up, out=ws.act)
        matmul(ws.act, layer.down, out=ws.proj)


def _softmax(scores: np.ndarray, row: np.ndarray) -> None:
    """Softmax over the last axis in place; row: a (..., 1) scratch."""
    np.maximum.reduce(scores, axis=-1, keepdims=True, out=row)
    np.subtract(scores, row, out=scores)
    np.exp(scores, out=scores)
    np.add.reduce(scores, axis=-1, keepdims=True, out=row)
    np.divide(scores, row, out=scores)
