"""Decode tokens/s of every engine and dtype, one panel per model, from bench_cpu.py's JSON.

    python experiments/plot_bench_cpu.py --results docs/benchmarks/bench_cpu.json \
        --out docs/benchmarks/cpu_decode.png

Bars are the measured decode tokens/s; the black tick on each bar is that row's read-bandwidth
bound (the run's bound, see bench_cpu.py, / weight bytes per token), so a reader sees both the
ranking and how close each engine gets to what the memory allows. Rows whose weights fit in the
last-level cache have no tick (they are compute/overhead-bound) and are hatched.
"""
from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position

from geb_jax.atomic_io import atomic_path  # noqa: E402  pylint: disable=wrong-import-position

ENGINE_ORDER = ("numpy", "onnxruntime", "onnxruntime_fused", "ort_genai", "torch", "llama_cpp")
DTYPE_ORDER = ("f32", "f16", "bf16", "int8", "int4")
COLORS = {"numpy": "tab:blue", "onnxruntime": "tab:orange", "onnxruntime_fused": "tab:brown",
          "ort_genai": "tab:purple", "torch": "tab:green", "llama_cpp": "tab:red"}


def ok_rows(results: dict) -> list[dict]:
    return [r for r in results["rows"] if r.get("status") == "ok"]


def _rank(order, value):
    return order.index(value) if value in order else len(order)


def plot(results: dict, out: str) -> None:
    rows = ok_rows(results)
    models = list(dict.fromkeys(r["model"] for r in rows))
    if not models:
        raise SystemExit("no rows with status ok in the results file")
    fig, axes = plt.subplots(1, len(models), figsize=(max(4.6 * len(models), 7.5), 4.6),
                             squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = sorted((r for r in rows if r["model"] == model),
                      key=lambda r: (_rank(DTYPE_ORDER, r["dtype"]),
                                     _rank(ENGINE_ORDER, r["engine"])))
        xs = list(range(len(mine)))
        bars = ax.bar(xs, [r["decode_tok_s"] for r in mine],
                      color=[COLORS.get(r["engine"], "gray") for r in mine])
        for bar, r in zip(bars, mine):
            if r.get("bound", "memory") != "memory":
                bar.set_hatch("//")
        ticked = [(x, r["bound_tok_s"]) for x, r in zip(xs, mine) if r.get("bound_tok_s")]
        ax.scatter([x for x, _ in ticked], [b for _, b in ticked], marker="_", s=200,
                   color="black", zorder=3, label="read-bandwidth bound")
        ax.set_xticks(xs, [f"{r['dtype']}\n{r['engine'].replace('_', ' ')}" for r in mine],
                      rotation=90, fontsize=7)
        ax.set_yscale("log")
        ax.set_title(model)
        ax.set_ylabel("decode tokens/s (batch 1)")
    engines = [e for e in ENGINE_ORDER if any(r["engine"] == e for r in rows)]
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[e]) for e in engines]
    handles.append(plt.Line2D([], [], color="black", marker="_", linestyle="", markersize=14))
    fig.legend(handles, engines + ["read-bandwidth bound"], loc="upper center",
               ncol=min(len(handles), 4 if len(models) == 1 else 7), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.88))
    with atomic_path(out) as tmp:  # the usual file mode, not mkstemp's 0600
        fig.savefig(tmp, dpi=110, format="png")
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
