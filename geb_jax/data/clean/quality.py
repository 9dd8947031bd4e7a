"""English quality heuristics: Gopher (Rae et al. 2021, MassiveText) and C4 (Raffel et al. 2020).

Both apply only to documents with lang == "en"; other documents pass unchanged. Pure functions
`f(doc, *, thresholds...) -> doc | None`, like every filter of the chain.

Two deliberate differences from the published C4 rules, both because they drop clean text:
  * C4 judges each *line*, which on the web is a paragraph. Hard-wrapped text (books, e-mail,
    dictionaries: every line ~70 characters) would lose almost every line, so with
    `join_wrapped=True` consecutive lines are judged together as one logical line while a line
    "continues": it lacks terminal punctuation and is long (>= `wrap_min_chars`), ends with
    , ; : or a dash, or the next line starts in lower case, or both lines are indented (verse,
    quotations). Short unpunctuated lines (menus, buttons) stay separate and are judged alone.
    A line ending in a closing bracket or quote after . ! ? ("... (see below.)") also counts
    as terminated, and so does a (logical) line ending with ":" that introduces a quotation or
    a list (`colon_ends_line=True`; it still needs `min_words_per_line` words).
  * C4 drops every page containing "{" (to remove code). `curly_braces="code"` (the default)
    drops only pages with a code-like brace line (a line ending with "{" or starting with "}"),
    so prose cross-references such as "{bit bucket}" survive; "any" is the original rule.
"""
from __future__ import annotations

import re

from geb_jax.data.clean._text import line_continues

GOPHER_STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))
_BULLETS = ("•", "●", "◦", "‣", "▪", "-", "*", "·", "–", "—")
_ELLIPSES = ("...", "…", ". . .")


def _is_en(doc: dict) -> bool:
    return doc.get("lang") == "en"


# -------------------------------------------------------------------------------- Gopher

def gopher_stats(text: str) -> dict:
    words = text.split()
    n = len(words)
    stripped = [w.strip("\"'()[]{}<>,.;:!?“”‘’«»-—–*") for w in words]
    lens = [len(w) for w in stripped if w]
    lines = [ln for ln in text.split("\n") if ln.strip()]
    lower = {w.lower() for w in stripped}
    return dict(
        words=n,
        mean_word_length=(sum(lens) / len(lens)) if lens else 0.0,
        symbol_ratio=(text.count("#") + sum(text.count(e) for e in _ELLIPSES)) / max(n, 1),
        bullet_lines=(sum(ln.lstrip().startswith(_BULLETS) for ln in lines) / len(lines))
        if lines else 0.0,
        ellipsis_lines=(sum(ln.rstrip().endswith(_ELLIPSES) for ln in lines) / len(lines))
        if lines else 0.0,
        alpha_words=(sum(any(c.isalpha() for c in w) for w in words) / n) if n else 0.0,
        stop_words=len(lower & GOPHER_STOP_WORDS),
    )


def gopher_filter(doc: dict, *, min_words: int = 50, max_words: int = 100_000,
                  min_mean_word_length: float = 3.0, max_mean_word_length: float = 10.0,
                  max_symbol_ratio: float = 0.1, max_bullet_lines: float = 0.9,
                  max_ellipsis_lines: float = 0.3, min_alpha_words: float = 0.8,
                  min_stop_words: int = 2) -> dict | None:
    """Drops English documents that fail any of Gopher's quality rules (no edits)."""
    if not _is_en(doc):
        return doc
    s = gopher_stats(doc["text"])
    ok = (min_words <= s["words"] <= max_words
          and min_mean_word_length <= s["mean_word_length"] <= max_mean_word_length
          and s["symbol_ratio"] < max_symbol_ratio
          and s["bullet_lines"] <= max_bullet_lines
          and s["ellipsis_lines"] < max_ellipsis_lines
          and s["alpha_words"] >= min_alpha_words
          and s["stop_words"] >= min_stop_words)
    return doc if ok else None


# ------------------------------------------------------------------------------------ C4

C4_END_MARKS = (".", "?", "!", "\"", "”", "’", "'")
C4_POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies",
                        "use of cookies", "use cookies", "all rights reserved")
_SENTENCE_RE = re.compile(r"[^.!?]*[.!?]+(?=\s|$)")
_CLOSED_SENTENCE_RE = re.compile(r"[.!?][)\]”’\"'»]+$")  # "(... today.)" ends a sentence too


def _ends_sentence(line: str, colon: bool = False) -> bool:
    line = line.rstrip()
    return (line.endswith(C4_END_MARKS) or bool(_CLOSED_SENTENCE_RE.search(line))
            or (colon and line.endswith(":")))


def _logical_lines(lines: list[str], join_wrapped: bool, wrap_min_chars: int) -> list[list[int]]:
    """Groups line indices into logical lines (see the module docstring)."""
    groups: list[list[int]] = []
    current: list[int] = []
    for i, line in enumerate(lines):
        if not line.strip():
            if current:
                groups.append(current)
                current = []
            continue
        current.append(i)
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        continues = (join_wrapped and not _ends_sentence(line)
                     and line_continues(line, nxt, wrap_min_chars, marks=""))
        if not continues:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


def _code_brace_line(line: str) -> bool:
    s = line.strip()
    return s.endswith("{") or s.startswith("}")


def c4_filter(doc: dict, *, min_words_per_line: int = 5, min_sentences: int = 3,
              curly_braces: str = "code", join_wrapped: bool = True,
              wrap_min_chars: int = 40, colon_ends_line: bool = True) -> dict | None:
    """C4's clean_page on English documents: removes lines, may drop the whole page.

    Keeps a (logical) line only if it ends with terminal punctuation, has at least
    `min_words_per_line` words, and mentions neither "javascript" nor a cookie/privacy/terms
    boilerplate phrase. Drops the page if it contains "lorem ipsum", code-like curly braces
    (see module docstring), or fewer than `min_sentences` sentences remain.
    """
    if not _is_en(doc):
        return doc
    text = doc["text"]
    lower = text.lower()
    if "lorem ipsum" in lower:
        return None
    lines = text.split("\n")
    if curly_braces == "code" and any(_code_brace_line(ln) for ln in lines):
        return None
    keep = [False] * len(lines)
    for group in _logical_lines(lines, join_wrapped, wrap_min_chars):
        joined = " ".join(lines[i].strip() for i in group)
        low = joined.lower()
        if not _ends_sentence(joined, colon=colon_ends_line):
            continue
        if len(joined.split()) < min_words_per_line:
            continue
        if "javascript" in low or any(p in low for p in C4_POLICY_SUBSTRINGS):
            continue
        if curly_braces == "any" and "{" in joined:
            return None
        for i in group:
            keep[i] = True
    if all(keep[i] or not line.strip() for i, line in enumerate(lines)):
        new = text
    else:
        out: list[str] = []
        for i, line in enumerate(lines):
            if keep[i]:
                out.append(line)
            elif not line.strip() and out and out[-1].strip():
                out.append("")  # keep one blank line between kept blocks
        new = "\n".join(out).strip("\n")
    if len(_SENTENCE_RE.findall(new)) < min_sentences:
        return None
    return doc if new == text else {**doc, "text": new}

