"""GEB-1.3B-style rule cleaning: HTML remnants, garbled text, incomplete lines, PII, spam words.

Every filter is a pure function `f(doc, *, thresholds...) -> doc | None`: it returns the same
dict when it changes nothing, a new dict when it edits the text, and None to drop the document.
Filters never count anything; the chain runner (chain.py) does.

Which documents each rule touches:
  * strip_html, drop_incomplete_lines, drop_spam: natural language only (lang != "code"); code
    legitimately holds "<div>" strings, lines without punctuation and arbitrary identifiers.
  * drop_garbled: every document.
  * remove_pii: every document, but URLs are left alone in code unless `urls_in_code=True`
    (a URL in code can be an API endpoint or a reference the code needs).

PII policy: e-mails, phone numbers, Chinese resident ID numbers and URLs are *replaced by a
placeholder* (<EMAIL>, <PHONE>, <ID_NUMBER>, <URL>) when `placeholders=True` (the default),
so the sentence around them stays grammatical and a leak is easy to count afterwards; with
`placeholders=False` they are removed and the spaces around them collapsed.
"""
from __future__ import annotations

import functools
import html
import re
import unicodedata
from importlib import resources

from geb_jax.data.clean._text import (TERMINAL, count_words, ends_with_terminal,
                                      is_natural_language, line_continues)

# ------------------------------------------------------------------------------------ HTML

# Only real HTML element names are treated as tags, so prose like "a < b and c > d" or
# "<ESC>" survives. Block-level elements become a line break, inline ones disappear.
_BLOCK_TAGS = ("address article aside blockquote body br dd div dl dt fieldset figcaption figure "
               "footer form h1 h2 h3 h4 h5 h6 head header hr html li main nav ol p pre section "
               "table tbody td tfoot th thead title tr ul").split()
_INLINE_TAGS = ("a abbr b bdi bdo big button canvas caption center cite code col colgroup data del "
                "details dfn em embed font i iframe img input ins kbd label legend link map mark "
                "meta meter noscript object optgroup option output param picture progress q s "
                "samp select small source span strike strong sub summary sup svg template "
                "textarea time tt u var video wbr").split()
_TAG_RE = re.compile(r"</?(%s)(?:\s[^<>]*)?/?>" % "|".join(
    sorted(_BLOCK_TAGS + _INLINE_TAGS, key=len, reverse=True)), re.IGNORECASE)
