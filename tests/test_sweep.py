"""Sweeps: expansion, naming, up-front validation, resume, report tables, power-law fits, and
one real two-run sweep through `python -m geb_jax.sweep` -> `python -m geb_jax.main`."""
import csv
import json
import math
import os
import re
import statistics
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from geb_jax.config_loader import load_config
from geb_jax.sweep import chain, cross, load_sweep, product, zip_
from geb_jax.sweep import powerlaw, report, runner
from geb_jax.sweep.spec import SweepError, run_name, short_field_names

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "configs/tiny.py"


@pytest.fixture
def tiny():
    config = load_config(os.path.join(REPO_ROOT, TINY))
    config.stages = "pretrain"  # synthetic runs log one stage
    return config


def write_sweep(tmp_path, body: str, name: str = "sweep.py") -> str:
    path = tmp_path / name
    path.write_text("from geb_jax.sweep import product, zip_, chain, cross\n"
                    + textwrap.dedent(body))
    return str(path)


# ---- Expansion ----------------------------------------------------------------------------------
def test_product_zip_chain_cross_match_hand_enumeration():
    assert product(**{"a.x": [1, 2], "b.y": ["p", "q", "r"]}) == [
        {"a.x": 1, "b.y": "p"}, {"a.x": 1, "b.y": "q"}, {"a.x": 1, "b.y": "r"},
        {"a.x": 2, "b.y": "p"}, {"a.x": 2, "b.y": "q"}, {"a.x": 2, "b.y": "r"}]
    assert product({"a.x": [1]}, **{"b.y": [True, False]}) == [
        {"a.x": 1, "b.y": True}, {"a.x": 1, "b.y": False}]
    assert zip_(**{"a.x": [1, 2, 3], "b.y": [4, 5, 6]}) == [
        {"a.x": 1, "b.y": 4}, {"a.x": 2, "b.y": 5}, {"a.x": 3, "b.y": 6}]
    assert chain([{"a": 1}], [{"b": 2}, {"c": 3}]) == [{"a": 1}, {"b": 2}, {"c": 3}]
    assert cross(zip_(a=[1, 2], b=[3, 4]), [{"c": 5}, {"c": 6}]) == [
        {"a": 1, "b": 3, "c": 5}, {"a": 1, "b": 3, "c": 6},
        {"a": 2, "b": 4, "c": 5}, {"a": 2, "b": 4, "c": 6}]


def test_bad_axes_are_errors():
    with pytest.raises(SweepError, match="equal length"):
        zip_(a=[1, 2], b=[1])
    with pytest.raises(SweepError, match="'a' must be a list"):
        product(a="pre")  # a string is not a list of values


def test_sweep_file_as_list_and_as_product_expand_alike(tmp_path, tiny):
    as_list = write_sweep(tmp_path, """
        def get_sweep():
            return [{"model.n_kv_heads": 1, "seed": 0}, {"model.n_kv_heads": 1, "seed": 1},
                    {"model.n_kv_heads": 2, "seed": 0}, {"model.n_kv_heads": 2, "seed": 1}]
        """, "a.py")
    as_product = write_sweep(tmp_path, """
        def get_sweep():
            return product(**{"model.n_kv_heads": [1, 2], "seed": [0, 1]})
        """, "b.py")
    a, b = load_sweep(as_list, tiny), load_sweep(as_product, tiny)
    assert [r.overrides for r in a.runs] == [r.overrides for r in b.runs]
    assert [r.name for r in a.runs] == ["n_kv_heads=1,seed=0", "n_kv_heads=1,seed=1",
                                        "n_kv_heads=2,seed=0", "n_kv_heads=2,seed=1"]
    assert [r.config.model.n_kv_heads for r in a.runs] == [1, 1, 2, 2]
    assert a.swept_fields() == ["model.n_kv_heads", "seed"]


