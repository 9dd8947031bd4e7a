"""GEB-1.3B (its paper and released config): 24 layers, d 2048, 16 heads, 4 KV heads, FFN 5632,
vocab 64,896, context 4096, untied embeddings, RMSNorm eps 1e-5, bfloat16 compute.
Recipe: AdamW (0.9, 0.95, eps 1e-8), cosine 4e-4 -> 4e-5, global batch 320 x 4096.

    python -m geb_jax.main --config configs/geb_1_3b.py --config.workdir=gs://.../geb
"""
from geb_jax.config_base import base_config


def get_config(arg=None):
    del arg
    c = base_config()
    c.workdir = "runs/geb_1_3b"
    c.model.update(vocab_size=64896, d_model=2048, n_layers=24, n_heads=16, n_kv_heads=4,
                   head_dim=128, d_ff=5632, max_seq_len=4096, norm_eps=1e-5, dtype="bfloat16",
                   remat_policy="save_dots")
    c.train.update(seq_len=4096, batch_size=320, steps=420000)
    c.optimizer.update(peak_learning_rate=4e-4, min_learning_rate=4e-5, warmup_steps=2000)
    c.checkpoint.every = 1000
    c.eval.every = 1000
    return c
