"""Tiny preset (~3M parameters): pretrain -> SFT -> DPO on the built-in corpus and demo sets,
on 2 CPU cores in minutes.

    python -m geb_jax.main --config configs/tiny.py
    python -m geb_jax.main --config configs/tiny.py --config.mode=export   # then serve it
    python -m geb_jax.main --config configs/tiny.py:smoke   # a few pretrain steps, for tests
"""
from geb_jax.config_base import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False)
    c = base_config()
    c.workdir = "runs/tiny"
    c.stages = "pretrain,sft,dpo"
    if arg.smoke:
        c.workdir = "runs/tiny_smoke"
        c.stages = "pretrain"
        c.train.steps = c.optimizer.total_steps = 6
        c.optimizer.warmup_steps = 2
        c.train.batch_size, c.train.seq_len, c.train.log_every = 2, 64, 1
        c.checkpoint.every = c.eval.every = 3
    return c
