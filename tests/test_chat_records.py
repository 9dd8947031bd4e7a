"""SFT / DPO records from files: geb_jax.data.chat_records layouts, sources, train.inputs, CLI.

Each layout is one record whose canonical form is asserted exactly; every bad-record reason is
produced; then small JSONL / Parquet files per layout go through train.inputs into batches, which
are decoded: the loss mask must cover exactly the assistant replies (and their <|end|>). The local
readers are also checked in fresh processes (an import done earlier in the same process once hid
a crash), and one CLI run trains two SFT steps from a JSONL file.
"""
import gzip
import json
import os
import subprocess
import sys

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from geb_jax.config_base import base_config
from geb_jax.data import chat_records as C
from geb_jax.data import chat_pipeline as CP
from geb_jax.data import pipeline as P
from geb_jax.data import sources as S
from geb_jax.data import tfds_source as T
from geb_jax.data.chat_records import RecordError
from geb_jax.data.demo_tasks import builtin_sft_conversations
from geb_jax.data.tokenizer import builtin_tokenizer
from geb_jax.train import inputs
from tests.conftest import REPO_ROOT


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def s(text):
    return {"role": "system", "content": text}


# ----------------------------------------------------------------------------- SFT layouts
SFT_CASES = {
    "messages": (
        {"messages": [s("Be brief."), u("Hi"), a("Hello!"), u("2+3?"),
                      {"role": "assistant", "content": "5", "name": "bot"}]},
        [s("Be brief."), u("Hi"), a("Hello!"), u("2+3?"), a("5")]),
    "messages_content_parts": (
        {"messages": [u([{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]),
                      a("Hello!")]},
        [u("Hi there"), a("Hello!")]),
    "sharegpt": (
        {"conversations": [{"from": "system", "value": "Be brief."},
                           {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                           {"from": "human", "value": "2+3?"}, {"from": "gpt", "value": "5"}]},
        [s("Be brief."), u("Hi"), a("Hello!"), u("2+3?"), a("5")]),
    "sharegpt_user_assistant": (
        {"conversations": [{"from": "user", "value": "Hi"},
                           {"from": "assistant", "value": "Hello!"}]},
        [u("Hi"), a("Hello!")]),
    "alpaca": (
        {"instruction": "Add the numbers.", "input": "2 3", "output": "5"},
        [u("Add the numbers.\n\n2 3"), a("5")]),
    "alpaca_no_input": (
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        [u("Say hi."), a("Hi!")]),
    "alpaca_system_history": (
        {"system": "Be brief.", "history": [["Hi", "Hello!"]], "instruction": "2+3?",
         "output": "5"},
        [s("Be brief."), u("Hi"), a("Hello!"), u("2+3?"), a("5")]),
    "prompt_completion": (
        {"prompt": "2+3=", "completion": "5"},
        [u("2+3="), a("5")]),
    "prompt_completion_conversational": (
        {"prompt": [s("Be brief."), u("2+3?")], "completion": [a("5")]},
        [s("Be brief."), u("2+3?"), a("5")]),
}


@pytest.mark.parametrize("case", sorted(SFT_CASES))
def test_sft_layout(case):
    record, messages = SFT_CASES[case]
    assert C.to_sft(record) == {"messages": messages}
    fmt = C.detect_sft_format(record)
    assert C.to_sft(record, fmt) == {"messages": messages}  # forced == detected


# ----------------------------------------------------------------------------- DPO layouts
HH_CHOSEN = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+3?\n\nAssistant: 5"
HH_REJECTED = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+3?\n\nAssistant: 6"
MULTI_PROMPT = [u("Hi"), a("Hello!"), u("2+3?")]

DPO_CASES = {
    "trl_strings": (
        {"prompt": "2+3=", "chosen": "5", "rejected": "6"},
        {"prompt": [u("2+3=")], "chosen": "5", "rejected": "6"}),
    "trl_messages": (
        {"prompt": [s("Be brief."), u("2+3?")], "chosen": [a("5")], "rejected": [a("6")]},
        {"prompt": [s("Be brief."), u("2+3?")], "chosen": "5", "rejected": "6"}),
    "trl_implicit_prompt": (
        {"chosen": [u("2+3?"), a("5")], "rejected": [u("2+3?"), a("6")]},
        {"prompt": [u("2+3?")], "chosen": "5", "rejected": "6"}),
    "hh_strings": (
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
        {"prompt": MULTI_PROMPT, "chosen": "5", "rejected": "6"}),
    "hh_message_lists": (
        {"chosen": MULTI_PROMPT + [a("5")], "rejected": MULTI_PROMPT + [a("6")]},
        {"prompt": MULTI_PROMPT, "chosen": "5", "rejected": "6"}),
    "hh_prompt_string": (
        {"prompt": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+3?\n\nAssistant:",
         "chosen": " 5", "rejected": " 6"},
        {"prompt": MULTI_PROMPT, "chosen": "5", "rejected": "6"}),
    "hh_prompt_and_transcripts": (  # a prompt column next to whole HH transcripts
        {"prompt": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+3?\n\nAssistant:",
         "chosen": HH_CHOSEN, "rejected": HH_REJECTED},
        {"prompt": MULTI_PROMPT, "chosen": "5", "rejected": "6"}),
}


@pytest.mark.parametrize("case", sorted(DPO_CASES))
def test_dpo_layout(case):
    record, pair = DPO_CASES[case]
    assert C.to_dpo(record) == pair
    assert C.to_dpo(record, "preference") == pair


def test_hh_parsing():
    assert C.parse_hh(HH_CHOSEN) == MULTI_PROMPT + [a("5")]
    assert C.parse_hh("Human: multi\nline\n\nAssistant:  sure ") == [u("multi\nline"),
                                                                      a("sure")]
    assert C.parse_hh("\n\nHuman: q\n\nAssistant:") == [u("q"), a("")]  # the cue is kept
    assert C.looks_like_hh(HH_CHOSEN) and C.looks_like_hh("Human: hi")
    assert not C.looks_like_hh("2+3=") and not C.looks_like_hh(["Human: hi"])
    with pytest.raises(RecordError) as e:
        C.parse_hh("preamble\n\nHuman: q\n\nAssistant: r")
    assert e.value.reason == C.BAD_TRANSCRIPT


def test_shared_prefix_extraction():
    sys_q = [s("Be brief."), u("2+3?")]
    assert C.shared_prefix(sys_q + [a("5")], sys_q + [a("6")]) == 2
    assert C.split_pair(sys_q + [a("5")], sys_q + [a("6")]) == {
        "prompt": sys_q, "chosen": "5", "rejected": "6"}
    # the first turns differ -> the prompt would be empty
    with pytest.raises(RecordError) as e:
        C.to_dpo({"chosen": [u("a"), a("5")], "rejected": [u("b"), a("6")]})
    assert e.value.reason == C.PROMPT_MISMATCH
    # TRL: chosen may repeat the prompt; the shared turns move into the prompt
    assert C.to_dpo({"prompt": [u("Hi")], "chosen": [a("Hello!"), u("2+3?"), a("5")],
                     "rejected": [a("Hello!"), u("2+3?"), a("6")]}) == {
        "prompt": MULTI_PROMPT, "chosen": "5", "rejected": "6"}


def test_format_forced_vs_auto():
    both = {"messages": [u("m"), a("from messages")],
            "conversations": [{"from": "human", "value": "c"}, {"from": "gpt", "value": "sg"}]}
    assert C.to_sft(both)["messages"][-1] == a("from messages")  # auto: messages first
    assert C.to_sft(both, "sharegpt")["messages"][-1] == a("sg")
    with pytest.raises(RecordError) as e:  # forced layout, its key absent
        C.to_sft({"messages": [u("m"), a("r")]}, "alpaca")
    assert e.value.reason == C.MISSING_FIELD
    for stage, fmt in (("sft", "preference"), ("dpo", "alpaca"), ("sft", "chatml")):
        with pytest.raises(ValueError, match=f"data.format={fmt!r}"):
            C.normalizer(stage, fmt)
    config = _config("local", "/nonexistent/*.jsonl", format="preference")
    with pytest.raises(S.SourceError, match="cannot be read by the sft stage"):
        S.conversations_source_from_config(config.data, "train", seed=0)


# ----------------------------------------------------------------------------- bad records
BAD_SFT = [
    ({"messages": [u("q"), a("")]}, C.EMPTY_REPLY),
    ({"messages": [u("q"), a("   ")]}, C.EMPTY_REPLY),
    ({"messages": [u("q")]}, C.NO_ASSISTANT_TURN),
    ({"messages": []}, C.NO_MESSAGES),
    ({"messages": [{"role": "robot", "content": "x"}, a("y")]}, C.UNKNOWN_ROLE),
    ({"conversations": [{"from": "tool", "value": "x"}]}, C.UNKNOWN_ROLE),
    ({"messages": "hello"}, C.BAD_TYPE),
    ({"messages": [u(3), a("y")]}, C.BAD_TYPE),
    ({"messages": [{"role": "user"}, a("y")]}, C.MISSING_FIELD),
    ({"instruction": "do it"}, C.MISSING_FIELD),
    ({"prompt": "2+3="}, C.MISSING_FIELD),
    ({"prompt": [u("q")], "completion": [u("more")]}, C.NO_ASSISTANT_TURN),
    ({"text": "plain text"}, C.UNKNOWN_LAYOUT),
    ({"prompt": "q", "chosen": "a", "rejected": "b"}, C.WRONG_STAGE),
]
BAD_DPO = [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, C.CHOSEN_EQUALS_REJECTED),
    ({"chosen": HH_CHOSEN, "rejected": HH_CHOSEN}, C.CHOSEN_EQUALS_REJECTED),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, C.EMPTY_REPLY),
    ({"chosen": "\n\nHuman: q\n\nAssistant:", "rejected": "\n\nHuman: q\n\nAssistant: b"},
     C.EMPTY_REPLY),
    ({"prompt": "q", "rejected": "b"}, C.MISSING_FIELD),
    ({"chosen": "a", "rejected": "b"}, C.BAD_TRANSCRIPT),
    ({"chosen": [a("a")], "rejected": [a("b")]}, C.MISSING_FIELD),  # no prompt at all
    ({"chosen": [u("q"), a("a"), u("q2"), a("x")], "rejected": [u("q"), a("b"), u("q2"),
                                                                  a("x")]},
     C.PROMPT_MISMATCH),
    ({"chosen": [u("q"), a("a")], "rejected": [u("q"), a("a"), u("more"), a("b")]},
     C.PROMPT_MISMATCH),
    ({"prompt": [u("q")], "chosen": [u("a")], "rejected": [u("b")]}, C.NO_ASSISTANT_TURN),
    ({"prompt": [u("q")], "chosen": [{"role": "critic", "content": "a"}],
      "rejected": [a("b")]}, C.UNKNOWN_ROLE),
    ({"prompt": "q", "chosen": 5, "rejected": "b"}, C.BAD_TYPE),
    ({"messages": [u("q"), a("a")]}, C.WRONG_STAGE),
    ({"foo": 1}, C.UNKNOWN_LAYOUT),
]


