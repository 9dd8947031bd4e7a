"""Chat formatting driven by a model's own Jinja chat template, rendered as transformers does.

Published models carry their template (GGUF ``tokenizer.chat_template``, Hugging Face
``tokenizer_config.json`` ``chat_template``). This module gives the three operations of
`geb_jax.data.chat` for such a template, on a tokenizer ``tok`` that has ``encode(text,
add_bos=False, add_eos=False, parse_special=True)``, ``bos_id``, ``eos_id``, ``id_to_piece``,
``stop_ids``, ``add_bos`` and ``chat_template``:

* `render_template`: the text, from jinja2's ImmutableSandboxedEnvironment with transformers'
  settings (trim_blocks, lstrip_blocks, loopcontrols, ``{% generation %}``, ``raise_exception``,
  ``strftime_now``, its ``tojson``, ``dict`` and ``namespace``). Every failure of the template is a
  `ChatTemplateError` (a ValueError); a sandbox violation is also a jinja2 ``SecurityError``.
* `template_encode_chat` -> (ids, mask): the ids of the whole rendered text (tokenized once with
  special tokens parsed, as apply_chat_template(tokenize=True) and inference see it), bos put in
  front only when the tokenizer adds one and the text does not already start with it (no double
  bos; transformers itself never adds one). The mask is 1 on each assistant message's content
  and the end-of-turn text right after it (e.g. ``<|im_end|>``, not the ``\\n`` that follows),
  TRL's assistant-only rule. Templates with ``{% generation %}`` blocks mark those blocks instead,
  exactly like ``return_assistant_tokens_mask``. A token straddling a span edge (SentencePiece's
  ``▁Hello`` after the glue space) counts as inside, as transformers' char_to_token does.
* `template_chat_prompt`: ids of the messages plus the generation prompt.
* `template_encode_reply`: ids of a reply as it follows that prompt, up to and including the
  end-of-turn text; ``chat_prompt + reply`` are the first ids of `template_encode_chat` of the
  conversation (the template's glue after the end of turn, e.g. ChatML's ``\\n``, is not part of
  the reply, so the reply is what the model generates before it stops).

Without generation blocks the assistant spans come from render differences: the messages before
turn i with the generation prompt must be a prefix of the messages up to turn i, and rendering
the turn with a probe string in place of its content locates the content and the template text
around it. Templates that rewrite content (other than trimming it), or render earlier turns
differently once later ones follow, raise a ValueError saying so.

Like transformers' default, message text is tokenized with special tokens parsed: a user who
types ``<|im_end|>`` gets that token.
"""
from __future__ import annotations

import contextvars
import functools
import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.utils
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_PROBE = "\ue000\ue001\ue002"  # private-use: uncased, not space, in no template text


class ChatTemplateError(ValueError):
    """The model's chat template failed to compile or render, or cannot give an assistant mask."""


class ChatTemplateSecurityError(ChatTemplateError, SecurityError):
    """The model's chat template tried something the sandbox forbids (attribute access, ...)."""


class _Raised(TemplateError):
    """`raise_exception` from inside a template: its message is the template's own words."""


# -- the environment, as transformers builds it ---------------------------------------------

_TRACK: contextvars.ContextVar = contextvars.ContextVar("geb_chat_template_track", default=None)


class _Track:
    """Characters yielded so far and the (start, end) spans of {% generation %} blocks."""

    def __init__(self):
        self.pos = 0
        self.spans: list[tuple[int, int]] = []


