"""Small preset (~110M parameters: 12 layers, d 768, 12 heads, FFN 2048, tied 32k vocab).

    python -m geb_jax.main --config configs/small.py --config.workdir=runs/small
"""
from geb_jax.config_base import base_config


def get_config(arg=None):
    del arg
    c = base_config()
    c.workdir = "runs/small"
    c.model.update(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                   head_dim=64, d_ff=2048, max_seq_len=1024, tie_embeddings=True)
    c.train.update(seq_len=1024, batch_size=32, steps=20000)
    c.optimizer.update(peak_learning_rate=6e-4, min_learning_rate=6e-5, warmup_steps=2000)
    return c
