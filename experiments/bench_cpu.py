"""CPU serving benchmark: prefill and decode tokens/s of every CPU engine, side by side (issue 6).

    python experiments/bench_cpu.py --models tiny,small,tinyllama_1_1b,geb_1_3b \
        --dtypes f32,int8,int4 --engines numpy,onnxruntime,torch,llama_cpp \
        --prompt 512 --decode 128 --threads 2 --out docs/bench_cpu.json

One row = one preset shape (configs/<model>.py) x dtype x engine, batch 1, random float32
weights (N(0, 0.02), norm scales 1: speed does not depend on the values), all engines fed the
same random prompt. Engines and what each dtype means for them:

  numpy        geb_jax.infer.Engine; int8 / int4 = geb_jax.infer.quantize (layer matrices;
               embedding and lm head stay float32)
  onnxruntime  the graph of geb_jax.export.onnx_export.build_onnx_model, CPU provider;
               int8 / int4 = com.microsoft MatMulNBits, block 32, accuracy_level 4 (int8
               activations); every linear, an untied head too (embedding float32)
  torch        transformers LlamaForCausalLM on PyTorch CPU, a KV-cache loop (use_cache,
               logits of the last position only, as generate() does); f32, bf16 on request
  llama_cpp    llama-cpp-python on geb_jax.export.gguf_export's file; f32, int8 = q8_0,
               int4 = q4_0 (every matrix, lm head included), f16 on request
Combinations not listed (torch int4, ...) are not run and are named under the table.

Timing. A warm-up (a 32-token prefill and 2 decode steps), then up to --repeats times: prefill
the --prompt tokens (timed), then decode --decode tokens greedily (timed, argmax included).
Medians; a repeat that takes longer than --max-repeat-s ends the repeats. prefill tok/s =
prompt / prefill seconds, decode tok/s = decode / decode seconds. Every engine runs with
--threads threads (OMP/MKL/OpenBLAS env vars, numpy's BLAS, onnxruntime intra_op_num_threads,
torch.set_num_threads, llama n_threads / n_threads_batch).

Bandwidth bound. Decoding one token reads every weight it uses once, so it cannot beat
bandwidth / bytes read per token. Read bandwidth (`measure_bandwidth`: the best of two
read-only kernels on a 1 GiB float32 array, each best of 5 -- --threads Python threads each
taking np.dot of its own slice with itself, and a float32 GEMV x @ W with BLAS at --threads
threads) is measured right before each row, in the row's process, and once at the start of the
run for the header: on a shared VM it moved between 15 and 23 GB/s from one run to the next.
Bytes per token are taken from what each engine actually holds: every layer matrix and norm,
the lm head, one embedding row (a lookup); rotary tables and the KV cache are not counted (the
cache is ~1% of GEB-1.3B's weights at 640 positions).

Isolation, memory, resuming. Each (model, engine) runs in a child process of this script
(memory is returned between engines; thread settings apply before any library loads), which
builds its own random weights (same seed: every engine sees the same model) and holds at most
two float32 copies of them. Rows are merged into --out after each child, written atomically; a
rerun skips rows already there with status "ok", so an interrupted run continues where it
stopped. Rows of engines that are not installed are recorded as "not installed".
"""
# Engines are imported inside the functions that use them: each child loads only its own.
# pylint: disable=import-outside-toplevel
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO_ROOT, "configs")
SCHEMA = "geb_jax.bench_cpu/1"
ENGINES = ("numpy", "onnxruntime", "torch", "llama_cpp")
DTYPES = ("f32", "f16", "bf16", "int8", "int4")
ENGINE_FORMATS = {  # engine -> {dtype column: the format that engine runs}
    "numpy": {"f32": "float32", "int8": "int8 per channel", "int4": "int4 g32 asym"},
    "onnxruntime": {"f32": "float32 MatMul", "int8": "MatMulNBits 8b b32 int8-compute",
                    "int4": "MatMulNBits 4b b32 int8-compute"},
    "torch": {"f32": "float32", "bf16": "bfloat16"},
    "llama_cpp": {"f32": "gguf f32", "f16": "gguf f16", "int8": "gguf q8_0",
                  "int4": "gguf q4_0"},
}
ENGINE_PACKAGES = {"numpy": ("numpy",), "onnxruntime": ("onnxruntime", "onnx"),
                   "torch": ("torch", "transformers"), "llama_cpp": ("llama_cpp", "gguf")}
