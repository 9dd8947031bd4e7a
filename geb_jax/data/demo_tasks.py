"""Small, real instruction (SFT) and preference (DPO) data generated from the built-in corpus.

So that the SFT and DPO stages can run offline, `builtin_sft_conversations(split)` and
`builtin_dpo_pairs(split)` derive a few hundred examples each, deterministically, from the
built-in corpus' *train* documents (geb_jax.data.corpus) plus generated arithmetic:

  * continue   "Continue this passage from Genesis 3: <verse>" -> the next verse (KJV)
  * define     "In The Devil's Dictionary, how is ABATIS defined?" -> Bierce's entry; likewise
               Jargon File entries
  * source     "Which book or source is this excerpt from? <lines>" -> the source's name
  * poem       "续写这首诗：<first line>" -> the remaining lines (Tang / Song poems);
               "《题目》的作者是谁？" -> "作者是X。"
  * classic    "这段话出自哪部典籍？<saying>" -> "出自《论语》。" (fortunes-zh attributions)
  * code       "In numpy, what does `vstack` do?" -> the first line of its docstring
  * arithmetic "What is 37 + 48?" / "计算 12 × 7。" -> "37 + 48 = 85" (exact); some two-turn
               ("And if we multiply that by 3?") and some with a system message

DPO pairs use the same prompts; "chosen" is the correct answer and "rejected" a wrong one: the
answer of another example of the same task (another verse, definition, poem, source, book), or a
wrong number (off by a small nonzero amount).

Splits: every example is assigned to "valid" iff crc32 of its first user message is 0 mod 10
(about 10%), else "train", so the split is stable and a prompt never appears in both.
Answers longer than `MAX_ANSWER_CHARS` are skipped to keep examples short for small models.
"""
from __future__ import annotations

import copy
import functools
import random
import re
import zlib
from typing import Callable

from geb_jax.data.corpus import builtin_documents

SPLITS = ("train", "valid")
MAX_ANSWER_CHARS = 400
MAX_PER_TASK = 80  # per task family, before the split, to keep the mix balanced
SYSTEM_PROMPT = "You are a helpful bilingual (English / 中文) assistant. Answer briefly."

SOURCE_NAMES = {
    "kjv": "The King James Bible (1611).",
    "devil": "The Devil's Dictionary by Ambrose Bierce.",
    "jargon": "The Jargon File, the hacker's dictionary.",
    "tang300": "《唐诗三百首》(Three Hundred Tang Poems).",
    "song100": "宋代诗词选 (Song-dynasty poems, from fortunes-zh).",
    "fortunes": "fortunes-zh 的古典名句 (Chinese classical sayings).",
    "debref": "《Debian 参考手册》(The Debian Reference).",
    "numpy": "The source code of NumPy.",
    "absl": "The source code of absl-py (Abseil Python).",
}


def _split_of(prompt: str) -> str:
    return "valid" if zlib.crc32(prompt.encode("utf-8")) % 10 == 0 else "train"


def _unwrap(text: str) -> str:
    """Join hard-wrapped lines of a paragraph with single spaces."""
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


# ----------------------------------------------------------------------------- task items
# Each generator yields (task, prompt, answer) triples; all answers of one task are
# interchangeable "wrong answers" for the other prompts of that task (used by DPO).

def _kjv(docs):
    for d in docs:
        lines = d["text"].splitlines()
        title = lines[0].strip()
        verses = [re.sub(r"^\d+\s+", "", ln).strip() for ln in lines[1:]
                  if re.match(r"^\d+\s", ln)]
        for k in range(0, len(verses) - 1, 9):  # a few verses per chapter
            yield ("continue", f"Continue this passage from {title}:\n{verses[k]}",
                   verses[k + 1])


