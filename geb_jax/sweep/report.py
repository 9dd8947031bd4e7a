"""A sweep's results as docs-ready tables (results.csv, results.md) and plots, from its runs' logs.

Per run, from <run>/<last stage>/metrics.jsonl (the last line per (split, step) wins, which is
how a resumed run supersedes lines logged after its checkpoint):
    steps                last train step logged
    final_train_<k>      every metric of the last train record (loss, accuracy, grad_norm, ...)
    final_eval_<k>       every metric of the last eval record (loss, perplexity, ...)
    best_eval_loss       lowest eval loss, at best_eval_step; best_eval_perplexity = exp of it
    max_train_loss       highest logged train loss (a loss spike shows here)
    sum_train_<k>        for the event counters skipped / spike: logged steps where it fired
    tokens_per_s         median train throughput, leaving out the first record (compilation)
    wall_time_s          summed wall time of the runner's launches of this run
and from the config: params, tokens (steps x batch x seq_len) and train_flops (tokens x
ModelConfig.flops_per_token).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics

import numpy as np

from geb_jax.atomic_io import atomic_file
from geb_jax.model import ModelConfig
from geb_jax.sweep import runner
from geb_jax.sweep.powerlaw import fit_power_law, plot_power_law, save_figure
from geb_jax.sweep.spec import DERIVED_COLUMNS, Run, Sweep, format_value

LEAD_COLUMNS = ("name", "status")
MAIN_METRICS = ("steps", "final_train_loss", "final_eval_loss", "best_eval_loss",
                "final_eval_perplexity", "tokens_per_s", "wall_time_s")
EVENT_COUNTERS = ("skipped", "spike")
NOT_METRICS = ("stage", "split", "step", "time")


def read_metrics(path: str) -> dict[str, list[dict]]:
    """metrics.jsonl -> {"train": [...], "eval": [...]}, sorted by step, last line per step."""
    by_split: dict[str, dict[int, dict]] = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill: the run resumes
                    continue
                by_split.setdefault(record.get("split", "train"), {})[record["step"]] = record
    return {split: [records[s] for s in sorted(records)] for split, records in by_split.items()}


def summarize(metrics: dict[str, list[dict]]) -> dict:
    """Final and best values of one run's metrics (see the module docstring)."""
    train, evals = metrics.get("train", []), metrics.get("eval", [])
    row: dict = {}
    if train:
        row["steps"] = train[-1]["step"]
        row.update({f"final_train_{k}": v for k, v in train[-1].items() if k not in NOT_METRICS})
        row["max_train_loss"] = max(r["loss"] for r in train if "loss" in r)
        for key in EVENT_COUNTERS:
            if any(key in r for r in train):
                row[f"sum_train_{key}"] = sum(r.get(key, 0.0) for r in train)
        speeds = [r["tokens_per_s"] for r in train[1:] or train if "tokens_per_s" in r]
        if speeds:
            row["tokens_per_s"] = statistics.median(speeds)
    if evals:
        row.update({f"final_eval_{k}": v for k, v in evals[-1].items() if k not in NOT_METRICS})
        scored = [r for r in evals if "loss" in r]
        if scored:
            best = min(scored, key=lambda r: r["loss"])
            row.update(best_eval_loss=best["loss"], best_eval_step=best["step"],
                       best_eval_perplexity=math.exp(best["loss"]))
    suite = metrics.get("eval_suite", [])  # "task/metric" keys from geb_jax.eval
    if suite:
        row.update({f"final_suite_{k.replace('/', '_')}": v for k, v in suite[-1].items()
                    if k not in NOT_METRICS})
    for event in metrics.get("event", []):  # replaced batches, rewinds (train/spikes.py)
        key = f"events_{event.get('event')}"
        row[key] = row.get(key, 0) + 1
    return row


def last_stage(run: Run) -> str:
    return [s.strip() for s in run.config.stages.split(",") if s.strip()][-1]


def run_row(sweep: Sweep, run: Run, workdir: str) -> dict:
    """One results row: name, status, swept values, derived sizes and the metric summary."""
    directory = runner.run_dir(workdir, run)
    metrics = read_metrics(os.path.join(directory, last_stage(run), "metrics.jsonl"))
    summary = summarize(metrics)
    tries = runner.attempts(directory)
    if runner.is_finished(directory):
        status = "done"
    elif tries and tries[-1]["returncode"] != 0:
        status = "failed"
    elif summary.get("steps") == run.config.train.steps:
        status = "finished"  # reached its last step without the runner (e.g. on a cluster)
    else:
        status = "partial" if summary else "not started"
    model = ModelConfig.from_dict(run.config.model)
    steps = summary.get("steps", run.config.train.steps)
    tokens = steps * run.config.train.batch_size * run.config.train.seq_len
    row = {"name": run.name, "status": status,
           **{field: run.overrides.get(field) for field in sweep.swept_fields()},
           "params": model.num_params(), "tokens": tokens,
           "train_flops": tokens * model.flops_per_token(run.config.train.seq_len)}
    if tries:
        row["wall_time_s"] = sum(t["wall_s"] for t in tries)
    row.update(summary)
    return row