@pytest.mark.parametrize("record,reason", BAD_SFT, ids=lambda x: x if isinstance(x, str) else "")
def test_bad_sft_records(record, reason):
    with pytest.raises(RecordError) as e:
        C.to_sft(record)
    assert e.value.reason == reason, e.value


@pytest.mark.parametrize("record,reason", BAD_DPO, ids=lambda x: x if isinstance(x, str) else "")
def test_bad_dpo_records(record, reason):
    with pytest.raises(RecordError) as e:
        C.to_dpo(record)
    assert e.value.reason == reason, e.value


def test_every_reason_is_exercised():
    assert {r for _, r in BAD_SFT + BAD_DPO} == set(C.REASONS)
    with pytest.raises(RecordError) as e:
        C.to_sft(["not", "an", "object"])
    assert e.value.reason == C.BAD_TYPE


# ----------------------------------------------------------------------------- files
@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer(4096)


def _config(source="local", path="", stage="sft", **data):
    c = base_config()
    c.train.stage = stage
    c.train.seq_len, c.train.batch_size = 64, 2
    c.data.source, c.data.path = source, path
    c.data.valid_fraction = 0.0
    for k, v in data.items():
        c.data[k] = v
    return c


def write_jsonl(path, records, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def _sft_records(layout, n=6):
    """n records of a layout; record i's reply is f"reply {layout} {i}" (unique)."""
    out = []
    for i in range(n):
        q, r = f"question {i} 你好", f"reply {layout} {i}"
        out.append({
            "messages": {"messages": [s("Be brief."), u(q), a(r)]},
            "sharegpt": {"conversations": [{"from": "human", "value": q},
                                           {"from": "gpt", "value": r}]},
            "alpaca": {"instruction": q, "input": "" if i % 2 else "ctx", "output": r},
            "prompt_completion": {"prompt": q, "completion": r},
        }[layout])
    return out


def _dpo_records(layout, n=6):
    out = []
    for i in range(n):
        q, c, r = f"question {i}", f"good {layout} {i}", f"bad {layout} {i}"
        out.append({
            "trl": {"prompt": q, "chosen": c, "rejected": r},
            "trl_messages": {"prompt": [u(q)], "chosen": [a(c)], "rejected": [a(r)]},
            "hh": {"chosen": f"\n\nHuman: {q}\n\nAssistant: {c}",
                   "rejected": f"\n\nHuman: {q}\n\nAssistant: {r}"},
        }[layout])
    return out


def _runs(targets, mask):
    """Contiguous runs of targets where mask is on (one assistant reply + <|end|> each)."""
    runs, current = [], []
    for t, m in zip(targets.tolist(), mask.tolist()):
        if m:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def _sft_replies(ds, tok, want: set, max_batches=60):
    """Decoded masked runs of the first batches until every wanted reply was seen."""
    seen, it = set(), iter(ds)
    for _ in range(max_batches):
        batch = next(it)
        assert batch["inputs"].shape == (2, 64)
        for row in range(2):
            for run in _runs(batch["targets"][row], batch["loss_mask"][row]):
                seen.add(tok.decode(run))
            unmasked = tok.decode([t for t, m in zip(batch["targets"][row].tolist(),
                                                     batch["loss_mask"][row].tolist())
                                   if not m and t != tok.pad_id])
            assert "reply" not in unmasked  # no assistant text goes unlearned
        if want <= seen:
            break
    return seen


@pytest.mark.parametrize("layout", ["messages", "sharegpt", "alpaca", "prompt_completion"])
def test_sft_end_to_end_jsonl(tmp_path, tok, layout):
    records = _sft_records(layout)
    path = write_jsonl(tmp_path / f"{layout}.jsonl", records)
    ds = inputs.train_dataset(_config("local", path), "sft", tok)
    want = {f"reply {layout} {i}<|end|>" for i in range(len(records))}
    assert _sft_replies(ds, tok, want) == want  # exactly the replies, nothing else masked
    assert inputs.input_report(ds)["skipped"] == {}


def test_sft_user_and_system_text_present_but_not_learned(tmp_path, tok):
    path = write_jsonl(tmp_path / "m.jsonl", _sft_records("messages", 2))
    batch = next(iter(inputs.train_dataset(_config("local", path), "sft", tok)))
    text = tok.decode([t for t in batch["inputs"].ravel().tolist() if t != tok.pad_id])
    assert "<|system|>Be brief.<|end|><|user|>question" in text and "<|assistant|>reply" in text
    learned = tok.decode([t for t, m in zip(batch["targets"].ravel().tolist(),
                                            batch["loss_mask"].ravel().tolist()) if m])
    assert "question" not in learned and "Be brief" not in learned and "reply" in learned


def _parquet(path, records):
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=4)
    return str(path)


