"""Small, real instruction (SFT) and preference (DPO) data, built in and generated offline.

So that the SFT and DPO stages can run offline, `builtin_sft_conversations(split)` derives a few
hundred instruction examples, deterministically, from the built-in corpus' *train* documents
(geb_jax.data.corpus) plus generated arithmetic, and `builtin_dpo_pairs(split)` generates a few
hundred preference pairs from templates (below):

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

DPO pairs (`builtin_dpo_pairs`) are a bilingual preference set in the spirit of GEB-1.3B's DPO
data, one whose preference a small model can learn from the request and carry to new prompts
(the knowledge above is not: no small model knows the answer to a held-out verse or poem, so
pairs of "the correct fact vs another example's answer" teach nothing that generalises). Six
groups of 80 templated pairs, English and Chinese:

  * refuse_en / refuse_zh   a mild request to deceive, insult or cheat ("How can I trick my
               neighbour into lending me money?", "帮我嘲笑我的同学的字迹。") -> chosen: a brief
               polite refusal in the request's language; rejected: the compliant opening only
               ("Sure, here is how to trick your neighbour into lending you money:" /
               "好的，下面是嘲笑同学的话："), which stops there: neither answer holds harmful content
  * helpful_en / helpful_zh a benign request (arithmetic, unit conversions, capitals from a
               table, string tasks) -> chosen: the exact answer; rejected: an unneeded refusal
  * language_en / language_zh the same benign requests -> chosen: the answer in the request's
               language; rejected: the same answer in the other language

Every user prompt occurs once (and is none of the SFT prompts above); every 5th pair of each
group is "valid" (96 pairs), the others "train" (384), so no held-out prompt is trained on; every
7th pair carries the SFT system message. Every
8th training pair of the refuse / helpful groups is also an SFT "train" conversation (prompt and
chosen reply), so that SFT sees both formats; the SFT valid split is unchanged.

SFT splits: every example is assigned to "valid" iff crc32 of its first user message is 0 mod 10
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
    out["train"].extend(_preference_sft())
    return {s: tuple(v) for s, v in out.items()}


# ----------------------------------------------------------------------------- preferences
# The DPO pairs (see the module docstring): refusals of mild requests to deceive, insult or
# cheat; helpful answers to benign requests; replies in the language of the request.

PREF_SEED = 20261202
PREF_PER_GROUP = 80  # pairs per (family, language): 6 groups, 480 pairs
PREF_VALID_EVERY = 5  # every 5th pair of each group is held out: 384 train, 96 valid pairs
PREF_SFT_EVERY = 8  # every 8th training pair of the refuse / helpful families is also an SFT
#                     conversation (its prompt and chosen reply), so SFT sees both formats

# Requests to deceive / insult / cheat. A target is (as the user names it, as the assistant
# names it back); "{t}" in a request template, "{ty}" in its compliant opening.
_TARGETS_EN = [("my neighbour", "your neighbour"), ("my teacher", "your teacher"),
               ("my boss", "your boss"), ("my classmate", "your classmate"),
               ("my best friend", "your best friend"), ("my landlord", "your landlord"),
               ("a coworker", "your coworker"), ("my little brother", "your little brother"),
               ("my older sister", "your older sister"), ("the shop owner", "the shop owner"),
               ("my roommate", "your roommate"), ("my coach", "your coach")]
_ACTS_EN = [("lending me money", "lending you money"),
            ("doing my homework", "doing your homework"),
            ("paying for my lunch", "paying for your lunch"),
            ("giving me their concert ticket", "giving you their concert ticket"),
            ("covering my shift", "covering your shift"),
            ("washing my car", "washing your car")]
_TOPICS_EN = [("where I was last night", "where you were last night"),
              ("my exam results", "your exam results"), ("the broken vase", "the broken vase"),
              ("why I was late", "why you were late"),
              ("the money I spent", "the money you spent")]
_TRAITS_EN = ["their haircut", "their cooking", "their handwriting", "their singing",
              "their old phone", "their shoes"]
_TESTS_EN = [("my maths exam", "your maths exam"), ("the history quiz", "the history quiz"),
             ("the driving test", "the driving test"),
             ("tomorrow's spelling test", "tomorrow's spelling test"),
             ("my chemistry final", "your chemistry final"),
             ("the online coding test", "the online coding test")]
_PEERS_EN = [("my classmate", "your classmate"), ("my deskmate", "your deskmate"),
             ("the top student", "the top student"), ("my lab partner", "your lab partner")]
_GAMES_EN = ["chess", "poker", "a board game", "an online game", "darts", "cards"]

_TARGETS_ZH = [("我的邻居", "邻居"), ("我的老师", "老师"), ("我的老板", "老板"),
               ("我的同学", "同学"), ("我最好的朋友", "朋友"), ("我的房东", "房东"),
               ("同事", "同事"), ("我弟弟", "弟弟"), ("我姐姐", "姐姐"), ("店主", "店主"),
               ("我的室友", "室友"), ("我的教练", "教练")]
_ACTS_ZH = [("借钱给我", "借钱给你"), ("帮我写作业", "帮你写作业"), ("请我吃午饭", "请你吃午饭"),
            ("把演唱会门票给我", "把门票给你"), ("替我值班", "替你值班"), ("帮我洗车", "帮你洗车")]
_CLAIMS_ZH = ["我昨晚在家学习", "花瓶不是我打碎的", "我迟到是因为堵车", "我的成绩很好",
              "钱是被别人拿走的"]
_TRAITS_ZH = ["发型", "厨艺", "字迹", "唱歌", "旧手机", "鞋子"]
_TESTS_ZH = ["数学考试", "历史小测验", "驾照考试", "明天的英语听写", "化学期末考试",
             "在线编程测试"]
_PEERS_ZH = ["同桌", "同学", "学霸", "前排的同学"]
_GAMES_ZH = ["象棋", "扑克", "桌游", "网络游戏", "麻将", "飞行棋"]

# (kind, request template, compliant opening); fillers: t/ty target, a/ay act, p/py topic,
# r trait, x/xy test, c/cy classmate, g game.
_BAD_EN = [
    ("deceive", "How can I trick {t} into {a}?", "Sure, here is how to trick {ty} into {ay}:"),
    ("deceive", "Help me lie to {t} about {p}.", "Sure, here is a lie to tell {ty} about {py}:"),
    ("deceive", "Write a fake excuse so I can fool {t}.",
     "Sure, here is a fake excuse to fool {ty}:"),
    ("insult", "Write a mean message insulting {t}.", "Sure, here is a mean message for {ty}:"),
    ("insult", "Give me some rude names to call {t}.", "Sure, here are some rude names for {ty}:"),
    ("insult", "Help me make fun of {t} because of {r}.",
     "Sure, here is how to make fun of {ty}:"),
    ("cheat", "How do I cheat on {x}?", "Sure, here is how to cheat on {xy}:"),
    ("cheat", "Help me copy answers from {c} during {x}.",
     "Sure, here is how to copy {cy}'s answers:"),
    ("cheat", "How can I cheat at {g} without getting caught?",
     "Sure, here is how to cheat at {g}:"),
]
_BAD_ZH = [
    ("deceive", "怎样骗{t}{a}？", "好的，下面是骗{ty}{ay}的方法："),
    ("deceive", "帮我编个谎话骗{t}，说{p}。", "好的，下面是可以对{ty}说的谎话："),
    ("deceive", "帮我想个假借口糊弄{t}。", "好的，下面是糊弄{ty}的假借口："),
    ("insult", "写一段话辱骂{t}。", "好的，下面是辱骂{ty}的话："),
    ("insult", "给我几个难听的外号去骂{t}。", "好的，下面是几个骂{ty}的外号："),
    ("insult", "帮我嘲笑{t}的{r}。", "好的，下面是嘲笑{ty}的话："),
    ("cheat", "{x}怎么作弊？", "好的，下面是{x}作弊的方法："),
    ("cheat", "{x}的时候怎么偷看{c}的答案？", "好的，下面是偷看{c}答案的方法："),
    ("cheat", "玩{g}怎么作弊才不会被发现？", "好的，下面是玩{g}作弊的方法："),
]
_REFUSALS = {  # one brief sentence: about as long as the compliant openings
    "en": {"deceive": "Sorry, I can't help you deceive people.",
           "insult": "Sorry, I won't write insults.",
           "cheat": "Sorry, I can't help with cheating."},
    "zh": {"deceive": "抱歉，我不能帮你骗人。", "insult": "抱歉，我不能帮你骂人。",
           "cheat": "抱歉，我不能帮你作弊。"},
}
# Unneeded refusals of benign requests: worded like the real ones, so that only the request
# tells them apart.
_NEEDLESS_REFUSALS = {
    "en": ["Sorry, I can't help with that request.", "Sorry, I can't help you with this."],
    "zh": ["抱歉，我不能帮你做这件事。", "抱歉，我无法回答这个问题。"],
}

# (English name, capital, Chinese name, Chinese capital); capitals as of 2026.
_CAPITALS = [
    ("France", "Paris", "法国", "巴黎"), ("Germany", "Berlin", "德国", "柏林"),
    ("Italy", "Rome", "意大利", "罗马"), ("Spain", "Madrid", "西班牙", "马德里"),
    ("Japan", "Tokyo", "日本", "东京"), ("China", "Beijing", "中国", "北京"),
    ("Russia", "Moscow", "俄罗斯", "莫斯科"), ("Egypt", "Cairo", "埃及", "开罗"),
    ("Canada", "Ottawa", "加拿大", "渥太华"), ("Australia", "Canberra", "澳大利亚", "堪培拉"),
    ("Argentina", "Buenos Aires", "阿根廷", "布宜诺斯艾利斯"),
    ("Mexico", "Mexico City", "墨西哥", "墨西哥城"), ("India", "New Delhi", "印度", "新德里"),
    ("Thailand", "Bangkok", "泰国", "曼谷"), ("Vietnam", "Hanoi", "越南", "河内"),
    ("South Korea", "Seoul", "韩国", "首尔"), ("Greece", "Athens", "希腊", "雅典"),
    ("Portugal", "Lisbon", "葡萄牙", "里斯本"), ("Norway", "Oslo", "挪威", "奥斯陆"),
    ("Sweden", "Stockholm", "瑞典", "斯德哥尔摩"), ("Finland", "Helsinki", "芬兰", "赫尔辛基"),
    ("Poland", "Warsaw", "波兰", "华沙"), ("Austria", "Vienna", "奥地利", "维也纳"),
    ("Kenya", "Nairobi", "肯尼亚", "内罗毕"), ("Peru", "Lima", "秘鲁", "利马"),
    ("Ireland", "Dublin", "爱尔兰", "都柏林"), ("Turkey", "Ankara", "土耳其", "安卡拉"),
    ("Cuba", "Havana", "古巴", "哈瓦那"), ("Denmark", "Copenhagen", "丹麦", "哥本哈根"),
    ("Hungary", "Budapest", "匈牙利", "布达佩斯"),
]
# (English from-unit, to-unit, factor, Chinese from-unit, to-unit)
_UNITS = [("metres", "centimetres", 100, "米", "厘米"), ("kilograms", "grams", 1000, "千克", "克"),
          ("hours", "minutes", 60, "小时", "分钟"), ("minutes", "seconds", 60, "分钟", "秒"),
          ("days", "hours", 24, "天", "小时"), ("kilometres", "metres", 1000, "千米", "米"),
          ("weeks", "days", 7, "周", "天")]
_WORDS = ["apple", "river", "garden", "window", "pencil", "planet", "silver", "rabbit",
          "orange", "yellow", "bottle", "castle", "dragon", "forest", "guitar", "jacket",
          "kitten", "lemon", "market", "number", "pocket", "rocket", "summer", "ticket",
          "winter", "tiger", "cloud", "bread"]


def _bad_request(lang: str, rng: random.Random) -> tuple[str, str, str]:
    """(kind, request, compliant opening) for a random template and fillers."""
    templates = _BAD_EN if lang == "en" else _BAD_ZH
    kind, request, opening = templates[rng.randrange(len(templates))]
    if lang == "en":
        t, ty = rng.choice(_TARGETS_EN)
        a, ay = rng.choice(_ACTS_EN)
        p, py = rng.choice(_TOPICS_EN)
        x, xy = rng.choice(_TESTS_EN)
        c, cy = rng.choice(_PEERS_EN)
        fill = dict(t=t, ty=ty, a=a, ay=ay, p=p, py=py, r=rng.choice(_TRAITS_EN), x=x, xy=xy,
                    c=c, cy=cy, g=rng.choice(_GAMES_EN))
    else:
        t, ty = rng.choice(_TARGETS_ZH)
        a, ay = rng.choice(_ACTS_ZH)
        fill = dict(t=t, ty=ty, a=a, ay=ay, p=rng.choice(_CLAIMS_ZH), r=rng.choice(_TRAITS_ZH),
                    x=rng.choice(_TESTS_ZH), c=rng.choice(_PEERS_ZH), g=rng.choice(_GAMES_ZH))
    return kind, request.format(**fill), opening.format(**fill)


def _benign_request(rng: random.Random) -> tuple[str, str, str, str]:
    """(English request, English answer, Chinese request, Chinese answer), exact and matching."""
    family = rng.randrange(4)
    if family == 0:  # arithmetic
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.randrange(3)
        if op == 0:
            return (f"Please add {a} and {b}.", f"The sum of {a} and {b} is {a + b}.",
                    f"请计算 {a} 加 {b}。", f"{a} 加 {b} 等于 {a + b}。")
        if op == 1:
            a, b = max(a, b), min(a, b)
            return (f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}.",
                    f"{a} 减 {b} 等于多少？", f"{a} 减 {b} 等于 {a - b}。")
        b = rng.randint(2, 12)
        return (f"What is {a} times {b}?", f"{a} times {b} is {a * b}.",
                f"{a} 乘以 {b} 等于多少？", f"{a} 乘以 {b} 等于 {a * b}。")
    if family == 1:  # unit conversion
        src, dst, factor, src_zh, dst_zh = rng.choice(_UNITS)
        n = rng.randint(2, 20)
        return (f"How many {dst} are in {n} {src}?", f"{n} {src} is {n * factor} {dst}.",
                f"{n} {src_zh}是多少{dst_zh}？", f"{n} {src_zh}等于 {n * factor} {dst_zh}。")
    if family == 2:  # capitals
        country, capital, country_zh, capital_zh = rng.choice(_CAPITALS)
        k = rng.randrange(3)
        en = ("What is the capital of {}?", "Which city is the capital of {}?",
              "Name the capital city of {}.")[k].format(country)
        zh = ("{}的首都是哪里？", "{}的首都是哪个城市？", "请说出{}的首都。")[k].format(country_zh)
        return (en, f"The capital of {country} is {capital}.", zh,
                f"{country_zh}的首都是{capital_zh}。")
    word = rng.choice(_WORDS)  # string tasks
    k = rng.randrange(3)
    if k == 0:
        return (f'Spell the word "{word}" backwards.',
                f'"{word}" spelled backwards is "{word[::-1]}".',
                f"把单词“{word}”倒过来拼写。", f"“{word}”倒过来拼写是“{word[::-1]}”。")
    if k == 1:
        return (f'Write the word "{word}" in capital letters.',
                f'In capital letters it is "{word.upper()}".',
                f"把单词“{word}”改成大写字母。", f"改成大写字母是“{word.upper()}”。")
    return (f'How many letters are in the word "{word}"?',
            f'The word "{word}" has {len(word)} letters.',
            f"单词“{word}”有几个字母？", f"单词“{word}”有 {len(word)} 个字母。")


@functools.lru_cache(maxsize=None)
def _preference_items() -> tuple[tuple[str, dict], ...]:
    """All (split, pair), deterministic; every user prompt is used once (and is none of the SFT
    knowledge tasks' prompts), so no valid prompt is seen in training.

    Six groups of PREF_PER_GROUP pairs: refuse_en / refuse_zh (chosen: a polite refusal;
    rejected: the compliant opening, which stops there), helpful_en / helpful_zh (chosen: the
    answer; rejected: an unneeded refusal), language_en / language_zh (a question in English /
    Chinese; chosen: the answer in that language; rejected: the same answer in the other one).
    Every PREF_VALID_EVERY-th pair of each group is "valid", the others "train".
    """
    rng = random.Random(PREF_SEED)
    seen: set[str] = set()
    # prompts the SFT knowledge tasks use, so that no preference prompt is one of them
    seen.update(prompt for _, prompt, _ in _items())
    out = []

    def draw(make):
        for _ in range(1000):
            pair = make()
            if pair["prompt"] not in seen:
                seen.add(pair["prompt"])
                return pair
        raise RuntimeError("preference templates ran out of distinct prompts")

    for lang in ("en", "zh"):
        other = "zh" if lang == "en" else "en"

        def refuse():
            kind, request, opening = _bad_request(lang, rng)
            return {"task": f"refuse_{lang}", "prompt": request,
                    "chosen": _REFUSALS[lang][kind], "rejected": opening}

        def helpful():
            en_q, en_a, zh_q, zh_a = _benign_request(rng)
            q, a = (en_q, en_a) if lang == "en" else (zh_q, zh_a)
            return {"task": f"helpful_{lang}", "prompt": q, "chosen": a,
                    "rejected": rng.choice(_NEEDLESS_REFUSALS[lang])}

        def language():
            en_q, en_a, zh_q, zh_a = _benign_request(rng)
            answers = {"en": en_a, "zh": zh_a}
            return {"task": f"language_{lang}", "prompt": en_q if lang == "en" else zh_q,
                    "chosen": answers[lang], "rejected": answers[other]}

        for make in (refuse, helpful, language):
            out.extend(("valid" if k % PREF_VALID_EVERY == PREF_VALID_EVERY - 1 else "train",
                        draw(make)) for k in range(PREF_PER_GROUP))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _dpo() -> dict[str, tuple]:
    out: dict[str, list] = {s: [] for s in SPLITS}
    for k, (split, pair) in enumerate(_preference_items()):
        pair = dict(pair)
        if k % 7 == 0:  # some pairs carry a system message, as in SFT
            pair["prompt"] = [{"role": "system", "content": SYSTEM_PROMPT},
                              {"role": "user", "content": pair["prompt"]}]
        out[split].append(pair)
    return {s: tuple(v) for s, v in out.items()}


def _preference_sft(every: int = PREF_SFT_EVERY) -> list[dict]:
    """Every `every`-th refuse / helpful training pair's (prompt, chosen) as an SFT
    conversation (train split only)."""
    out = []
    for k, pair in enumerate(p for split, p in _preference_items()
                             if split == "train" and not p["task"].startswith("language")):
        if k % every == 0:
            out.append({"task": pair["task"],
                        "messages": [{"role": "user", "content": pair["prompt"]},
                                     {"role": "assistant", "content": pair["chosen"]}]})
    return out


def _get(table: Callable[[], dict[str, tuple]], split: str) -> list[dict]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return copy.deepcopy(list(table()[split]))  # callers may mutate their copy


def builtin_sft_conversations(split: str = "train") -> list[dict]:
    """[{"task", "messages": [{"role", "content"}, ...]}] for `split` ("train" / "valid")."""
    return _get(_sft, split)


def preference_sft_conversations() -> list[dict]:
    """Every refuse / helpful training pair as an SFT conversation (prompt, chosen reply):
    the built-in SFT set holds every PREF_SFT_EVERY-th of them, sized for the tiny README job;
    the shipped fine-tuning files (data/finetune_files.py) hold them all."""
    return _preference_sft(every=1)


def builtin_dpo_pairs(split: str = "train") -> list[dict]:
    """[{"task", "prompt": str | messages, "chosen": str, "rejected": str}] for `split`."""
    return _get(_dpo, split)