GGUF_DTYPES = {"f32": "f32", "f16": "f16", "int8": "q8_0", "int4": "q4_0"}
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
WARMUP_PROMPT, WARMUP_DECODE = 32, 2
LOGITS_SAMPLE = 32  # first logits of the prompt's last position, kept to compare engines
TOKENIZER_VOCAB = 512  # the GGUF needs a vocabulary; a small builtin one, padded to the model's
ONNX_INLINE_BYTES = 1024  # initializers below this stay in the .onnx (shapes, axes, norms)


# ---- device and bandwidth ---------------------------------------------------------------------

def device_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": usable,
            "memory_gib": round(memory / 2**30, 1), "platform": platform.platform(),
            "python": platform.python_version()}


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # pages faulted in, threads started
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_bandwidth(threads: int, nbytes: int = 1 << 30, repeats: int = 5) -> dict:
    """Read bandwidth in GB/s (1e9 B/s) with `threads` threads: the faster of np.dot of each
    thread's slice with itself (numpy releases the GIL) and a BLAS float32 GEMV; best of N."""
    from geb_jax.infer._blas import set_blas_threads
    set_blas_threads(threads)
    array = np.ones(nbytes // 4, np.float32)
    parts = np.array_split(array, threads)
    with ThreadPoolExecutor(threads) as pool:
        dot_s = _best_seconds(lambda: list(pool.map(lambda p: np.dot(p, p), parts)), repeats)
    matrix = array.reshape(-1, 1024)
    x = np.ones((1, matrix.shape[0]), np.float32)
    gemv_s = _best_seconds(lambda: x @ matrix, repeats)
    dot, gemv = array.nbytes / dot_s / 1e9, array.nbytes / gemv_s / 1e9
    return {"gb_s": max(dot, gemv), "dot_gb_s": dot, "gemv_gb_s": gemv, "bytes": array.nbytes,
            "threads": threads, "method": "max(threaded np.dot of slices, BLAS GEMV), best of "
                                          f"{repeats}, float32 array of {array.nbytes} bytes"}


def bound_tokens_per_s(bandwidth_gb_s: float, bytes_per_token: int) -> float:
    return bandwidth_gb_s * 1e9 / bytes_per_token


# ---- model shapes and random weights ---------------------------------------------------------

def bench_model_config(model: str, prompt: int, decode: int):
    """The preset's ModelConfig, max_seq_len raised to fit prompt + decode when shorter."""
    from geb_jax.config_loader import load_config
    from geb_jax.model import ModelConfig
    config = ModelConfig.from_dict(load_config(os.path.join(CONFIG_DIR, model + ".py")).model)
    return config.replace(max_seq_len=max(config.max_seq_len, prompt + decode))


def random_params(config, seed: int = 0, std: float = 0.02) -> dict:
    """float32 numpy parameters in init_params' tree (shapes from jax.eval_shape, so jax
    allocates nothing): matrices N(0, std), norm scales 1."""
    import jax
    from geb_jax.model import abstract_params
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if any(getattr(key, "key", None) == "scale" for key in path):
            return np.ones(leaf.shape, np.float32)
        value = rng.standard_normal(leaf.shape, dtype=np.float32)
        value *= np.float32(std)
        return value

    return jax.tree_util.tree_map_with_path(draw, abstract_params(config))


# ---- engines ----------------------------------------------------------------------------------
# Each `_<engine>_runners` generator builds its weights once and yields (dtype, Runner) per
# dtype; the caller measures the runner before asking for the next one, so every engine and file
# is released before the next dtype is built.

@dataclasses.dataclass
class Runner:
    prefill: Callable[[np.ndarray], np.ndarray]  # prompt ids (T,) -> last logits (V,)
    decode: Callable[[int], np.ndarray]  # one token -> its logits (V,)
    kv_length: Callable[[], int]  # positions held in the KV cache
    weight_bytes_per_token: int  # weight bytes one decode step reads


def _numpy_runners(config, dtypes, spec) -> Iterator[tuple[str, Runner]]:
    from geb_jax.infer import Engine, Weights, quantize_weights
    from geb_jax.infer.weights import matrix_nbytes
    params = random_params(config, spec["seed"])
    base = Weights.from_params(params, config)
    del params
    gc.collect()
    for dtype in dtypes:
        weights = quantize_weights(base, None if dtype == "f32" else dtype)
        engine = Engine(weights, max_len=spec["prompt"] + spec["decode"],
                        threads=spec["threads"])
        nbytes = weights.final_norm.nbytes + matrix_nbytes(weights.lm_head) + config.d_model * 4
        for layer in weights.layers:
            nbytes += layer.attn_norm.nbytes + layer.mlp_norm.nbytes + sum(
                matrix_nbytes(m) for m in (layer.qkv, layer.o, layer.gate_up, layer.down))
        yield dtype, Runner(prefill=lambda ids, e=engine: e.prefill(ids[None])[0],
                            decode=lambda t, e=engine: e.decode_step(np.array([t]), copy=False)[0],
                            kv_length=lambda e=engine: e.length, weight_bytes_per_token=nbytes)
        del engine, weights
        gc.collect()


class _NamedTensorWeights:
    """What build_onnx_model reads of a Weights (.config, .to_named_tensors()), over a HF state
    dict it does not copy: a real Weights would be a third float32 copy of GEB-1.3B."""

    def __init__(self, config, named):
        self.config, self._named = config, named

    def to_named_tensors(self):
        return self._named


@contextlib.contextmanager
def _onnx_initializers_streamed(data_path: str, sizes: dict):
    """While active, onnx_export writes each initializer of >= ONNX_INLINE_BYTES to data_path
    and keeps only an external-data reference; `sizes` gets every initializer's bytes.

    Signpost: this patches the `numpy_helper` name inside geb_jax.export.onnx_export. Why:
    build_onnx_model keeps every weight several times over (its initializer list, make_graph's
    copy, make_model's copy: 1.14 GiB of weights peaked at 5.65 GiB RSS), which puts GEB-1.3B
    float32 (5.5 GB) out of reach of a 24 GB machine. The graph built is unchanged."""
    from onnx import TensorProto, helper, numpy_helper
    from geb_jax.export import onnx_export
    location = os.path.basename(data_path)
    with open(data_path, "wb") as f:
        def from_array(array, name=None):
            array = np.ascontiguousarray(array)
            sizes[name] = array.nbytes
            if array.nbytes < ONNX_INLINE_BYTES:
                return numpy_helper.from_array(array, name)
            offset = -(-f.tell() // 4096) * 4096  # page-aligned, as onnx.save aligns
            f.seek(offset)
            f.write(array.data)
            tensor = TensorProto(name=name, dims=array.shape,
                                 data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                                 data_location=TensorProto.EXTERNAL)
            for key, value in (("location", location), ("offset", offset),
                               ("length", array.nbytes)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            return tensor

        original = onnx_export.numpy_helper
        onnx_export.numpy_helper = types.SimpleNamespace(from_array=from_array)
        try:
            yield
        finally:
            onnx_export.numpy_helper = original


def _write_onnx(state: dict, infer_config, path: str, quantize: str | None) -> int:
    """Our exporter's graph for `state` at `path` (+ .data); returns weight bytes per token."""
    import onnx
    from geb_jax.export.onnx_export import build_onnx_model
    sizes: dict[str, int] = {}
    with _onnx_initializers_streamed(path + ".data", sizes):
        model = build_onnx_model(_NamedTensorWeights(infer_config, state), quantize=quantize)
    onnx.save_model(model, path)
    not_read = {"rope.cos_cache", "rope.sin_cache"}  # a row each per token: not counted
    if not infer_config.tie_embeddings:
        not_read.add("model.embed_tokens.weight")  # a lookup: one row, added below
    return sum(size for name, size in sizes.items()
               if name not in not_read and not name.startswith("const/")) + \
        infer_config.d_model * 4


def _onnxruntime_runners(config, dtypes, spec) -> Iterator[tuple[str, Runner]]:
    import onnxruntime as ort
    from geb_jax.export.hf import hf_state_dict_from_params
    from geb_jax.export.onnx_export import ort_feed
    from geb_jax.infer import InferConfig
    infer_config = InferConfig.from_dict(config)
    params = random_params(config, spec["seed"])
    state = hf_state_dict_from_params(params, config)
    del params
    gc.collect()
    for dtype in dtypes:
        path = os.path.join(spec["workdir"], f"model-{dtype}.onnx")
        nbytes = _write_onnx(state, infer_config, path, None if dtype == "f32" else dtype)
        options = ort.SessionOptions()
        options.intra_op_num_threads = spec["threads"]
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        held: dict = {}  # the last run's outputs: present.* is the next run's past

        def run(ids, past, s=session, n=names, h=held):
            h["out"] = dict(zip(n, s.run(None, ort_feed(infer_config, ids, past=past))))
            return h["out"]["logits"][0, -1]

        yield dtype, Runner(prefill=lambda ids, r=run: r(ids[None], None),
                            decode=lambda t, r=run, h=held: r([[t]], h["out"]),
                            kv_length=lambda h=held: h["out"]["present.0.key"].shape[2],
                            weight_bytes_per_token=nbytes)
        del session, run, held
        gc.collect()
        for name in (path, path + ".data"):
            os.remove(name)


def _torch_runners(config, dtypes, spec) -> Iterator[tuple[str, Runner]]:
    import torch
    import transformers
    from geb_jax.export.hf import hf_config_from_model_config, hf_state_dict_from_params
    torch.set_num_threads(spec["threads"])
    torch.set_num_interop_threads(1)
    params = random_params(config, spec["seed"])
    tensors = {k: torch.from_numpy(v) for k, v in hf_state_dict_from_params(params, config).items()}
    del params
    gc.collect()
    if config.tie_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    hf_config = transformers.LlamaConfig(**hf_config_from_model_config(config))
    with torch.device("meta"):  # no random init: the tensors are assigned (shared, not copied)
        model = transformers.LlamaForCausalLM(hf_config)
    model.load_state_dict(tensors, assign=True, strict=True)
    del tensors
    # inv_freq is a buffer outside the state dict: rebuild the rotary module on the CPU.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=hf_config)
    model.eval()
    for dtype in sorted(dtypes, key=lambda d: d != "f32"):  # bf16 converts the f32 model
        if dtype == "bf16":
            model.to(torch.bfloat16)
        unique = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
        embedding = model.model.embed_tokens.weight
        nbytes = sum(unique.values()) + config.d_model * embedding.element_size()
        if not config.tie_embeddings:
            nbytes -= embedding.numel() * embedding.element_size()
        held: dict = {}

        @torch.inference_mode()
        def run(ids, past, m=model, h=held):
            out = m(input_ids=torch.as_tensor(ids), past_key_values=past, use_cache=True,
                    logits_to_keep=1)
            h["past"] = out.past_key_values
            return out.logits[0, -1].float().numpy()

        yield dtype, Runner(prefill=lambda ids, r=run: r(ids[None], None),
                            decode=lambda t, r=run, h=held: r([[t]], h["past"]),
                            kv_length=lambda h=held: h["past"].get_seq_length(),
                            weight_bytes_per_token=nbytes)
        del run, held
        gc.collect()


def _gguf_weight_bytes(path: str, vocab_size: int) -> int:
    import gguf
    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path, "r").tensors}
    table = tensors["token_embd.weight"]
    tied = "output.weight" not in tensors  # llama.cpp then reads the table as the head
    return sum(tensors.values()) - (0 if tied else table) + table // vocab_size


def _llama_cpp_runners(config, dtypes, spec) -> Iterator[tuple[str, Runner]]:
    import llama_cpp
    from geb_jax.data.tokenizer import builtin_tokenizer
    from geb_jax.export.gguf_export import export_gguf
    tokenizer = builtin_tokenizer(TOKENIZER_VOCAB)  # the GGUF's vocabulary; ids are random
    params = random_params(config, spec["seed"])
    for dtype in dtypes:
        path = export_gguf(params, config, tokenizer.path,
                           os.path.join(spec["workdir"], f"model-{dtype}.gguf"),
                           dtype=GGUF_DTYPES[dtype])
        nbytes = _gguf_weight_bytes(path, config.vocab_size)
        llm = llama_cpp.Llama(model_path=path, n_ctx=spec["prompt"] + spec["decode"] + 8,
                              n_batch=512, n_ubatch=512, n_threads=spec["threads"],
                              n_threads_batch=spec["threads"], logits_all=False, verbose=False)

        def logits(m=llm):  # eval() keeps no logits unless logits_all; read llama.cpp's
            return np.ctypeslib.as_array(llama_cpp.llama_get_logits(m.ctx),
                                         shape=(config.vocab_size,))

        def prefill(ids, m=llm):
            m.reset()
            m.eval([int(i) for i in ids])
            return logits()

        def decode(token, m=llm):
            m.eval([token])
            return logits()

        yield dtype, Runner(prefill=prefill, decode=decode, kv_length=lambda m=llm: m.n_tokens,
                            weight_bytes_per_token=nbytes)
        if hasattr(llm, "close"):
            llm.close()
        del llm, prefill, decode, logits
        gc.collect()
        os.remove(path)


RUNNERS = {"numpy": _numpy_runners, "onnxruntime": _onnxruntime_runners,
           "torch": _torch_runners, "llama_cpp": _llama_cpp_runners}


# ---- measuring one row -------------------------------------------------------------------------

def measure(runner: Runner, prompt_ids: np.ndarray, decode: int, repeats: int,
            max_repeat_s: float) -> dict:
    """Warm-up, then up to `repeats` x (timed prefill, timed greedy decode); medians."""
    logits = runner.prefill(prompt_ids[:WARMUP_PROMPT])
    for _ in range(WARMUP_DECODE):
        logits = runner.decode(int(np.argmax(logits)))
    prefill_s, decode_s, sample, kv_length = [], [], None, None
    for _ in range(repeats):
        start = time.perf_counter()
        logits = runner.prefill(prompt_ids)
        prefilled = time.perf_counter()
        if sample is None:
            sample = [float(v) for v in np.asarray(logits[:LOGITS_SAMPLE], np.float64)]
        token = int(np.argmax(logits))
        decode_start = time.perf_counter()
        for _ in range(decode):
            token = int(np.argmax(runner.decode(token)))
        end = time.perf_counter()
        kv_length = int(runner.kv_length())
        prefill_s.append(prefilled - start)
        decode_s.append(end - decode_start)
        if end - start > max_repeat_s:
            break
    return {"prefill_s": prefill_s, "decode_s": decode_s,
            "prefill_tok_s": len(prompt_ids) / statistics.median(prefill_s),
            "decode_tok_s": decode / statistics.median(decode_s),
            "kv_length": kv_length, "logits_sample": sample}


def run_child(spec: dict) -> None:
    """One (model, engine): a row per dtype appended to spec["results"] as a JSON line; a
    failure becomes an error row (the traceback goes to stderr) and the next dtype runs."""
    from geb_jax.model import ModelConfig
    config = ModelConfig.from_dict(spec["config"])
    prompt_ids = np.random.default_rng(spec["seed"]).integers(
        4, config.vocab_size, spec["prompt"])

    def emit(dtype: str, row: dict) -> None:
        with open(spec["results"], "a") as f:
            f.write(json.dumps({"dtype": dtype, **row}) + "\n")

    runners = RUNNERS[spec["engine"]](config, spec["dtypes"], spec)
    pending = list(spec["dtypes"])
    started = time.perf_counter()
    try:
        for dtype, runner in runners:
            pending.remove(dtype)
            row = dict(status="ok", weight_bytes_per_token=int(runner.weight_bytes_per_token),
                       setup_s=time.perf_counter() - started, load_avg_1m=[os.getloadavg()[0]],
                       bandwidth=measure_bandwidth(spec["threads"], spec["bandwidth_bytes"]))
            try:
                row.update(measure(runner, prompt_ids, spec["decode"], spec["repeats"],
                                   spec["max_repeat_s"]))
            except Exception as e:  # pylint: disable=broad-except
                traceback.print_exc()
                emit(dtype, {"status": f"error: {type(e).__name__}: {e}"})
                continue
            finally:
                del runner
            row["load_avg_1m"].append(os.getloadavg()[0])
            row["row_s"] = time.perf_counter() - started
            emit(dtype, row)
            print(f"  [{spec['model']} {spec['engine']} {dtype}] prefill "
                  f"{row['prefill_tok_s']:.1f} tok/s, decode {row['decode_tok_s']:.2f} tok/s "
                  f"({row['row_s']:.0f} s)", flush=True)
            started = time.perf_counter()
    except Exception as e:  # pylint: disable=broad-except  (building weights / a file failed)
        traceback.print_exc()
        for i, dtype in enumerate(pending):
            emit(dtype, {"status": f"error: {type(e).__name__}: {e}" if i == 0 else
                         f"not run: setting up {pending[0]} failed"})


# ---- the run: plan, children, merge ------------------------------------------------------------

def row_key(row: dict) -> tuple:
    return (row["model"], row["dtype"], row["engine"], row["prompt_tokens"],
            row["decode_tokens"], row["threads"])


def load_results(path: str | None) -> dict:
    if not path or not os.path.exists(path):
        return {"schema": SCHEMA, "runs": [], "rows": []}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"--out {path}: cannot read it as JSON ({e}); move it away or pass "
                         f"another --out.") from None
    if data.get("schema") != SCHEMA:
        raise SystemExit(f"--out {path}: schema {data.get('schema')!r} is not {SCHEMA!r}; it was "
                         f"not written by this script. Pass another --out.")
    return data


