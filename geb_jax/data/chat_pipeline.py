"""Chat pipelines: packed SFT batches (loss on assistant tokens only) and unpacked DPO pairs.
See pipeline.py for the shared steps and the batch layout.

* SFT uses grain's `FirstFitPackIterDataset`: a conversation is never split across rows (the
  reply must see its prompt); whole conversations are placed first-fit into `num_packing_bins`
  rows and the rest is padding. A conversation longer than seq_len + 1 tokens is truncated to
  its first seq_len + 1 tokens (so its last replies may be cut or lost) and counted in
  `PipelineStats["truncated"]` (and logged once).
* DPO is not packed: each row holds one prompt + reply, padded to seq_len.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Mapping

import grain
import numpy as np

from geb_jax.data.chat import chat_prompt, encode_chat, encode_reply, validate_messages
from geb_jax.data.pipeline import (DEFAULT_PREFETCH, DEFAULT_READ_BUFFER, DEFAULT_READ_THREADS,
                                   PipelineStats, Source, check_pipeline_args, finish_batches,
                                   listed, lm_example_from_row, materialize,
                                   ordered_documents, to_iter)
from geb_jax.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- SFT
def _messages_of(conv: Any) -> Any:
    """A conversation is a list of messages or a dict with a "messages" list."""
    if isinstance(conv, Mapping) and "messages" in conv:
        return conv["messages"]
    return conv


def _check_conversations(source: Source, name: str) -> None:
    convs = listed(source, name, "conversations")
    if convs is None:
        return
    has_reply = False
    for i, conv in enumerate(convs):
        msgs = validate_messages(_messages_of(conv), what=f"{name}[{i}]")
        has_reply = has_reply or any(m["role"] == "assistant" and m["content"] for m in msgs)
    if not has_reply:
        raise ValueError(f"source {name!r} has no assistant text: SFT would train on nothing")


def sft_dataset(conversations_source: Source, tokenizer: Tokenizer, *, seq_len: int,
                batch_size: int, seed: int, shard_index: int = 0, shard_count: int = 1,
                num_epochs: int | None = None, num_packing_bins: int | None = None,
                drop_remainder: bool = True, read_threads: int = DEFAULT_READ_THREADS,
                read_buffer: int = DEFAULT_READ_BUFFER, prefetch: int = DEFAULT_PREFETCH,
                stats: PipelineStats | None = None,
                name: str = "conversations_source") -> grain.IterDataset:
    """Packed SFT batches: loss only where the target is an assistant token (chat.encode_chat).

    Conversations (lists of messages, or {"messages": [...]}) are packed whole, first-fit, into
    `num_packing_bins` rows (default: batch_size) of seq_len + 1 tokens; one longer than that is
    truncated to its first seq_len + 1 tokens and counted in `stats["truncated"]`.
    """
    check_pipeline_args(seq_len, batch_size, seed, shard_index, shard_count, num_epochs)
    conversations_source = materialize(conversations_source)
    _check_conversations(conversations_source, name)
    docs = ordered_documents(conversations_source, seed=seed, shard_index=shard_index,
                             shard_count=shard_count, num_epochs=num_epochs, name=name)
    row_len = seq_len + 1
    stats = stats if stats is not None else PipelineStats()
    warned = threading.Event()

    def encode(conv):
        ids, mask = encode_chat(tokenizer, _messages_of(conv))
        stats.add("conversations")
        if len(ids) > row_len:
            stats.add("truncated")
            if not warned.is_set():
                warned.set()
                log.warning("%s: a conversation of %d tokens was truncated to seq_len + 1 = %d "
                            "(counted in PipelineStats['truncated'])", name, len(ids), row_len)
            ids, mask = ids[:row_len], mask[:row_len]
        return {"tokens": np.asarray(ids, np.int32), "weights": np.asarray(mask, np.int32)}

    ds = to_iter(docs.map(encode), read_threads, read_buffer)
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct={"tokens": row_len, "weights": row_len},
        num_packing_bins=int(num_packing_bins or batch_size), seed=int(seed), shuffle_bins=True)
    ds = ds.map(lambda row: lm_example_from_row(row["tokens"], row["tokens_segment_ids"],
                                                row["tokens_positions"], row["weights"]))
    return finish_batches(ds, batch_size, drop_remainder, prefetch)


# ----------------------------------------------------------------------------- DPO
def _prompt_messages(prompt: Any, what: str) -> list:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return validate_messages(prompt, what=f"{what} prompt")


def _check_pair(pair: Any, what: str) -> None:
    if not isinstance(pair, Mapping):
        raise ValueError(f"{what} must be a dict with 'prompt', 'chosen', 'rejected', got "
                         f"{type(pair).__name__}")
    for key in ("prompt", "chosen", "rejected"):
        if key not in pair:
            raise ValueError(f"{what} has no {key!r}")
    _prompt_messages(pair["prompt"], what)
    for key in ("chosen", "rejected"):
        if not isinstance(pair[key], str):
            raise ValueError(f"{what} {key!r} must be a str, got {type(pair[key]).__name__}")


def _row_arrays(ids: list[int], reply_start: int, seq_len: int, pad_id: int
                ) -> dict[str, np.ndarray]:
    """prompt + reply ids (<= seq_len + 1) -> shifted, padded (seq_len,) arrays."""
    row_len = seq_len + 1
    tokens = np.full(row_len, pad_id, np.int32)
    tokens[:len(ids)] = ids
    real = np.zeros(row_len, bool)
    real[:len(ids)] = True
    reply = np.zeros(row_len, bool)
    reply[reply_start:len(ids)] = True
    return {
        "inputs": tokens[:-1],
        "targets": tokens[1:].copy(),
        "positions": np.arange(seq_len, dtype=np.int32),
        "segment_ids": real[:-1].astype(np.int32),
        "loss_mask": reply[1:].astype(np.float32),
    }


def dpo_example(tokenizer: Tokenizer, pair: Mapping[str, Any], seq_len: int,
                stats: PipelineStats | None = None) -> dict[str, np.ndarray]:
    """One preference pair -> "chosen_*" and "rejected_*" (seq_len,) arrays, unpacked.

    Row = chat_prompt(prompt) + reply + <|end|>, padded to seq_len + 1 and shifted; loss_mask is
    1 where the target is a reply token (content and <|end|>). When prompt + the longer reply
    exceed seq_len + 1 tokens, the prompt is left-truncated (bos kept, its latest tokens kept,
    the same for chosen and rejected, so the two prompts stay identical); replies are only
    right-truncated when even a 2-token prompt (bos, <|assistant|>) would not leave room.
    """
    messages = _prompt_messages(pair["prompt"], "pair")
    prompt = chat_prompt(tokenizer, messages)
    chosen = encode_reply(tokenizer, pair["chosen"], messages)
    rejected = encode_reply(tokenizer, pair["rejected"], messages)
    row_len = seq_len + 1
    if len(prompt) + max(len(chosen), len(rejected)) > row_len:
        min_prompt = min(len(prompt), 2)
        max_reply = row_len - min_prompt
        if max(len(chosen), len(rejected)) > max_reply:
            chosen, rejected = chosen[:max_reply], rejected[:max_reply]
            if stats is not None:
                stats.add("reply_truncated")
        keep = row_len - max(len(chosen), len(rejected))
        if keep < len(prompt):
            prompt = [prompt[0]] + prompt[len(prompt) - keep + 1:] if keep >= 2 else \
                prompt[len(prompt) - keep:]
            if stats is not None:
                stats.add("prompt_truncated")
    out = {}
    for prefix, reply in (("chosen_", chosen), ("rejected_", rejected)):
        for k, v in _row_arrays(prompt + reply, len(prompt), seq_len,
                                tokenizer.pad_id).items():
            out[prefix + k] = v
    return out


def dpo_dataset(pairs_source: Source, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                seed: int, shard_index: int = 0, shard_count: int = 1,
                num_epochs: int | None = None, drop_remainder: bool = True,
                read_threads: int = DEFAULT_READ_THREADS,
                read_buffer: int = DEFAULT_READ_BUFFER, prefetch: int = DEFAULT_PREFETCH,
                stats: PipelineStats | None = None,
                name: str = "pairs_source") -> grain.IterDataset:
    """Unpacked DPO batches of {"prompt": str | messages, "chosen": str, "rejected": str}."""
    check_pipeline_args(seq_len, batch_size, seed, shard_index, shard_count, num_epochs)
    pairs_source = materialize(pairs_source)
    for i, pair in enumerate(listed(pairs_source, name, "pairs") or ()):
        _check_pair(pair, f"{name}[{i}]")
    docs = ordered_documents(pairs_source, seed=seed, shard_index=shard_index,
                             shard_count=shard_count, num_epochs=num_epochs, name=name)
    stats = stats if stats is not None else PipelineStats()

    def encode(pair):
        stats.add("pairs")
        return dpo_example(tokenizer, pair, seq_len, stats)

    ds = to_iter(docs.map(encode), read_threads, read_buffer)
    return finish_batches(ds, batch_size, drop_remainder, prefetch)


__all__ = ["sft_dataset", "dpo_dataset", "dpo_example"]
