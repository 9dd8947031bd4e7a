"""Greedy-loop decoding of a geb_jax *fused* ONNX file through onnxruntime IOBinding, with one
preallocated KV cache per layer that is the graph's past and its present at once.

Why: `session.run` takes the past as numpy arrays and returns every present as a new array, so
each decode step copies the whole cache twice (and allocates it once) in Python's hands; on
GEB-1.3B int4 that per-step feeding cost more than the graph's kernels left on the table
(docs/benchmarks.md, 2026-12-03: 26.4 ms of kernels, 31.3 ms per token). GroupQueryAttention
writes the new tokens into its past buffer in place when present.{i}.* is bound to the very
same memory as past_key_values.{i}.* (onnxruntime's past_present_share_buffer mode, the way
onnxruntime-genai's kv_cache.cpp binds its caches): the buffer is (B, K, max_len, H), the
graph reads each row's length from the attention mask (seqlens_k = sum(mask) - 1,
total_sequence_length = its width), and present takes the past's shape. No graph change is
needed: the fused graph's KV dims are symbolic.

Per decode step only the token ids, the position ids and the mask (a copy of B x (P + 1)
int64) change; logits land in a bound (B, 1, V) buffer. A prompt whose rows all end at its
last column computes the head on that column only (the graph's logits_to_keep input = 1).
Rows follow the fused graph's convention (geb_jax/export/onnx_fused.py): a batch is padded on
the RIGHT.

The plain graph cannot share its cache (its present is a Concat of past and new keys); drive it
with geb_jax.export.onnx_export.ort_feed and session.run.
"""
from __future__ import annotations

import numpy as np

from geb_jax.infer.config import InferConfig
from geb_jax.infer.engine import ContextLengthError
from geb_jax.infer.onnx_file import LOGITS_TO_KEEP, META_GRAPH


class OnnxDecoderError(ValueError):
    """A request the bound decoder cannot serve; the message says what to do instead."""


def right_padding_error(mask: np.ndarray, past: int) -> str | None:
    """Why `mask` (B, past + T) cannot drive the fused graph, or None: each row's new columns
    must be ones then zeros (padded on the right), and each row must hold a token."""
    new = np.asarray(mask)[:, past:] != 0
    if (new[:, 1:] > new[:, :-1]).any() or not np.asarray(mask).sum(axis=1).all():
        return ("the fused ONNX graph (GroupQueryAttention) needs each row's new tokens padded "
                "on the right (mask ones, then zeros) and at least one token per row; this "
                "attention_mask pads on the left.")
    return None


