"""Copies each finished study's report (results.md, plots) from runs/sweeps/<study>/ into
docs/experiments/<study>/, so that docs/experiments.md can show them.

    for s in stability norm_position kv_heads tie_embeddings vocab_size scaling; do
        python -m geb_jax.sweep --sweep experiments/sweeps/$s.py --workdir runs/sweeps/$s
    done
    python experiments/collect_studies.py
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil

STUDIES = ("stability", "norm_position", "kv_heads", "tie_embeddings", "vocab_size", "scaling")


def collect(runs: str, docs: str) -> list[str]:
    copied = []
    for study in STUDIES:
        source = os.path.join(runs, study)
        if not os.path.isfile(os.path.join(source, "results.md")):
            print(f"{study}: no results.md under {source}; run its sweep first")
            continue
        target = os.path.join(docs, study)
        os.makedirs(target, exist_ok=True)
        for path in [os.path.join(source, "results.md"), os.path.join(source, "results.csv"),
                     *glob.glob(os.path.join(source, "*.png"))]:
            shutil.copyfile(path, os.path.join(target, os.path.basename(path) + ".tmp"))
            os.replace(os.path.join(target, os.path.basename(path) + ".tmp"),
                       os.path.join(target, os.path.basename(path)))
            copied.append(os.path.join(target, os.path.basename(path)))
    return copied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=os.path.join("runs", "sweeps"))
    parser.add_argument("--docs", default=os.path.join("docs", "experiments"))
    args = parser.parse_args()
    for path in collect(args.runs, args.docs):
        print(path)


if __name__ == "__main__":
    main()