def save_results(path: str, data: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _missing_packages(engine: str) -> list[str]:
    return [p for p in ENGINE_PACKAGES[engine] if importlib.util.find_spec(p) is None]


def _child_env(threads: int) -> dict:
    env = dict(os.environ, **{name: str(threads) for name in THREAD_ENV})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    return env


def run_engine(model: str, config, engine: str, dtypes: list[str], args, workdir: str) -> list:
    """The rows of one (model, engine), from a child process; a crash becomes error rows."""
    spec = dict(model=model, engine=engine, dtypes=dtypes, config=dataclasses.asdict(config),
                prompt=args.prompt, decode=args.decode, threads=args.threads,
                repeats=args.repeats, max_repeat_s=args.max_repeat_s, seed=args.seed,
                bandwidth_bytes=args.bandwidth_mib << 20,
                workdir=os.path.join(workdir, f"{model}-{engine}"),
                results=os.path.join(workdir, f"{model}-{engine}.jsonl"))
    os.makedirs(spec["workdir"], exist_ok=True)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                          env=_child_env(args.threads), check=False)
    rows = []
    if os.path.exists(spec["results"]):
        with open(spec["results"]) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    done = {r["dtype"] for r in rows}
    for dtype in dtypes:
        if dtype not in done:
            rows.append({"dtype": dtype, "status": f"error: child process exited with "
                                                   f"{proc.returncode} (see its output above)"})
    shutil.rmtree(spec["workdir"], ignore_errors=True)
    return rows