def test_sft_end_to_end_parquet_and_gz(tmp_path, tok):
    records = _sft_records("messages", 7)  # messages: list<struct<role, content>> column
    path = _parquet(tmp_path / "sft.parquet", records)
    ds = inputs.train_dataset(_config("local", path), "sft", tok)
    want = {f"reply messages {i}<|end|>" for i in range(7)}
    assert _sft_replies(ds, tok, want) == want
    gz = write_jsonl(tmp_path / "sft.jsonl.gz", _sft_records("alpaca"), gz=True)
    ds = inputs.train_dataset(_config("local", gz), "sft", tok)
    want = {f"reply alpaca {i}<|end|>" for i in range(6)}
    assert _sft_replies(ds, tok, want) == want


def _dpo_rows(ds, tok, n_rows):
    """(prompt text, chosen text, rejected text) of the first n_rows rows."""
    out, it = [], iter(ds)
    while len(out) < n_rows:
        b = next(it)
        for row in range(b["chosen_inputs"].shape[0]):
            texts = []
            for side in ("chosen", "rejected"):
                runs = _runs(b[f"{side}_targets"][row], b[f"{side}_loss_mask"][row])
                assert len(runs) == 1  # one reply per row
                texts.append(tok.decode(runs[0]))
            first = int(np.flatnonzero(b["chosen_loss_mask"][row])[0])  # reply starts at +1
            prompt = tok.decode(b["chosen_inputs"][row][:first + 1].tolist())
            np.testing.assert_array_equal(b["chosen_inputs"][row][:first + 1],
                                          b["rejected_inputs"][row][:first + 1])
            out.append((prompt, *texts))
    return out[:n_rows]


