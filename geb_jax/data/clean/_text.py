"""Small text helpers shared by the cleaning filters (no state, no I/O)."""
from __future__ import annotations

import re
import unicodedata

# Terminal punctuation of a complete sentence. English: . ! ? and closing quotes; Chinese:
# 。！？ (and their half-width forms), the closing quotes ” 」 』 and the ellipsis …
EN_TERMINAL = ".!?\"'"
ZH_TERMINAL = "。！？”…」』"
TERMINAL = EN_TERMINAL + ZH_TERMINAL + "’"

CJK_RE = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef]")
LATIN_WORD_RE = re.compile(r"[A-Za-z\u00c0-\u024f]+(?:['’][A-Za-z]+)*")

# A sentence ends after a run of terminal marks (plus closing quotes/brackets). English marks
# end a sentence only before whitespace or the end ("3.14", "e.g.x" do not); Chinese marks end
# it immediately. A newline always ends one. The trailing whitespace belongs to the sentence.
_SENTENCE_END_RE = re.compile(
    r"(?:[.!?]+[\"'”’)\]]*(?=\s|$)|[。！？…]+[”’」』）)]*|(?=\n))\s*")


def nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


def ends_with_terminal(line: str, marks: str = TERMINAL) -> bool:
    stripped = line.rstrip()
    return bool(stripped) and stripped[-1] in marks


def count_cjk(text: str) -> int:
    return len(CJK_RE.findall(text))


def count_words(text: str) -> int:
    """Latin words plus CJK characters (one CJK character counts as one word)."""
    return len(LATIN_WORD_RE.findall(text)) + count_cjk(text) + len(
        re.findall(r"(?<![\w])\d+(?![\w])", text))


_CONTINUES_RE = re.compile(r"[,;:\-–—、，；：]\s*$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def line_continues(line: str, nxt: str, wrap_min_chars: int = 40,
                   marks: str = TERMINAL) -> bool:
    """Whether `nxt` continues `line` (hard-wrapped prose, verse, a list after "... said:").

    True when both are non-blank, `line` does not end with terminal punctuation, and `line` is
    long (>= wrap_min_chars), ends with , ; : or a dash, or `nxt` starts in lower case, or both
    lines are indented.
    """
    stripped = line.rstrip()
    if not stripped or not nxt.strip() or stripped[-1] in marks:
        return False
    return bool(len(stripped) >= wrap_min_chars or _CONTINUES_RE.search(stripped)
                or nxt.lstrip()[:1].islower() or (_indent(line) >= 2 and _indent(nxt) >= 2))


def split_sentences(text: str) -> list[str]:
    """Splits into pieces that concatenate back to `text`; each keeps its trailing whitespace."""
    pieces, start = [], 0
    for m in _SENTENCE_END_RE.finditer(text):
        end = m.end()
        if end > start:
            pieces.append(text[start:end])
            start = end
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def split_paragraphs(text: str) -> list[tuple[str, str]]:
    """[(paragraph, separator_after)] with blank lines as separators; joins back to `text`."""
    parts = re.split(r"(\n[ \t]*\n\s*)", text)
    out = []
    for i in range(0, len(parts), 2):
        sep = parts[i + 1] if i + 1 < len(parts) else ""
        out.append((parts[i], sep))
    return out


_PUNCT_CATEGORIES = ("P", "S")


def normalize(text: str) -> str:
    """NFKC, lowercase, punctuation and symbols removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(ch)[0] in _PUNCT_CATEGORIES else ch for ch in text)
    return " ".join(text.split())


def is_natural_language(doc: dict) -> bool:
    return doc.get("lang") != "code"
