"""Decode tokens/s of every engine and dtype, one panel per model, from bench_cpu.py's JSON.

    python experiments/plot_bench_cpu.py --results docs/benchmarks/bench_cpu.json \
        --out docs/benchmarks/cpu_decode.png

Bars are the measured decode tokens/s; the black tick on each bar is that row's bandwidth
bound (bandwidth measured before the row / weight bytes per token), so a reader sees both the
ranking and how close each engine gets to what the memory allows.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position

ENGINE_ORDER = ("numpy", "onnxruntime", "torch", "llama_cpp")
DTYPE_ORDER = ("f32", "f16", "bf16", "int8", "int4")
COLORS = {"numpy": "tab:blue", "onnxruntime": "tab:orange", "torch": "tab:green",
          "llama_cpp": "tab:red"}


def ok_rows(results: dict) -> list[dict]:
    return [r for r in results["rows"] if r.get("status") == "ok"]


def plot(results: dict, out: str) -> None:
    rows = ok_rows(results)
    models = list(dict.fromkeys(r["model"] for r in rows))
    if not models:
        raise SystemExit("no rows with status ok in the results file")
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = sorted((r for r in rows if r["model"] == model),
                      key=lambda r: (DTYPE_ORDER.index(r["dtype"]),
                                     ENGINE_ORDER.index(r["engine"])))
        xs = range(len(mine))
        ax.bar(xs, [r["decode_tok_s"] for r in mine],
               color=[COLORS[r["engine"]] for r in mine])
        ax.scatter(xs, [r["bound_tok_s"] for r in mine], marker="_", s=200, color="black",
                   zorder=3, label="bandwidth bound")
        ax.set_xticks(list(xs), [f"{r['dtype']}\n{r['engine'].replace('_', '.')}" for r in mine],
                      rotation=90, fontsize=7)
        ax.set_yscale("log")
        ax.set_title(model)
        ax.set_ylabel("decode tokens/s (batch 1)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[e]) for e in ENGINE_ORDER]
    fig.legend(handles + [axes[0][0].collections[0]], list(ENGINE_ORDER) + ["bandwidth bound"],
               loc="upper center", ncol=5, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=folder)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, help="bench_cpu.py --out file")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    with open(args.results) as f:
        plot(json.load(f), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
