"""The measured gain of fine-tuning a published model: SFT then DPO, full and LoRA.

    python experiments/finetune_gain.py                  # SmolLM2-135M-Instruct, full + LoRA 16
    python experiments/finetune_gain.py --runs lora16 --out /tmp/gain

Each stage of each run is its own process (`python -m geb_jax.main --config
configs/finetune.py...`, the DPO stage with init_from = the SFT stage), so wall time and peak
resident memory (wait4's ru_maxrss) are per stage. The stage evaluates itself before its first
update and at its end (eval.at_start; configs/finetune.py): the "before" and "after" columns come
from the same JAX model and the same held-out data. Writes OUT/finetune_gain.json, prints the
markdown table for docs/finetune.md and plots the DPO stage's held-out reward margin and
accuracy over steps (OUT/finetune_dpo.png).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {"full": "", "lora16": "lora=16"}
# (label, eval_suite key); before = the SFT stage's step 0 (the published model), then the
# end of each stage. The DPO stage's dpo_preference in the suite is the implicit-reward
# accuracy against its reference, so the log-prob accuracy after DPO comes from the stage's
# summary (pref_accuracy_after), as the README job prints it.
METRICS = (
    ("perplexity, held-out corpus", "perplexity/perplexity"),
    ("SFT exact match, held-out tasks", "sft_exact_match/exact_match"),
    ("preference accuracy, log p(chosen) > log p(rejected)", "dpo_preference/accuracy"),
    ("refusal rate, held-out unethical requests", "refusal/unethical"),
    ("refusal rate, held-out benign requests", "refusal/benign"),
)


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return platform.processor()
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
    return " ".join(f for f in wanted if f in flags)


def run_stage(arg: str, workdir: str, stage: str, extra: list[str]) -> dict:
    """One stage in a fresh process: {"seconds", "peak_rss_gib", "returncode"}."""
    config = "configs/finetune.py" + (f":{arg}" if arg else "")
    cmd = [sys.executable, "-m", "geb_jax.main", "--config", config,
           f"--config.workdir={workdir}", f"--config.stages={stage}"] + extra
    if stage == "dpo":
        cmd.append(f"--config.init_from={os.path.join(workdir, 'sft')}")
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.time() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{stage} stage of {workdir} failed with exit code {code}")
    return {"seconds": seconds, "peak_rss_gib": usage.ru_maxrss / 2**20}


def read_metrics(workdir: str, stage: str) -> list[dict]:
    with open(os.path.join(workdir, stage, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(workdir: str, stage: str) -> dict:
    rows = read_metrics(workdir, stage)
    suite = [r for r in rows if r.get("split") == "eval_suite"]
    train = [r for r in rows if r.get("split") == "train" and "tokens_per_s" in r]
    evals = [r for r in rows if r.get("split") == "eval"]
    speeds = sorted(r["tokens_per_s"] for r in train[1:] or train)  # first window: compile
    summary = [r for r in rows if r.get("split") == "summary"]
    return {"before": suite[0] if suite else {}, "after": suite[-1] if suite else {},
            "summary": summary[-1] if summary else {},
            "tokens_per_s": speeds[len(speeds) // 2] if speeds else None,
            "first_loss": train[0]["loss"] if train else None,
            "final_loss": train[-1]["loss"] if train else None,
            "eval_curve": [{k: r[k] for k in r if k == "step" or k.startswith("rewards/")
                            or k == "loss"} for r in evals],
            "train_curve": [{k: r[k] for k in r if k == "step" or k.startswith("rewards/")
                             or k == "loss"} for r in train]}


def cell(result: dict, stage: str, key: str) -> float:
    if stage == "dpo" and key == "dpo_preference/accuracy":
        return result["dpo"]["summary"].get("pref_accuracy_after", float("nan"))
    return result[stage]["after"].get(key, float("nan"))


def table(results: dict) -> str:
    names = list(results)
    lines = ["| metric | base | " + " | ".join(f"{n}: after SFT | {n}: after DPO"
                                                for n in names) + " |",
             "|" + "---|" * (2 + 2 * len(names))]
    first = results[names[0]]
    for label, key in METRICS:
        cells = [label, f"{first['sft']['before'].get(key, float('nan')):.3f}"]
        for n in names:
            cells += [f"{cell(results[n], s, key):.3f}" for s in ("sft", "dpo")]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["DPO reward accuracy vs its SFT reference, held-out pairs", ""]
    for n in names:
        cells += ["", f"{results[n]['dpo']['summary'].get('reward_accuracy', float('nan')):.3f}"]
    lines.append("| " + " | ".join(cells) + " |")
    for label, key, fmt in (("wall time of the stage, s (incl. evals)", "seconds", "{:.0f}"),
                            ("peak resident memory, GiB", "peak_rss_gib", "{:.2f}"),
                            ("training tokens/s (median window)", "tokens_per_s", "{:.0f}"),
                            ("training loss, first -> last logged", None, None)):
        cells = [label, ""]
        for n in names:
            for s in ("sft", "dpo"):
                r = results[n][s]
                cells.append(f"{r['first_loss']:.3f} -> {r['final_loss']:.3f}" if key is None
                             else fmt.format(r[key]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_m, ax_a) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, result in results.items():
        for curve, style, where in ((result["dpo"]["eval_curve"], "-o", "held-out"),
                                    (result["dpo"]["train_curve"], ":", "train batch")):
            steps = [r["step"] for r in curve if "rewards/margins" in r]
            ax_m.plot(steps, [r["rewards/margins"] for r in curve if "rewards/margins" in r],
                      style, label=f"{name}, {where}", markersize=3)
            ax_a.plot(steps, [r["rewards/accuracies"] for r in curve
                              if "rewards/accuracies" in r], style, label=f"{name}, {where}",
                      markersize=3)
    ax_m.set(xlabel="DPO step", ylabel="reward margin (beta * log-ratio)",
             title="DPO reward margin")
    ax_a.set(xlabel="DPO step", ylabel="reward accuracy", title="DPO reward accuracy",
             ylim=(0, 1.05))
    for ax in (ax_m, ax_a):
        ax.grid(alpha=0.3)
    ax_a.legend(fontsize=7)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated of {list(RUNS)}")
    p.add_argument("--out", default="runs/finetune_gain")
    p.add_argument("--reuse", action="store_true",
                   help="keep stages that finished before (their measured.json exists)")
    p.add_argument("extra", nargs="*", help="more --config.* overrides for every stage")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for name in args.runs.split(","):
        workdir = os.path.abspath(os.path.join(args.out, name))
        results[name] = {}
        for stage in ("sft", "dpo"):
            done = os.path.join(workdir, stage, "measured.json")
            if args.reuse and os.path.exists(done):
                with open(done, encoding="utf-8") as f:
                    measured = json.load(f)
            else:
                measured = run_stage(RUNS[name], workdir, stage, args.extra)
                with open(done, "w", encoding="utf-8") as f:
                    json.dump(measured, f)
            results[name][stage] = {**measured, **summarize(workdir, stage)}
    info = {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
            "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
            "command": "python experiments/finetune_gain.py " + " ".join(sys.argv[1:])}
    out = os.path.join(args.out, "finetune_gain.json")
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"info": info, "results": results}, f, indent=1)
    os.replace(out + ".tmp", out)
    plot(results, os.path.join(args.out, "finetune_dpo.png"))
    print(json.dumps(info))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
