"""Ablation and scaling sweeps: `python -m geb_jax.sweep --config configs/x.py --sweep file.py`.

spec.py expands a sweep file into named runs and checks every override first; runner.py runs
them (or prints their commands) resumably; report.py turns their logs into tables and plots;
powerlaw.py fits the scaling study. Sweep files import the helpers from here:

    from geb_jax.sweep import product, zip_, chain, cross
"""
from geb_jax.sweep.spec import SweepError, chain, cross, load_sweep, product, zip_

__all__ = ["SweepError", "chain", "cross", "load_sweep", "product", "zip_"]
