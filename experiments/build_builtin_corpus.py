"""Regenerate the built-in bilingual corpus shipped in geb_jax/data/builtin/.

The corpus is small (about 3 MB of text) so that the package can train a tokenizer and a tiny
model with no network access. Everything comes from packages installed on a Debian machine and
from the project's own virtualenv, so anyone can rebuild byte-identical files:

    apt-get install bible-kjv dict-devil jargon-text fortunes-zh
    python3 experiments/build_builtin_corpus.py            # writes the files
    python3 experiments/build_builtin_corpus.py --check    # fails if they differ

Sources (licences and provenance are recorded in docs/data.md and builtin/LICENSES.txt):
  en  kjv      Debian bible-kjv-text (King James Bible, public domain), via the `bible` program
  en  devil    Debian dict-devil (Bierce, The Devil's Dictionary, public domain)
  en  jargon   Debian jargon-text (The Jargon File 4.4.7, public domain)
  zh  tang300 / song100 / fortunes   Debian fortunes-zh (GPL-3.0+ compilation of pre-modern
               poems and sayings; modern copyrighted quotations are filtered out)
  zh  debref   Debian fortunes-zh excerpts of the Debian Reference (GPL-2.0+) in Chinese
  code numpy / absl   a fixed list of Python files from numpy (BSD-3-Clause) and absl-py
               (Apache-2.0) as installed in the virtualenv

Output: one JSON object per line, {"text", "source", "lang"}, gzip'd with a fixed mtime so
the bytes are reproducible; split into train/valid by a hash of the text (identical texts
always land in the same split, so duplicates cannot leak from train into valid).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import textwrap
from importlib import metadata
from typing import Iterable, Iterator

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(REPO_ROOT, "geb_jax", "data", "builtin")

# Percentage of documents (by text hash) that go to the held-out split.
VALID_PERCENT = 5
# Per-mille of documents kept from the sources we subsample, tuned for ~3 MB in total.
KJV_KEEP_PER_MILLE = 130
JARGON_KEEP_PER_MILLE = 250
DEBREF_KEEP_PER_MILLE = 300
# Upper bound on one document, in characters: a few hundred words / one function-sized chunk.
MAX_DOC_CHARS = 4000
GROUP_TARGET_CHARS = 1500

ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# Python files taken verbatim (chunked at top-level defs). Fixed list so the corpus does not
# drift when a package adds files; recorded in docs/data.md.
CODE_FILES = {
    "absl": [
        "absl/app.py",
        "absl/flags/_argument_parser.py",
        "absl/flags/_defines.py",
        "absl/flags/_flag.py",
        "absl/flags/_flagvalues.py",
        "absl/flags/_helpers.py",
        "absl/flags/_validators.py",
        "absl/logging/__init__.py",
    ],
    "numpy": [
        "numpy/_core/function_base.py",
        "numpy/_core/numeric.py",
        "numpy/_core/shape_base.py",
        "numpy/lib/_arraypad_impl.py",
        "numpy/lib/_arraysetops_impl.py",
        "numpy/lib/_histograms_impl.py",
        "numpy/lib/_twodim_base_impl.py",
    ],
}
PYPI_DIST = {"absl": "absl-py", "numpy": "numpy"}

# fortunes-zh "chinese" mixes pre-modern texts with quotations from modern, copyrighted books
# (and from software manuals). We keep pre-modern material only: a document is dropped when it
# contains ASCII letters (manuals, English names) or when its text or attribution mentions one
# of these modern authors, works or topics.
ZH_MODERN_MARKERS = (
    "鲁迅", "钱钟书", "赫拉利", "吴军", "浪潮之颠", "钢之炼金术师", "巴金", "三国演义", "毛泽东",
    "老舍", "朱自清", "冰心", "余光中", "陈毅", "胡志明", "王健林", "李彦宏", "雷震", "言峰绮礼",
    "卫宫切嗣", "机械工业出版社", "清华", "显卡", "网吧", "出租车", "营业厅", "读博", "斯托曼",
    "乔布斯", "黑格尔", "网线", "结对编程", "缩进", "权限", "贴纸", "炼丹", "男女生", "美声",
    "吴老板", "最年轻", "协会", "以身作则", "秋瑾", "王国维", "定理", "方程", "矩阵", "公式",
    "编程", "软件", "自由软件", "计算机", "程序", "电脑", "网络", "互联网", "一九", "二〇",
    "黄遵宪", "林则徐", "龚自珍", "科学", "地址", "黄蘖", "中国最",
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr)


def text_hash(text: str) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:16], 16)


def keep(text: str, per_mille: int) -> bool:
    """Deterministic subsample: keep per_mille/1000 of documents, chosen by a salted hash."""
    return text_hash("keep\0" + text) % 1000 < per_mille


def split_of(text: str) -> str:
    return "valid" if text_hash(text) % 100 < VALID_PERCENT else "train"


def clean(text: str) -> str:
    """Drop terminal colour codes and trailing spaces per line; keep everything else."""
    text = ANSI_RE.sub("", text)
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def group(items: Iterable[str], target: int = GROUP_TARGET_CHARS) -> Iterator[str]:
    """Concatenate consecutive short entries (blank line between) into ~target-char documents."""
    buf: list[str] = []
    size = 0
    for item in items:
        if buf and size + len(item) > target:
            yield "\n\n".join(buf)
            buf, size = [], 0
        buf.append(item)
        size += len(item) + 2
    if buf:
        yield "\n\n".join(buf)


def split_long(text: str, limit: int = MAX_DOC_CHARS) -> Iterator[str]:
    """Cut an over-long document at blank lines (then at line ends) into pieces <= limit chars.

    Keeps documents near the size a small model sees in one context window; splitting at
    paragraph / blank-line boundaries keeps each piece readable (a method, a paragraph).
    """
    if len(text) <= limit:
        yield text
        return
    paragraphs = text.split("\n\n")
    buf = ""
    for para in paragraphs:
        pieces = [para]
        if len(para) > limit:  # one huge paragraph: fall back to line boundaries
            pieces, cur = [], ""
            for line in para.split("\n"):
                if cur and len(cur) + len(line) + 1 > limit:
                    pieces.append(cur)
                    cur = ""
                cur = cur + "\n" + line if cur else line
            pieces.append(cur)
        for piece in pieces:
            if buf and len(buf) + len(piece) + 2 > limit:
                yield buf
                buf = ""
            buf = buf + "\n\n" + piece if buf else piece
    if buf.strip():
        yield buf


def deb_version(package: str) -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], check=True,
                         capture_output=True, text=True)
    return out.stdout.strip()


# ---------------------------------------------------------------------------------- English
def kjv_docs() -> Iterator[str]:
    """One document per chapter: 'Genesis 1' then one verse per line ('1 In the beginning...')."""
    out = subprocess.run(["bible", "-l100000", "Ge1:1-Re22:21"], check=True,
                         capture_output=True, text=True).stdout
    chapters = re.split(r"\n\n(?=\S[^\n]* \d+\n\n)", "\n" + out)
    for chapter in chapters:
        chapter = clean(chapter)
        if not chapter:
            continue
        head, _, body = chapter.partition("\n\n")
        verses = [line.strip() for line in body.split("\n") if line.strip()]
        yield head.strip() + "\n\n" + "\n".join(verses)


def devil_docs() -> Iterator[str]:
    """Entries of The Devil's Dictionary read through the dictd index, grouped into documents."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def b64(s: str) -> int:
        n = 0
        for c in s:
            n = n * 64 + alphabet.index(c)
        return n

    with gzip.open("/usr/share/dictd/devil.dict.dz", "rb") as f:
        data = f.read()
    entries = []
    with open("/usr/share/dictd/devil.index", encoding="utf-8") as f:
        for line in f:
            word, off, length = line.rstrip("\n").split("\t")
            if word.startswith("00database"):
                continue
            start = b64(off)
            entries.append((start, clean(data[start:start + b64(length)].decode("utf-8"))))
    entries.sort()
    for doc in group(e for _, e in entries if e):
        yield from split_long(doc)