_BLOCK_SET = frozenset(_BLOCK_TAGS)
_SCRIPT_RE = re.compile(r"<(script|style|noscript)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_COMMENT_RE = re.compile(r"<!--.*?-->|<!DOCTYPE[^>]*>|<\?xml[^>]*\?>", re.IGNORECASE | re.DOTALL)
# Evidence that a document really holds markup: a closing tag, a tag with attributes, a
# comment, a doctype or a script/style block. Without it only entities are decoded.
_MARKUP_RE = re.compile(r"</(?:%s)\s*>|<(?:%s)\s+[\w-]+\s*=|<!--|<!DOCTYPE|<script|<style" % (
    "|".join(_BLOCK_TAGS + _INLINE_TAGS), "|".join(_BLOCK_TAGS + _INLINE_TAGS)), re.IGNORECASE)
_ENTITY_RE = re.compile(r"&(?:[a-zA-Z][a-zA-Z0-9]{1,31}|#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6});")
# CSS rules ("body { margin: 0; }", ".nav a:hover{color:red}") and JavaScript left on a line.
_CSS_LINE_RE = re.compile(
    r"^\s*[\w\s.#,:>*+~\[\]=\"'()-]*\{\s*(?:[-\w]+\s*:\s*[^;{}\n]+;?\s*)+\}\s*$")
_JS_LINE_RE = re.compile(
    r"^\s*(?:(?:var|let|const)\s+[\w$]+\s*=.*;\s*$|function\s*[\w$]*\s*\([^)]*\)\s*\{"
    r"|\}\s*\)?\s*;?\s*$)"
    r"|document\.(?:write|getElementById|cookie|createElement)|window\.(?:location|onload)"
    r"|\$\(document\)|adsbygoogle|google_ad_client|\(function\s*\(")


def _entity(m: re.Match) -> str:
    out = html.unescape(m.group(0))
    return " " if out == "\xa0" else out


def strip_html(doc: dict) -> dict | None:
    """Removes HTML tags, <script>/<style> blocks, comments, entities and CSS/JS lines.

    Tags and CSS/JS lines are removed only from documents with real markup (a closing tag, a
    tag with attributes, a comment, a doctype or a script/style block); otherwise only HTML
    entities (&amp; &#39; ...) are decoded, so prose that mentions "<body>" is left alone.
    """
    if not is_natural_language(doc):
        return doc
    text = doc["text"]
    if "<" not in text and "&" not in text:
        return doc
    if not _MARKUP_RE.search(text):  # "COME FROM <label>" in prose is not markup
        new = _ENTITY_RE.sub(_entity, text)
        return doc if new == text else {**doc, "text": new}
    new = _SCRIPT_RE.sub("\n", text)
    new = _COMMENT_RE.sub("", new)
    new = _TAG_RE.sub(lambda m: "\n" if m.group(1).lower() in _BLOCK_SET else "", new)
    new = _ENTITY_RE.sub(_entity, new)
    kept = [ln.rstrip() for ln in new.split("\n")
            if not (_CSS_LINE_RE.match(ln) or _JS_LINE_RE.search(ln))]  # CSS / JS remnants
    new = re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip("\n")
    if new == text:
        return doc
    if not new.strip():
        return None
    return {**doc, "text": new}


# -------------------------------------------------------------------------------- garbled

# UTF-8 read as cp1252/latin-1 ("Ã©", "â€™"), GBK/UTF-8 confusions ("锟斤拷", "烫烫烫",
# "屯屯屯") and runs of Latin-1 symbols/letters that real words almost never produce.
_MOJIBAKE_RE = re.compile(
    "[\u00c2\u00c3][\u0080-\u00bf]"
    "|\u00e2\u20ac[\u0080-\u00bf\u2018-\u203a\u0152-\u017e\u02c6\u02dc\u2122\u20ac"
    "\u0153\u201c\u201d]"
    "|(?:锟斤拷)+|(?:烫){2,}|(?:屯){3,}"
    "|[\u00a1-\u00ff]{3,}")


def garbled_ratio(text: str) -> float:
    """Fraction of characters that are replacement/control/private-use chars or mojibake."""
    if not text:
        return 0.0
    bad = 0
    for ch in text:
        if ch == "\ufffd":
            bad += 1
            continue
        cat = unicodedata.category(ch)
        if (cat == "Cc" and ch not in "\t\n\r") or cat in ("Co", "Cs", "Cn"):
            bad += 1
    bad += sum(len(m.group(0)) for m in _MOJIBAKE_RE.finditer(text))
    return bad / len(text)


def drop_garbled(doc: dict, *, max_ratio: float = 0.01) -> dict | None:
    return None if garbled_ratio(doc["text"]) > max_ratio else doc


# ------------------------------------------------------------------------------------ PII

_URL_RE = re.compile(r"(?:\b(?:https?|ftp)://|\bwww\.)[^\s<>\"'“”‘’«»，。、；：！？（）「」『』《》【】]+",
                     re.IGNORECASE)
_EMAIL_RE = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
                       r"\.[A-Za-z]{2,}\b")
_CN_ID_RE = re.compile(r"(?<![0-9A-Za-z])[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])"
                       r"(?:0[1-9]|[12]\d|3[01])\d{3}[0-9Xx](?![0-9A-Za-z])")
_PHONE_RES = (
    # Chinese mobile, optionally +86 / 86 and separated 3-4-4: 13812345678, +86 138-1234-5678
    re.compile(r"(?<![\d+])(?:(?:\+|00)?86[-\s]?)?1[3-9]\d(?:[-\s]?\d{4}){2}(?!\d)"),
    # International with a leading + (or 00): +44 20 7946 0958, +1 (555) 123-4567
    re.compile(r"(?<![\w+])(?:\+|00)[1-9]\d{0,2}[-\s.]?(?:\(\d{1,4}\)[-\s.]?)?"
               r"\d{1,4}(?:[-\s.]\d{2,5}){1,4}(?!\d)"),
    # North American (555) 123-4567 / 555-123-4567 / 555.123.4567 (separators required)
    re.compile(r"(?<![\w-])(?:\(\d{3}\)\s?|\d{3}[-.])\d{3}[-.]\d{4}(?![\w-])"),
    # Chinese landline with area code: 010-12345678, 0755-1234567
    re.compile(r"(?<![\w-])0\d{2,3}-\d{7,8}(?![\w-])"),
)
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def valid_cn_id(number: str) -> bool:
    """GB 11643 check character (ISO 7064 MOD 11-2) of an 18-character resident ID number."""
    total = sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS))
    return "10X98765432"[total % 11] == number[17].upper()


