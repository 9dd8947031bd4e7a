"""Decode speed of two versions of the numpy engine, side by side in one process (issue 15).

    git show main:geb_jax/infer/engine.py > /tmp/engine_old.py
    git show main:geb_jax/infer/quantize.py > /tmp/quantize_old.py
    OMP_NUM_THREADS=1 python experiments/bench_engine_ab.py --old-engine /tmp/engine_old.py \
        --old-quantize /tmp/quantize_old.py --models tiny,small --dtypes f32,int8,int4 \
        --prompt 32 --decode 64 --repeats 7 --threads 1

"old" is the engine (and quantize) module loaded from the given files, "new" the installed
geb_jax.infer. Both run the same random weights (geb_jax.infer.bench.random_weights, shapes of
configs/<model>.py as experiments/bench_cpu.py builds them) and the same prompt, batch 1. Each
repeat prefills the prompt (not timed), then decodes --decode tokens greedily (timed, argmax
included, as bench_cpu.py times them); old and new alternate (old first on even repeats, new
first on odd ones), and the medians are compared, so load that drifts during the run hits both
alike. The bound is bench_cpu.py's: read bandwidth measured in this process (here with
--threads threads) before each model / bytes of weights one decoded token reads. The last
column is the largest logit difference between old and new after the last decoded token.

--split adds a second table: per decoded token, the time spent inside the weight matmuls (the
module-level `matmul` each engine calls, wrapped with a timer) and the rest of the step, the
per-token overhead this issue is about (attention over the cache, norms, RoPE, SwiGLU, Python).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_cpu  # noqa: E402  pylint: disable=wrong-import-position

from geb_jax.infer import Engine, quantize_weights  # noqa: E402
from geb_jax.infer._blas import set_blas_threads  # noqa: E402
from geb_jax.infer.bench import PRESETS, random_weights  # noqa: E402
from geb_jax.infer.config import InferConfig  # noqa: E402
from geb_jax.infer.weights import matrix_nbytes  # noqa: E402

CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile",
             "amx_bf16", "amx_int8")


def load_module(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return []
    return [flag for flag in CPU_FLAGS if flag in flags]


def bytes_per_token(weights) -> int:
    """Weight bytes one decode step reads (bench_cpu.py's count)."""
    c = weights.config
    total = weights.final_norm.nbytes + matrix_nbytes(weights.lm_head) + c.d_model * 4
    for layer in weights.layers:
        total += layer.attn_norm.nbytes + layer.mlp_norm.nbytes + sum(
            matrix_nbytes(m) for m in (layer.qkv, layer.o, layer.gate_up, layer.down))
    return total


def decode_seconds(engine, prompt: np.ndarray, tokens: int) -> tuple[float, np.ndarray]:
    logits = engine.prefill(prompt)
    start = time.perf_counter()
    for _ in range(tokens):
        logits = engine.decode_step(np.array([int(np.argmax(logits[0]))]), copy=False)
    return time.perf_counter() - start, logits.copy()


def split_seconds(module, engine, prompt: np.ndarray, tokens: int) -> tuple[float, float]:
    """(seconds per decoded token, of which inside the weight matmuls), token 0 fed."""
    real, inside = module.matmul, [0.0]

    def timed(x, w, out=None):
        start = time.perf_counter()
        result = real(x, w, out=out)
        inside[0] += time.perf_counter() - start
        return result

    engine.prefill(prompt)
    token = np.zeros(1, np.int64)
    module.matmul = timed
    try:
        start = time.perf_counter()
        for _ in range(tokens):
            engine.decode_step(token, copy=False)
        total = time.perf_counter() - start
    finally:
        module.matmul = real
    return total / tokens, inside[0] / tokens


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old-engine", required=True, help="a copy of geb_jax/infer/engine.py")
    p.add_argument("--old-quantize", required=True, help="a copy of geb_jax/infer/quantize.py")
    p.add_argument("--models", default="tiny,small",
                   help="configs/<name>.py presets, or bench.<name> for geb_jax.infer.bench's")
    p.add_argument("--dtypes", default="f32,int8,int4")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bandwidth-mib", type=int, default=512)
    p.add_argument("--split", action="store_true",
                   help="also time the weight matmuls inside the step vs the rest")
    args = p.parse_args(argv)
    old_quantize = load_module("engine_ab_old_quantize", args.old_quantize)
    old_engine = load_module("engine_ab_old_engine", args.old_engine)
    set_blas_threads(args.threads)
    print(f"CPU flags: {' '.join(cpu_flags())}; numpy {np.__version__}; threads {args.threads};"
          f" batch 1, prompt {args.prompt}, decode {args.decode}, median of {args.repeats}")
    print("| model | dtype | MiB read/token | GB/s | bound tok/s | old tok/s | new tok/s | "
          "new / old | old % of bound | new % of bound | max abs dlogit |")
    print("|" + "---|" * 11, flush=True)
    splits = []
    for model in args.models.split(","):
        if model.startswith("bench."):  # geb_jax/infer/bench.py's presets ("bench.tiny")
            values = dict(PRESETS[model[len("bench."):]])
            values["max_seq_len"] = max(values["max_seq_len"], args.prompt + args.decode)
            config = InferConfig.from_dict(values)
        else:  # configs/<model>.py
            config = InferConfig.from_dict(
                bench_cpu.bench_model_config(model, args.prompt, args.decode))
        base = random_weights(config)
        prompt = np.random.default_rng(1).integers(0, config.vocab_size, (1, args.prompt))
        bandwidth = bench_cpu.measure_bandwidth(args.threads, args.bandwidth_mib << 20)["gb_s"]
        for dtype in args.dtypes.split(","):
            mode = None if dtype == "f32" else dtype
            new_weights = quantize_weights(base, mode)
            engines = {
                "old": old_engine.Engine(old_quantize.quantize_weights(base, mode),
                                         max_len=args.prompt + args.decode + 1),
                "new": Engine(new_weights, max_len=args.prompt + args.decode + 1)}
            for engine in engines.values():
                decode_seconds(engine, prompt, 4)  # warm-up: workspaces, scratch buffers
            seconds: dict[str, list[float]] = {"old": [], "new": []}
            last = {}
            for r in range(args.repeats):
                for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
                    dt, last[name] = decode_seconds(engines[name], prompt, args.decode)
                    seconds[name].append(dt)
            tok_s = {k: args.decode / statistics.median(v) for k, v in seconds.items()}
            nbytes = bytes_per_token(new_weights)
            bound = bench_cpu.bound_tokens_per_s(bandwidth, nbytes)
            print(f"| {model} | {dtype} | {nbytes / 2**20:,.1f} | {bandwidth:.1f} | {bound:,.1f} |"
                  f" {tok_s['old']:,.1f} | {tok_s['new']:,.1f} | "
                  f"{tok_s['new'] / tok_s['old']:.2f} | {100 * tok_s['old'] / bound:.0f}% | "
                  f"{100 * tok_s['new'] / bound:.0f}% | "
                  f"{np.abs(last['old'] - last['new']).max():.1e} |", flush=True)
            if args.split:
                modules = {"old": old_engine, "new": sys.modules[Engine.__module__]}
                runs: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
                for r in range(args.repeats):
                    for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
                        runs[name].append(split_seconds(modules[name], engines[name], prompt,
                                                        args.decode))
                splits.append((model, dtype, {
                    name: (statistics.median(t for t, _ in v),
                           statistics.median(t - m for t, m in v)) for name, v in runs.items()}))
            del engines, new_weights
    if splits:
        print("\n| model | dtype | old ms/token | new ms/token | old ms outside weight matmuls |"
              " new ms outside weight matmuls | outside: old / new |")
        print("|" + "---|" * 7)
        for model, dtype, v in splits:
            print(f"| {model} | {dtype} | {v['old'][0] * 1e3:.3f} | {v['new'][0] * 1e3:.3f} | "
                  f"{v['old'][1] * 1e3:.3f} | {v['new'][1] * 1e3:.3f} | "
                  f"{v['old'][1] / v['new'][1]:.2f} |")


if __name__ == "__main__":
    main()