def _devil(docs):
    for d in docs:
        for entry in re.split(r"\n\s*\n", d["text"]):
            m = re.match(r"^([A-Z][A-Z' -]+), ([a-z.]+)\s+(.+)", entry.strip(), re.S)
            if m and not entry.startswith(" "):
                word, definition = m.group(1).title(), _unwrap(m.group(3))
                yield ("define", f"In The Devil's Dictionary, how is \"{word}\" defined?",
                       definition)


def _jargon(docs):
    for d in docs:
        for m in re.finditer(r"^:([^:\n]+):[^\n]*\n\n(.+?)(?:\n\n|\Z)", d["text"], re.M | re.S):
            term, definition = m.group(1).strip(), _unwrap(m.group(2))
            yield ("define", f"According to the Jargon File, what does \"{term}\" mean?",
                   definition)


def _poems(docs):
    for d in docs:
        lines = [ln.strip() for ln in d["text"].splitlines() if ln.strip()]
        title = re.search(r"《([^》]+)》", lines[0]) if lines else None
        author = re.match(r"^作者[:：]\s*([^（(]+)", lines[1]) if len(lines) > 1 else None
        body = lines[2:]
        if not (title and author) or len(body) < 2:
            continue
        yield ("poem", f"续写这首诗：\n{body[0]}", "\n".join(body[1:]))
        yield ("author", f"《{title.group(1)}》的作者是谁？", f"作者是{author.group(1).strip()}。")


def _classics(docs):
    for d in docs:
        for m in re.finditer(r"(?:^|\n\n)(.+?)\n\s+--\s*(《[^》]+》)", d["text"], re.S):
            saying, book = m.group(1).strip(), m.group(2)
            if book in ("《谚语》", "《にちじょう》") or len(saying) > 120:
                continue  # "proverb" is not a book; skip stray non-Chinese entries
            yield ("classic", f"这段话出自哪部典籍？\n{saying}", f"出自{book}。")


def _code(docs):
    for d in docs:
        module = d["text"].split("\n", 1)[0].lstrip("# ").strip()
        package = module.split("/", 1)[0]
        for m in re.finditer(r'^def ([A-Za-z]\w*)\(.*?\):\n\s+(?:r?""")\s*\n?\s*([^\n]+)',
                             d["text"], re.M | re.S):
            name, first = m.group(1), m.group(2).strip()
            if first and not first.startswith('"""'):
                yield ("code", f"In {package}, what does the function `{name}` "
                               f"(in {module}) do?", first)


def _sources(docs, rng: random.Random):
    for d in docs:
        lines = [ln for ln in d["text"].splitlines() if ln.strip()]
        if d["lang"] == "code":
            lines = lines[1:]  # the first line names the file
        if len(lines) < 4:
            continue
        start = rng.randrange(0, len(lines) - 2)
        excerpt = "\n".join(lines[start:start + 2])
        if len(excerpt) > 240:
            continue
        yield ("source", f"Which book or source is this excerpt from?\n{excerpt}",
               SOURCE_NAMES[d["source"]])


def _arithmetic(rng: random.Random, n: int):
    ops = [("+", "+", lambda a, b: a + b), ("-", "-", lambda a, b: a - b),
           ("*", "×", lambda a, b: a * b)]
    for i in range(n):
        sym, shown, fn = ops[i % 3]
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        if sym == "*":
            b = rng.randint(2, 19)
        q = f"What is {a} {shown} {b}?" if i % 2 == 0 else f"计算 {a} {shown} {b}。"
        yield ("arithmetic", q, f"{a} {shown} {b} = {fn(a, b)}")