@pytest.mark.parametrize("layout", ["trl", "trl_messages", "hh"])
def test_dpo_end_to_end_jsonl(tmp_path, tok, layout):
    records = _dpo_records(layout)
    path = write_jsonl(tmp_path / f"{layout}.jsonl", records)
    ds = inputs.train_dataset(_config("local", path, stage="dpo"), "dpo", tok)
    rows = _dpo_rows(ds, tok, len(records))  # the first epoch: each pair once
    assert sorted(rows) == sorted(
        (f"<|user|>question {i}<|end|><|assistant|>", f"good {layout} {i}<|end|>",
         f"bad {layout} {i}<|end|>") for i in range(len(records)))


def test_dpo_end_to_end_parquet(tmp_path, tok):
    records = _dpo_records("trl_messages", 5)
    path = _parquet(tmp_path / "dpo.parquet", records)
    ds = inputs.train_dataset(_config("local", path, stage="dpo"), "dpo", tok)
    assert sorted(r[1] for r in _dpo_rows(ds, tok, 5)) == [
        f"good trl_messages {i}<|end|>" for i in range(5)]


def test_bad_records_counted_with_reasons(tmp_path, tok, caplog):
    good = _sft_records("messages", 3)
    lines = good[:1] + [
        {"messages": [u("q"), a("")]},                          # line 2: empty_reply
        {"messages": [u("q")]},                                 # line 3: no_assistant_turn
        "not json",                                             # line 4: invalid JSON
        {"messages": [{"role": "robot", "content": "x"}, a("y")]},  # line 5: unknown_role
        {"prompt": "q", "chosen": "a", "rejected": "b"},        # line 6: wrong_stage
    ] + good[1:]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    with caplog.at_level("WARNING"):
        ds = inputs.train_dataset(_config("local", path), "sft", tok)
    report = inputs.input_report(ds)
    assert report["skipped"] == {"empty_reply": 1, "invalid JSON": 1, "no_assistant_turn": 1,
                                 "unknown_role": 1, "wrong_stage": 1}
    assert report["examples"][0].startswith(f"{path}:2: empty_reply (")
    assert any("5 skipped" in r.getMessage() and "empty_reply" in r.getMessage()
               for r in caplog.records)  # in the run's log
    want = {f"reply messages {i}<|end|>" for i in range(3)}
    assert _sft_replies(ds, tok, want) == want  # only the good records are trained on

    # DPO, Parquet: rows named by number
    pairs = _dpo_records("trl", 3) + [{"prompt": "q", "chosen": "x", "rejected": "x"}]
    ppath = _parquet(tmp_path / "pairs.parquet", pairs)
    ds = inputs.train_dataset(_config("local", ppath, stage="dpo"), "dpo", tok)
    report = inputs.input_report(ds)
    assert report["skipped"] == {"chosen_equals_rejected": 1}
    assert report["examples"] == [f"{ppath}:row 3: chosen_equals_rejected (chosen and "
                                  f"rejected are the same conversation)"]