def plan(args, data: dict) -> list[tuple[str, str, list[str]]]:
    """(model, engine, dtypes still to run) for every requested combination an engine offers."""
    done = {row_key(r) for r in data["rows"] if r.get("status") == "ok"}
    todo = []
    for model in args.models:
        for engine in args.engines:
            dtypes = [d for d in args.dtypes if d in ENGINE_FORMATS[engine] and
                      (model, d, engine, args.prompt, args.decode, args.threads) not in done]
            if dtypes:
                todo.append((model, engine, dtypes))
    return todo


def _merge(data: dict, rows: list[dict]) -> None:
    keys = {row_key(r) for r in rows}
    data["rows"] = [r for r in data["rows"] if row_key(r) not in keys] + rows


def _finish_row(row: dict, model: str, engine: str, args, run_index: int) -> dict:
    """Adds what the parent knows, and the bound from the bandwidth measured before the row."""
    row.update(model=model, engine=engine, format=ENGINE_FORMATS[engine][row["dtype"]],
               prompt_tokens=args.prompt, decode_tokens=args.decode, threads=args.threads,
               run=run_index)
    if row["status"] == "ok":
        row["bandwidth_gb_s"] = row["bandwidth"]["gb_s"]
        row["bound_tok_s"] = bound_tokens_per_s(row["bandwidth_gb_s"],
                                                row["weight_bytes_per_token"])
        row["pct_of_bound"] = 100.0 * row["decode_tok_s"] / row["bound_tok_s"]
    return row