def jargon_docs() -> Iterator[str]:
    """Glossary entries of the Jargon File (':term: ...' blocks), grouped into documents."""
    with gzip.open("/usr/share/doc/jargon-text/jargon.txt.gz", "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    entries: list[list[str]] = []
    current: list[str] | None = None
    for line in lines:
        if line.startswith("Appendix A"):
            break
        if re.match(r"^   :[^:]+:", line):
            current = [line]
            entries.append(current)
        elif line and not line.startswith("   "):
            current = None  # section / letter heading: what follows is a table of contents
        elif current is not None:
            current.append(line)
    texts = [clean(textwrap.dedent("\n".join(e))) for e in entries]
    for doc in group(t for t in texts if t):
        yield from split_long(doc)


# ---------------------------------------------------------------------------------- Chinese
def fortune_file(name: str) -> list[str]:
    with open(os.path.join("/usr/share/games/fortunes", name), encoding="utf-8") as f:
        return [clean(d) for d in f.read().split("\n%\n") if clean(d)]


def is_premodern(doc: str) -> bool:
    if re.search(r"[A-Za-z]", doc):
        return False
    return not any(marker in doc for marker in ZH_MODERN_MARKERS)


def fortunes_zh_docs() -> Iterator[tuple[str, str]]:
    """(source, text) pairs: tang300 / song100 whole, 'chinese' split into classical / debref."""
    for name in ("tang300", "song100"):
        for doc in fortune_file(name):
            yield name, doc
    classical = []
    for doc in fortune_file("chinese"):
        if "Debian 参考手册" in doc:
            if keep(doc, DEBREF_KEEP_PER_MILLE):
                for piece in split_long(doc):
                    yield "debref", piece
        elif is_premodern(doc):
            classical.append(doc)
    # Many sayings are one line: group neighbours so a document is a few hundred characters.
    for doc in group(classical, target=600):
        yield "fortunes", doc


# ------------------------------------------------------------------------------------ code
def chunk_python(source: str, limit: int = MAX_DOC_CHARS) -> Iterator[str]:
    """Split at top-level def/class/decorator lines; pack consecutive blocks up to `limit`."""
    blocks: list[str] = []
    cur: list[str] = []
    for line in source.split("\n"):
        if re.match(r"^(def |class |async def |@)", line) and cur and not re.match(r"^@", cur[-1]):
            blocks.append("\n".join(cur))
            cur = []
        cur.append(line)
    blocks.append("\n".join(cur))
    buf = ""
    for block in blocks:
        if buf and len(buf) + len(block) + 1 > limit:
            yield buf.strip("\n") + "\n"
            buf = ""
        buf = buf + "\n" + block if buf else block
    if buf.strip():
        yield buf.strip("\n") + "\n"


def code_docs() -> Iterator[tuple[str, str]]:
    for pkg, files in CODE_FILES.items():
        dist = metadata.distribution(PYPI_DIST[pkg])
        for rel in files:
            path = dist.locate_file(rel)
            with open(path, encoding="utf-8") as f:
                src = f.read().replace("\r\n", "\n")
            for chunk in chunk_python(src):
                for piece in split_long(chunk):
                    yield pkg, f"# {rel}\n" + piece.strip("\n") + "\n"


# ---------------------------------------------------------------------------------- driver
def collect() -> tuple[list[dict], dict]:
    docs: list[dict] = []

    def add(text: str, source: str, lang: str) -> None:
        if text.strip():
            docs.append({"text": text, "source": source, "lang": lang})

    for t in kjv_docs():
        if keep(t, KJV_KEEP_PER_MILLE):
            add(t, "kjv", "en")
    for t in devil_docs():
        add(t, "devil", "en")
    for t in jargon_docs():
        if keep(t, JARGON_KEEP_PER_MILLE):
            add(t, "jargon", "en")
    for source, t in fortunes_zh_docs():
        add(t, source, "zh")
    for source, t in code_docs():
        add(t, source, "code")

    # Exact duplicates (the fortune files repeat some sayings) would only waste space.
    seen: set[str] = set()
    unique = []
    for d in docs:
        if d["text"] not in seen:
            seen.add(d["text"])
            unique.append(d)

    provenance = {
        "debian": {p: deb_version(p) for p in
                   ("bible-kjv-text", "bible-kjv", "dict-devil", "jargon-text", "fortunes-zh")},
        "pypi": {d: metadata.version(d) for d in PYPI_DIST.values()},
        "code_files": CODE_FILES,
    }
    return unique, provenance


LICENSE_SOURCES = [
    # (source, lang, package, kind, licence)
    ("kjv", "en", "bible-kjv-text", "deb", "public domain (King James Version, 1611)"),
    ("devil", "en", "dict-devil", "deb", "public domain (A. Bierce, The Devil's Dictionary, 1911)"),
    ("jargon", "en", "jargon-text", "deb", "public domain (The Jargon File 4.4.7)"),
    ("tang300", "zh", "fortunes-zh", "deb", "GPL-3.0-or-later compilation of pre-modern poems"),
    ("song100", "zh", "fortunes-zh", "deb", "GPL-3.0-or-later compilation of pre-modern poems"),
    ("fortunes", "zh", "fortunes-zh", "deb", "GPL-3.0-or-later compilation of pre-modern texts"),
    ("debref", "zh", "fortunes-zh", "deb",
     "GPL-3.0-or-later (Debian Reference, Osamu Aoki et al., GPL-2.0-or-later)"),
    ("numpy", "code", "numpy", "pypi", "BSD-3-Clause (text below)"),
    ("absl", "code", "absl-py", "pypi", "Apache-2.0 (text below)"),
]

LICENSE_NOTES = """
fortunes-zh: Copyright 2001-2009 Yu Guanghui, 2015-2019 Mo Zhou, 2020-2021 xiao sheng wen;
GPL-3.0-or-later. The documents with source tang300 / song100 / fortunes / debref are taken from
it (terminal colour codes removed, short sayings grouped) and are redistributed under the GNU
General Public License version 3 or later (text below). They are plain text, so these files are
their own source; experiments/build_builtin_corpus.py in the geb_jax repository regenerates them
from the Debian package. The debref documents are excerpts of the Chinese translation of the
Debian Reference (Copyright 2007-2013 Osamu Aoki and translators, GPL-2.0-or-later).

The Python documents (numpy, absl) are unmodified excerpts of the files named in their first
line, cut at top-level definitions.
"""


def licenses_text(provenance: dict) -> str:
    import importlib.metadata as md
    versions = dict(provenance["debian"], **provenance["pypi"])
    title = "Licences of the built-in corpus (geb_jax/data/builtin/*.jsonl.gz)"
    lines = [title, "=" * len(title), "",
             'Each document carries a "source" field; its licence depends on it.', "",
             f"{'source':9s} {'lang':5s} {'taken from':32s} licence"]
    for source, lang, pkg, kind, lic in LICENSE_SOURCES:
        origin = f"{pkg} {versions[pkg]} ({'Debian' if kind == 'deb' else 'PyPI'})"
        lines.append(f"{source:9s} {lang:5s} {origin:32s} {lic}")
    parts = ["\n".join(lines) + "\n" + LICENSE_NOTES + "\n"]
    numpy_license = md.distribution("numpy").read_text("licenses/LICENSE.txt") or ""
    # Only NumPy's own licence: the binary wheel's bundled libraries are not in the corpus.
    numpy_license = numpy_license.split("\n----")[0].strip()
    absl_license = md.distribution("absl-py").read_text("licenses/LICENSE") or ""
    with open("/usr/share/common-licenses/GPL-3", encoding="utf-8") as f:
        gpl3 = f.read()
    for title, body in (("NumPy (BSD-3-Clause)", numpy_license),
                        ("absl-py (Apache License 2.0)", absl_license.strip()),
                        ("fortunes-zh (GNU GPL version 3)", gpl3.strip())):
        parts.append("=" * 78 + "\n" + title + "\n" + "=" * 78 + "\n\n" + body + "\n\n")
    return "".join(parts)


def write_jsonl_gz(path: str, docs: list[dict]) -> bytes:
    raw = io.BytesIO()
    # mtime=0 and no file name in the header: identical input gives identical bytes.
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
        for d in docs:
            gz.write((json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))
    return raw.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=OUT_DIR)
    ap.add_argument("--check", action="store_true",
                    help="do not write; exit 1 if the generated files differ from those in --out")
    args = ap.parse_args()

    docs, provenance = collect()
    splits = {"train": [], "valid": []}
    for d in docs:
        splits[split_of(d["text"])].append(d)

    stats: dict = {}
    outputs = {}
    for split, items in splits.items():
        outputs[f"{split}.jsonl.gz"] = write_jsonl_gz(split, items)
        for d in items:
            s = stats.setdefault(split, {}).setdefault(d["source"], {
                "lang": d["lang"], "documents": 0, "bytes": 0, "characters": 0})
            s["documents"] += 1
            s["bytes"] += len(d["text"].encode("utf-8"))
            s["characters"] += len(d["text"])
    manifest = {
        "format": "gzip'd JSONL, one document per line: text, source, lang (en|zh|code)",
        "valid_percent": VALID_PERCENT,
        "provenance": provenance,
        "files": {name: {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
                  for name, blob in outputs.items()},
        "stats": stats,
    }
    outputs["LICENSES.txt"] = licenses_text(provenance).encode("utf-8")
    outputs["manifest.json"] = (json.dumps(manifest, indent=1, ensure_ascii=False,
                                           sort_keys=True) + "\n").encode("utf-8")

    for split, per_source in stats.items():
        for source, s in sorted(per_source.items()):
            log(f"{split:5s} {s['lang']:4s} {source:9s} docs={s['documents']:5d} "
                f"bytes={s['bytes']:8d} chars={s['characters']:8d}")
    for name, blob in outputs.items():
        log(f"{name}: {len(blob)} bytes")

    if args.check:
        stale = []
        for name, blob in outputs.items():
            path = os.path.join(args.out, name)
            if not os.path.exists(path) or open(path, "rb").read() != blob:
                stale.append(name)
        if stale:
            log(f"out of date: {stale}")
            return 1
        log("built-in corpus is up to date")
        return 0
    os.makedirs(args.out, exist_ok=True)
    for name, blob in outputs.items():
        tmp = os.path.join(args.out, f".{name}.tmp")
        with open(tmp, "wb") as f:
            f.write(blob)
        os.replace(tmp, os.path.join(args.out, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