def remove_pii(doc: dict, *, placeholders: bool = True, urls_in_code: bool = False) -> dict | None:
    """Replaces URLs, e-mails, Chinese ID numbers (valid check char) and phone numbers."""
    text = doc["text"]

    def sub(kind: str):
        return (f"<{kind}>" if placeholders else "")

    new = text
    if urls_in_code or is_natural_language(doc):
        new = _URL_RE.sub(lambda m: _trim_url(m, sub("URL")), new)
    new = _EMAIL_RE.sub(sub("EMAIL"), new)
    new = _CN_ID_RE.sub(lambda m: sub("ID_NUMBER") if valid_cn_id(m.group(0)) else m.group(0), new)
    for pattern in _PHONE_RES:
        new = pattern.sub(lambda m: sub("PHONE") if sum(c.isdigit() for c in m.group(0)) >= 8
                          else m.group(0), new)
    if new == text:
        return doc
    if not placeholders:
        new = re.sub(r"[ \t]{2,}", " ", new)
        new = re.sub(r"[ \t]+([,.;:!?，。；：！？])", r"\1", new)
    if not new.strip():
        return None
    return {**doc, "text": new}


def _trim_url(m: re.Match, replacement: str) -> str:
    url = m.group(0)
    trimmed = url.rstrip(".,;:!?)]}'\"")
    return replacement + url[len(trimmed):]


# ------------------------------------------------------------------- incomplete sentences

_BOX_DRAWING_RE = re.compile("[\u2500-\u257f]")


def drop_incomplete_lines(doc: dict, *, short_line_words: int = 2,
                          min_doc_words: int = 20) -> dict | None:
    """Removes short lines that do not end a sentence, then drops too-short documents.

    A line is removed when it has fewer than `short_line_words` words (a CJK character counts
    as a word, so does a number) and does not end with terminal punctuation (. ! ? " ' 。 ！ ？
    ” … 」 』) and does not continue the line above (hard-wrapped prose: the last word of a
    paragraph on its own line; see _text.line_continues): navigation, buttons, separators and
    other page furniture. Lines drawn with box-drawing characters (U+2500-U+257F, text tables)
    are kept. A document left with fewer than `min_doc_words` words is dropped. Natural
    language only; code passes unchanged.
    """
    if not is_natural_language(doc):
        return doc
    text = doc["text"]
    lines = text.split("\n")
    kept = [ln for i, ln in enumerate(lines)
            if not ln.strip() or ends_with_terminal(ln, TERMINAL)
            or count_words(ln) >= short_line_words or _BOX_DRAWING_RE.search(ln)
            or (i > 0 and line_continues(lines[i - 1], ln))]
    new = text
    if len(kept) != len(lines):
        new = re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip("\n")
    if count_words(new) < min_doc_words:
        return None
    return doc if new == text else {**doc, "text": new}


# --------------------------------------------------------------------- spam and profanity

@functools.lru_cache(maxsize=None)
def blocklist() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(English terms, Chinese terms) from geb_jax/data/clean/blocklist_{en,zh}.txt."""
    out = []
    for lang in ("en", "zh"):
        data = resources.files("geb_jax").joinpath("data", "clean", f"blocklist_{lang}.txt")
        terms = []
        for line in data.read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                terms.append(line.lower() if lang == "en" else line)
        out.append(tuple(terms))
    return out[0], out[1]


@functools.lru_cache(maxsize=None)
def _blocklist_res():
    en, zh = blocklist()
    en_re = re.compile(r"\b(?:%s)\b" % "|".join(re.escape(t).replace(r"\ ", r"\s+")
                                                 for t in sorted(en, key=len, reverse=True)),
                       re.IGNORECASE)
    zh_re = re.compile("|".join(re.escape(t) for t in sorted(zh, key=len, reverse=True)))
    return en_re, zh_re


def spam_density(text: str) -> float:
    """Words of the text that are block-list words, over all words (CJK characters = words)."""
    words = count_words(text)
    if not words:
        return 0.0
    en_re, zh_re = _blocklist_res()
    hits = sum(count_words(m.group(0)) for m in en_re.finditer(text))
    hits += sum(len(m.group(0)) for m in zh_re.finditer(text))
    return hits / words


def drop_spam(doc: dict, *, max_density: float = 0.02) -> dict | None:
    """Drops natural-language documents whose profanity/promotion word density is too high."""
    if not is_natural_language(doc):
        return doc
    return None if spam_density(doc["text"]) > max_density else doc