# ----------------------------------------------------------------------------- building
@functools.lru_cache(maxsize=None)
def _items() -> tuple[tuple[str, str, str], ...]:
    """All (task, prompt, answer) triples, deduplicated by prompt, capped per task."""
    docs = list(builtin_documents("train"))
    by_source: dict[str, list[dict]] = {}
    for d in docs:
        by_source.setdefault(d["source"], []).append(d)
    rng = random.Random(20240611)
    gens = [
        _kjv(by_source["kjv"]),
        _devil(by_source["devil"]),
        _jargon(by_source["jargon"]),
        _poems(by_source["tang300"] + by_source["song100"]),
        _classics(by_source["fortunes"]),
        _code(by_source["numpy"] + by_source["absl"]),
        _sources(docs, rng),
        _arithmetic(rng, 2 * MAX_PER_TASK),
    ]
    seen: set[str] = set()
    per_task: dict[str, list[tuple[str, str, str]]] = {}
    for gen in gens:
        for task, prompt, answer in gen:
            if prompt in seen or not answer or len(answer) > MAX_ANSWER_CHARS:
                continue
            seen.add(prompt)
            per_task.setdefault(task, []).append((task, prompt, answer))
    out = []
    for task in sorted(per_task):
        items = per_task[task]
        # An evenly spaced subset (deterministic) rather than the first ones of each source.
        step = max(1, len(items) / MAX_PER_TASK)
        out.extend(items[int(k * step)] for k in range(min(MAX_PER_TASK, len(items))))
    return tuple(out)


def _conversation(task: str, prompt: str, answer: str, k: int) -> list[dict]:
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    if k % 5 == 0:
        msgs.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
    if task == "arithmetic" and k % 4 == 1:  # a two-turn follow-up with an exact answer
        value = int(answer.rsplit("=", 1)[1])
        m = 2 + k % 7
        follow = (f"And if we multiply that by {m}?" if prompt.startswith("What")
                  else f"再乘以 {m} 呢？")
        msgs += [{"role": "user", "content": follow},
                 {"role": "assistant", "content": f"{value} × {m} = {value * m}"}]
    return msgs


@functools.lru_cache(maxsize=None)
def _sft() -> dict[str, tuple]:
    out: dict[str, list] = {s: [] for s in SPLITS}
    for k, (task, prompt, answer) in enumerate(_items()):
        conv = {"task": task, "messages": _conversation(task, prompt, answer, k)}
        out[_split_of(prompt)].append(conv)
    return {s: tuple(v) for s, v in out.items()}


def _wrong_number(answer: str, rng: random.Random) -> str:
    lhs, value = answer.rsplit("=", 1)
    delta = rng.choice([-10, -2, -1, 1, 2, 10])
    return f"{lhs}= {int(value) + delta}"


@functools.lru_cache(maxsize=None)
def _dpo() -> dict[str, tuple]:
    items = _items()
    by_task: dict[str, list[str]] = {}
    for task, _, answer in items:
        by_task.setdefault(task, []).append(answer)
    rng = random.Random(7)
    out: dict[str, list] = {s: [] for s in SPLITS}
    for k, (task, prompt, answer) in enumerate(items):
        if task == "arithmetic":
            rejected = _wrong_number(answer, rng)
        else:
            others = [a for a in by_task[task] if a != answer]
            if not others:
                continue
            rejected = others[rng.randrange(len(others))]
        pair_prompt: str | list = prompt
        if k % 5 == 0:
            pair_prompt = [{"role": "system", "content": SYSTEM_PROMPT},
                           {"role": "user", "content": prompt}]
        out[_split_of(prompt)].append({"task": task, "prompt": pair_prompt, "chosen": answer,
                                       "rejected": rejected})
    return {s: tuple(v) for s, v in out.items()}


def _get(table: Callable[[], dict[str, tuple]], split: str) -> list[dict]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return copy.deepcopy(list(table()[split]))  # callers may mutate their copy


def builtin_sft_conversations(split: str = "train") -> list[dict]:
    """[{"task", "messages": [{"role", "content"}, ...]}] for `split` ("train" / "valid")."""
    return _get(_sft, split)


def builtin_dpo_pairs(split: str = "train") -> list[dict]:
    """[{"task", "prompt": str | messages, "chosen": str, "rejected": str}] for `split`."""
    return _get(_dpo, split)
