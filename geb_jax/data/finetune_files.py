"""The built-in SFT and DPO sets written as a user's files would be: every common layout.

    python -m geb_jax.data.finetune_files OUT_DIR     # writes OUT_DIR/{sft,dpo}/...

The package ships the result under geb_jax/data/builtin/finetune/ (FINETUNE_DIR), so the
fine-tuning preset (configs/finetune.py) trains from files through `data.source=local`, the
path a user's data takes, rather than from Python lists:

    sft/messages.jsonl            OpenAI / HF `messages` (every system or multi-turn record
                                  lands here or in ShareGPT, the layouts that carry them)
    sft/sharegpt.jsonl.gz         ShareGPT `conversations` [{from, value}]
    sft/alpaca.parquet            Alpaca `instruction` / `input` / `output`
    sft/prompt_completion.jsonl   `prompt` / `completion` strings
    sft/valid.jsonl               the held-out conversations (messages)
    dpo/trl.jsonl                 TRL `prompt` / `chosen` / `rejected` strings (message lists
                                  where the prompt has a system turn)
    dpo/trl_messages.parquet      the same layout with message lists on every side
    dpo/hh.jsonl                  Anthropic HH: whole `chosen` / `rejected` transcripts
    dpo/valid.jsonl               the held-out pairs (TRL)

The SFT files hold the built-in conversations and *every* refuse / helpful training pair's
prompt and chosen reply (sft_conversations()): GEB's recipe teaches refusals in SFT and
sharpens them with DPO; the built-in set, sized for the tiny README job, carries one in eight.
Held-out prompts appear in neither. Records are dealt round-robin to the layouts that can hold them, so each file gets a share
of every task. Reading the files back gives the built-in sets exactly (tests/test_finetune_files.py).
"""
from __future__ import annotations

import gzip
import json
import os
import sys
from typing import Sequence

from geb_jax.atomic_io import atomic_path
from geb_jax.data.demo_tasks import (builtin_dpo_pairs, builtin_sft_conversations,
                                     preference_sft_conversations)

FINETUNE_DIR = os.path.join(os.path.dirname(__file__), "builtin", "finetune")
SFT_GLOB = os.path.join("sft", "[!v]*")  # every training file, not valid.jsonl
DPO_GLOB = os.path.join("dpo", "[!v]*")
SFT_VALID = os.path.join("sft", "valid.jsonl")
DPO_VALID = os.path.join("dpo", "valid.jsonl")


def _is_single_turn(messages: Sequence[dict]) -> bool:
    return [m["role"] for m in messages] == ["user", "assistant"]


def _as_messages(messages):
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def sft_conversations() -> list[dict]:
    """The SFT training conversations the files hold: the built-in task conversations, then
    every refuse / helpful training pair as (prompt, chosen reply)."""
    preference_tasks = {c["task"] for c in preference_sft_conversations()}
    return ([c for c in builtin_sft_conversations("train") if c["task"] not in preference_tasks]
            + preference_sft_conversations())


def sft_records() -> dict[str, list[dict]]:
    """{file name: records} for the SFT training split, plus valid.jsonl."""
    files: dict[str, list[dict]] = {"messages.jsonl": [], "sharegpt.jsonl.gz": [],
                                    "alpaca.parquet": [], "prompt_completion.jsonl": []}
    names = list(files)
    for k, conv in enumerate(sft_conversations()):
        messages = _as_messages(conv["messages"])
        name = names[k % 4] if _is_single_turn(messages) else names[k % 2]
        user, reply = (messages[0]["content"], messages[1]["content"]) if len(messages) == 2 \
            else (None, None)
        if name == "messages.jsonl":
            files[name].append({"messages": messages})
        elif name == "sharegpt.jsonl.gz":
            frm = {"system": "system", "user": "human", "assistant": "gpt"}
            files[name].append({"conversations": [{"from": frm[m["role"]], "value": m["content"]}
                                                  for m in messages]})
        elif name == "alpaca.parquet":
            files[name].append({"instruction": user, "input": "", "output": reply})
        else:
            files[name].append({"prompt": user, "completion": reply})
    files["valid.jsonl"] = [{"messages": _as_messages(c["messages"])}
                            for c in builtin_sft_conversations("valid")]
    return files


def _hh(messages: Sequence[dict], reply: str) -> str:
    """An Anthropic HH transcript; a system turn has no HH form, so callers avoid it."""
    names = {"user": "Human", "assistant": "Assistant"}
    turns = list(messages) + [{"role": "assistant", "content": reply}]
    return "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in turns)


def _trl(pair: dict, lists: bool) -> dict:
    prompt = pair["prompt"]
    if not lists and isinstance(prompt, str):
        return {"prompt": prompt, "chosen": pair["chosen"], "rejected": pair["rejected"]}
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return {"prompt": messages, "chosen": [{"role": "assistant", "content": pair["chosen"]}],
            "rejected": [{"role": "assistant", "content": pair["rejected"]}]}


def dpo_records() -> dict[str, list[dict]]:
    """{file name: records} for the DPO training split, plus valid.jsonl."""
    files: dict[str, list[dict]] = {"trl.jsonl": [], "trl_messages.parquet": [], "hh.jsonl": []}
    for k, pair in enumerate(builtin_dpo_pairs("train")):
        name = list(files)[k % 3]
        if name == "hh.jsonl" and not isinstance(pair["prompt"], str):
            name = "trl.jsonl"  # HH transcripts have no system turn
        if name == "hh.jsonl":
            user = [{"role": "user", "content": pair["prompt"]}]
            files[name].append({"chosen": _hh(user, pair["chosen"]),
                                "rejected": _hh(user, pair["rejected"])})
        else:
            files[name].append(_trl(pair, lists=name == "trl_messages.parquet"))
    files["valid.jsonl"] = [_trl(p, lists=False) for p in builtin_dpo_pairs("valid")]
    return files


def _write(path: str, records: list[dict]) -> None:
    with atomic_path(path) as tmp:
        if path.endswith(".parquet"):
            import pyarrow as pa
            import pyarrow.parquet as pq
            pq.write_table(pa.Table.from_pylist(records), tmp)
        else:
            lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            data = lines.encode("utf-8")
            with open(tmp, "wb") as f:
                f.write(gzip.compress(data, mtime=0) if path.endswith(".gz") else data)


def write_finetune_files(out_dir: str) -> list[str]:
    """Writes every file; returns their paths."""
    written = []
    for sub, files in (("sft", sft_records()), ("dpo", dpo_records())):
        for name, records in files.items():
            path = os.path.join(out_dir, sub, name)
            _write(path, records)
            written.append(path)
    return written


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    for path in write_finetune_files(argv[0]):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
