"""Exact resume: a run killed with SIGKILL after step 10 and resumed logs the same losses for
steps 11-20 as an uninterrupted run (real subprocesses, real kill, same command line)."""
import json
import os
import signal
import subprocess
import sys
import time

from tests.conftest import REPO_ROOT

STEPS, KILL_AFTER = 20, 10


def _command(workdir):
    return [sys.executable, "-m", "geb_jax.main", "--config", "configs/tiny.py:smoke",
            f"--config.workdir={workdir}", f"--config.train.steps={STEPS}",
            f"--config.optimizer.total_steps={STEPS}", "--config.train.batch_size=4",
            "--config.train.seq_len=128", f"--config.checkpoint.every={KILL_AFTER}",
            "--config.eval.every=0", "--config.train.log_every=1"]


def _losses(workdir):
    """Last logged loss per step (a resumed run re-logs the steps after its checkpoint)."""
    losses = {}
    with open(os.path.join(workdir, "pretrain", "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if record["split"] == "train":
                losses[record["step"]] = record["loss"]
    return losses


def test_sigkill_then_resume_gives_identical_losses(tmp_path):
    reference = tmp_path / "reference"
    subprocess.run(_command(reference), cwd=REPO_ROOT, check=True, timeout=600,
                   capture_output=True)
    expected = _losses(reference)
    assert sorted(expected) == list(range(1, STEPS + 1))

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_command(killed), cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    committed = killed / "pretrain" / "checkpoints" / str(KILL_AFTER)
    deadline = time.time() + 600
    while not committed.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert str(STEPS) not in os.listdir(killed / "pretrain" / "checkpoints")

    resumed = subprocess.run(_command(killed), cwd=REPO_ROOT, timeout=600, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from step {KILL_AFTER}" in resumed.stderr + resumed.stdout
    got = _losses(killed)
    for step in range(KILL_AFTER + 1, STEPS + 1):
        assert got[step] == expected[step], (step, got[step], expected[step])