def collect(sweep: Sweep, workdir: str) -> tuple[list[dict], list[str]]:
    """All rows and the column order: lead, swept, derived, main metrics, the rest sorted."""
    rows = [run_row(sweep, run, workdir) for run in sweep.runs]
    present = {k for row in rows for k in row}
    first = [*LEAD_COLUMNS, *sweep.swept_fields(), *DERIVED_COLUMNS,
             *(m for m in MAIN_METRICS if m in present)]
    columns = first + sorted(present - set(first))
    return rows, columns


def comparison_metric(sweep: Sweep, columns: list[str]) -> tuple[str, str]:
    """The column a sweep compares (meta "metric", else best eval loss, else final train
    loss) and a note when the asked-for metric is missing from every run."""
    fallback = "best_eval_loss" if "best_eval_loss" in columns else "final_train_loss"
    wanted = sweep.meta.get("metric")
    if wanted is None or wanted in columns:
        return wanted or fallback, ""
    return fallback, f" No run logged `{wanted}`, so the sweep falls back to `{fallback}`."


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return format_value(value)


def csv_text(rows: list[dict], columns: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else
                         (repr(row[c]) if isinstance(row[c], float) else format_value(row[c]))
                         for c in columns})
    return out.getvalue()


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)).replace("|", "\\|")
                                       for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_text_atomic(path: str, text: str) -> str:
    with atomic_file(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


# ---- Plots ------------------------------------------------------------------------------------
def plot_loss_curves(sweep: Sweep, workdir: str, path: str) -> str:
    """Train and eval loss against step, one line per run, on two panels."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for i, run in enumerate(sweep.runs):
        metrics = read_metrics(os.path.join(runner.run_dir(workdir, run), last_stage(run),
                                            "metrics.jsonl"))
        for ax, split in zip(axes, ("train", "eval")):
            points = [(r["step"], r["loss"]) for r in metrics.get(split, []) if "loss" in r]
            if points:
                steps, losses = zip(*points)
                ax.plot(steps, losses, color=f"C{i % 10}", label=run.name,
                        marker="o" if split == "eval" else None, markersize=3)
    for ax, split in zip(axes, ("train", "eval")):
        ax.set_title(f"{split} loss")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss")
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[1].get_legend_handles_labels()
    if handles:
        columns = max(1, min(3, len(labels), 150 // max(len(label) for label in labels)))
        fig.legend(handles, labels, loc="outside lower center", ncols=columns, fontsize=7)
    fig.suptitle(sweep.meta.get("title", os.path.basename(sweep.path)))
    return save_figure(fig, path)


def size_label(row: dict) -> str:
    """A short point label: parameters N and training tokens D."""
    return f"N={row['params']:.3g}, D={row['tokens']:.3g}"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def numeric_axes(sweep: Sweep, rows: list[dict]) -> list[str]:
    """Swept fields (or meta "x") whose values are all numbers: what a metric can be plotted on."""
    if sweep.meta.get("x"):  # the sweep's own choice (zipped sizes would give many plots)
        candidates = [sweep.meta["x"]]
    else:
        candidates = [f for f in sweep.swept_fields() if not f.endswith("seed")]  # seed: noise
    return [f for f in candidates
            if all(_is_number(row.get(f)) for row in rows)
            and len({row.get(f) for row in rows}) > 1]


def plot_metric_vs(sweep: Sweep, rows: list[dict], field: str, metric: str, path: str) -> str:
    """The metric against one numeric swept value; one line per setting of the other fields."""
    from matplotlib.figure import Figure

    others = [f for f in sweep.swept_fields() if f != field]
    groups: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if row.get(metric) is None:
            continue
        label = ",".join(f"{f.split('.')[-1]}={_cell(row.get(f))}" for f in others) or metric
        groups.setdefault(label, []).append((row[field], row[metric]))
    scatter = groups and all(len(points) == 1 for points in groups.values())
    if scatter:  # every run its own setting (e.g. zipped sizes): points labelled N, D
        groups = {metric: [p for points in groups.values() for p in points]}
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    for i, (label, points) in enumerate(groups.items()):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", color=f"C{i % 10}", label=label,
                linestyle="none" if scatter else "-")
    if scatter:
        for row in rows:
            if row.get(metric) is not None:
                ax.annotate(size_label(row), (row[field], row[metric]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    values = sorted({row[field] for row in rows})
    if values[0] > 0 and values[-1] / values[0] >= 8:
        ax.set_xscale("log")
    ax.set_xlabel(field)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if groups:
        ax.legend(fontsize=7)
    ax.set_title(sweep.meta.get("title", os.path.basename(sweep.path)), fontsize=10)
    return save_figure(fig, path)


# ---- Everything ---------------------------------------------------------------------------------
def power_law_section(sweep: Sweep, rows: list[dict], workdir: str) -> tuple[str, str | None]:
    """Fits meta["power_law"] = {"x": column, "y": column, "extrapolate": factor} if asked;
    returns the Markdown section and the plot's path."""
    spec = sweep.meta.get("power_law")
    if not spec:
        return "", None
    x_key, y_key = spec.get("x", "train_flops"), spec.get("y", "final_eval_loss")
    extrapolate = float(spec.get("extrapolate", 10.0))
    points = [(row[x_key], row[y_key], size_label(row)) for row in rows
              if row.get(x_key) is not None and row.get(y_key) is not None
              and row["status"] in ("done", "finished")]
    if len(points) < 3:
        return (f"\n## Power law\n\nNot fitted: {len(points)} finished run(s) with {x_key} and "
                f"{y_key}; at least 3 are needed.\n"), None
    x, y, labels = zip(*points)
    fit = fit_power_law(x, y, offset=len(points) >= 4)
    path = plot_power_law(fit, x, y, os.path.join(workdir, f"power_law_{y_key}_vs_{x_key}.png"),
                          extrapolate=extrapolate, xlabel=x_key, ylabel=y_key,
                          labels=list(labels))
    far = max(x) * extrapolate
    return (f"\n## Power law: {y_key} against {x_key}\n\n"
            f"Fit on {fit.n_points} runs: `{fit.formula()}` (a={fit.a:.6g}, b={fit.b:.6g}, "
            f"c={fit.c:.6g}; rms log error {fit.rms_log_error:.3g}). With {fit.n_points} points "
            f"and {3 if fit.c else 2} coefficients the fit is loosely constrained.\n\n"
            f"**Extrapolation** (beyond the data, {extrapolate:g}x the largest {x_key}, "
            f"{far:.3g}): predicted {y_key} {float(fit(far)):.4g}. This is an extrapolation "
            f"from tiny runs, not a measurement.\n"), path


def build_report(sweep: Sweep, workdir: str) -> dict[str, str]:
    """Writes results.csv, results.md, loss_curves.png and metric_vs_<field>.png files."""
    os.makedirs(workdir, exist_ok=True)
    rows, columns = collect(sweep, workdir)
    metric, note = comparison_metric(sweep, columns)
    axes = [sweep.meta.get("x"), sweep.meta.get("power_law", {}).get("x")]
    md_columns = [c for c in [*LEAD_COLUMNS, *sweep.swept_fields(), "params", *axes,
                              *MAIN_METRICS, metric] if c in columns]
    md_columns = list(dict.fromkeys(md_columns))
    paths = {"csv": write_text_atomic(os.path.join(workdir, "results.csv"),
                                      csv_text(rows, columns))}
    paths["loss_curves"] = plot_loss_curves(sweep, workdir,
                                            os.path.join(workdir, "loss_curves.png"))
    if metric in columns:
        for field in numeric_axes(sweep, rows):
            name = f"metric_vs_{field.replace('.', '_')}.png"
            paths[name] = plot_metric_vs(sweep, rows, field, metric,
                                         os.path.join(workdir, name))
    title = sweep.meta.get("title", os.path.basename(sweep.path))
    best = best_run(rows, metric)
    best_text = f" Lowest `{metric}`: `{best['name']}` ({best[metric]:.4g})." if best else ""
    fit_text, fit_path = power_law_section(sweep, rows, workdir)
    if fit_path:
        paths["power_law"] = fit_path
    text = (f"# {title}\n\nSweep `{sweep.path}`, {len(rows)} runs; compared on `{metric}`."
            f"{note}{best_text} Every column is in results.csv.\n\n"
            + markdown_table(rows, md_columns)
            + fit_text)
    paths["md"] = write_text_atomic(os.path.join(workdir, "results.md"), text)
    return paths


def best_run(rows: list[dict], metric: str) -> dict | None:
    scored = [r for r in rows if _is_number(r.get(metric)) and np.isfinite(r[metric])]
    return min(scored, key=lambda r: r[metric]) if scored else None
