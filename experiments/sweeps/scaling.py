"""A small scaling study: 3 model sizes x 2 token budgets (6 runs), with a fitted power law.

    python -m geb_jax.sweep --config configs/tiny.py --sweep experiments/sweeps/scaling.py

Sizes (vocab 1,024 so the embedding does not dwarf the blocks): d_model 64 / 128 / 192 with
2 / 3 / 4 layers; budgets 60 and 150 steps of 4 x 128 tokens, each with its own cosine
schedule. The report fits final eval loss = a * C^-b + c over training FLOPs C and draws the
fit 10x past the largest run, shaded and labelled as an extrapolation: six tiny runs constrain
a three-coefficient law only loosely, so read the extrapolation as a sketch, not a forecast.
"""
from geb_jax.sweep import cross, zip_


def get_sweep():
    sizes = zip_(**{"model.d_model": [64, 128, 192], "model.n_layers": [2, 3, 4],
                    "model.n_heads": [2, 4, 6], "model.n_kv_heads": [1, 2, 2],
                    "model.d_ff": [192, 352, 512]})
    budgets = zip_(**{"train.steps": [60, 150], "optimizer.total_steps": [60, 150]})
    return cross(sizes, budgets)


def get_sweep_meta():
    return {
        "config": "configs/tiny.py",
        "title": "scaling: 3 sizes x 2 token budgets (tiny)",
        "x": "train_flops",
        "metric": "final_eval_loss",
        "power_law": {"x": "train_flops", "y": "final_eval_loss", "extrapolate": 10.0},
        "fixed": {"stages": "pretrain", "model.vocab_size": 1024, "model.head_dim": 32,
                  "optimizer.warmup_steps": 10, "train.batch_size": 4, "train.seq_len": 128,
                  "train.log_every": 5, "eval.every": 30, "checkpoint.every": 60},
    }
