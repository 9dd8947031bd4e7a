"""GEB's loss-spike handling under injected spikes: policy none / skip / replace / rewind.

    python -m geb_jax.sweep --config configs/tiny.py --sweep experiments/sweeps/stability.py

Data batches 100-110 are replaced on purpose by junk (a short random token pattern repeated:
train.spike.inject_batches, studies only). "none" trains on them, "skip" drops updates whose
loss jumps above 1.3x its running mean, "replace" retries the update on the next batch, and
"rewind" restores the last checkpoint (step 75) and skips batches 76-115. Compare
max_train_loss, sum_train_skipped and the final eval loss.
"""
from geb_jax.sweep import product


def get_sweep():
    return product(**{"train.spike.policy": ["none", "skip", "replace", "rewind"]})


def get_sweep_meta():
    return {
        "config": "configs/tiny.py",
        "title": "spike policy under injected spikes at steps 100-110 (tiny, 150 steps)",
        "metric": "final_eval_loss",
        "fixed": {"stages": "pretrain", "train.spike.inject_batches": "100-110",
                  "train.spike.loss_factor": 1.3,
                  "train.spike.rewind_skip_batches": 40, "train.steps": 150,
                  "optimizer.total_steps": 150, "optimizer.warmup_steps": 15,
                  "train.batch_size": 4, "train.seq_len": 128, "train.log_every": 1,
                  "eval.every": 25, "checkpoint.every": 25},
    }