def test_bad_records_error_names_file_and_line(tmp_path, tok):
    lines = _sft_records("messages", 2) + [{"messages": [u("q"), a(" ")]}]
    path = write_jsonl(tmp_path / "strict.jsonl", lines)
    config = _config("local", path, bad_records="error")
    with pytest.raises(S.SourceError, match=rf"^{path}:3: empty_reply: messages message 1 "):
        inputs.train_dataset(config, "sft", tok)
    ppath = _parquet(tmp_path / "strict.parquet",
                     _dpo_records("trl", 2) + [{"prompt": "q", "chosen": "x", "rejected": "x"}])
    with pytest.raises(S.SourceError, match=rf"^{ppath}:row 2: chosen_equals_rejected"):
        inputs.train_dataset(_config("local", ppath, stage="dpo", bad_records="error"), "dpo",
                             tok)


def test_nothing_usable_is_one_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "pretraining text"}] * 3)
    with pytest.raises(S.SourceError, match=r"nothing usable.*3 unknown_layout"):
        inputs.train_dataset(_config("local", path), "sft", tok)
    txt = tmp_path / "a.txt"
    txt.write_text("hello")
    with pytest.raises(S.SourceError, match=r"a\.txt: a \.txt file holds no records"):
        inputs.train_dataset(_config("local", str(txt)), "sft", tok)
    with pytest.raises(S.SourceError, match="pretokenized"):
        inputs.train_dataset(_config("pretokenized", str(tmp_path)), "sft", tok)


