"""LLaMA-7B: 32 layers, d 4096, 32 heads (MHA), FFN 11008, vocab 32000, context 2048, untied,
RMSNorm eps 1e-6. Recipe: AdamW (0.9, 0.95), wd 0.1, clip 1.0, 2000 warm-up steps, cosine to
10% of the 3e-4 peak, 4M-token batches (2048 x 2048).

    python -m geb_jax.main --config configs/llama_7b.py --config.mesh.fsdp=-1 --config.mesh.data=1
"""
from geb_jax.config_base import base_config


def get_config(arg=None):
    del arg
    c = base_config()
    c.workdir = "runs/llama_7b"
    c.model.update(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                   head_dim=128, d_ff=11008, max_seq_len=2048, norm_eps=1e-6, dtype="bfloat16",
                   remat_policy="save_dots")
    c.train.update(seq_len=2048, batch_size=2048, steps=250000)
    c.optimizer.update(peak_learning_rate=3e-4, min_learning_rate=3e-5, warmup_steps=2000)
    c.mesh.update(data=1, fsdp=-1)
    c.checkpoint.every = 1000
    c.eval.every = 1000
    return c
