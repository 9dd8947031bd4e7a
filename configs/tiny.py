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
    # DPO on the built-in preference pairs (refuse / help / answer in the request's language,
    # demo_tasks.builtin_dpo_pairs), at the base config's rates (2e-4, 50 steps, beta 0.1).
    # seq_len 128: every pair fits (about 100 tokens at most) at half the cost of 256.
    # log_every 1: first_loss is step 1's (ln 2: the policy starts as its SFT reference).
    # dpo_preference in the suite: the stage's summary line also gives the held-out preference
    # accuracy before (the SFT model) -> after (train/loop.py dpo_preference_summary).
    c.stage_overrides.dpo.train.update(dict(seq_len=128, log_every=1))
    c.stage_overrides.dpo.eval = dict(suite=dict(tasks="perplexity,dpo_preference"))
    if arg.smoke:
        c.workdir = "runs/tiny_smoke"
        c.stages = "pretrain"
        c.train.steps = 6  # optimizer.total_steps follows it
        c.optimizer.warmup_steps = 2
        c.train.batch_size, c.train.seq_len, c.train.log_every = 2, 64, 1
        c.checkpoint.every = c.eval.every = 3
    return c