# ---- the table ---------------------------------------------------------------------------------

def _fmt(value, digits=1) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def selected_rows(data: dict, args) -> list[dict]:
    order = {(m, d, e): (i, j, k) for i, m in enumerate(args.models)
             for j, d in enumerate(args.dtypes) for k, e in enumerate(args.engines)}
    rows = [r for r in data["rows"] if (r["model"], r["dtype"], r["engine"]) in order and
            (r["prompt_tokens"], r["decode_tokens"], r["threads"]) ==
            (args.prompt, args.decode, args.threads)]
    return sorted(rows, key=lambda r: order[(r["model"], r["dtype"], r["engine"])])


def markdown_table(rows: list[dict]) -> str:
    """One line per row; ratios against onnxruntime f32 and logits against numpy f32 of the
    same model."""
    def find(model, dtype, engine):
        return next((r for r in rows if (r["model"], r["dtype"], r["engine"]) ==
                     (model, dtype, engine) and r["status"] == "ok"), None)

    lines = ["| model | dtype | engine | format | MiB read/token | prefill tok/s | decode tok/s | "
             "GB/s | bound tok/s | % of bound | decode x ORT f32 | prefill x ORT f32 | "
             "max abs dlogit vs numpy f32 |", "|" + "---|" * 13]
    for r in rows:
        cells = [r["model"], r["dtype"], r["engine"], r["format"]]
        if r["status"] != "ok":
            lines.append("| " + " | ".join(cells + [r["status"]] + [""] * 8) + " |")
            continue
        ort, ref = find(r["model"], "f32", "onnxruntime"), find(r["model"], "f32", "numpy")
        dlogit = None
        if ref and ref.get("logits_sample") and r.get("logits_sample"):
            dlogit = float(np.max(np.abs(np.subtract(r["logits_sample"], ref["logits_sample"]))))
        cells += [_fmt(r["weight_bytes_per_token"] / 2**20), _fmt(r["prefill_tok_s"]),
                  _fmt(r["decode_tok_s"], 2), _fmt(r["bandwidth_gb_s"]),
                  _fmt(r["bound_tok_s"], 2),
                  _fmt(r["pct_of_bound"], 0) + "%",
                  _fmt(r["decode_tok_s"] / ort["decode_tok_s"], 2) if ort else "",
                  _fmt(r["prefill_tok_s"] / ort["prefill_tok_s"], 2) if ort else "",
                  "" if dlogit is None else f"{dlogit:.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_report(data: dict, args) -> None:
    rows = selected_rows(data, args)
    runs = sorted({r["run"] for r in rows if "run" in r})
    for i in runs:
        run = data["runs"][i]
        d, bw = run["device"], run["bandwidth"]
        print(f"run {i}: {run['date']}, {d['cpu']} ({d['usable_cpus']} usable of "
              f"{d['logical_cpus']} CPUs, {d['memory_gib']} GiB), threads {args.threads}; "
              f"read bandwidth {bw['gb_s']:.2f} GB/s ({bw['method']}); load avg "
              f"{run['load_avg_1m']:.2f}\n  command: {run['command']}")
    print(f"batch 1, prompt {args.prompt} tokens, decode {args.decode} tokens; bound = read "
          f"bandwidth measured before the row / weight bytes per decoded token\n")
    print(markdown_table(rows))
    offered = [f"{e} {d}" for e in args.engines for d in args.dtypes
               if d not in ENGINE_FORMATS[e]]
    if offered:
        print(f"\nnot offered by the engine: {', '.join(offered)}")


# ---- command line ------------------------------------------------------------------------------

def _list_arg(choices, what: str):
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{what} {bad or text!r} not known; choose from {', '.join(choices)}")
        return items
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    presets = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py"))
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_list_arg(presets, "--models: preset(s)"),
                   default="tiny,small,tinyllama_1_1b,geb_1_3b")
    p.add_argument("--dtypes", type=_list_arg(DTYPES, "--dtypes:"), default="f32,int8,int4")
    p.add_argument("--engines", type=_list_arg(ENGINES, "--engines:"), default=",".join(ENGINES))
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens (prefill)")
    p.add_argument("--decode", type=int, default=128, help="tokens decoded after the prompt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    p.add_argument("--max-repeat-s", type=float, default=30.0,
                   help="no further repeats once one repeat took this long")
    p.add_argument("--bandwidth-mib", type=int, default=1024, help="bandwidth test array size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON results; rows already there are skipped")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("prompt", "decode", "threads", "repeats", "bandwidth_mib"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got "
                    f"{getattr(args, name)}")
    for name in ("models", "dtypes", "engines"):  # defaults arrive as strings
        if isinstance(getattr(args, name), str):
            setattr(args, name, getattr(args, name).split(","))
    return args


