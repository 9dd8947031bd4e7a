"""The shipped fine-tuning files (geb_jax/data/builtin/finetune/): written by
geb_jax.data.finetune_files from the built-in sets, read back through the same local-file
readers and layout detection a user's data takes; what comes out must be the built-in sets
exactly (the independent reference: demo_tasks' Python lists), in every layout."""
import collections
import os
import subprocess
import sys

import ml_collections
import pytest

from geb_jax.data import finetune_files
from geb_jax.data.demo_tasks import builtin_dpo_pairs, builtin_sft_conversations
from geb_jax.data.sources import records_source_from_config

DIR = finetune_files.FINETUNE_DIR


def _read(pattern: str, stage: str, folder: str = DIR) -> list[dict]:
    config = ml_collections.ConfigDict(dict(
        source="local", path=os.path.join(folder, pattern), valid_path="", valid_fraction=0.0,
        format="auto", validate=True, bad_records="error", max_record_bytes=1 << 20, lang="",
        text_field="text"))
    records = records_source_from_config(config, "train", stage=stage, seed=0)
    # "source" (file:line, for error messages) is where a record came from, not its content
    return [{k: v for k, v in records[i].items() if k != "source"} for i in range(len(records))]


def _key(record: dict) -> str:
    return repr(sorted(record.items()))


def _canonical_pair(pair: dict) -> dict:
    prompt = pair["prompt"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return {"prompt": messages, "chosen": pair["chosen"], "rejected": pair["rejected"]}


def test_shipped_files_are_what_the_generator_writes(tmp_path):
    """A fresh write (in a new process, the user's command) reads back equal to the shipped
    files, so the checked-in data cannot drift from demo_tasks."""
    subprocess.run([sys.executable, "-m", "geb_jax.data.finetune_files", str(tmp_path)],
                   check=True, capture_output=True)
    shipped = sorted(os.path.relpath(os.path.join(d, f), DIR)
                     for d, _, fs in os.walk(DIR) for f in fs)
    fresh = sorted(os.path.relpath(os.path.join(d, f), tmp_path)
                   for d, _, fs in os.walk(tmp_path) for f in fs)
    assert shipped == fresh
    for name in shipped:
        stage = name.split(os.sep)[0]
        assert _read(name, stage) == _read(name, stage, str(tmp_path)), \
            f"{name} differs from a fresh write"
    assert all(os.stat(os.path.join(d, f)).st_mode & 0o644 == 0o644
               for d, _, fs in os.walk(tmp_path) for f in fs)


@pytest.mark.parametrize("split", ["train", "valid"])
def test_sft_files_read_back_as_the_builtin_conversations(split):
    pattern = finetune_files.SFT_GLOB if split == "train" else finetune_files.SFT_VALID
    got = collections.Counter(_key(r) for r in _read(pattern, "sft"))
    conversations = (finetune_files.sft_conversations() if split == "train"
                     else builtin_sft_conversations(split))
    want = collections.Counter(_key({"messages": c["messages"]}) for c in conversations)
    assert got == want


@pytest.mark.parametrize("split", ["train", "valid"])
def test_dpo_files_read_back_as_the_builtin_pairs(split):
    pattern = finetune_files.DPO_GLOB if split == "train" else finetune_files.DPO_VALID
    got = collections.Counter(_key(r) for r in _read(pattern, "dpo"))
    want = collections.Counter(_key(_canonical_pair(p)) for p in builtin_dpo_pairs(split))
    assert got == want


def test_every_layout_is_shipped_and_detected():
    """Each file holds one layout, and auto detection names it (chat_records.detect)."""
    from geb_jax.data import chat_records
    expected = {"sft/messages.jsonl": "messages", "sft/sharegpt.jsonl.gz": "sharegpt",
                "sft/alpaca.parquet": "alpaca", "sft/prompt_completion.jsonl": "prompt_completion",
                "dpo/trl.jsonl": "preference", "dpo/trl_messages.parquet": "preference",
                "dpo/hh.jsonl": "preference"}
    for name, layout in expected.items():
        stage = name.split("/")[0]
        config = ml_collections.ConfigDict(dict(
            source="local", path=os.path.join(DIR, name), valid_path="", valid_fraction=0.0,
            format=layout, validate=True, bad_records="error", max_record_bytes=1 << 20,
            lang="", text_field="text"))
        forced = records_source_from_config(config, "train", stage=stage, seed=0)
        assert len(forced) == len(_read(name, stage)) > 20, name
    assert set(chat_records.SFT_FORMATS) == {v for v in expected.values() if v != "preference"}
