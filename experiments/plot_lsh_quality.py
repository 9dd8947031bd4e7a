"""The S-curves of each LSH layout with the recall measured by experiments/lsh_quality.py.

    python experiments/plot_lsh_quality.py --results docs/benchmarks/lsh_quality.json \
        --out docs/benchmarks/lsh_quality.png

Dashed: P(candidate) = 1 - (1 - s^r)^b; solid: P(candidate and estimated Jaccard >= threshold),
exact (lsh.detection_probability); points: the fraction of planted pairs confirmed in each
true-Jaccard bin, at the bin's mean Jaccard, with a 95% Wilson interval. Needs matplotlib (not a
dependency of the package: run it with any Python that has matplotlib, numpy and scipy).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from geb_jax.data.clean import lsh  # noqa: E402  pylint: disable=wrong-import-position

COLORS = ("tab:blue", "tab:orange", "tab:red", "tab:green")


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sound at 0% and 100%)."""
    p = hits / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return mid - half, mid + half


def plot(results: dict, out: str) -> None:
    s = np.linspace(0.0, 1.0, 401)
    fig, ax = plt.subplots(figsize=(8, 5))
    for color, lay in zip(COLORS, results["layouts"]):
        b, r, n, t = lay["bands"], lay["rows"], lay["num_perm"], lay["threshold"]
        label = f"{lay['name']}: {b} x {r} of {n}"
        ax.plot(s, lsh.collision_probability(s, b, r), "--", color=color, lw=1,
                label=f"{label}, P(candidate)")
        ax.plot(s, lsh.detection_probability(s, b, r, n, t), "-", color=color, lw=1.5,
                label=f"{label}, P(candidate and est. J >= {t})")
        bins = [x for x in lay["bins"] if x["pairs"] >= 5]
        x = [x["mean_jaccard"] for x in bins]
        y = [x["recall"] for x in bins]
        lo_hi = np.array([wilson(x["confirmed"], x["pairs"]) for x in bins])
        y_err = np.clip([np.array(y) - lo_hi[:, 0], lo_hi[:, 1] - np.array(y)], 0, None)
        ax.errorbar(x, y, yerr=y_err,
                    fmt="o", color=color, ms=4, capsize=2)
    ax.axvspan(0.85, 1.0, color="green", alpha=0.06)
    ax.axvspan(0.0, 0.5, color="grey", alpha=0.08)
    ax.axhline(0.98, color="grey", lw=0.6, ls=":")
    corpus = results["corpus"]
    ax.set(xlabel="true 5-gram Jaccard similarity of the pair", xlim=(0.3, 1.0),
           ylabel="probability the pair is collapsed", ylim=(-0.02, 1.02),
           title=f"MinHash-LSH on planted near-duplicates ({corpus['documents']} documents, "
                 f"{corpus['planted_pairs']} pairs)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(out))
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".png", delete=False) as tmp:
        fig.savefig(tmp.name, dpi=120)
    os.replace(tmp.name, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="docs/benchmarks/lsh_quality.json")
    parser.add_argument("--out", default="docs/benchmarks/lsh_quality.png")
    args = parser.parse_args()
    with open(args.results, encoding="utf-8") as f:
        plot(json.load(f), args.out)
    print(args.out)


if __name__ == "__main__":
    main()
