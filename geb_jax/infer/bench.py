"""Decode speed of the numpy engine on random weights: float32 vs int8 vs int4.

    python -m geb_jax.infer.bench --preset small --threads 1
    python -m geb_jax.infer.bench --preset tinyllama-layer --modes float32,int8,int4

Presets: "small" (configs/small.py: 12 layers, d 768, 12 heads, FFN 2048, tied 32k vocab),
"tinyllama-layer" (one TinyLlama-1.1B layer: d 2048, 32 heads / 4 KV heads, FFN 5632, untied
32k vocab) and "tiny" (a smoke test). Reports prefill and decode tokens/s and the weight bytes;
"layers only" decode times are measured with the lm head excluded (a 1-row vocabulary would
change the shapes, so the head matmul is timed separately and subtracted).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from geb_jax.infer.config import InferConfig
from geb_jax.infer.engine import Engine
from geb_jax.infer.quantize import quantize_weights
from geb_jax.infer.weights import LayerWeights, Weights, matmul

PRESETS = {
    "tiny": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                 d_ff=128, max_seq_len=256),
    "small": dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                  head_dim=64, d_ff=2048, max_seq_len=1024, tie_embeddings=True),
    "tinyllama-layer": dict(vocab_size=32000, d_model=2048, n_layers=1, n_heads=32,
                            n_kv_heads=4, head_dim=64, d_ff=5632, max_seq_len=2048),
}


def random_weights(config: InferConfig, seed: int = 0, std: float = 0.02) -> Weights:
    """Random float32 weights in the engine's layout (no jax needed)."""
    c, rng = config, np.random.default_rng(seed)

    def mat(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std))

    qkv = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
    layers = [LayerWeights(attn_norm=np.ones(c.d_model, np.float32),
                           mlp_norm=np.ones(c.d_model, np.float32),
                           qkv=mat(c.d_model, qkv), o=mat(c.n_heads * c.head_dim, c.d_model),
                           gate_up=mat(c.d_model, 2 * c.d_ff), down=mat(c.d_ff, c.d_model))
              for _ in range(c.n_layers)]
    embedding = mat(c.vocab_size, c.d_model)
    head = embedding.T if c.tie_embeddings else mat(c.d_model, c.vocab_size)
    return Weights(c, embedding, layers, np.ones(c.d_model, np.float32), head)


def _time(fn, repeat: int) -> float:
    fn()
    best = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best.append(time.perf_counter() - start)
    return float(np.median(best))


def bench(config: InferConfig, modes, prompt_len: int, new_tokens: int, threads,
          quantize_embeddings: bool, seed: int = 0):
    base = random_weights(config, seed)
    prompt = np.random.default_rng(seed).integers(0, config.vocab_size, (1, prompt_len))
    rows = []
    for mode in modes:
        start = time.perf_counter()
        weights = quantize_weights(base, None if mode == "float32" else mode,
                                   quantize_embeddings)
        quant_s = time.perf_counter() - start
        engine = Engine(weights, max_len=prompt_len + new_tokens + 1, threads=threads)

        def decode():
            engine.prefill(prompt)
            token = np.zeros(1, np.int64)
            for _ in range(new_tokens):
                engine.decode_step(token, copy=False)

        prefill_s = _time(lambda: engine.prefill(prompt), 3)
        total_s = _time(decode, 3)
        step_s = (total_s - prefill_s) / new_tokens
        x = np.zeros((1, config.d_model), np.float32)
        out = np.empty((1, config.vocab_size), np.float32)
        head_s = _time(lambda: matmul(x, weights.lm_head, out=out), 10)
        rows.append(dict(mode=mode, mib=weights.nbytes / 2**20, quantize_s=quant_s,
                         prefill_tok_s=prompt_len / prefill_s, decode_tok_s=1.0 / step_s,
                         decode_ms=step_s * 1e3, head_ms=head_s * 1e3,
                         layers_ms=(step_s - head_s) * 1e3))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--modes", default="float32,int8,int4")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quantize-embeddings", action="store_true")
    args = p.parse_args(argv)
    config = InferConfig.from_dict(PRESETS[args.preset])
    rows = bench(config, args.modes.split(","), args.prompt_len, args.new_tokens, args.threads,
                 args.quantize_embeddings)
    print(f"preset {args.preset}, threads {args.threads or 'default'}, quantize_embeddings "
          f"{args.quantize_embeddings}")
    print(f"{'mode':8} {'MiB':>8} {'prefill tok/s':>14} {'decode tok/s':>13} {'ms/token':>9} "
          f"{'head ms':>8} {'layers ms':>10}")
    for r in rows:
        print(f"{r['mode']:8} {r['mib']:8.1f} {r['prefill_tok_s']:14.1f} "
              f"{r['decode_tok_s']:13.2f} {r['decode_ms']:9.2f} {r['head_ms']:8.2f} "
              f"{r['layers_ms']:10.2f}")


if __name__ == "__main__":
    main()