def test_unvalidated_bad_records_are_dropped_when_read(tmp_path, tok):
    lines = _sft_records("sharegpt", 3) + [{"conversations": []}]
    path = write_jsonl(tmp_path / "lazy.jsonl", lines)
    ds = inputs.train_dataset(_config("local", path, validate=False), "sft", tok)
    want = {f"reply sharegpt {i}<|end|>" for i in range(3)}
    assert _sft_replies(ds, tok, want) == want
    assert inputs.input_report(ds)["skipped"].get("no_messages", 0) >= 1


def test_hash_split_and_valid_path(tmp_path):
    records = _sft_records("messages", 40)
    path = write_jsonl(tmp_path / "all.jsonl", records)
    config = _config("local", path, valid_fraction=0.3)
    train = S.conversations_source_from_config(config.data, "train", seed=0)
    valid = S.conversations_source_from_config(config.data, "valid", seed=0)
    replies = lambda ds: {ds[i]["messages"][-1]["content"] for i in range(len(ds))}
    assert replies(train).isdisjoint(replies(valid)) and len(valid) > 0
    assert replies(train) | replies(valid) == {f"reply messages {i}" for i in range(40)}
    # the split is by the canonical record: the same conversation in another layout (ShareGPT)
    # lands in the same split
    sg = [{"conversations": [{"from": "system", "value": "Be brief."},
                             {"from": "human", "value": r["messages"][1]["content"]},
                             {"from": "gpt", "value": r["messages"][2]["content"]}]}
          for r in records]
    sg_path = write_jsonl(tmp_path / "sg.jsonl", sg)
    sg_valid = S.conversations_source_from_config(
        _config("local", sg_path, valid_fraction=0.3).data, "valid", seed=0)
    assert replies(sg_valid) == replies(valid)
    # valid_path: each split is all of its files; sources carry file:line
    vpath = write_jsonl(tmp_path / "v.jsonl", _sft_records("alpaca", 2))
    vconfig = _config("local", path, valid_path=vpath)
    valid = S.conversations_source_from_config(vconfig.data, "valid", seed=0)
    assert len(valid) == 2 and valid[1]["source"] == f"{vpath}:2"


