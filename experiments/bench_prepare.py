"""Documents/s and MB/s per core of `python3 -m geb_jax.data.prepare`: the single-process chain
against the Beam pipeline on the local runner, same corpus, same run; peak memory; how the
MinHash stage's time grows with the corpus.

    python experiments/bench_data.py prepare                           # 10x corpus, workers 1,2
    python experiments/bench_data.py prepare --scales 1 --minhash-scales 1 --workers 1  # smoke
    python experiments/bench_data.py prepare --workers 1,2,4,8 --scales 1,10   # a bigger machine

Corpus: the built-in corpus (train + valid, 1,939 documents, 2.9 MB) repeated `scale` times. Copy
0 is the original; in copy c >= 1 of a document, each word (a run of ASCII letters, digits or _)
is replaced with probability --perturb (default 0.3) by a word drawn from the same document, and
each Chinese character likewise by a Chinese character of the same document.
Punctuation, whitespace and line structure stay, so the rules see text shaped like the original
(same line ends, word lengths, stop-word rates); but ~80% of a copy's 5-gram shingles change
(Jaccard with the original ~0.1), so neither exact nor near dedup removes the copies, and every
stage does 10x the work. An unperturbed 10x corpus would measure dedup dropping 90% of it.
Checked at 2x (the original + one copy, default chain, 2026-12-03): 3,844 of 3,878 documents
kept (99.1%, as 1,922 of 1,939 at 1x); lang_id, incomplete, gopher and c4 drop 7 / 4 / 12 / 10
documents (3 / 2 / 6 / 5 at 1x), near_dedup none.

Each run is `python3 -m geb_jax.data.prepare --config configs/tiny.py --input CORPUS --output
DIR --no-progress [--runner=FnApiRunner --direct_num_workers=N --direct_running_mode=M]` in a
fresh process (M: in_memory for 1 worker, multi_processing - one worker process each, no shared
GIL - for more, unless --beam-args names a mode), timed
with os.wait4: wall seconds, CPU seconds (user + sys of the process and every worker process it
waited for), the largest single process's peak RSS (exact, from the kernel), and the sum of the
RSS of the whole process tree sampled every 0.2 s (psutil; a lower bound: a peak shorter than
0.2 s is missed, so it can read below the largest process). Per core = per CPU second. Beam rows are skipped, with a
message, when prepare has no --runner option.

MinHash stage: the streaming NearDuplicateDeduper (signatures, band index, Jaccard checks)
timed alone, in this process, over the 1x, 4x and 10x corpora.

Prints markdown tables for docs/benchmarks.md and writes a JSON (machine, CPU flags, date).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from geb_jax.atomic_io import write_json_atomic  # noqa: E402
from geb_jax.data.corpus import builtin_documents  # noqa: E402

_WORD = re.compile(r"[A-Za-z0-9_]+")
_CJK = re.compile(r"[\u4e00-\u9fff]")


# ----------------------------------------------------------------------------- corpus

def perturb(text: str, p: float, rng: np.random.Generator) -> str:
    """Each word (a run of ASCII letters, digits or _) and each Chinese character replaced with
    probability p by a word (a character) of the same document; everything else (punctuation,
    spaces, newlines) kept in place."""
    for unit in (_WORD, _CJK):
        pool = unit.findall(text)
        if pool:
            text = unit.sub(lambda m, pool=pool: pool[rng.integers(len(pool))]
                            if rng.random() < p else m.group(0), text)
    return text


def write_corpus(path: str, scale: int, p: float, seed: int = 0,
                 limit: int | None = None) -> tuple[int, int]:
    """The built-in corpus (train + valid; its first `limit` documents) `scale` times as JSONL;
    (documents, text bytes)."""
    docs = (list(builtin_documents("train")) + list(builtin_documents("valid")))[:limit]
    rng = np.random.default_rng(seed)
    n_docs = n_bytes = 0
    with open(path, "w", encoding="utf-8") as f:
        for copy in range(scale):
            for doc in docs:
                text = doc["text"] if copy == 0 else perturb(doc["text"], p, rng)
                f.write(json.dumps({**doc, "text": text}, ensure_ascii=False) + "\n")
                n_docs += 1
                n_bytes += len(text.encode("utf-8"))
    return n_docs, n_bytes


def read_corpus(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- machine

def machine() -> dict:
    info = {"machine": platform.machine(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "load_average_1m": os.getloadavg()[0],
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    info.setdefault("cpu", value.strip())
                elif key == "flags":
                    info.setdefault("cpu_flags", value.split())
    except OSError:
        info["cpu"] = platform.processor()
    return info


# --------------------------------------------------------------------------------- runs

def _tree_rss(pid: int) -> int:
    import psutil
    try:
        proc = psutil.Process(pid)
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def timed(cmd: list[str], log: str) -> dict:
    """Runs `cmd`; wall s, CPU s, peak RSS of the largest process and of the sampled tree."""
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": REPO})
    peak = [0]
    done = threading.Event()

    def sample():
        try:
            import psutil  # noqa: F401
        except ImportError:
            peak[0] = -1
            return
        while not done.wait(0.2):
            peak[0] = max(peak[0], _tree_rss(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    return {"returncode": proc.returncode, "wall_s": wall,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "max_process_rss_mb": usage.ru_maxrss / 1024,  # Linux: KiB
            "tree_rss_peak_mb": peak[0] / 2 ** 20 if peak[0] >= 0 else None}


def has_runner() -> bool:
    r = subprocess.run([sys.executable, "-m", "geb_jax.data.prepare", "--help"], cwd=REPO,
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO})
    return "--runner" in r.stdout


def prepare_run(corpus: str, out: str, n_docs: int, n_bytes: int, workers: int | None,
                beam_args: list[str], config: str) -> dict:
    cmd = [sys.executable, "-m", "geb_jax.data.prepare", "--config", config, "--input", corpus,
           "--output", out, "--no-progress"]
    mode = None
    if workers is not None:
        mode_args = [a for a in beam_args if a.startswith("--direct_running_mode")]
        mode = (mode_args[-1].split("=", 1)[1] if mode_args else
                "in_memory" if workers == 1 else "multi_processing")
        cmd += ["--runner=FnApiRunner", f"--direct_num_workers={workers}",
                *([] if mode_args else [f"--direct_running_mode={mode}"]), *beam_args]
    row = {"path": "single process" if workers is None else f"Beam FnApiRunner, {mode}",
           "workers": workers, "command": " ".join(cmd[1:]), "documents_in": n_docs,
           "mb_in": n_bytes / 1e6, **timed(cmd, out + ".log")}
    if row["returncode"] != 0:
        with open(out + ".log", encoding="utf-8") as f:
            row["error"] = f.read()[-2000:]
        return row
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        row["documents_out"] = json.load(f)["documents_out"]
    row.update(docs_per_s=n_docs / row["wall_s"], mb_per_s=row["mb_in"] / row["wall_s"],
               docs_per_cpu_s=n_docs / row["cpu_s"], mb_per_cpu_s=row["mb_in"] / row["cpu_s"])
    return row


def minhash_stage(docs: list[dict]) -> dict:
    """The streaming near-dedup step alone over `docs`: seconds, and documents it dropped."""
    from geb_jax.data.clean.dedup import NearDuplicateDeduper
    nd = NearDuplicateDeduper()
    start, cpu = time.perf_counter(), time.process_time()
    dropped = sum(nd(doc) is None for doc in docs)
    return {"documents": len(docs), "wall_s": time.perf_counter() - start,
            "cpu_s": time.process_time() - cpu, "dropped": dropped,
            "layout": f"{nd.bands} x {nd.rows} of {nd.num_perm}"}


# ------------------------------------------------------------------------------- report

def _mb(x) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"{result['date']}, {m.get('cpu', '?')}, {m['cpu_count']} cores, load average "
             f"{m['load_average_1m']:.2f} at start; `{result['command']}`", "",
             "| corpus | path | workers | docs in | MB in | docs out | wall s | CPU s | docs/s "
             "| MB/s | docs/s per core | MB/s per core | peak RSS, tree, sampled (MB) | peak RSS, "
             "largest process (MB) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| ---: | ---: |"]
    for r in result["runs"]:
        head = (f"| {r['scale']}x | {r['path']} | {r['workers'] or 1} | {r['documents_in']:,} "
                f"| {r['mb_in']:.1f} |")
        if r["returncode"] != 0:
            lines.append(head + f" failed (exit {r['returncode']}) |" + " |" * 10)
            continue
        lines.append(head + f" {r['documents_out']:,} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
                     f"{r['docs_per_s']:,.0f} | {r['mb_per_s']:.2f} | {r['docs_per_cpu_s']:,.0f}"
                     f" | {r['mb_per_cpu_s']:.2f} | {_mb(r['tree_rss_peak_mb'])} | "
                     f"{_mb(r['max_process_rss_mb'])} |")
    if result.get("beam_skipped"):
        lines += ["", f"Beam rows skipped: {result['beam_skipped']}"]
    stage = result["minhash_stage"]
    if stage:
        base = stage[0]["cpu_s"] / stage[0]["documents"]
        lines += ["", f"MinHash stage alone (streaming NearDuplicateDeduper, {stage[0]['layout']}"
                  f", in one process):", "",
                  "| corpus | documents | dropped | wall s | CPU s | CPU us / document | "
                  "vs 1x per document |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {s['scale']}x | {s['documents']:,} | {s['dropped']} | {s['wall_s']:.2f} | "
                  f"{s['cpu_s']:.2f} | {s['cpu_s'] / s['documents'] * 1e6:,.0f} | "
                  f"{s['cpu_s'] / s['documents'] / base:.2f}x |" for s in stage]
    return "\n".join(lines)


def run(scales: list[int], minhash_scales: list[int], workers: list[int], beam_args: list[str],
        perturbation: float, config: str, limit: int | None = None, progress=print) -> dict:
    beam = has_runner()
    result = {"machine": machine(), "perturbation": perturbation, "config": config,
              "builtin_documents_used": limit or "all",
              "runs": [], "minhash_stage": [],
              "beam_skipped": None if beam else "this checkout's prepare has no --runner "
                                               "(the Beam pipeline is not merged here)"}
    if not beam:
        progress("Beam rows skipped: " + result["beam_skipped"])
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        for scale in sorted(set(scales) | set(minhash_scales)):
            corpus = os.path.join(tmp, f"corpus_{scale}x.jsonl")
            n_docs, n_bytes = write_corpus(corpus, scale, perturbation, limit=limit)
            progress(f"{scale}x corpus: {n_docs:,} documents, {n_bytes / 1e6:.1f} MB")
            if scale in minhash_scales:
                result["minhash_stage"].append({"scale": scale,
                                                **minhash_stage(read_corpus(corpus))})
                progress(f"  MinHash stage: {result['minhash_stage'][-1]['cpu_s']:.1f} s CPU")
            if scale not in scales:
                continue
            for w in [None] + (workers if beam else []):
                out = os.path.join(tmp, f"out_{scale}x_{w or 0}")
                row = {"scale": scale, **prepare_run(corpus, out, n_docs, n_bytes, w,
                                                     beam_args, config)}
                result["runs"].append(row)
                progress(f"  {row['path']} ({w or 1} workers): exit {row['returncode']}, "
                         f"{row['wall_s']:.1f} s wall, {row['cpu_s']:.1f} s CPU")
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="10", help="corpus sizes for the prepare runs")
    parser.add_argument("--minhash-scales", default="1,4,10")
    parser.add_argument("--workers", default="1,2", help="Beam --direct_num_workers values")
    parser.add_argument("--beam-args", default="",
                        help="more Beam options, e.g. '--direct_running_mode=in_memory'")
    parser.add_argument("--perturb", type=float, default=0.3)
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--docs", type=int, default=None,
                        help="use only the first N built-in documents (tests, smoke runs)")
    parser.add_argument("--json", default="docs/benchmarks/bench_prepare.json")
    args = parser.parse_args(argv)

    def ints(s):
        return [int(x) for x in s.split(",") if x.strip()]

    result = run(ints(args.scales), ints(args.minhash_scales), ints(args.workers),
                 args.beam_args.split(), args.perturb, args.config, args.docs,
                 progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    result.update(command="python " + " ".join(sys.argv),
                  date=result["machine"]["date"])
    write_json_atomic(args.json, result)
    print(markdown(result))


if __name__ == "__main__":
    main()
