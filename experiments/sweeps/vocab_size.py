"""Tokenizer vocabulary size: the built-in BPE retrained at 1,024 / 2,048 / 4,096 pieces (3 runs).

    python -m geb_jax.sweep --config configs/tiny.py --sweep experiments/sweeps/vocab_size.py

With data.tokenizer="builtin" each vocab size trains its own sentencepiece model on the built-in
corpus (seconds; cached, so reruns reuse it). Loss per token is NOT comparable across
tokenizers (a larger vocabulary packs more text into each token): compare bits per byte
(eval "bits_per_byte" when the evaluation logs it; the report falls back to eval loss and says
so). Each step sees the same number of tokens, hence more text with a larger vocabulary.
"""
from geb_jax.sweep import product


def get_sweep():
    return product(**{"model.vocab_size": [1024, 2048, 4096]})


def get_sweep_meta():
    return {
        "config": "configs/tiny.py",
        "title": "tokenizer vocabulary size (tiny, 150 steps)",
        "x": "model.vocab_size",
        "metric": "final_suite_perplexity_bits_per_byte",
        "fixed": {"stages": "pretrain", "data.tokenizer": "builtin", "train.steps": 150,
                  "optimizer.total_steps": 150, "optimizer.warmup_steps": 15,
                  "train.batch_size": 4, "train.seq_len": 128, "train.log_every": 5,
                  "eval.every": 25, "checkpoint.every": 50},
    }