def test_mixture_and_builtin(tmp_path, tok):
    a_path = write_jsonl(tmp_path / "alpaca.jsonl", _sft_records("alpaca", 4))
    m_path = write_jsonl(tmp_path / "msgs.jsonl", _sft_records("messages", 4))
    config = _config("mixture", mixture=[
        dict(source="local", path=a_path, weight=1.0, format="alpaca", valid_fraction=0.0),
        dict(source="local", path=m_path, weight=1.0, valid_fraction=0.0),
        dict(source="builtin", weight=0.5, name="demo")])
    ds = inputs.train_dataset(config, "sft", tok)
    want = {f"reply {k} {i}<|end|>" for k in ("alpaca", "messages") for i in range(4)}
    assert want <= _sft_replies(ds, tok, want, max_batches=200)
    # builtin: the demo sets, exactly as before
    builtin = inputs.train_dataset(_config("builtin"), "sft", tok)
    direct = CP.sft_dataset(builtin_sft_conversations("train"), tok, seq_len=64, batch_size=2,
                           seed=0)
    for x, y in zip(P.take(iter(builtin), 3), P.take(iter(direct), 3)):
        for k in P.BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k])
    pairs = inputs.train_dataset(_config("builtin", stage="dpo"), "dpo", tok)
    assert next(iter(pairs))["chosen_inputs"].shape == (2, 64)


def test_tfds_records_plain_and_bad():
    """TfdsRecords over a tfds-like random-access source (bytes, numpy, dict-of-lists)."""
    data = [
        {"messages": {"role": np.array([b"user", b"assistant"]),
                      "content": np.array(["q".encode(), "r 0".encode()])}},
        {"messages": {"role": np.array([b"user"]), "content": np.array([b"q"])}},
        {"instruction": b"do", "output": b"r 2"},
    ]
    src = T.TfdsRecords(data, "tfds x train", C.normalizer("sft"))
    assert len(src) == 2 and src.skipped.as_dict()["skipped"] == {"no_assistant_turn": 1}
    assert T.plain({"n": np.int64(3), "b": np.bytes_(b"x"), "t": (np.array([b"y"]),)}) == {
        "n": 3, "b": "x", "t": [["y"]]}
    assert src[0] == {"messages": [u("q"), a("r 0")], "source": "tfds x train[0]"}
    assert src[1]["source"] == "tfds x train[2]"
    with pytest.raises(S.SourceError, match=r"tfds x train\[1\]: no_assistant_turn"):
        T.TfdsRecords(data, "tfds x train", C.normalizer("sft"), strict=True)
    lazy = grain.MapDataset.source(T.TfdsRecords(data, "t", C.normalizer("sft"),
                                                 validate=False))
    assert [r["messages"][-1]["content"] for r in lazy.to_iter_dataset()] == ["r 0", "r 2"]


def test_tfds_source_through_inputs(tok, monkeypatch):
    """data.source="tfds" for DPO (the prepared dataset faked: tfds is tested in test_sources)."""
    data = [{"prompt": b"q 0", "chosen": b"good 0", "rejected": b"bad 0"},
            {"prompt": b"q 1", "chosen": b"same", "rejected": b"same"},
            {"prompt": b"q 2", "chosen": b"good 2", "rejected": b"bad 2"}]
    asked = []

    def fake(name, data_dir, split):
        asked.append((name, data_dir, split))
        return data, f"{name}:1.0.0"

    monkeypatch.setattr(S, "tfds_data_source", fake)  # the name sources.py calls
    config = _config("tfds", stage="dpo", tfds_name="prefs", tfds_data_dir="/d")
    ds = inputs.train_dataset(config, "dpo", tok)
    assert asked == [("prefs", "/d", "train")]
    assert sorted(r[1] for r in _dpo_rows(ds, tok, 2)) == ["good 0<|end|>", "good 2<|end|>"]
    assert inputs.input_report(ds)["examples"] == [
        "tfds prefs:1.0.0 train[1]: chosen_equals_rejected (chosen and rejected are the same "
        "conversation)"]
    with pytest.raises(S.SourceError, match="tfds_name is empty"):
        inputs.train_dataset(_config("tfds", stage="dpo"), "dpo", tok)


# ----------------------------------------------------------------------------- fresh processes
_READ = """
import json, sys
sys.path.insert(0, {root!r})
from geb_jax.data.local_files import LocalSource
from geb_jax.data.chat_records import normalizer
kw = {kw}
if kw.pop("records", False):
    kw["convert"] = normalizer("sft")
src = LocalSource({path!r}, **kw)
print(json.dumps([src[i] for i in range(len(src))]))
"""


