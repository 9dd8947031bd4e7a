"""Tied vs untied input/output embeddings, two seeds each (4 runs).

    python -m geb_jax.sweep --config configs/tiny.py --sweep experiments/sweeps/tie_embeddings.py

At tiny scale the 4,096 x 192 embedding is a quarter of the parameters, so tying changes the
model size noticeably (params column); compare losses with that in mind.
"""
from geb_jax.sweep import product


def get_sweep():
    return product(**{"model.tie_embeddings": [False, True], "seed": [0, 1]})


def get_sweep_meta():
    return {
        "config": "configs/tiny.py",
        "title": "tied vs untied embeddings (tiny, 150 steps)",
        "metric": "best_eval_loss",
        "fixed": {"stages": "pretrain", "train.steps": 150, "optimizer.total_steps": 150,
                  "optimizer.warmup_steps": 15, "train.batch_size": 4, "train.seq_len": 128,
                  "train.log_every": 5, "eval.every": 25, "checkpoint.every": 50},
    }
