"""TinyLlama-1.1B: 22 layers, d 2048, 32 heads, 4 KV heads (head dim 64), FFN 5632, vocab 32000,
context 2048, untied. Recipe: AdamW (0.9, 0.95), peak 4e-4 cosine to 4e-5, 2000 warm-up steps,
~2M-token batches (1024 x 2048), 7:3 natural language to code.

    python -m geb_jax.main --config configs/tinyllama_1_1b.py
"""
from geb_jax.config_base import base_config


def get_config(arg=None):
    del arg
    c = base_config()
    c.workdir = "runs/tinyllama_1_1b"
    c.model.update(vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                   head_dim=64, d_ff=5632, max_seq_len=2048, norm_eps=1e-5, dtype="bfloat16",
                   remat_policy="save_dots")
    c.train.update(seq_len=2048, batch_size=1024, steps=1430000)
    c.optimizer.update(peak_learning_rate=4e-4, min_learning_rate=4e-5, warmup_steps=2000)
    c.checkpoint.every = 1000
    c.eval.every = 1000
    return c
