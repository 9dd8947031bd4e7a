"""Raw SFT / DPO records (one JSON object or Parquet row) -> the canonical forms the pipelines take.

Pure functions, no I/O: `to_sft(record, format)` and `to_dpo(record, format)` return

    SFT  {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
    DPO  {"prompt": [messages], "chosen": str, "rejected": str}

(what chat_pipeline.sft_dataset / dpo_dataset read), or raise `RecordError` whose `reason`
is one of the short stable codes in REASONS (counted per reason in the source's SkipReport).

Layouts (config.data.format; "auto" detects one per record from its keys, in this order):

SFT
    messages           {"messages": [{"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": "Hello!"}]}
                       OpenAI / Hugging Face chat. Roles system / user / assistant (ShareGPT's
                       human / gpt are accepted too); extra message keys ("name", ...) are
                       dropped; content may be a list of {"type": "text", "text": ...} parts.
    sharegpt           {"conversations": [{"from": "human", "value": "Hi"},
                                          {"from": "gpt", "value": "Hello!"}]}
                       from: system / human / gpt (also user / assistant); role / content keys
                       are accepted as well.
    alpaca             {"instruction": "Add 2 and 3.", "input": "", "output": "5"}
                       user turn = instruction, or instruction + "\\n\\n" + input when input is
                       non-empty; assistant turn = output. Optional "system" (str) becomes a
                       system message, optional "history" ([[user, assistant], ...]) the turns
                       before.
    prompt_completion  {"prompt": "2+3=", "completion": "5"}, or TRL's conversational form
                       {"prompt": [messages], "completion": [{"role": "assistant", ...}]}
                       (either side may be a string: prompt -> a user turn, completion -> an
                       assistant turn). The conversation is prompt + completion.
DPO
    preference         TRL: {"prompt": "2+3=", "chosen": "5", "rejected": "6"}, or with
                       message lists {"prompt": [messages], "chosen": [{"role": "assistant",
                       "content": "5"}], "rejected": [...]}; or Anthropic HH / TRL implicit
                       prompt: {"chosen": "\\n\\nHuman: 2+3?\\n\\nAssistant: 5",
                       "rejected": "\\n\\nHuman: 2+3?\\n\\nAssistant: 6"} (strings in HH's
                       "Human: / Assistant:" transcript form, or message lists). The prompt is
                       the part shared by both conversations; what follows must be exactly one
                       assistant turn on each side. A prompt string in HH form ("\\n\\nHuman:
                       ...\\n\\nAssistant:") is parsed into messages too (its trailing empty
                       "Assistant:" cue is dropped and the replies are stripped); next to a
                       prompt, whole HH transcripts that repeat it are split the same way.

Every record is checked: no assistant turn, an empty assistant turn, unknown roles, missing or
mistyped fields, chosen == rejected are RecordErrors, never silently trained on. A record longer
than seq_len is not an error here: the pipelines truncate it and count it (PipelineStats).
"""
from __future__ import annotations

import functools
import json
import re
from typing import Any, Mapping, Sequence

SFT_FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion")
DPO_FORMATS = ("preference",)
FORMATS = ("auto",) + SFT_FORMATS + DPO_FORMATS
ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"system": "system", "user": "user", "assistant": "assistant",
                "human": "user", "gpt": "assistant"}

# Reason codes (stable: they are the keys of skip counts in logs and reports).
MISSING_FIELD = "missing_field"          # the layout's key is absent (or prompt is empty)
BAD_TYPE = "bad_type"                    # a field or message has the wrong type
UNKNOWN_LAYOUT = "unknown_layout"        # format="auto" recognises none of the layouts' keys
WRONG_STAGE = "wrong_stage"              # a DPO pair in SFT data, or an SFT record in DPO data
UNKNOWN_ROLE = "unknown_role"
NO_MESSAGES = "no_messages"              # an empty conversation
NO_ASSISTANT_TURN = "no_assistant_turn"  # nothing to train on / no reply to compare
EMPTY_REPLY = "empty_reply"              # an assistant turn (or chosen / rejected) is blank
CHOSEN_EQUALS_REJECTED = "chosen_equals_rejected"
PROMPT_MISMATCH = "prompt_mismatch"      # chosen / rejected differ before their last turn
BAD_TRANSCRIPT = "bad_transcript"        # a string not in HH's "Human: / Assistant:" form
REASONS = (MISSING_FIELD, BAD_TYPE, UNKNOWN_LAYOUT, WRONG_STAGE, UNKNOWN_ROLE, NO_MESSAGES,
           NO_ASSISTANT_TURN, EMPTY_REPLY, CHOSEN_EQUALS_REJECTED, PROMPT_MISMATCH,
           BAD_TRANSCRIPT)