class _GenerationBlocks(Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body and records where it went."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller):
        text = caller()
        track = _TRACK.get()
        if track is not None:
            track.spans.append((track.pos, track.pos + len(text)))
        return text


def _raise_exception(message):
    raise _Raised(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson HTML-escapes; transformers' does not (and takes these options)
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """``dict(...)`` without handing the template the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """A namespace that refuses underscore attributes (a route to CPython internals)."""

    def __init__(*args, **kwargs):  # pylint: disable=no-method-argument
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlocks, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_TemplateDict(), namespace=_TemplateNamespace)
    return env


def _wrap(err: Exception) -> ChatTemplateError:
    """A clear error naming the model's chat template and the jinja message."""
    if isinstance(err, SecurityError):
        return ChatTemplateSecurityError(
            f"the model's chat template tried an operation the sandbox forbids: {err}")
    if isinstance(err, _Raised):
        return ChatTemplateError(f"the model's chat template rejected the conversation: {err}")
    if isinstance(err, TemplateSyntaxError):
        return ChatTemplateError(
            f"the model's chat template does not compile (line {err.lineno}): {err.message}")
    return ChatTemplateError(
        f"the model's chat template failed to render: {type(err).__name__}: {err}")


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    """Compiled once per template text (tokenizing a data set renders it many times)."""
    try:
        return _environment().from_string(template)
    except TemplateError as err:
        raise _wrap(err) from err


def _plain(value: Any) -> Any:
    """Only JSON-like data reaches the sandbox (rich objects may carry unsafe methods)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def _render(template: str, messages: Sequence[Mapping], add_generation_prompt: bool,
            variables: Mapping[str, Any], track: _Track | None = None) -> str:
    compiled = _compile(template)
    context = {"tools": None, "documents": None, **_plain(dict(variables)),
               "messages": _plain(list(messages)), "add_generation_prompt": add_generation_prompt}
    token = _TRACK.set(track)
    try:
        if track is None:
            return compiled.render(**context)
        parts = []
        for block in compiled.generate(**context):
            parts.append(block)
            track.pos += len(block)
        return "".join(parts)
    except ChatTemplateError:
        raise
    except Exception as err:  # pylint: disable=broad-except  (any failure is the template's)
        raise _wrap(err) from err
    finally:
        _TRACK.reset(token)


def render_template(template: str, messages: Sequence[Mapping], *,
                    add_generation_prompt: bool = False, bos_token: str = "",
                    eos_token: str = "", **extra) -> str:
    """The conversation as the model's template writes it (transformers' tokenize=False text)."""
    return _render(template, messages, add_generation_prompt,
                   {"bos_token": bos_token, "eos_token": eos_token, **extra})


# -- template-driven chat formatting ---------------------------------------------------------

def validate_template_messages(messages: Any, what: str = "conversation") -> list[dict]:
    """Plain message dicts (None-valued keys dropped, as transformers does); role and content
    must be strings. Roles other than system/user/assistant pass through: the template decides."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"{what} must be a list of {{'role', 'content'}} messages, got "
                         f"{type(messages).__name__}")
    if not messages:
        raise ValueError(f"{what} has no messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"{what}: message {i} must be a dict, got {type(m).__name__}")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise ValueError(f"{what}: message {i} needs a str 'role' (one of {ROLES}, or a "
                             f"role the chat template knows), got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"{what}: message {i} ({m['role']}) content must be a str, got "
                             f"{type(m.get('content')).__name__}")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def _piece(tok, i) -> str:
    return "" if i is None or i < 0 else tok.id_to_piece(i)


def _setup(tok, template: str | None, variables: Mapping[str, Any]) -> tuple[str, dict]:
    """The template to use and the variables it sees (bos_token/eos_token from ``tok``)."""
    template = template if template is not None else getattr(tok, "chat_template", None)
    if not template:
        raise ValueError("this tokenizer has no chat template (GGUF tokenizer.chat_template / "
                         "tokenizer_config.json chat_template); pass template=")
    return template, {"bos_token": _piece(tok, tok.bos_id),
                      "eos_token": _piece(tok, tok.eos_id), **variables}


def _bos_lead(tok, text: str) -> list[int]:
    """[bos_id] when the tokenizer adds a bos and the template did not write one, else []:
    never a double bos (llama.cpp strips a rendered bos before adding its own)."""
    bos = _piece(tok, tok.bos_id)
    return [tok.bos_id] if getattr(tok, "add_bos", False) and bos and \
        not text.startswith(bos) else []


def _encode(tok, text: str) -> list[int]:
    """Rendered text -> ids, special tokens parsed, at most one bos."""
    return _bos_lead(tok, text) + tok.encode(text, add_bos=False, add_eos=False,
                                             parse_special=True)


def _end_of_turn(tail: str, tok) -> int:
    """Length of the end-of-turn text at the start of ``tail``: through the first stop token
    (eos or stop_ids); without one, ``tail`` less trailing whitespace."""
    stops = {_piece(tok, i) for i in set(getattr(tok, "stop_ids", None) or ()) | {tok.eos_id}}
    found = [tail.index(s) + len(s) for s in stops if s and s in tail]
    return min(found) if found else len(tail.rstrip())


@dataclass(frozen=True)
class _Reply:
    prompt: str   # messages before the reply, with the generation prompt
    head: str     # template text between the prompt and the content (Llama-2's " ")
    content: str  # the content as rendered: verbatim, or stripped by templates that trim
    end: str      # end-of-turn text closing the reply (ChatML's "<|im_end|>")


def _reply_parts(tok, template: str, variables: Mapping, before: list[dict],
                 message: dict) -> _Reply:
    """Split the assistant ``message`` after ``before`` into prompt / head / content / end."""
    prompt = _render(template, before, True, variables)
    full = _render(template, before + [message], False, variables)
    probe = _render(template, before + [{**message, "content": _PROBE}], False, variables)
    if not (full.startswith(prompt) and probe.startswith(prompt)):
        raise ChatTemplateError(
            "the model's chat template does not render the conversation before an assistant "
            "turn (with the generation prompt) as the start of the conversation with it, so "
            "the reply cannot be told apart from the prompt")
    head, found, tail = probe[len(prompt):].partition(_PROBE)
    if not found or _PROBE in tail:
        raise ChatTemplateError("the model's chat template does not write an assistant "
                                "message's content exactly once after the generation prompt")
    content = message["content"]
    for shown in (content, content.strip()):
        if full[len(prompt):] == head + shown + tail:
            return _Reply(prompt, head, shown, tail[:_end_of_turn(tail, tok)])
    raise ChatTemplateError("the model's chat template does not render assistant content "
                            "verbatim (nor merely stripped), so the reply tokens cannot be "
                            "located for the assistant mask")


def _boundary(tok, text: str, ids: list[int], c: int, step: int) -> int:
    """Index into ``ids`` of the token boundary at char ``c``; where a token straddles ``c``,
    the nearest one moving by ``step`` (-1 for a span start, +1 for an end), so the token falls
    inside the span."""
    while 0 < c < len(text):
        head = tok.encode(text[:c], add_bos=False, add_eos=False, parse_special=True)
        k = next((j for j, (a, b) in enumerate(zip(head, ids)) if a != b), min(len(head),
                                                                              len(ids)))
        if k == len(head):
            return k
        j = _respelled(tok, head, ids, k)
        if j is not None:
            return j
        c += step
    return 0 if c <= 0 else len(ids)


def _respelled(tok, head: list[int], ids: list[int], k: int) -> int | None:
    """j such that ids[:j] spells what ``head`` does, though ``head`` (the prefix encoded alone)
    ends in other tokens (GPT-2's regex makes a final "\\n\\n" one token, but "\\n" "\\n" before
    a word). Needs ``tok.decode``; one shared token of context keeps decoders' start rules equal."""
    decode = getattr(tok, "decode", None)
    if decode is None:
        return None
    ctx = max(k - 1, 0)
    want = decode(head[ctx:])
    for j in range(k + 1, min(len(ids), k + 4 * (len(head) - k) + 4) + 1):
        got = decode(ids[ctx:j])
        if got == want:
            return j
        if len(got) > len(want) + 1:
            break
    return None


def _encode_spans(tok, text: str, spans: Sequence[tuple[int, int]]
                  ) -> tuple[list[int], list[int]]:
    """(ids of the whole ``text``, mask of the tokens in ``spans``).

    Fast path: tokenize the pieces between span edges; when their ids join up to the whole
    text's ids the edges are token boundaries. Otherwise (a token crosses an edge) keep the
    whole text's ids, which is what inference sees, and find each edge by re-encoding
    prefixes."""
    ids = tok.encode(text, add_bos=False, add_eos=False, parse_special=True)
    spans = [(a, b) for a, b in spans if b > a]
    cuts = [0] + [c for span in spans for c in span] + [len(text)]
    joined, mask = [], []
    for k in range(len(cuts) - 1):
        piece = text[cuts[k]:cuts[k + 1]]
        piece_ids = tok.encode(piece, add_bos=False, add_eos=False,
                               parse_special=True) if piece else []
        joined += piece_ids
        mask += [k % 2] * len(piece_ids)
    if joined != ids:
        mask = [0] * len(ids)
        for a, b in spans:
            lo, hi = _boundary(tok, text, ids, a, -1), _boundary(tok, text, ids, b, +1)
            mask[lo:hi] = [1] * (hi - lo)
    lead = _bos_lead(tok, text)
    return lead + ids, [0] * len(lead) + mask


def template_encode_chat(tok, messages: Sequence[Mapping], *, template: str | None = None,
                         **variables) -> tuple[list[int], list[int]]:
    """(ids, mask) for SFT: mask 1 on assistant contents and their end-of-turn text."""
    template, variables = _setup(tok, template, variables)
    messages = validate_template_messages(messages)
    if _GENERATION_TAG.search(template):  # the template marks what to train on
        track = _Track()
        text = _render(template, messages, False, variables, track)
        return _encode_spans(tok, text, track.spans)
    text = _render(template, messages, False, variables)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        r = _reply_parts(tok, template, variables, messages[:i], m)
        start = len(r.prompt) + len(r.head)
        end = start + len(r.content) + len(r.end)
        if text[:end] != r.prompt + r.head + r.content + r.end:
            raise ChatTemplateError(
                f"the model's chat template renders assistant message {i} differently once "
                "later messages follow it, so its tokens cannot be masked without "
                "{% generation %} blocks")
        spans.append((start, end))
    return _encode_spans(tok, text, spans)


def template_chat_prompt(tok, messages: Sequence[Mapping], *, template: str | None = None,
                         **variables) -> list[int]:
    """Ids of the messages and the generation prompt: what the model continues to reply."""
    template, variables = _setup(tok, template, variables)
    return _encode(tok, _render(template, validate_template_messages(messages), True,
                                variables))


def template_encode_reply(tok, messages_before: Sequence[Mapping], reply: str, *,
                          template: str | None = None, **variables) -> list[int]:
    """Ids of ``reply`` as it follows template_chat_prompt(messages_before), through its
    end-of-turn text (for DPO and preference scoring)."""
    template, variables = _setup(tok, template, variables)
    before = validate_template_messages(messages_before, "messages before the reply")
    message, = validate_template_messages([{"role": "assistant", "content": reply}], "reply")
    r = _reply_parts(tok, template, variables, before, message)
    prompt_ids = _encode(tok, r.prompt)
    ids = _encode(tok, r.prompt + r.head + r.content + r.end)
    if ids[:len(prompt_ids)] != prompt_ids:
        raise ChatTemplateError("the reply's first token merges with the end of the chat "
                                "template's generation prompt; it cannot be scored after it")
    return ids[len(prompt_ids):]