class OnnxDecoder:
    """prefill / append / decode on an onnxruntime session of a fused geb_jax file.

    max_len: cache length (default config.max_seq_len, the rotary tables' length), allocated
    once: n_layers x 2 x batch x K x max_len x H float32. `length` is the cache's used width
    (the mask's; right-padded rows hold fewer tokens)."""

    def __init__(self, session, config: InferConfig, max_len: int | None = None,
                 batch: int = 1):
        import onnxruntime as ort  # pylint: disable=import-outside-toplevel

        graph = session.get_modelmeta().custom_metadata_map.get(META_GRAPH, "plain")
        if graph != "fused":
            raise OnnxDecoderError(
                f"the bound decoder needs a fused ONNX graph (this session runs the {graph} "
                f"graph, whose present cache is a new tensor each step); export with "
                f"graph='fused', or run the plain graph with ort_feed and session.run.")
        max_len = config.max_seq_len if max_len is None else int(max_len)
        if not 1 <= max_len <= config.max_seq_len or batch < 1:
            raise OnnxDecoderError(f"max_len={max_len} must be in 1..{config.max_seq_len} (the "
                                   f"model's max_seq_len) and batch={batch} >= 1")
        self.session, self.config, self.max_len, self.batch = session, config, max_len, batch
        self._binding = session.io_binding()
        shape = (batch, config.n_kv_heads, max_len, config.head_dim)
        self._cache = []  # numpy arrays and their OrtValues, kept alive with the binding
        for i in range(config.n_layers):
            for which in ("key", "value"):
                array = np.zeros(shape, np.float32)
                value = ort.OrtValue.ortvalue_from_numpy(array)
                self._binding.bind_ortvalue_input(f"past_key_values.{i}.{which}", value)
                self._binding.bind_ortvalue_output(f"present.{i}.{which}", value)
                self._cache.append((array, value))
        self._mask = np.zeros((batch, max_len), np.int64)  # the cache's columns in use
        self._mask_fed = np.zeros(batch * max_len, np.int64)  # contiguous (B, width) copy
        self._rows = np.zeros(batch, np.int64)  # tokens held per row
        self._ids = np.zeros((batch, 1), np.int64)
        self._positions = np.zeros((batch, 1), np.int64)
        self._logits = np.zeros((batch, 1, config.vocab_size), np.float32)
        # logits_to_keep: 0 = every position, 1 = the last; bound arrays must outlive runs
        self._keep = {n: np.array([n], np.int64) for n in (0, 1)}
        self._decode_bound = False
        self.length = 0

    def reset(self) -> None:
        """Empty the cache (its bytes need no clearing: the graph reads only used slots)."""
        self._mask[:] = 0
        self._rows[:] = 0
        self.length = 0

    def prefill(self, ids, attention_mask=None, all_logits: bool = False) -> np.ndarray:
        """A new prompt (B, T), padded on the right by attention_mask (B, T) if given. Returns
        each row's logits at its last token (B, V), or every position's (B, T, V)."""
        ids = np.asarray(ids, np.int64)
        mask = np.ones(ids.shape, np.int64) if attention_mask is None else np.asarray(
            attention_mask, np.int64)
        if mask.shape != ids.shape:
            raise OnnxDecoderError(f"attention_mask {mask.shape} must match ids {ids.shape}")
        problem = right_padding_error(mask, 0)
        if problem:
            raise OnnxDecoderError(problem + " Pad on the right.")
        self.reset()
        last_only = not all_logits and bool(mask[:, -1].all())
        logits = self._step(ids, mask, keep=1 if last_only else 0)
        if all_logits:
            return logits
        if last_only:
            return logits[:, -1]
        return logits[np.arange(len(ids)), mask.sum(axis=1) - 1]

    def append(self, ids) -> np.ndarray:
        """T new tokens for every row (B, T) after the cache; their logits (B, T, V)."""
        ids = np.asarray(ids, np.int64)
        return self._step(ids, np.ones(ids.shape, np.int64))

    def decode(self, tokens, copy: bool = True) -> np.ndarray:
        """One new token per row (B,); its logits (B, V). copy=False returns a view of the
        bound buffer, which the next step overwrites."""
        self._check_fits(1)
        self._ids[:, 0] = tokens
        self._positions[:, 0] = self._rows
        if not self._decode_bound:
            self._bind("input_ids", self._ids)
            self._bind("position_ids", self._positions)
            self._bind("logits", self._logits, output=True)
            self._decode_bound = True
        self._mask[:, self.length] = 1
        self._run(1)
        self._rows += 1
        logits = self._logits[:, 0]
        return logits.copy() if copy else logits

    def _check_fits(self, new: int) -> None:
        if self.length + new > self.max_len:
            raise ContextLengthError(
                f"{self.length} cached + {new} new tokens exceed the decoder's cache of "
                f"max_len={self.max_len} (model max_seq_len={self.config.max_seq_len}); "
                f"start over with prefill, or make the decoder with a larger max_len.")

    def _step(self, ids: np.ndarray, mask: np.ndarray, keep: int = 0) -> np.ndarray:
        """Any number of new tokens with their mask columns; the logits of all of them
        (B, T, V), or of the last `keep` (B, keep, V)."""
        if ids.ndim != 2 or ids.shape[0] != self.batch or ids.shape[1] < 1:
            raise OnnxDecoderError(f"ids {ids.shape} must be (batch={self.batch}, T >= 1)")
        b, t = ids.shape
        self._check_fits(t)
        self._mask[:, self.length:self.length + t] = mask
        ids = np.ascontiguousarray(ids)
        positions = self._rows[:, None] + np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        logits = np.empty((b, keep or t, self.config.vocab_size), np.float32)
        self._bind(LOGITS_TO_KEEP, self._keep[keep])  # decode keeps it: 1 position either way
        self._bind("input_ids", ids)  # bound by address: these arrays live until run returns
        self._bind("position_ids", positions)
        self._bind("logits", logits, output=True)
        self._decode_bound = False
        self._run(t)
        self._rows += mask.sum(axis=1)
        return logits

    def _bind(self, name: str, array: np.ndarray, output: bool = False) -> None:
        """Bind a C-contiguous array by its address: onnxruntime reads (or writes) that very
        memory on every run until it is bound again, so in-place updates need no rebinding."""
        assert array.flags.c_contiguous
        bind = self._binding.bind_output if output else self._binding.bind_input
        bind(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)

    def _run(self, new: int) -> None:
        """Feed mask[:, :length + new] (one small contiguous copy) and run."""
        width = self.length + new
        fed = self._mask_fed[:self.batch * width].reshape(self.batch, width)
        fed[...] = self._mask[:, :width]
        self._bind("attention_mask", fed)
        self.session.run_with_iobinding(self._binding)
        self.length = width
