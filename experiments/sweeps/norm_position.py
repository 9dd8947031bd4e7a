"""Pre-norm (Llama) vs post-norm (original Transformer) blocks, two seeds each (4 runs).

    python -m geb_jax.sweep --config configs/tiny.py --sweep experiments/sweeps/norm_position.py

Tiny preset shortened to 150 steps of 4 x 128 tokens; the same learning rate for both, so a
post-norm run that trains worse (or diverges) at this rate is part of the finding. The second
seed changes only the initialisation: it shows how big a difference the noise alone makes.
"""
from geb_jax.sweep import product


def get_sweep():
    return product(**{"model.norm_position": ["pre", "post"], "seed": [0, 1]})


def get_sweep_meta():
    return {
        "config": "configs/tiny.py",
        "title": "pre-norm vs post-norm (tiny, 150 steps)",
        "metric": "best_eval_loss",
        "fixed": {"stages": "pretrain", "train.steps": 150, "optimizer.total_steps": 150,
                  "optimizer.warmup_steps": 15, "train.batch_size": 4, "train.seq_len": 128,
                  "train.log_every": 5, "eval.every": 25, "checkpoint.every": 50},
    }
