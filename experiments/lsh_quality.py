"""Recall and precision of the MinHash-LSH stage on planted near-duplicates of known Jaccard.

    python experiments/lsh_quality.py                        # ~1 min on one core
    python experiments/lsh_quality.py --families 200 --json /tmp/q.json

Corpus: `--families` families of one base document (`--words` random words from a 20,000-word
made-up vocabulary, so unrelated documents share no 5-gram) and `--copies` copies, each with k
words replaced by new words at random positions; k is drawn so that the copies' 5-gram Jaccard
with the base spreads evenly over [--low, 1), except a fraction --focus of the copies, drawn over
[0.8, 0.95] where the threshold and the target sit. The true Jaccard of every pair in a family is
computed by brute force on the shingle sets (dedup.shingles, as the chain shingles); pairs across
families are checked on a random sample (and every cross-family candidate is checked), so a
recall over all planted pairs and a precision over all confirmed pairs are exact.

LSH stage, as the Beam pipeline runs it: signature -> band_keys -> group by key -> candidate
pairs (every pair sharing a key) -> estimated Jaccard >= threshold -> confirmed. Layouts: the
default (256 values, lsh.choose_bands), the alternative (128 values, lsh.choose_bands), and the
chain before issue 16 (128 values, datasketch's optimal_param at 0.8 = (9, 13)). Writes a JSON
(docs/benchmarks/lsh_quality.json) and prints a markdown table per layout; plot it with
experiments/plot_lsh_quality.py.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from geb_jax.atomic_io import write_json_atomic  # noqa: E402
from geb_jax.data.clean import lsh  # noqa: E402
from geb_jax.data.clean.dedup import shingles  # noqa: E402

BIN_EDGES = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.825, 0.85, 0.875, 0.9, 0.95, 1.0 + 1e-9)
NGRAM = 5
FOCUS = (0.8, 0.95)  # where the target (>= 98% at 0.85) and the threshold (0.8) are decided


# ----------------------------------------------------------------------------- corpus

def _vocabulary(rng: np.random.Generator, size: int) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(letters, rng.integers(3, 10))))
    return sorted(words)


def _replacements_for(target_j: float, words: int) -> int:
    """Words to replace so that the expected 5-gram Jaccard is about `target_j`."""
    shingle_count = words - NGRAM + 1
    broken = shingle_count * (1 - target_j) / (1 + target_j)  # J = (S - m) / (S + m)
    return max(1, round(words * (1 - (1 - broken / shingle_count) ** (1 / NGRAM))))


def planted_corpus(families: int, copies: int, words: int, low: float, seed: int,
                   focus: float = 0.0) -> tuple[list[str], list[list[int]]]:
    """(texts, families as lists of document ids); see the module docstring."""
    rng = np.random.default_rng(seed)
    vocab = _vocabulary(rng, 20_000)
    fresh = (f"new{i}x" for i in itertools.count())  # replacement words in no base document
    texts: list[str] = []
    groups: list[list[int]] = []
    for _ in range(families):
        base = [vocab[i] for i in rng.integers(0, len(vocab), words)]
        group = [len(texts)]
        texts.append(" ".join(base))
        for _ in range(copies):
            lo, hi = (FOCUS if rng.random() < focus else (low, 1.0))
            k = _replacements_for(float(rng.uniform(lo, hi)), words)
            copy = list(base)
            for pos in rng.choice(words, size=min(k, words), replace=False):
                copy[pos] = next(fresh)
            group.append(len(texts))
            texts.append(" ".join(copy))
        groups.append(group)
    return texts, groups


def exact_jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def truth(sets: list[set], groups: list[list[int]], sample: int,
          seed: int) -> tuple[dict[tuple[int, int], float], float]:
    """Exact Jaccard of every within-family pair; max over `sample` random cross-family pairs."""
    pairs = {(u, v): exact_jaccard(sets[u], sets[v])
             for g in groups for u, v in itertools.combinations(g, 2)}
    family = {d: i for i, g in enumerate(groups) for d in g}
    rng = np.random.default_rng(seed + 1)
    worst = 0.0
    for u, v in rng.integers(0, len(sets), (sample, 2)):
        if family[int(u)] != family[int(v)]:
            worst = max(worst, exact_jaccard(sets[int(u)], sets[int(v)]))
    return pairs, worst


# -------------------------------------------------------------------------- LSH stage

def lsh_stage(sets: list[set], num_perm: int, bands: int, rows: int,
              threshold: float) -> tuple[dict[tuple[int, int], float], float]:
    """({candidate pair: estimated Jaccard}, seconds), as the Beam graph computes them."""
    start = time.perf_counter()
    perms = lsh.permutations(num_perm)
    sigs = [lsh.signature(s, num_perm, perms=perms) for s in sets]
    buckets: dict[bytes, list[int]] = {}
    for doc, sig in enumerate(sigs):
        for key in lsh.band_keys(sig, bands, rows):
            buckets.setdefault(key, []).append(doc)
    candidates = {}
    for members in buckets.values():
        for u, v in itertools.combinations(members, 2):
            if (u, v) not in candidates:
                candidates[(u, v)] = lsh.estimated_jaccard(sigs[u], sigs[v])
    return candidates, time.perf_counter() - start


def evaluate(layout: dict, sets: list[set], true_j: dict, threshold: float) -> dict:
    """Per-bin recall and candidate rate, predicted detection, and precision for one layout."""
    n, b, r = layout["num_perm"], layout["bands"], layout["rows"]
    candidates, seconds = lsh_stage(sets, n, b, r, threshold)
    confirmed = {p for p, est in candidates.items() if est >= threshold}
    for p in candidates:  # a cross-family candidate: its true Jaccard, by brute force
        if p not in true_j:
            true_j[p] = exact_jaccard(sets[p[0]], sets[p[1]])
    js = np.array([true_j[p] for p in true_j])
    keys = list(true_j)
    predicted = lsh.detection_probability(js, b, r, n, threshold)
    bins = []
    for lo, hi in zip(BIN_EDGES[:-1], BIN_EDGES[1:]):
        idx = [i for i, j in enumerate(js) if lo <= j < hi]
        if not idx:
            continue
        hits = sum(keys[i] in confirmed for i in idx)
        bins.append({"lo": lo, "hi": min(hi, 1.0), "pairs": len(idx),
                     "mean_jaccard": float(js[idx].mean()),
                     "candidates": sum(keys[i] in candidates for i in idx),
                     "confirmed": hits, "recall": hits / len(idx),
                     "predicted": float(predicted[idx].mean())})
    high = [p for p in true_j if true_j[p] >= 0.85]
    conf_j = [true_j[p] for p in confirmed]
    return {**layout, "threshold": threshold, "seconds": seconds,
            "summary": {
                "pairs_at_least_0.85": len(high),
                "recall_at_least_0.85": sum(p in confirmed for p in high) / max(len(high), 1),
                "confirmed_at_most_0.5": sum(j <= 0.5 for j in conf_j),
                "confirmed": len(confirmed),
                "precision_at_threshold": sum(j >= threshold for j in conf_j) / max(len(conf_j), 1),
                "precision_at_0.7": sum(j >= 0.7 for j in conf_j) / max(len(conf_j), 1),
                "candidates": len(candidates),
                "candidates_per_document": len(candidates) / len(sets)},
            "bins": bins}


# ------------------------------------------------------------------------------ report

def layouts(threshold: float) -> list[dict]:
    from datasketch.lsh import _optimal_param  # today's choice: MinHashLSH(threshold, 128)
    default = lsh.choose_bands(256, threshold)
    alternative = lsh.choose_bands(128, threshold)
    today = _optimal_param(threshold, 128, 0.5, 0.5)
    return [{"name": "default", "num_perm": 256, "bands": default[0], "rows": default[1],
             "how": "lsh.choose_bands(256, threshold)"},
            {"name": "alternative", "num_perm": 128, "bands": alternative[0],
             "rows": alternative[1], "how": "lsh.choose_bands(128, threshold)"},
            {"name": "before issue 16", "num_perm": 128, "bands": today[0], "rows": today[1],
             "how": "datasketch MinHashLSH(threshold, num_perm=128) optimal_param"}]


def markdown(result: dict) -> str:
    lines = []
    for lay in result["layouts"]:
        s = lay["summary"]
        lines += [f"**{lay['name']}**: {lay['num_perm']} values, {lay['bands']} bands x "
                  f"{lay['rows']} rows ({lay['how']}), estimated Jaccard >= {lay['threshold']}; "
                  f"recall at J >= 0.85: {s['recall_at_least_0.85']:.1%} of "
                  f"{s['pairs_at_least_0.85']} pairs; confirmed at J <= 0.5: "
                  f"{s['confirmed_at_most_0.5']}; precision (J >= {lay['threshold']}) "
                  f"{s['precision_at_threshold']:.1%}, (J >= 0.7) {s['precision_at_0.7']:.1%}; "
                  f"{s['candidates_per_document']:.2f} candidate pairs per document", "",
                  "| true Jaccard | pairs | candidates | confirmed (recall) | predicted |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| [{b['lo']:g}, {b['hi']:g}) | {b['pairs']} | {b['candidates']} | "
                  f"{b['confirmed']} ({b['recall']:.1%}) | {b['predicted']:.1%} |"
                  for b in lay["bins"]]
        lines.append("")
    return "\n".join(lines)


def run(families: int, copies: int, words: int, low: float, seed: int, threshold: float,
        sample: int, focus: float = 0.0, progress=print) -> dict:
    texts, groups = planted_corpus(families, copies, words, low, seed, focus)
    sets = [shingles(t, "en", NGRAM) for t in texts]
    true_j, worst = truth(sets, groups, sample, seed)
    progress(f"{len(texts)} documents, {len(true_j)} planted pairs, max Jaccard of {sample} "
             f"random cross-family pairs {worst:.3f}")
    results = []
    for lay in layouts(threshold):
        progress(f"layout {lay['name']}: {lay['bands']} x {lay['rows']} of {lay['num_perm']}")
        results.append(evaluate(lay, sets, dict(true_j), threshold))
    return {"corpus": {"families": families, "copies": copies, "words": words, "low": low,
                       "focus": focus, "focus_range": FOCUS, "seed": seed, "documents": len(texts), "planted_pairs": len(true_j),
                       "cross_family_sample": sample, "cross_family_max_jaccard": worst},
            "layouts": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", type=int, default=1500)
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--words", type=int, default=300)
    parser.add_argument("--low", type=float, default=0.3, help="lowest target Jaccard")
    parser.add_argument("--focus", type=float, default=0.5,
                        help="fraction of copies with a target Jaccard in [0.8, 0.95]")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--sample", type=int, default=20_000, help="cross-family pairs checked")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="docs/benchmarks/lsh_quality.json")
    args = parser.parse_args()
    result = run(args.families, args.copies, args.words, args.low, args.seed, args.threshold,
                 args.sample, args.focus, progress=lambda m: print(m, file=sys.stderr, flush=True))
    result.update(command="python " + " ".join(sys.argv),
                  date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                          f"python {platform.python_version()}")
    write_json_atomic(args.json, result)
    print(markdown(result))


if __name__ == "__main__":
    main()
