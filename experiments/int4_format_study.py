"""Which MatMulNBits format the exporter writes: fused-graph variants side by side, each
scored on SmolLM2-135M's held-out text and timed on a model (docs/benchmarks.md, "int4 format").

    python experiments/int4_format_study.py --model smollm2 --docs 16 --reps 0 \
        --variants "b=32,sym=0,hb=4;b=32,hb=4;b=32;b=128"
    python experiments/int4_format_study.py --model geb_1_3b --ppl 0 --reps 3 \
        --variants "b=32,sym=0,hb=4;b=32,hb=4;b=32;b=64;b=128"

A variant is comma-separated key=value: q (int4 | int8 | f32, default int4), b (block size;
default the exporter's), sym (1 symmetric, the exporter's; 0 onnxruntime's asymmetric blocks
with uint4 zero points, the format before), hb (head bits: 8, the exporter's, or 4), qe
(quantized embedding table: 1, the exporter's, or 0), acc (accuracy_level, default 4).
Variants the exporter no longer writes (sym=0, hb=4) are built by swapping its quantizer and
its head's Quant for the run. --llama-cpp also scores llama.cpp's f32 / q8_0 / q4_0 GGUF of
SmolLM2 on the same windows. One JSON line per variant: MiB read per token, perplexity, prefill
and decode tokens/s (median of --reps after a warm-up; 2 threads by default).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


@contextlib.contextmanager
def exporter_format(symmetric: bool, head_bits: int):
    """Patches onnx_graph's quantizer (asymmetric blocks add a zero-point input) and the
    head's bits for the duration of one build."""
    # pylint: disable=import-outside-toplevel,no-name-in-module,protected-access
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits
    from geb_jax.export import onnx_graph
    saved = (onnx_graph.linear, onnx_graph.Quant.for_head)

    def asymmetric_linear(g, x, w_kn, name, quant, scope):
        if quant.bits != 4 or symmetric:
            return saved[0](g, x, w_kn, name, quant, scope)
        k, n = w_kn.shape
        block = quant.block_for(k)
        blocks = -(-k // block)
        w = np.zeros((blocks * block, n), np.float32)
        w[:k] = w_kn
        packed = np.zeros((n, blocks, block // 2), np.uint8)
        scales = np.zeros((n, blocks), np.float32)
        zero_points = np.zeros((n, -(-blocks // 2)), np.uint8)
        quantize_matmul_4bits(packed, w, scales, zero_points, block, n, blocks * block, False)
        base = name + ".MatMul.weight"
        inputs = [x, g.weight(base + "_Q4", packed), g.weight(base + "_scales", scales),
                  g.weight(base + "_zero_points", zero_points)]
        return g.op("MatMulNBits", inputs, scope, domain="com.microsoft", K=k, N=n, bits=4,
                    block_size=block, accuracy_level=quant.accuracy_level)

    def head(quant, d_model):
        if quant.bits is None:
            return quant
        return onnx_graph.Quant(head_bits, quant.block_for(d_model), quant.accuracy_level)

    onnx_graph.linear = asymmetric_linear
    onnx_graph.Quant.for_head = head
    from geb_jax.export import onnx_fused
    onnx_fused.linear = asymmetric_linear
    try:
        yield
    finally:
        onnx_graph.linear = onnx_fused.linear = saved[0]
        onnx_graph.Quant.for_head = saved[1]


def parse_variant(text: str) -> dict:
    spec = dict(item.split("=", 1) for item in text.split(",") if item)
    unknown = set(spec) - {"q", "b", "sym", "hb", "qe", "acc"}
    if unknown:
        raise SystemExit(f"error: variant {text!r}: unknown keys {sorted(unknown)}; use q, b, "
                         f"sym, hb, qe, acc")
    return spec


def load(model: str, docs: int, prompt: int, decode: int, want_ppl: bool):
    """(ModelConfig, HF-named float32 tensors, held-out windows or [])."""
    import bench_cpu_engines as E  # pylint: disable=import-outside-toplevel
    from geb_jax.export.hf import hf_state_dict_from_params  # pylint: disable=import-outside-toplevel
    windows = []
    if model == "smollm2":
        from geb_jax.checkpoint.published import read_published, smollm2_path  # pylint: disable=import-outside-toplevel
        from published_perplexity import make_windows  # pylint: disable=import-outside-toplevel
        published = read_published(smollm2_path())
        config = published.config.replace(
            max_seq_len=max(published.config.max_seq_len, prompt + decode + 8))
        if want_ppl:
            windows = make_windows(published.tokenizer, docs, 256, 2)[0]
        params = published.params
    else:
        config = E.bench_model_config(model, prompt, decode + 8)
        params = E.random_params(config, 0)
    return config, hf_state_dict_from_params(params, config), windows


def build(config, state, spec: dict, path: str) -> None:
    import onnx  # pylint: disable=import-outside-toplevel
    import bench_cpu_engines as E  # pylint: disable=import-outside-toplevel
    from geb_jax.export.onnx_fused import build_fused_model  # pylint: disable=import-outside-toplevel
    from geb_jax.infer import InferConfig  # pylint: disable=import-outside-toplevel
    weights = E._NamedTensorWeights(  # pylint: disable=protected-access
        InferConfig.from_dict(dataclasses.asdict(config)), state)
    q = spec.get("q", "int4")
    with exporter_format(spec.get("sym", "1") == "1", int(spec.get("hb", 8))):
        model = build_fused_model(weights, quantize=None if q == "f32" else q,
                                  block_size=int(spec["b"]) if "b" in spec else None,
                                  accuracy_level=int(spec.get("acc", 4)),
                                  quantize_embedding=spec.get("qe", "1") == "1",
                                  stream_to=path + ".data")
    onnx.save_model(model, path)


def score_and_time(config, path: str, windows, args) -> dict:
    import onnxruntime as ort  # pylint: disable=import-outside-toplevel
    import bench_cpu_engines as E  # pylint: disable=import-outside-toplevel
    from geb_jax.export.onnx_export import ort_feed  # pylint: disable=import-outside-toplevel
    from geb_jax.infer import InferConfig  # pylint: disable=import-outside-toplevel
    from geb_jax.infer.onnx_decoder import OnnxDecoder  # pylint: disable=import-outside-toplevel
    infer_config = InferConfig.from_dict(dataclasses.asdict(config))
    session = ort.InferenceSession(path, E.ort_session_options(args.threads),
                                   providers=["CPUExecutionProvider"])
    row: dict = {"MiB_per_token": round(E.onnx_weight_bytes(path) / 2 ** 20, 3)}
    if windows:
        nll = np.concatenate([E.token_nll(session.run(["logits"], ort_feed(
            infer_config, [w], graph="fused"))[0][0], w) for w in windows])
        row.update(perplexity=round(float(np.exp(nll.mean())), 3), scored_tokens=int(nll.size))
    if args.reps:
        decoder = OnnxDecoder(session, infer_config, max_len=args.prompt + args.decode + 8)
        prompt = np.random.default_rng(1).integers(0, config.vocab_size, args.prompt)
        prefill_s, decode_s = [], []
        for rep in range(args.reps + 1):  # the first is a warm-up
            decoder.reset()
            start = time.perf_counter()
            token = int(np.argmax(decoder.prefill(prompt[None])[0]))
            middle = time.perf_counter()
            for _ in range(args.decode):
                token = int(np.argmax(decoder.decode([token], copy=False)[0]))
            if rep:
                prefill_s.append(middle - start)
                decode_s.append(time.perf_counter() - middle)
        row.update(prefill_tok_s=round(args.prompt / statistics.median(prefill_s), 1),
                   decode_tok_s=round(args.decode / statistics.median(decode_s), 2))
    return row


def llama_cpp_rows(docs: int, threads: int) -> list[dict]:
    """llama.cpp's perplexity of our f32 / q8_0 / q4_0 GGUF of SmolLM2 on the same windows."""
    # pylint: disable=import-outside-toplevel
    import llama_cpp
    import bench_cpu_engines as E
    from geb_jax.checkpoint.published import read_published, smollm2_path
    from geb_jax.data.tokenizer_files import save_tokenizer
    from geb_jax.export.gguf_export import export_gguf
    from published_perplexity import make_windows
    published = read_published(smollm2_path())
    windows = make_windows(published.tokenizer, docs, 256, 2)[0]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = save_tokenizer(published.tokenizer, os.path.join(folder, "tokenizer"))
        for dtype in ("f32", "q8_0", "q4_0"):
            path = export_gguf(published.params, published.config, tokenizer,
                               os.path.join(folder, f"smollm2-{dtype}.gguf"), dtype=dtype)
            llm = llama_cpp.Llama(model_path=path, n_ctx=300, n_batch=300, n_threads=threads,
                                  n_threads_batch=threads, logits_all=True, verbose=False)
            nll = []
            for window in windows:
                llm.reset()
                llm.eval(list(map(int, window)))
                nll.append(E.token_nll(np.array(llm.scores[:len(window)], np.float32), window))
            nll = np.concatenate(nll)
            rows.append({"variant": f"llama.cpp {dtype}",
                         "perplexity": round(float(np.exp(nll.mean())), 3),
                         "scored_tokens": int(nll.size)})
            del llm
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2, or a configs/ preset name")
    p.add_argument("--variants", required=True, help="';'-separated variants (see above)")
    p.add_argument("--docs", type=int, default=16, help="held-out documents (2 windows each)")
    p.add_argument("--ppl", type=int, default=1, help="score perplexity (SmolLM2 only)")
    p.add_argument("--llama-cpp", action="store_true", help="score llama.cpp's GGUFs too")
    p.add_argument("--reps", type=int, default=3, help="timed repeats (0: no timing)")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    variants = [parse_variant(v) for v in args.variants.split(";") if v]
    config, state, windows = load(args.model, args.docs, args.prompt, args.decode,
                                  bool(args.ppl) and args.model == "smollm2")
    print(f"# {args.model}, {len(windows)} windows, threads {args.threads}, "
          f"{time.strftime('%Y-%m-%dT%H:%M:%S')}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        for text, spec in zip(args.variants.split(";"), variants):
            path = os.path.join(folder, "variant.onnx")
            build(config, state, spec, path)
            row = {"variant": text, **score_and_time(config, path, windows, args)}
            print(json.dumps(row), flush=True)
    if args.llama_cpp:
        for row in llama_cpp_rows(args.docs, args.threads):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
