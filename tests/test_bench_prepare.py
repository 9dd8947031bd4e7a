"""experiments/bench_prepare.py (reached as `bench_data.py prepare`): the perturbed corpus it
times and one small run of the whole command in a fresh process."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np

from geb_jax.data.clean.dedup import shingles
from geb_jax.data.corpus import builtin_documents
from tests.conftest import REPO_ROOT, load_experiment


def _script():
    return load_experiment('bench_prepare')


def test_perturbed_copies_keep_their_shape_but_are_not_near_duplicates():
    bp = _script()
    rng = np.random.default_rng(0)
    words = re.compile(r"[A-Za-z0-9_]+|[\u4e00-\u9fff]")
    docs = {d["lang"]: d for d in builtin_documents("train") if len(d["text"]) > 2000}
    assert set(docs) == {"en", "zh", "code"}
    for lang, doc in docs.items():
        text = doc["text"]
        assert bp.perturb(text, 0.0, rng) == text
        copy = bp.perturb(text, 0.3, rng)
        # punctuation, spaces and newlines stay where they were
        assert words.sub("", copy) == words.sub("", text), lang
        old, new = words.findall(text), words.findall(copy)
        assert len(old) == len(new)
        changed = np.mean([a != b for a, b in zip(old, new)])
        assert 0.15 < changed <= 0.3, (lang, changed)  # a draw may pick the same word
        a, b = shingles(text, lang), shingles(copy, lang)
        assert len(a & b) / len(a | b) < 0.5, lang


def test_bench_data_prepare_runs_in_a_fresh_process(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "experiments/bench_data.py", "prepare", "--docs", "40",
                        "--scales", "2", "--minhash-scales", "1,2", "--workers", "1",
                        "--json", str(out)], cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    single = result["runs"][0]
    assert single["path"] == "single process" and single["returncode"] == 0
    assert single["documents_in"] == 80 and 0 < single["documents_out"] <= 80
    assert single["cpu_s"] > 0 and single["max_process_rss_mb"] > 50
    assert [s["documents"] for s in result["minhash_stage"]] == [40, 80]
    assert result["machine"]["cpu_flags"] and result["date"]
    assert "| 2x | single process | 1 | 80 |" in r.stdout
    if result["beam_skipped"]:
        assert "Beam rows skipped" in r.stdout
    else:
        beam = result["runs"][1]
        assert beam["returncode"] == 0, beam.get("error")
        assert beam["documents_out"] == single["documents_out"]
