"""CLI: run, print or report a sweep.

    python -m geb_jax.sweep --config configs/tiny.py:smoke --sweep experiments/sweeps/x.py
        [--workdir runs/sweeps/x] [--print_commands | --dry_run | --report_only]

Every override of every run is checked before the first run starts. Running the same command
again skips finished runs and resumes unfinished ones; the report is rebuilt at the end.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags

from geb_jax.config_loader import load_config
from geb_jax.errors import ConfigError
from geb_jax.sweep import report, runner
from geb_jax.sweep.spec import load_sweep, read_sweep_file

_CONFIG = flags.DEFINE_string("config", None, "configs/<preset>.py[:arg]; default: the sweep "
                              "file's get_sweep_meta()['config'].")
_SWEEP = flags.DEFINE_string("sweep", None, "Sweep file (experiments/sweeps/<name>.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep folder; default runs/sweeps/<name>.")
_PRINT = flags.DEFINE_bool("print_commands", False,
                           "Print one command per unfinished run (for a scheduler); run nothing.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Say what would run; run nothing.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Rebuild the report from existing runs.")


def default_workdir(sweep_path: str) -> str:
    return os.path.join("runs", "sweeps", os.path.splitext(os.path.basename(sweep_path))[0])


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments {argv[1:]}; overrides belong in the sweep "
                             "file (get_sweep_meta()['fixed'] for every run).")
    if not _SWEEP.value:
        raise app.UsageError("Pass --sweep experiments/sweeps/<name>.py.")
    try:
        config_spec = _CONFIG.value or read_sweep_file(_SWEEP.value)[1].get("config")
        if not config_spec:
            raise ConfigError(f"Pass --config configs/<preset>.py ({_SWEEP.value} names no "
                              "default in get_sweep_meta()['config']).")
        sweep = load_sweep(_SWEEP.value, load_config(config_spec))
        workdir = _WORKDIR.value or default_workdir(_SWEEP.value)
        if _PRINT.value:
            runner.print_commands(sweep, config_spec, workdir)
            return
        if not _REPORT_ONLY.value:
            outcomes = runner.run_sweep(sweep, config_spec, workdir, dry_run=_DRY_RUN.value)
            if _DRY_RUN.value:
                return
        paths = report.build_report(sweep, workdir)
        print("report: " + ", ".join(sorted(paths.values())))
    except ConfigError as e:  # SweepError included: one message, no traceback
        sys.exit(f"error: {e}")
    if not _REPORT_ONLY.value and any(o.status == "failed" for o in outcomes):
        failed = [o.name for o in outcomes if o.status == "failed"]
        sys.exit(f"{len(failed)} run(s) failed: {', '.join(failed)} (logs: "
                 f"<run>/{runner.LOG_FILE}); run the same command again to retry them.")


if __name__ == "__main__":
    app.run(main)