def _exit_on_sigterm(signum, frame):
    raise SystemExit(f"stopped by signal {signum}; rows finished so far are in --out")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if argv is None:  # a killed run still removes its work folder (and its child exits too)
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if args.child:
        run_child(json.loads(args.child))
        return {}
    data = load_results(args.out)
    todo = plan(args, data)
    if todo:
        started = time.perf_counter()
        bandwidth = measure_bandwidth(args.threads, args.bandwidth_mib << 20)
        data["runs"].append({"date": datetime.datetime.now().isoformat(timespec="seconds"),
                             "command": _command(argv),
                             "device": device_info(), "bandwidth": bandwidth,
                             "load_avg_1m": os.getloadavg()[0],
                             "versions": _versions(args.engines)})
        run_index = len(data["runs"]) - 1
        print(f"read bandwidth {bandwidth['gb_s']:.2f} GB/s; {sum(len(d) for _, _, d in todo)} "
              f"row(s) to run", flush=True)
        workdir = tempfile.mkdtemp(prefix="bench_cpu-")
        try:
            for model, engine, dtypes in todo:
                config = bench_model_config(model, args.prompt, args.decode)
                missing = _missing_packages(engine)
                if missing:
                    rows = [{"dtype": d, "status": f"not installed ({', '.join(missing)})"}
                            for d in dtypes]
                else:
                    print(f"{model} / {engine}: {', '.join(dtypes)}", flush=True)
                    rows = run_engine(model, config, engine, dtypes, args, workdir)
                _merge(data, [_finish_row(r, model, engine, args, run_index) for r in rows])
                if args.out:
                    save_results(args.out, data)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        data["runs"][run_index]["wall_s"] = time.perf_counter() - started
        if args.out:
            save_results(args.out, data)
    else:
        print(f"every requested row is already in {args.out}; nothing to run")
    print_report(data, args)
    return data


def _command(argv) -> str:
    words = [os.path.relpath(os.path.abspath(__file__))] + list(sys.argv[1:] if argv is None
                                                                else argv)
    return " ".join(["python"] + words)


def _versions(engines) -> dict:
    out = {"numpy": np.__version__}
    for engine in engines:
        for package in ENGINE_PACKAGES[engine]:
            if importlib.util.find_spec(package) is not None:
                try:
                    from importlib.metadata import version
                    out[package] = version(package.replace("_", "-"))
                except Exception:  # pylint: disable=broad-except
                    out[package] = "unknown"
    if "llama_cpp" in out:  # which SIMD features the llama.cpp build uses
        import llama_cpp
        out["llama_cpp_system_info"] = llama_cpp.llama_print_system_info().decode().strip()
    return out


if __name__ == "__main__":
    main()