# ---- Naming -------------------------------------------------------------------------------------
def test_short_names_are_the_shortest_unambiguous_suffix():
    known = ["a.x", "b.x", "g.h.x", "a.y", "c.d.z", "e.d.z", "p.q", "r.s.q", "w"]
    assert short_field_names(known) == {"a.x": "a.x", "b.x": "b.x", "g.h.x": "h.x", "a.y": "y",
                                        "c.d.z": "c.d.z", "e.d.z": "e.d.z", "p.q": "q",
                                        "r.s.q": "s.q", "w": "w"}


def test_run_names_are_stable_unique_and_filesystem_safe(tmp_path, tiny):
    path = write_sweep(tmp_path, """
        def get_sweep():
            return chain([{}], product(**{"model.norm_position": ["pre", "post"],
                                         "optimizer.peak_learning_rate": [1e-3, 3e-3]}),
                         [{"data.path": "a/b"}, {"data.path": "a_b"}, {"data.path": "a b"}],
                         [{"optimizer.warmup_steps": 5}, {"train.spike.warmup_steps": 5}])
        """)
    names = [r.name for r in load_sweep(path, tiny).runs]
    assert names == [r.name for r in load_sweep(path, tiny).runs]  # stable
    assert len(set(names)) == len(names)  # unique, even where cleaning made texts alike
    assert all(re.fullmatch(r"[A-Za-z0-9._=,+-]+", n) for n in names)
    assert names[0] == "baseline"
    assert names[1:5] == ["norm_position=pre,peak_learning_rate=0.001",
                          "norm_position=pre,peak_learning_rate=0.003",
                          "norm_position=post,peak_learning_rate=0.001",
                          "norm_position=post,peak_learning_rate=0.003"]
    assert names[6] == "path=a_b"  # already clean: no hash; "a/b" and "a b" carry one
    assert names[5].startswith("path=a_b-") and names[7].startswith("path=a_b-")
    # two fields share the leaf "warmup_steps": the deeper one keeps its section
    assert names[8] == "warmup_steps=5"
    assert names[9] == "spike.warmup_steps=5"
    assert len(run_name({"data.path": "x" * 500}, {})) <= 120


# ---- Validation before anything runs ------------------------------------------------------------
@pytest.mark.parametrize("body, message", [
    ("""
     def get_sweep():
         return [{"model.norm_position": "post"}, {"model.norm_postion": "pre"}]
     """, r"sweep\.py: run 1 .*'model\.norm_postion'.*nearest: model\.norm_position"),
    ("""
     def get_sweep():
         return product(**{"model.n_kv_heads": [1, 4]})
     """, r"run 1 .*divisible by model\.n_kv_heads"),
    ("""
     def get_sweep():
         return [{"workdir": "x"}]
     """, r"run 0 .*do not override workdir"),
    ("""
     def get_sweep():
         return [{"seed": 1}, {"seed": 1}]
     """, r"run 1 .*same run name 'seed=1' as run 0"),
    ("""
     def get_sweep():
         return [{"seed": 1}]
     def get_sweep_meta():
         return {"fixed": {"train.stepz": 3}}
     """, r"run 0 .*'train\.stepz'.*nearest: train\.steps"),
])
def test_bad_sweeps_fail_before_any_run(tmp_path, tiny, body, message):
    path = write_sweep(tmp_path, body)
    with pytest.raises(SweepError, match=message):
        load_sweep(path, tiny)


