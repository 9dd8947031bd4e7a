"""Local multiple-choice task files and the MMLU / C-Eval / CMMLU prompt layouts.

Task file: JSONL, one question per line (blank lines are skipped)::

    {"question": "2 + 2 = ?", "choices": ["3", "4", "5", "22"], "answer": "B", "subject": "math"}

* question: a non-empty string; choices: a list of 2 to 26 non-empty strings (lettered A, B, ..);
* answer: the letter ("B") or the 0-based index (1) of the correct choice;
* subject (optional): a string; it names the prompt header and groups few-shot examples.

MMLU, C-Eval and CMMLU convert to this format one line per question. Any bad line raises
`TaskFileError` naming the file, the line and the fix.

Layouts are lm-evaluation-harness' (mmlu/default, ceval-valid, cmmlu)::

    <header naming the subject>\\n\\n
    <shot question>\\nA. <choice>\\nB. <choice>..\\nAnswer: <letter>\\n\\n     (k times)
    <question>\\nA. <choice>\\nB. <choice>..\\nAnswer:

and the continuations scored are " A", " B", ... ("答案：" instead of "Answer:" for C-Eval
and CMMLU). style="text" is the other lm-eval flavour (ARC, HellaSwag): the prompt lists no
options and the continuations are " <choice text>", which is where acc_norm matters.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
STYLES = ("letter", "text")


class TaskFileError(ValueError):
    """A task file line that cannot be used; the message names file, line and fix."""


@dataclasses.dataclass(frozen=True)
class MultipleChoiceItem:
    question: str
    choices: tuple[str, ...]
    answer: int  # 0-based index into choices
    subject: str | None = None
    source: str = ""  # "file:line", for messages


@dataclasses.dataclass(frozen=True)
class PromptLayout:
    header: str  # with {subject}
    header_without_subject: str
    answer_prompt: str  # ends the question block; the continuation follows after a space


LAYOUTS = {
    "mmlu": PromptLayout(
        "The following are multiple choice questions (with answers) about {subject}.\n\n",
        "The following are multiple choice questions (with answers).\n\n", "Answer:"),
    "ceval": PromptLayout("以下是中国关于{subject}的单项选择题，请选出其中的正确答案。\n\n",
                          "以下是中国的单项选择题，请选出其中的正确答案。\n\n", "答案："),
    "cmmlu": PromptLayout("以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n",
                          "以下是单项选择题，请直接给出正确答案的选项。\n\n", "答案："),
}


def _parse_answer(answer, n_choices: int, where: str) -> int:
    letters = LETTERS[:n_choices]
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        raise TaskFileError(f"{where}: 'answer' must be a letter ({letters[0]}-{letters[-1]}) or "
                            f"a 0-based index, got {answer!r}")
    if isinstance(answer, str):
        letter = answer.strip().upper()
        if len(letter) != 1 or letter not in letters:
            raise TaskFileError(f"{where}: answer {answer!r} is outside the {n_choices} choices "
                                f"({letters[0]}-{letters[-1]}); use one of their letters")
        return letters.index(letter)
    if not 0 <= answer < n_choices:
        raise TaskFileError(f"{where}: answer index {answer} is outside the {n_choices} choices "
                            f"(0-{n_choices - 1}, 0-based)")
    return answer


def parse_item(record, where: str) -> MultipleChoiceItem:
    """One decoded JSON line -> MultipleChoiceItem; TaskFileError names `where`."""
    if not isinstance(record, dict):
        raise TaskFileError(f"{where}: expected a JSON object with question, choices, answer; "
                            f"got {type(record).__name__}")
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise TaskFileError(f"{where}: 'question' must be a non-empty string")
    if "choices" not in record:
        raise TaskFileError(f"{where}: missing 'choices' (a list of the answer options)")
    choices = record["choices"]
    if not isinstance(choices, list) or not choices:
        raise TaskFileError(f"{where}: 'choices' is empty or not a list; give 2 to "
                            f"{len(LETTERS)} options")
    if not 2 <= len(choices) <= len(LETTERS):
        raise TaskFileError(f"{where}: {len(choices)} choice(s); give 2 to {len(LETTERS)}")
    bad = [i for i, c in enumerate(choices) if not isinstance(c, str) or not c.strip()]
    if bad:
        raise TaskFileError(f"{where}: choice {LETTERS[bad[0]]} is empty or not a string")
    if "answer" not in record:
        raise TaskFileError(f"{where}: missing 'answer' (the correct choice's letter or 0-based "
                            f"index)")
    subject = record.get("subject")
    if subject is not None and not isinstance(subject, str):
        raise TaskFileError(f"{where}: 'subject' must be a string, got {type(subject).__name__}")
    return MultipleChoiceItem(question, tuple(choices),
                              _parse_answer(record["answer"], len(choices), where),
                              subject or None, where)


def load_task_file(path: str | os.PathLike) -> list[MultipleChoiceItem]:
    """Read and validate a JSONL task file (see the module docstring)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TaskFileError(f"task file not found: {path}")
    items = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskFileError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); "
                                    f"each line must be one JSON object") from None
            items.append(parse_item(record, where))
    if not items:
        raise TaskFileError(f"{path}: no questions (expected one JSON object per line)")
    return items


def question_block(item: MultipleChoiceItem, layout: PromptLayout, style: str) -> str:
    """lm-eval's doc_to_text: the question (and lettered options) up to the answer prompt."""
    if style == "letter":
        options = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))
        return f"{item.question.strip()}{options}\n{layout.answer_prompt}"
    return f"{item.question.strip()}\n{layout.answer_prompt}"


def choice_strings(item: MultipleChoiceItem, style: str) -> list[str]:
    """lm-eval's doc_to_choice: what is scored (after a space) and whose length normalises."""
    return list(LETTERS[:len(item.choices)]) if style == "letter" else list(item.choices)


def few_shot_prompt(item: MultipleChoiceItem, shots: Sequence[MultipleChoiceItem],
                    layout: str | PromptLayout = "mmlu", style: str = "letter") -> str:
    """Header, k solved examples, then the question: the prompt before " <choice>"."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if isinstance(layout, str):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
        layout = LAYOUTS[layout]
    header = (layout.header.format(subject=item.subject.replace("_", " ")) if item.subject
              else layout.header_without_subject)
    solved = "".join(f"{question_block(s, layout, style)} "
                     f"{choice_strings(s, style)[s.answer]}\n\n" for s in shots)
    return header + solved + question_block(item, layout, style)


def select_shots(item: MultipleChoiceItem, pool: Sequence[MultipleChoiceItem], k: int
                 ) -> list[MultipleChoiceItem]:
    """The first k pool items of the same subject, other than `item` (lm-eval's first_n)."""
    if k <= 0:
        return []
    same = [p for p in pool if p.subject == item.subject and p is not item and p != item]
    return same[:k]