Message = dict


class RecordError(ValueError):
    """A record that cannot be used: `reason` (one of REASONS) and a human `detail`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail

    def __reduce__(self):  # picklable with both arguments
        return (RecordError, (self.reason, self.detail))


def check_format(fmt: str, stage: str) -> str:
    """`fmt` if it is valid for `stage` ("sft" / "dpo"), else ValueError naming the choices."""
    allowed = ("auto",) + (SFT_FORMATS if stage == "sft" else DPO_FORMATS)
    if fmt not in allowed:
        other = " (a DPO layout)" if fmt in DPO_FORMATS else (
            " (an SFT layout)" if fmt in SFT_FORMATS else "")
        raise ValueError(f"data.format={fmt!r}{other} cannot be read by the {stage} stage; "
                         f"expected one of {allowed}")
    return fmt


# ----------------------------------------------------------------------------- messages
def _text(value: Any, what: str) -> str:
    """A content value: a str, or a list of {"type": "text", "text": str} parts (joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        parts = []
        for part in value:
            if isinstance(part, str):
                parts.append(part)
            elif (isinstance(part, Mapping) and part.get("type", "text") == "text"
                  and isinstance(part.get("text"), str)):
                parts.append(part["text"])
            else:
                raise RecordError(BAD_TYPE, f"{what} has a content part that is not text: "
                                            f"{_short(part)}")
        return "".join(parts)
    raise RecordError(BAD_TYPE, f"{what} must be a string, got {type(value).__name__}")


def _columns_to_rows(value: Any) -> Any:
    """tfds Sequence features come as a dict of equal-length lists: turn it into a row list."""
    if isinstance(value, Mapping) and value and all(
            isinstance(v, Sequence) and not isinstance(v, (str, bytes)) for v in value.values()):
        lengths = {len(v) for v in value.values()}
        if len(lengths) == 1:
            n = lengths.pop()
            return [{k: v[i] for k, v in value.items()} for i in range(n)]
    return value


def _message(m: Any, i: int, what: str) -> Message:
    if not isinstance(m, Mapping):
        raise RecordError(BAD_TYPE, f"{what} message {i} must be an object with role and "
                                    f"content, got {type(m).__name__}")
    role_key = "role" if "role" in m else "from" if "from" in m else None
    content_key = "content" if "content" in m else "value" if "value" in m else None
    if role_key is None or content_key is None:
        raise RecordError(MISSING_FIELD, f"{what} message {i} needs 'role' and 'content' "
                          f"(or ShareGPT's 'from' and 'value'); its keys: "
                          f"{', '.join(map(repr, m)) or 'none'}")
    raw = m[role_key]
    role = ROLE_ALIASES.get(raw.strip().lower()) if isinstance(raw, str) else None
    if role is None:
        raise RecordError(UNKNOWN_ROLE, f"{what} message {i} has {role_key} {raw!r}; expected "
                                        f"one of {', '.join(ROLE_ALIASES)}")
    content = m[content_key]
    if content is None and role == "assistant":
        content = ""
    return {"role": role, "content": _text(content, f"{what} message {i} ({role})")}


def messages_of(value: Any, what: str) -> list[Message]:
    """A list of messages (role/content or from/value) -> canonical messages (may be empty)."""
    value = _columns_to_rows(value)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise RecordError(BAD_TYPE, f"{what} must be a list of messages, got "
                                    f"{type(value).__name__}")
    return [_message(m, i, what) for i, m in enumerate(value)]


def _check_conversation(messages: list[Message], what: str) -> list[Message]:
    if not messages:
        raise RecordError(NO_MESSAGES, f"{what} has no messages")
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not replies:
        raise RecordError(NO_ASSISTANT_TURN, f"{what} has no assistant turn: nothing to train "
                                             f"on")
    for i in replies:
        if not messages[i]["content"].strip():
            raise RecordError(EMPTY_REPLY, f"{what} message {i} is an empty assistant turn")
    return messages


def _short(value: Any, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n - 3] + "..."


def _field(record: Mapping, key: str, fmt: str) -> Any:
    if key not in record or record[key] is None:
        raise RecordError(MISSING_FIELD, f"a {fmt} record needs {key!r}; its keys: "
                          f"{', '.join(map(repr, record)) or 'none'}")
    return record[key]


def _keys(record: Mapping) -> str:
    return ", ".join(map(repr, record)) or "none"


# ----------------------------------------------------------------------------- HH transcripts
_HH_MARK = re.compile(r"(?:\A|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def looks_like_hh(text: Any) -> bool:
    """True for a string in Anthropic HH's "\\n\\nHuman: ...\\n\\nAssistant: ..." form."""
    if not isinstance(text, str):
        return False
    return bool(re.match(r"\s*(Human|Assistant):", text)) or (
        "\n\nHuman:" in text and "\n\nAssistant:" in text)


def parse_hh(text: str, what: str = "transcript") -> list[Message]:
    """An HH transcript -> messages (Human -> user, Assistant -> assistant; contents stripped).

    The final turn is kept even when empty (a trailing "Assistant:" generation cue); text before
    the first "Human:" / "Assistant:" is a BAD_TRANSCRIPT.
    """
    if not isinstance(text, str):
        raise RecordError(BAD_TYPE, f"{what} must be a string, got {type(text).__name__}")
    body = text.lstrip()
    parts = _HH_MARK.split(body)
    if len(parts) < 3 or parts[0].strip():
        raise RecordError(BAD_TRANSCRIPT, f"{what} is not a 'Human: ... Assistant: ...' "
                                          f"transcript: {_short(text)}")
    return [{"role": _HH_ROLES[parts[k]], "content": parts[k + 1].strip()}
            for k in range(1, len(parts), 2)]


# ----------------------------------------------------------------------------- SFT
def _sft_messages(record: Mapping) -> list[Message]:
    return messages_of(_field(record, "messages", "messages"), "messages")


def _sft_sharegpt(record: Mapping) -> list[Message]:
    return messages_of(_field(record, "conversations", "sharegpt"), "conversations")


def _sft_alpaca(record: Mapping) -> list[Message]:
    instruction = _text(_field(record, "instruction", "alpaca"), "instruction")
    output = _text(_field(record, "output", "alpaca"), "output")
    extra = record.get("input")
    extra = "" if extra is None else _text(extra, "input")
    messages: list[Message] = []
    system = record.get("system")
    if system is not None and _text(system, "system").strip():
        messages.append({"role": "system", "content": _text(system, "system")})
    history = record.get("history") or []
    if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
        raise RecordError(BAD_TYPE, f"alpaca 'history' must be a list of [user, assistant] "
                                    f"pairs, got {type(history).__name__}")
    for i, turn in enumerate(history):
        if (isinstance(turn, (str, bytes)) or not isinstance(turn, Sequence)
                or len(turn) != 2):
            raise RecordError(BAD_TYPE, f"alpaca history[{i}] must be a [user, assistant] "
                                        f"pair, got {_short(turn)}")
        messages += [{"role": "user", "content": _text(turn[0], f"history[{i}][0]")},
                     {"role": "assistant", "content": _text(turn[1], f"history[{i}][1]")}]
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return messages + [{"role": "user", "content": user},
                       {"role": "assistant", "content": output}]


def _side(value: Any, role: str, what: str) -> list[Message]:
    """A prompt / completion: a string (one `role` turn) or a message list."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return messages_of(value, what)


def _sft_prompt_completion(record: Mapping) -> list[Message]:
    prompt = _side(_field(record, "prompt", "prompt_completion"), "user", "prompt")
    completion = _side(_field(record, "completion", "prompt_completion"), "assistant",
                       "completion")
    if not any(m["role"] == "assistant" for m in completion):
        raise RecordError(NO_ASSISTANT_TURN, "completion has no assistant turn")
    return prompt + completion


_SFT = {"messages": _sft_messages, "sharegpt": _sft_sharegpt, "alpaca": _sft_alpaca,
        "prompt_completion": _sft_prompt_completion}


def detect_sft_format(record: Mapping) -> str:
    """The SFT layout of a record by its keys (RecordError when none fits)."""
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    if "chosen" in record and "rejected" in record:
        raise RecordError(WRONG_STAGE, "a preference pair (chosen / rejected) in SFT data: "
                                       "use it in the dpo stage")
    if "prompt" in record or "completion" in record:
        return "prompt_completion"
    raise RecordError(UNKNOWN_LAYOUT, f"no SFT layout fits the keys {_keys(record)}: expected "
                      f"'messages', 'conversations', 'instruction'/'output' or "
                      f"'prompt'/'completion'")


def to_sft(record: Any, format: str = "auto") -> dict:
    """One raw record -> {"messages": [...]} (canonical), or RecordError."""
    if not isinstance(record, Mapping):
        raise RecordError(BAD_TYPE, f"a record must be an object, got {type(record).__name__}")
    fmt = detect_sft_format(record) if format == "auto" else format
    if fmt not in _SFT:
        check_format(fmt, "sft")
    messages = _check_conversation(_SFT[fmt](record), fmt)
    return {"messages": messages}


# ----------------------------------------------------------------------------- DPO
def _dpo_side(value: Any, key: str, hh: bool) -> list[Message]:
    """chosen / rejected: a message list, an HH transcript, or (hh False) a reply string."""
    if isinstance(value, str):
        if hh:
            return parse_hh(value, key)
        return [{"role": "assistant", "content": value}]
    return messages_of(value, key)


def _starts_with_human(value: Any) -> bool:
    """A whole HH transcript ("\n\nHuman: ..."), not a reply that follows a prompt."""
    return isinstance(value, str) and value.lstrip().startswith("Human:")


def _prompt_side(record: Mapping) -> tuple[list[Message], bool]:
    """(prompt messages, whether they came from an HH transcript)."""
    prompt = record["prompt"]
    if isinstance(prompt, str):
        if looks_like_hh(prompt):
            messages = parse_hh(prompt, "prompt")
            if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
                messages = messages[:-1]  # the generation cue "\n\nAssistant:"
            return messages, True
        return [{"role": "user", "content": prompt}], False
    return messages_of(prompt, "prompt"), False


def _reply(tail: list[Message], key: str) -> str:
    if not tail:
        raise RecordError(PROMPT_MISMATCH, f"{key} has no turn after the shared prompt (one "
                                           f"conversation is a prefix of the other)")
    if len(tail) > 1:
        raise RecordError(PROMPT_MISMATCH, f"chosen and rejected differ before their last "
                          f"turn ({key} has {len(tail)} turns after the shared prompt; a pair "
                          f"must differ only in its final assistant turn)")
    if tail[0]["role"] != "assistant":
        raise RecordError(NO_ASSISTANT_TURN, f"{key} does not end with an assistant turn")
    return tail[0]["content"]


def shared_prefix(a: Sequence[Message], b: Sequence[Message]) -> int:
    """How many leading messages two conversations have in common (same role and content)."""
    n = 0
    for x, y in zip(a, b):
        if x["role"] != y["role"] or x["content"] != y["content"]:
            break
        n += 1
    return n


def split_pair(chosen: list[Message], rejected: list[Message]) -> dict:
    """Two full conversations -> {"prompt", "chosen", "rejected"}: the prompt is their longest
    shared prefix, and each must continue it with exactly one assistant turn."""
    if [(m["role"], m["content"]) for m in chosen] == \
            [(m["role"], m["content"]) for m in rejected]:
        raise RecordError(CHOSEN_EQUALS_REJECTED, "chosen and rejected are the same "
                                                  "conversation")
    n = shared_prefix(chosen, rejected)
    if n and n == min(len(chosen), len(rejected)) and chosen[n - 1]["role"] == "assistant":
        n -= 1  # e.g. [u, a] vs [u, a, ...]: reported by _reply below as a prefix
    return {"prompt": list(chosen[:n]), "chosen": _reply(chosen[n:], "chosen"),
            "rejected": _reply(rejected[n:], "rejected")}


def to_dpo(record: Any, format: str = "auto") -> dict:
    """One raw record -> {"prompt": [messages], "chosen": str, "rejected": str}, or RecordError."""
    if not isinstance(record, Mapping):
        raise RecordError(BAD_TYPE, f"a record must be an object, got {type(record).__name__}")
    if format not in ("auto", "preference"):
        check_format(format, "dpo")
    if format == "auto" and not ("chosen" in record or "rejected" in record):
        if any(k in record for k in ("messages", "conversations", "instruction", "completion")):
            raise RecordError(WRONG_STAGE, f"an SFT record (keys {_keys(record)}) in DPO data: "
                                           f"a pair needs 'chosen' and 'rejected'")
        raise RecordError(UNKNOWN_LAYOUT, f"no DPO layout fits the keys {_keys(record)}: "
                                          f"expected 'chosen' and 'rejected' (and 'prompt')")
    chosen_raw = _field(record, "chosen", "preference")
    rejected_raw = _field(record, "rejected", "preference")
    has_prompt = record.get("prompt") is not None
    if has_prompt:
        prompt, hh = _prompt_side(record)
        strip = hh  # HH-form prompt: replies are " reply" continuations of "Assistant:"
        full = _starts_with_human(chosen_raw) and _starts_with_human(rejected_raw)
        chosen = _dpo_side(chosen_raw, "chosen", hh=full)
        rejected = _dpo_side(rejected_raw, "rejected", hh=full)
        if full:  # whole HH transcripts next to their prompt: they normally repeat it
            n = len(prompt)
            if shared_prefix(prompt, chosen) == n and shared_prefix(prompt, rejected) == n:
                prompt = []
        elif strip:
            chosen = [dict(m, content=m["content"].strip()) for m in chosen]
            rejected = [dict(m, content=m["content"].strip()) for m in rejected]
        # TRL lets chosen / rejected repeat the prompt or carry shared turns: all go to the prompt
        pair = split_pair(prompt + chosen, prompt + rejected)
    else:
        hh = isinstance(chosen_raw, str) or isinstance(rejected_raw, str)
        pair = split_pair(_dpo_side(chosen_raw, "chosen", hh),
                          _dpo_side(rejected_raw, "rejected", hh))
    if not pair["prompt"]:
        raise RecordError(MISSING_FIELD, "the pair has no prompt: give 'prompt', or chosen / "
                                         "rejected conversations that share their first turns")
    for key in ("chosen", "rejected"):
        if not pair[key].strip():
            raise RecordError(EMPTY_REPLY, f"{key} is an empty reply")
    if pair["chosen"] == pair["rejected"]:
        raise RecordError(CHOSEN_EQUALS_REJECTED, "chosen and rejected are the same reply")
    return pair


# ----------------------------------------------------------------------------- helpers
def normalizer(stage: str, format: str = "auto"):
    """A picklable record -> canonical function for `stage` ("sft" / "dpo"), format checked."""
    if stage not in ("sft", "dpo"):
        raise ValueError(f"chat records are read by the sft and dpo stages, not {stage!r}")
    check_format(format, stage)
    return functools.partial(to_sft if stage == "sft" else to_dpo, format=format)


def canonical_text(record: Mapping) -> str:
    """A stable string of a canonical record (for the train / valid hash split)."""
    keys = ("messages",) if "messages" in record else ("prompt", "chosen", "rejected")
    return json.dumps({k: record[k] for k in keys}, ensure_ascii=False, sort_keys=True)


__all__ = ["RecordError", "REASONS", "FORMATS", "SFT_FORMATS", "DPO_FORMATS", "to_sft", "to_dpo",
           "detect_sft_format", "parse_hh", "looks_like_hh", "split_pair", "shared_prefix",
           "messages_of", "normalizer", "canonical_text", "check_format"]
