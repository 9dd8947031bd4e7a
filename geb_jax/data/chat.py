"""Chat template on the tokenizer's role tokens, with the assistant-only training mask.

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}``.
It is laid out as ::

    <s> <|system|> system text <|end|> <|user|> question <|end|>
        <|assistant|> reply <|end|> ... </s>

(spaces and the line break are for reading only; the pieces follow each other directly).

* every message is its role token, its content, then ``<|end|>``; there is no newline or other
  glue text between the pieces, so `render_chat` is exactly the text of the token sequence:
  ``tokenizer.decode(encode_chat(tok, msgs)[0]) == render_chat(msgs)`` (bos/eos decode to "").
* `encode_chat` returns the ids and a 0/1 mask that is 1 exactly on the tokens of assistant
  replies: their content and their closing ``<|end|>`` (so the model learns to stop), and 0 on
  bos/eos, on every role token (including ``<|assistant|>``, which the prompt supplies at
  generation time) and on all system / user tokens. SFT trains only where the mask is 1.
* `chat_prompt` is the generation prompt: bos, the messages, then ``<|assistant|>``; sample
  until ``<|end|>``.
* Content is encoded so that it can never produce a role token: a literal "<|user|>" typed by a
  user is spelled with byte pieces (it still decodes to the same text). `Tokenizer.encode` alone
  would turn it into the special id, which would let message text forge turns.

A published model's tokenizer carries its own Jinja chat template (`tokenizer.chat_template`,
from the GGUF or tokenizer_config.json): then the same functions render that template instead
(geb_jax.data.chat_template), with the mask on each assistant reply and its end-of-turn text,
so SFT, DPO, evaluation and the chat CLI speak the model's own format.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from geb_jax.data import chat_template
from geb_jax.data.tokenizer import CHAT_ROLE_TOKENS, Tokenizer

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_TOKEN = "<|end|>"
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in CHAT_ROLE_TOKENS) + ")")

Message = Mapping[str, Any]


def validate_messages(messages: Any, what: str = "conversation") -> list[Message]:
    """Check a conversation; ValueError names the offending message index. Returns a list."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"{what} must be a list of {{'role', 'content'}} messages, got "
                         f"{type(messages).__name__}")
    if len(messages) == 0:
        raise ValueError(f"{what} has no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"{what}: message {i} must be a dict with 'role' and 'content', "
                             f"got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"{what}: message {i} has unknown role {role!r}; expected one of "
                             f"{ROLES}")
        content = m.get("content")
        if not isinstance(content, str):
            raise ValueError(f"{what}: message {i} ({role}) content must be a str, got "
                             f"{type(content).__name__}")
    return list(messages)


def render_chat(messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """The conversation as text, exactly the template `encode_chat` tokenizes (no bos/eos)."""
    messages = validate_messages(messages)
    out = "".join(f"{ROLE_TOKENS[m['role']]}{m['content']}{END_TOKEN}" for m in messages)
    return out + (ROLE_TOKENS["assistant"] if add_generation_prompt else "")


def encode_content(tokenizer: Tokenizer, text: str) -> list[int]:
    """Message text -> ids; role-token strings inside it are spelled with byte pieces."""
    ids: list[int] = []
    for k, part in enumerate(_SPECIAL_RE.split(text)):
        if not part:
            continue
        if k % 2:  # a literal special-token string: its UTF-8 bytes, one byte piece each
            ids.extend(tokenizer.piece_to_id(f"<0x{b:02X}>") for b in part.encode("utf-8"))
        else:
            ids.extend(tokenizer.encode(part))
    return ids


def _role_id(tokenizer: Tokenizer, role: str) -> int:
    return tokenizer.piece_to_id(ROLE_TOKENS[role])


def uses_template(tokenizer) -> bool:
    """True for a published model's tokenizer with its own chat template."""
    return getattr(tokenizer, "chat_template", None) is not None


def reply_stop_ids(tokenizer) -> tuple[int, ...]:
    """Ids that end an assistant reply: ``<|end|>`` and eos, or the model's end-of-turn ids."""
    if uses_template(tokenizer):
        return tuple(tokenizer.stop_ids)
    return (tokenizer.end_id, tokenizer.eos_id)


def encode_chat(tokenizer: Tokenizer, messages: Sequence[Message], *, add_bos: bool = True,
                add_eos: bool = True) -> tuple[list[int], list[int]]:
    """(ids, assistant_mask): mask 1 exactly on assistant contents and their ``<|end|>``
    (with a model's template: its end-of-turn text; bos/eos as that template writes them)."""
    messages = validate_messages(messages)
    if uses_template(tokenizer):
        return chat_template.template_encode_chat(tokenizer, messages)
    ids: list[int] = [tokenizer.bos_id] if add_bos else []
    mask: list[int] = [0] * len(ids)
    for m in messages:
        content = encode_content(tokenizer, m["content"]) + [tokenizer.end_id]
        on = 1 if m["role"] == "assistant" else 0
        ids.append(_role_id(tokenizer, m["role"]))
        mask.append(0)
        ids.extend(content)
        mask.extend([on] * len(content))
    if add_eos:
        ids.append(tokenizer.eos_id)
        mask.append(0)
    return ids, mask


def chat_prompt(tokenizer: Tokenizer, messages: Sequence[Message], *,
                add_bos: bool = True) -> list[int]:
    """Ids of the messages followed by ``<|assistant|>``: what a model continues to reply."""
    if uses_template(tokenizer):
        return chat_template.template_chat_prompt(tokenizer, validate_messages(messages))
    ids, _ = encode_chat(tokenizer, messages, add_bos=add_bos, add_eos=False)
    return ids + [tokenizer.assistant_id]


def encode_reply(tokenizer: Tokenizer, text: str,
                 prompt_messages: Sequence[Message] = ()) -> list[int]:
    """An assistant reply as it follows `chat_prompt(prompt_messages)`: its content then
    ``<|end|>`` (a template's reply may depend on the conversation, so it is passed too)."""
    if not isinstance(text, str):
        raise ValueError(f"a reply must be a str, got {type(text).__name__}")
    if uses_template(tokenizer):
        return chat_template.template_encode_reply(tokenizer, list(prompt_messages), text)
    return encode_content(tokenizer, text) + [tokenizer.end_id]