def test_cli_misspelt_field_fails_before_any_run_directory_exists(tmp_path):
    path = write_sweep(tmp_path, """
        def get_sweep():
            return product(**{"model.norm_position": ["pre", "post"], "model.n_kv_head": [1]})
        """)
    workdir = tmp_path / "sweep_out"
    result = subprocess.run([sys.executable, "-m", "geb_jax.sweep", "--config", TINY,
                             "--sweep", path, "--workdir", str(workdir)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "model.n_kv_head'" in result.stderr and "nearest: model.n_kv_heads" in result.stderr
    assert path in result.stderr and "run 0" in result.stderr
    assert "Traceback" not in result.stderr
    assert not workdir.exists()


# ---- Resume -------------------------------------------------------------------------------------
class FakeLaunch:
    """Records launches; fails the runs named in `fail`; writes a finished metrics log."""

    def __init__(self, fail=()):
        self.fail, self.calls = set(fail), []

    def __call__(self, argv, log_path):
        self.calls.append(argv)
        workdir = next(a.split("=", 1)[1] for a in argv if a.startswith("--config.workdir="))
        if os.path.basename(workdir) in self.fail:
            return 1
        os.makedirs(os.path.join(workdir, "pretrain"), exist_ok=True)
        with open(os.path.join(workdir, "pretrain", "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"split": "train", "step": 3, "loss": 1.0}) + "\n")
        return 0


def test_resume_skips_finished_runs_and_relaunches_the_rest_identically(tmp_path, tiny):
    path = write_sweep(tmp_path, """
        def get_sweep():
            return product(seed=[0, 1, 2])
        """)
    sweep, workdir = load_sweep(path, tiny), str(tmp_path / "out")
    first = FakeLaunch(fail={"seed=1"})
    outcomes = runner.run_sweep(sweep, TINY, workdir, launch=first, echo=lambda s: None)
    assert [o.status for o in outcomes] == ["done", "failed", "done"]
    assert [runner.is_finished(os.path.join(workdir, f"seed={s}")) for s in range(3)] == [
        True, False, True]
    assert runner.print_commands(sweep, TINY, workdir, echo=lambda s: None) == [
        " ".join(["python", *first.calls[1][1:]])]  # only the unfinished run

    second = FakeLaunch()
    outcomes = runner.run_sweep(sweep, TINY, workdir, launch=second, echo=lambda s: None)
    assert [o.status for o in outcomes] == ["skipped", "done", "skipped"]
    assert second.calls == [first.calls[1]]  # the very same command: training resumes
    assert [a["returncode"] for a in runner.attempts(os.path.join(workdir, "seed=1"))] == [1, 0]
    rows, _ = report.collect(sweep, workdir)
    assert [r["status"] for r in rows] == ["done", "done", "done"]

    third = FakeLaunch()
    runner.run_sweep(sweep, TINY, workdir, launch=third, echo=lambda s: None)
    assert third.calls == []


def test_a_changed_sweep_definition_is_refused_not_silently_reused(tmp_path, tiny):
    path = write_sweep(tmp_path, """
        def get_sweep():
            return product(seed=[0])
        def get_sweep_meta():
            return {"fixed": {"train.steps": 5}}
        """)
    workdir = str(tmp_path / "out")
    runner.run_sweep(load_sweep(path, tiny), TINY, workdir, launch=FakeLaunch(),
                     echo=lambda s: None)
    write_sweep(tmp_path, open(path).read().split("\n", 1)[1].replace("5}", "7}"))
    launch = FakeLaunch()
    with pytest.raises(SweepError, match="another definition"):
        runner.run_sweep(load_sweep(path, tiny), TINY, workdir, launch=launch,
                         echo=lambda s: None)
    assert launch.calls == []


# ---- Report -------------------------------------------------------------------------------------
def _write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def test_report_tables_equal_hand_computed_values(tmp_path, tiny):
    path = write_sweep(tmp_path, """
        def get_sweep():
            return product(**{"model.n_kv_heads": [1, 2], "model.norm_position": ["pre"]})
        def get_sweep_meta():
            return {"fixed": {"train.steps": 4}, "title": "synthetic"}
        """)
    sweep, workdir = load_sweep(path, tiny), str(tmp_path / "out")
    train_loss = {1: [5.0, 4.0, 3.5, 3.0], 2: [5.0, 4.5, 4.0, 3.25]}
    eval_loss = {1: {2: 3.9, 4: 3.3}, 2: {2: 3.8, 4: 3.95}}
    speed = {1: [10.0, 200.0, 300.0, 100.0], 2: [20.0, 50.0, 60.0, 70.0]}
    for run, kv in zip(sweep.runs, (1, 2)):
        records = [{"stage": "pretrain", "split": "train", "step": s + 1, "time": 100.0 + s,
                    "loss": train_loss[kv][s], "tokens_per_s": speed[kv][s], "skipped": 0.0}
                   for s in range(4)]
        records.insert(2, {"split": "train", "step": 3, "loss": 99.0, "tokens_per_s": 1.0})
        records += [{"split": "eval", "step": s, "loss": v, "perplexity": math.exp(v),
                     "accuracy": 0.1 * s} for s, v in eval_loss[kv].items()]
        directory = os.path.join(workdir, run.name)
        # a resumed run logs step 3 again; the later line must win over the loss of 99
        _write_jsonl(os.path.join(directory, "pretrain", "metrics.jsonl"),
                     sorted(records, key=lambda r: r["split"] != "train"))
        _write_jsonl(os.path.join(directory, runner.ATTEMPTS_FILE),
                     [{"started": 0, "wall_s": 1.5, "returncode": 1},
                      {"started": 9, "wall_s": 2.25, "returncode": 0}])
        runner.write_json_atomic(os.path.join(directory, runner.DONE_FILE), {})
    paths = report.build_report(sweep, workdir)

    with open(paths["csv"]) as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["n_kv_heads=1,norm_position=pre", "n_kv_heads=2,norm_position=pre"]
    for kv, row in zip((1, 2), rows.values()):
        d, n, k, h, f, v, L = 192, 6, kv, 32, 512, 4096, 4  # tiny preset, hand formula
        params = 2 * v * d + L * (2 * d * n * h + 2 * d * k * h + 3 * d * f + 2 * d) + d
        best_step = min(eval_loss[kv], key=eval_loss[kv].get)
        expected = {
            "status": "done", "model.n_kv_heads": kv, "params": params,
            "tokens": 4 * 8 * 256, "steps": 4, "final_train_loss": train_loss[kv][-1],
            "final_eval_loss": eval_loss[kv][4], "best_eval_loss": eval_loss[kv][best_step],
            "best_eval_step": best_step, "best_eval_perplexity": math.exp(
                eval_loss[kv][best_step]), "final_eval_accuracy": 0.4,
            "final_eval_perplexity": math.exp(eval_loss[kv][4]),
            "max_train_loss": max(train_loss[kv]), "sum_train_skipped": 0.0,
            "tokens_per_s": statistics.median(speed[kv][1:]), "wall_time_s": 3.75}
        for key, value in expected.items():
            if isinstance(value, str):
                assert row[key] == value, key
            else:
                assert float(row[key]) == pytest.approx(value, rel=1e-12), key
    assert "model.norm_position" not in rows["n_kv_heads=1,norm_position=pre"]  # not swept

    md = open(paths["md"]).read()
    assert "| n_kv_heads=1,norm_position=pre | done | 1 |" in md
    assert "Lowest `best_eval_loss`: `n_kv_heads=1,norm_position=pre` (3.3)" in md
    for name in ("loss_curves.png", "metric_vs_model_n_kv_heads.png"):
        with open(os.path.join(workdir, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in os.listdir(workdir) if ".tmp" in p]  # atomic writes left no debris


def test_report_marks_unfinished_runs_and_a_missing_metric(tmp_path, tiny):
    path = write_sweep(tmp_path, """
        def get_sweep():
            return product(seed=[0, 1])
        def get_sweep_meta():
            return {"metric": "final_eval_bits_per_byte"}
        """)
    sweep, workdir = load_sweep(path, tiny), str(tmp_path / "out")
    _write_jsonl(os.path.join(workdir, "seed=0", "pretrain", "metrics.jsonl"),
                 [{"split": "train", "step": 7, "loss": 2.0}])
    paths = report.build_report(sweep, workdir)
    rows = list(csv.DictReader(open(paths["csv"])))
    assert [r["status"] for r in rows] == ["partial", "not started"]
    assert "falls back to `final_train_loss`" in open(paths["md"]).read()


# ---- Power laws ---------------------------------------------------------------------------------
@pytest.mark.parametrize("use_scipy", [True, False])
def test_power_law_fit_recovers_known_coefficients(use_scipy):
    x = np.geomspace(1e9, 1e13, 7)
    a, b, c = 30.0, 0.25, 1.7
    fit = powerlaw.fit_power_law(x, a * x ** -b + c, use_scipy=use_scipy)
    assert (fit.a, fit.b, fit.c) == pytest.approx((a, b, c), rel=1e-8)
    assert fit(2e14) == pytest.approx(a * 2e14 ** -b + c, rel=1e-7)
    plain = powerlaw.fit_power_law(x, 5.0 * x ** -0.1, offset=False, use_scipy=use_scipy)
    assert (plain.a, plain.b, plain.c) == pytest.approx((5.0, 0.1, 0.0), rel=1e-6)


@pytest.mark.parametrize("use_scipy", [True, False])
def test_loss_nd_fit_recovers_known_coefficients(use_scipy):
    n, d = (g.ravel() for g in np.meshgrid(np.geomspace(1e5, 1e7, 4),
                                           np.geomspace(1e6, 1e9, 4)))
    truth = dict(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28)
    loss = truth["E"] + truth["A"] * n ** -truth["alpha"] + truth["B"] * d ** -truth["beta"]
    fit = powerlaw.fit_loss_nd(n, d, loss, use_scipy=use_scipy)
    got = dict(E=fit.E, A=fit.A, alpha=fit.alpha, B=fit.B, beta=fit.beta)
    assert got == pytest.approx(truth, rel=1e-6)


def test_power_law_plot_marks_the_extrapolation(tmp_path):
    x = np.geomspace(1e9, 1e11, 4)
    fit = powerlaw.fit_power_law(x, 10 * x ** -0.2 + 1.0)
    out = powerlaw.plot_power_law(fit, x, 10 * x ** -0.2 + 1.0, str(tmp_path / "p.png"))
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="positive"):
        powerlaw.fit_power_law([1.0, 2.0, 3.0], [1.0, -1.0, 0.5])


# ---- The shipped studies ------------------------------------------------------------------------
@pytest.mark.parametrize("name, runs", [("norm_position", 4), ("kv_heads", 3),
                                        ("tie_embeddings", 4), ("vocab_size", 3),
                                        ("scaling", 6), ("stability", 4)])
def test_shipped_sweeps_validate(name, runs):
    path = os.path.join(REPO_ROOT, "experiments", "sweeps", f"{name}.py")
    _, meta = __import__("geb_jax.sweep.spec", fromlist=["x"]).read_sweep_file(path)
    config = load_config(os.path.join(REPO_ROOT, meta["config"]))
    assert len(load_sweep(path, config).runs) == runs


# ---- One real sweep ------------------------------------------------------------------------------
def test_two_run_sweep_end_to_end_through_geb_jax_main(tmp_path):
    """Real training: 2 runs x 4 steps, then a rerun that finds both finished."""
    path = write_sweep(tmp_path, """
        def get_sweep():
            return product(seed=[0, 1])
        def get_sweep_meta():
            return {"fixed": {"train.steps": 4, "optimizer.total_steps": 4,
                              "eval.every": 2, "eval.batches": 1, "checkpoint.every": 4}}
        """)
    workdir = tmp_path / "out"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    command = [sys.executable, "-m", "geb_jax.sweep", "--config", f"{TINY}:smoke",
               "--sweep", path, "--workdir", str(workdir)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {r["name"]: r for r in csv.DictReader(open(workdir / "results.csv"))}
    assert list(rows) == ["seed=0", "seed=1"]
    for name, row in rows.items():
        records = [json.loads(line) for line in open(workdir / name / "pretrain" /
                                                     "metrics.jsonl")]
        evals = [r for r in records if r["split"] == "eval"]
        assert row["status"] == "done" and int(row["steps"]) == 4
        assert [r["step"] for r in evals] == [2, 4]
        assert float(row["final_eval_loss"]) == evals[-1]["loss"]
        assert float(row["best_eval_loss"]) == min(r["loss"] for r in evals)
        assert float(row["final_train_loss"]) == [r for r in records
                                                  if r["split"] == "train"][-1]["loss"]
    assert rows["seed=0"]["final_train_loss"] != rows["seed=1"]["final_train_loss"]
    assert (workdir / "loss_curves.png").stat().st_size > 0

    again = subprocess.run(command + ["--dry_run"], cwd=REPO_ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("finished earlier, skipped") == 2
