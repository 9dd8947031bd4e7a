"""Language identification for zh / en / code with no model download.

`detect_language(text)` measures three things:
  * cjk_fraction: CJK characters / (CJK characters + Latin words): a Chinese character is
    compared with a whole Latin word (both carry about one morpheme), so Chinese technical text
    full of commands and paths is still zh; a document is "zh" from `zh_min_cjk` (0.3) on.
  * code_score: the fraction of non-blank, non-comment lines that look like program text
    (keywords at the start of a line, assignments, calls, brackets, decorators, doctest
    prompts), plus a bonus from the density of code symbols ({}()[];=<>_), capped at 0.2.
    Comment lines (# or //) are left out: "# Title" is also a Markdown heading. Prose scores
    about 0.
  * en_stop_fraction: English function words / Latin words, to tell English from other
    languages written in Latin script (which are "other").
and decides code (code_score >= code_min_score), else zh, else en, else "other".

`language_filter` drops a document whose language is not allowed, fills in a missing "lang",
and (check_declared=True) drops a document whose text does not support its declared "lang":
  zh needs cjk_fraction >= zh_min_cjk; en needs cjk_fraction < zh_min_cjk, English stop words
  and no strong code evidence (code_score < code_max_score_for_text); code needs
  code_score >= code_min_score_declared, which is lower than the detection threshold because
  a chunk of a real source file can be mostly docstring.
"""
from __future__ import annotations

import dataclasses
import re

from geb_jax.data.clean._text import CJK_RE

EN_STOP_WORDS = frozenset(
    "a an and are as at be but by for from had has have he her his i if in is it its not of on "
    "or our she so that the their them then there they this to was we were what when which who "
    "will with would you your unto thee thou thy ye".split())
_LATIN_WORD_RE = re.compile(r"[A-Za-z\u00c0-\u024f]+")
_CODE_LINE_RE = re.compile(
    r"^\s*(?:def |class |import |from [\w.]+ import |return\b|if .*:\s*$|elif |else\s*:|"
    r"for .* in .*:\s*$|while .*:\s*$|try\s*:|except\b|finally\s*:|with .*:\s*$|raise |yield\b|"
    r"pass\s*$|@[\w.]+|#include|#define|public |private |protected |static |function\b|"
    r"var |let |const |package |func |fn |impl |use |struct |enum |switch\s*\(|case .*:|"
    r">>> |\.\.\. |/\*|\*/)"
    r"|^\s*[\w.\[\]]+\s*(?:[+\-*/%|&^]?=)(?!=)\s*\S"  # assignment
    r"|[{}]\s*$|\)\s*;\s*$"                             # block end, call statement
    r"|^\s*[\w.]+\(.*\)\s*$"                           # a bare call
    r"|^\s*[)\]}]+[,;:)]*\s*$")                       # closing brackets
_CODE_SYMBOLS = set("{}()[];=<>_")
_COMMENT_LINE_RE = re.compile(r"^\s*(?:#(?!include|define|!)|//)")
# Lines that prose essentially never starts with: definitions, imports, decorators.
_KEYWORD_LINE_RE = re.compile(
    r"^\s*(?:def \w+\s*\(|class \w+\s*[(:]|import [\w.]+|from [\w.]+ import |@[\w.]+|"
    r"#include\s*[<\"]|function\s+\w+\s*\(|(?:public|private|protected) [\w<>\[\]]+|"
    r"package [\w.]+;|func \w+\(|fn \w+\()")


@dataclasses.dataclass(frozen=True)
class LanguageGuess:
    lang: str  # "zh" | "en" | "code" | "other"
    cjk_fraction: float
    code_score: float
    en_stop_fraction: float
    keyword_lines: int = 0


def code_score(text: str) -> float:
    # comment lines are neutral: "# Title" is also a Markdown heading
    lines = [ln for ln in text.split("\n") if ln.strip() and not _COMMENT_LINE_RE.match(ln)]
    if not lines:
        return 0.0
    code_lines = sum(bool(_CODE_LINE_RE.search(ln)) for ln in lines)
    chars = [c for c in text if not c.isspace()]
    symbols = sum(c in _CODE_SYMBOLS for c in chars) / max(len(chars), 1)
    return code_lines / len(lines) + min(symbols, 0.2)


def keyword_lines(text: str) -> int:
    return sum(bool(_KEYWORD_LINE_RE.match(ln)) for ln in text.split("\n"))


def detect_language(text: str, *, zh_min_cjk: float = 0.3, code_min_score: float = 0.35,
                    en_min_stop_fraction: float = 0.05) -> LanguageGuess:
    cjk = len(CJK_RE.findall(text))
    words = [w.lower() for w in _LATIN_WORD_RE.findall(text)]
    cjk_fraction = cjk / (cjk + len(words)) if cjk + len(words) else 0.0
    stop = sum(w in EN_STOP_WORDS for w in words) / len(words) if words else 0.0
    score = code_score(text)
    if cjk_fraction < zh_min_cjk and score >= code_min_score:
        lang = "code"
    elif cjk_fraction >= zh_min_cjk:
        lang = "zh"
    elif words and stop >= en_min_stop_fraction:
        lang = "en"
    else:
        lang = "other"
    return LanguageGuess(lang, cjk_fraction, score, stop, keyword_lines(text))


def declared_language_supported(declared: str, guess: LanguageGuess, *, zh_min_cjk: float = 0.3,
                                code_min_score_declared: float = 0.15,
                                code_max_score_for_text: float = 0.6,
                                en_min_stop_fraction: float = 0.05) -> bool:
    if declared == "zh":
        return guess.cjk_fraction >= zh_min_cjk
    if declared == "en":
        return (guess.cjk_fraction < zh_min_cjk and guess.en_stop_fraction >= en_min_stop_fraction
                and guess.code_score < code_max_score_for_text)
    if declared == "code":
        return guess.code_score >= code_min_score_declared or guess.keyword_lines >= 2
    return guess.lang == declared


def language_filter(doc: dict, *, allowed: tuple[str, ...] = ("en", "zh", "code"),
                    check_declared: bool = True, zh_min_cjk: float = 0.3,
                    code_min_score: float = 0.35, code_min_score_declared: float = 0.15,
                    code_max_score_for_text: float = 0.6,
                    en_min_stop_fraction: float = 0.05) -> dict | None:
    guess = detect_language(doc["text"], zh_min_cjk=zh_min_cjk, code_min_score=code_min_score,
                            en_min_stop_fraction=en_min_stop_fraction)
    declared = doc.get("lang")
    if not declared:
        return {**doc, "lang": guess.lang} if guess.lang in allowed else None
    if declared not in allowed:
        return None
    if check_declared and not declared_language_supported(
            declared, guess, zh_min_cjk=zh_min_cjk,
            code_min_score_declared=code_min_score_declared,
            code_max_score_for_text=code_max_score_for_text,
            en_min_stop_fraction=en_min_stop_fraction):
        return None
    return doc