def _fresh_read(path, **kw):
    code = _READ.format(root=REPO_ROOT, path=str(path), kw=repr(kw))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=os.path.dirname(str(path)), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_each_local_reader_in_a_fresh_process(tmp_path):
    """Regression: `pa.compute` without `import pyarrow.compute` failed on every Parquet file
    with validate on - only in a process that had not imported pyarrow.compute elsewhere."""
    (tmp_path / "a.txt").write_text("a text\n\nsecond", encoding="utf-8")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "b text"}])
    write_jsonl(tmp_path / "c.jsonl.gz", [{"text": "c text"}], gz=True)
    pq.write_table(pa.table({"text": ["d text", None]}), tmp_path / "d.parquet")
    for name, text in (("a.txt", "a text\n\nsecond"), ("b.jsonl", "b text"),
                       ("c.jsonl.gz", "c text"), ("d.parquet", "d text")):
        for validate in (True, False):
            docs = _fresh_read(tmp_path / name, validate=validate)
            assert docs[0]["text"] == text, (name, validate)
    assert len(_fresh_read(tmp_path / "d.parquet", validate=True)) == 1  # the null: skipped
    rec = {"messages": [u("q"), a("r")]}
    write_jsonl(tmp_path / "e.jsonl", [rec])
    write_jsonl(tmp_path / "f.jsonl.gz", [rec], gz=True)
    _parquet(tmp_path / "g.parquet", [rec])
    for name in ("e.jsonl", "f.jsonl.gz", "g.parquet"):
        for validate in (True, False):
            docs = _fresh_read(tmp_path / name, validate=validate, records=True)
            assert [d["messages"] for d in docs] == [rec["messages"]], (name, validate)


def test_cli_sft_from_jsonl(tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl",
                       _sft_records("messages", 6) + [{"messages": [u("q")]}])
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "geb_jax.main", "--config", "configs/tiny.py",
           "--config.stages=sft", "--config.init_from=", "--config.data.source=local",
           f"--config.data.path={data}", f"--config.workdir={workdir}",
           "--config.train.steps=2", "--config.train.batch_size=2", "--config.train.seq_len=64",
           "--config.stage_overrides.sft.train.steps=2",
           "--config.stage_overrides.sft.optimizer.total_steps=2",
           "--config.stage_overrides.sft.optimizer.warmup_steps=1", "--config.eval.every=0",
           "--config.model.d_model=64", "--config.model.n_layers=2", "--config.model.n_heads=2",
           "--config.model.n_kv_heads=1", "--config.model.d_ff=128",
           "--config.model.max_seq_len=64"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "1 skipped (1 no_assistant_turn)" in proc.stderr  # the bad record, in the log
    with open(workdir / "sft" / "metrics.jsonl") as f:
        steps = [json.loads(line) for line in f]
    assert [r["step"] for r in steps if r["split"] == "train"][-1] == 2
    assert [r["no_assistant_turn"] for r in steps if r.get("event") == "input_skipped"] == [1]
    # the same command with bad_records=error stops with file:line and the reason
    proc = subprocess.run(cmd + ["--config.data.bad_records=error",
                                 f"--config.workdir={tmp_path / 'run2'}"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode != 0
    assert f"error: {data}:7: no_assistant_turn" in proc.stderr


def test_stage_overrides_give_sft_its_own_data(tmp_path, tok):
    """A pretrain,sft run: pretraining reads texts, SFT its records via stage_overrides."""
    from geb_jax.train.stages import stage_config
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": f"document {i}"} for i in range(9)])
    chats = write_jsonl(tmp_path / "chats.jsonl", _sft_records("sharegpt", 3))
    config = _config("local", texts)
    config.stages = "pretrain,sft"
    config.stage_overrides.sft.data = dict(path=chats)
    sft = stage_config(config, "sft")
    assert stage_config(config, "pretrain").data.path == texts
    ds = inputs.train_dataset(sft, "sft", tok)
    want = {f"reply sharegpt {i}<|end|>" for i in range(3)}
    assert _sft_replies(ds, tok, want) == want
