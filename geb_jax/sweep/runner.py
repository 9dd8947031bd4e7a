"""Runs a sweep's runs one after another as `python -m geb_jax.main` subprocesses, resumably.

Each run lives in <sweep workdir>/<run name>/ (its config.workdir) and the runner keeps four
small files there:
    sweep_run.json       what the run is (config + overrides), written before the first launch
    sweep_log.txt        the subprocess' stdout and stderr, appended across attempts
    sweep_attempts.jsonl one line per launch: start time, wall seconds, exit code
    sweep_done.json      written atomically after a successful exit: the run is finished
A rerun of the sweep skips finished runs and relaunches the rest with the same command, so
training resumes from its own checkpoints. A crashing run is recorded and the sweep goes on.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Callable

from geb_jax.atomic_io import write_json_atomic
from geb_jax.sweep.spec import Run, Sweep, SweepError, format_value

RUN_FILE, LOG_FILE, ATTEMPTS_FILE, DONE_FILE = (
    "sweep_run.json", "sweep_log.txt", "sweep_attempts.jsonl", "sweep_done.json")

# (argv, log path) -> exit code. Tests inject a fake; the default runs a subprocess.
Launcher = Callable[[list[str], str], int]


def subprocess_launch(argv: list[str], log_path: str) -> int:
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ {shlex.join(argv)}\n")
        log.flush()
        return subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT).returncode


def run_dir(workdir: str, run: Run) -> str:
    return os.path.join(workdir, run.name)


def run_argv(config_spec: str, run: Run, workdir: str, python: str = sys.executable
             ) -> list[str]:
    """The run's command line; the same for every attempt, so training resumes."""
    return [python, "-m", "geb_jax.main", "--config", config_spec,
            *(f"--config.{k}={format_value(v)}" for k, v in run.all_overrides.items()),
            f"--config.workdir={run_dir(workdir, run)}"]


def _identity(config_spec: str, run: Run) -> dict:
    return {"name": run.name, "config": config_spec,
            "overrides": {k: format_value(v) for k, v in run.all_overrides.items()}}


def _check_identity(directory: str, identity: dict) -> None:
    """A run directory made by a different sweep definition must not be silently reused."""
    path = os.path.join(directory, RUN_FILE)
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        stored = json.load(f)
    if stored != identity:
        raise SweepError(f"{directory} holds a run of another definition ({path}: {stored}; "
                         f"now: {identity}). The sweep file, its fixed overrides or --config "
                         "changed: pass a fresh --workdir, or delete that run directory.")


def is_finished(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, DONE_FILE))


def attempts(directory: str) -> list[dict]:
    path = os.path.join(directory, ATTEMPTS_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclasses.dataclass(frozen=True)
class Outcome:
    name: str
    status: str  # skipped (finished before) | done | failed | pending (dry run)
    returncode: int | None = None
    wall_s: float | None = None


def check_workdirs(sweep: Sweep, config_spec: str, workdir: str) -> None:
    """Before any launch: no run directory may belong to another sweep definition."""
    for run in sweep.runs:
        _check_identity(run_dir(workdir, run), _identity(config_spec, run))


def run_sweep(sweep: Sweep, config_spec: str, workdir: str, launch: Launcher = subprocess_launch,
              dry_run: bool = False, echo: Callable[[str], None] = print) -> list[Outcome]:
    """Runs every unfinished run in order; returns what happened to each."""
    check_workdirs(sweep, config_spec, workdir)
    outcomes, total = [], len(sweep.runs)
    for i, run in enumerate(sweep.runs, 1):
        directory = run_dir(workdir, run)
        argv = run_argv(config_spec, run, workdir)
        prefix = f"[{i}/{total}] {run.name}"
        if is_finished(directory):
            echo(f"{prefix}: finished earlier, skipped")
            outcomes.append(Outcome(run.name, "skipped"))
            continue
        if dry_run:
            state = "resume" if os.path.isdir(directory) else "start"
            echo(f"{prefix}: would {state}: {shlex.join(argv)}")
            outcomes.append(Outcome(run.name, "pending"))
            continue
        os.makedirs(directory, exist_ok=True)
        write_json_atomic(os.path.join(directory, RUN_FILE), _identity(config_spec, run),
                          sort_keys=True)
        log_path = os.path.join(directory, LOG_FILE)
        echo(f"{prefix}: running (log: {log_path})")
        started = time.time()
        returncode = launch(argv, log_path)
        wall = time.time() - started
        with open(os.path.join(directory, ATTEMPTS_FILE), "a", encoding="utf-8") as f:
            f.write(json.dumps({"started": started, "wall_s": wall,
                                "returncode": returncode}) + "\n")
        if returncode == 0:
            write_json_atomic(os.path.join(directory, DONE_FILE),
                              {"argv": argv[1:], "finished": time.time(),
                               "wall_s": sum(a["wall_s"] for a in attempts(directory))},
                              sort_keys=True)
            echo(f"{prefix}: done in {wall:.0f} s")
            outcomes.append(Outcome(run.name, "done", returncode, wall))
        else:
            echo(f"{prefix}: FAILED (exit {returncode}) after {wall:.0f} s; see {log_path}")
            outcomes.append(Outcome(run.name, "failed", returncode, wall))
    return outcomes


def print_commands(sweep: Sweep, config_spec: str, workdir: str,
                   echo: Callable[[str], None] = print) -> list[str]:
    """One shell command per unfinished run, for a cluster scheduler (finished runs omitted)."""
    check_workdirs(sweep, config_spec, workdir)
    lines = [shlex.join(["python", *run_argv(config_spec, run, workdir)[1:]])
             for run in sweep.runs if not is_finished(run_dir(workdir, run))]
    for line in lines:
        echo(line)
    return lines
