"""CPU serving benchmark (issues 6 and 15): prefill and decode tokens/s, resident memory and
held-out perplexity of our ONNX graphs beside their peers, in one run; its report.

Issue 15's run (2 threads, GEB-1.3B and TinyLlama-1.1B with random weights, the real
SmolLM2-135M with its held-out perplexity; the plan, printed first, estimates ~30 min with
pessimistic constants, and --budget-min 23 makes it end by ~25 min: steps that would start later
are recorded as "not run", and the same command run again does only those):

    python experiments/bench_cpu.py --models smollm2_135m,geb_1_3b,tinyllama_1_1b \
        --engines llama_cpp,onnxruntime_fused,ort_genai,onnxruntime,torch \
        --dtypes f32,int8,int4 --prompt 512 --decode 128 --threads 2 --repeats 2 \
        --budget-min 23 --out docs/benchmarks/bench_cpu_issue15.json \
        --md docs/benchmarks/bench_cpu_issue15.md --plot docs/benchmarks/cpu_decode_issue15.png

(f32 runs on SmolLM2 only by default, its perplexity reference: --f32-models all adds it to the
1B shapes, where f32 decode is bandwidth-bound at ~4 tok/s and has no target.)

`--plan-only` prints the plan (steps and their estimated seconds) and stops. The engines, their
formats and the child processes are in experiments/bench_cpu_engines.py; this file is the
command line, the plan, the run loop and the report.

One row = model x dtype x engine, batch 1, every engine on the same weights (one Hugging Face
folder per model, written first; every engine's file is made from it) and the same random
prompt. Each row is timed in a fresh child process that only loads its file, so the row's
resident memory (VmRSS after the timed repeats, and the peak VmHWM) is that engine's own.

Timing: a warm-up (32-token prefill, 2 decode steps), then up to --repeats x (prefill the
--prompt tokens, timed; decode --decode tokens greedily, timed, argmax included); medians; a
repeat longer than --max-repeat-s ends the repeats. prefill tok/s = prompt / prefill s, decode
tok/s = decode / decode s. Every engine runs --threads threads.

Read-bandwidth bound (issue 15 item 4). Decoding one token reads every weight it uses once, so
a row's achieved read rate is weight bytes per token x decode tok/s. The bound is the fastest
read rate seen in the run: the best of (a) the median of a STREAM-style read compiled at run
time with the system C compiler (-O3 -march=native -fopenmp; an OpenMP simd sum over a
--bandwidth-mib buffer, --threads threads), measured at the start, before each row and at the
end, (b) the medians of two numpy kernels (Python-threaded np.dot of slices, a BLAS GEMV),
start and end, and (c) every row's own achieved read rate whose weights are at least 4x the
last-level cache, so no engine in the run beats it; "% of bound" = achieved / bound. Medians,
not maxima, of the repeated readings: one outlier (79.6 GB/s among ~35 GB/s readings on
2026-12-03) must not set the bound. Rows whose weights fit in the last-level cache are
labelled "LLC-resident: compute/overhead-bound" instead of a percentage.

Targets (issue 15 item 3), checked in the report for each of our graphs (onnxruntime plain and
fused) at int8 and int4: decode >= 1.0x llama.cpp q8_0 / q4_0 and >= 1.0x onnxruntime-genai's
graph at the same bits; prefill >= 1.2x llama.cpp; perplexity change vs the same engine's f32 no
worse than llama.cpp's (SmolLM2); peak resident memory <= llama.cpp's + 10%. Where a speed
target is missed the report shows onnxruntime's profile of that row (time per op type, a second
short pass: bench_cpu_engines.PROFILE_PROMPT tokens of prefill and PROFILE_DECODE decode steps)
beside onnxruntime-genai's at the same bits.

Peers outside the venv (bench_cpu_engines.PEER_DIR, default ~/.cache/geb_jax/bench_cpu):
  onnxruntime-genai   pip install onnxruntime-genai==0.18.0 (the runtime and its builder);
                      its builder also imports onnx_ir, which the wheel does not declare:
                      pip install --no-deps --target ~/.cache/geb_jax/bench_cpu/python onnx-ir==1.1.0
  llama.cpp native    CMAKE_ARGS=-DGGML_NATIVE=ON pip install --no-deps --target
                      ~/.cache/geb_jax/bench_cpu/llama_cpp_native llama-cpp-python==0.3.36
                      (used when present and it runs, else the venv's portable build; the
                      report prints which ran and its system_info: AVX2 / AVX-512 / AMX)

Results: --out JSON (rows merged after each step, written atomically; a rerun skips rows
already there with status "ok", so an interrupted run continues), --md the report as Markdown,
--plot experiments/plot_bench_cpu.py's figure. Engines that are not installed become rows
"not installed (...)"; --budget-min stops starting new steps after that many minutes.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_cpu_engines as E  # noqa: E402  pylint: disable=wrong-import-position
from geb_jax.atomic_io import atomic_file, write_json_atomic  # noqa: E402  pylint: disable=wrong-import-position

SCHEMA = "geb_jax.bench_cpu/2"
ENGINES, DTYPES, ENGINE_FORMATS = E.ENGINES, E.DTYPES, E.ENGINE_FORMATS
# Order of the steps within a model (and see plan() for the order across models): what issue 15's
# targets need first, so that --budget-min cuts the rest.
RUN_ORDER = ("llama_cpp", "onnxruntime_fused", "ort_genai", "onnxruntime", "torch", "numpy")
PRIMARY_ENGINES = ("llama_cpp", "ort_genai", "onnxruntime_fused")  # see plan()
BOUND_MIN_LLC = 4  # a row counts toward the bound when it reads >= this many LLCs per token
CHILD_TIMEOUT_S = 1200  # one step's child process (a 1B model's files: ~1-3 min)
MEMORY_SLACK = 1.10  # peak resident memory target: <= llama.cpp's + 10%
PREFILL_TARGET = 1.2
PEER_NAMES = {"llama_cpp": "llama.cpp", "ort_genai": "onnxruntime-genai"}
BITS_NAME = {"int8": "8-bit", "int4": "4-bit"}


# ---- the bound and the labels (pure) -------------------------------------------------------------

def fits_llc(weight_bytes: int, llc: int | None) -> bool:
    """Weights read per token fit in the last-level cache: such a row is compute/overhead-bound."""
    return bool(llc) and weight_bytes <= llc


def method_family(name: str) -> str:
    """A bandwidth reading's method without its settings or place: "C stream read (2 OpenMP
    threads, best of 5) before row m int4 x" -> "C stream read"."""
    return name.split(" before row ")[0].split(" (")[0]


def select_bound(methods: list[dict], rows: list[dict], llc: int | None) -> dict:
    """The run's read-bandwidth bound: the median of each method's readings (start, end and
    before every row), the best method's median, raised to the fastest ok row's achieved read
    rate when an engine beat it (rows whose weights are >= BOUND_MIN_LLC x the LLC: cache-
    resident rows read from the cache, not memory). Why a median: the maximum of ~60 readings
    picks an outlier (2026-12-03: one STREAM read of 79.6 GB/s among readings of ~35 GB/s made
    every row look at most half as fast as it could be); no engine can beat the bound, since
    any row that does sets it. Returns {"gb_s", "source", "candidates": [...]}."""
    readings: dict[str, list[float]] = {}
    for m in methods:
        if m.get("gb_s"):
            readings.setdefault(method_family(m["method"]), []).append(m["gb_s"])
    candidates = [{"source": f"median of {len(v)} {family} readings", "gb_s": statistics.median(v),
                   "readings": len(v), "min_gb_s": min(v), "max_gb_s": max(v)}
                  for family, v in readings.items()]
    floor = BOUND_MIN_LLC * llc if llc else 0
    for r in rows:
        if r.get("status") == "ok" and r.get("achieved_gb_s") and \
                r["weight_bytes_per_token"] >= floor:
            candidates.append({"source": f"row {r['model']} {r['dtype']} {r['engine']}",
                               "gb_s": r["achieved_gb_s"]})
    if not candidates:
        return {"gb_s": None, "source": "nothing measured", "candidates": []}
    best = max(candidates, key=lambda c: c["gb_s"])
    return {"gb_s": best["gb_s"], "source": best["source"], "candidates": candidates}


def bound_fields(row: dict, bound_gb_s: float | None, llc: int | None) -> dict:
    """bound tok/s and % of bound for one ok row, or the LLC-resident label."""
    if fits_llc(row["weight_bytes_per_token"], llc):
        return {"bound": "LLC-resident: compute/overhead-bound", "bound_tok_s": None,
                "pct_of_bound": None}
    if not bound_gb_s:
        return {"bound": "no bandwidth measured", "bound_tok_s": None, "pct_of_bound": None}
    bound_tok_s = bound_gb_s * 1e9 / row["weight_bytes_per_token"]
    return {"bound": "memory", "bound_tok_s": bound_tok_s,
            "pct_of_bound": 100.0 * row["decode_tok_s"] / bound_tok_s}


def run_methods(run: dict, rows: list[dict]) -> list[dict]:
    """Every bandwidth measurement of a run: start and end methods, and each row's probe."""
    methods = list(run.get("bandwidth", [])) + list(run.get("bandwidth_end", []))
    for r in rows:
        probe = r.get("bandwidth_now") or {}
        if probe.get("gb_s"):
            methods.append(dict(probe, method=f"{probe['method']} before row {r['model']} "
                                              f"{r['dtype']} {r['engine']}"))
    return methods


def apply_bounds(data: dict) -> None:
    """Stores each run's bound and every ok row's bound fields (the plot reads them)."""
    for i, run in enumerate(data["runs"]):
        rows = [r for r in data["rows"] if r.get("run") == i]
        llc = run["device"].get("llc_bytes")
        run["bound"] = select_bound(run_methods(run, rows), rows, llc)
        for r in rows:
            if r.get("status") == "ok":
                r.update(bound_fields(r, run["bound"]["gb_s"], llc))


# ---- targets (pure) -------------------------------------------------------------------------------

def ppl_change_pct(row: dict, rows: list[dict]) -> float | None:
    """Perplexity change (%) of a row against the same engine's f32 row of the same model (any
    engine's f32 row when that one is missing)."""
    if not (row.get("ppl") or {}).get("nll_per_token") or row["dtype"] == "f32":
        return None
    refs = [r for r in rows if r["model"] == row["model"] and r["dtype"] == "f32" and
            (r.get("ppl") or {}).get("nll_per_token") is not None]
    ref = next((r for r in refs if r["engine"] == row["engine"]), refs[0] if refs else None)
    if ref is None:
        return None
    return float(100 * np.expm1(row["ppl"]["nll_per_token"] - ref["ppl"]["nll_per_token"]))


def check_targets(rows: list[dict]) -> list[dict]:
    """Issue 15's targets for each of our quantized rows that has a peer at the same bits in the
    same run: [{model, dtype, engine, target, ours, peer, ratio, goal, met}]."""
    ok = [r for r in rows if r.get("status") == "ok"]
    find = {(r["model"], r["dtype"], r["engine"]): r for r in ok}
    out = []
    for r in ok:
        if r["engine"] not in E.OURS or r["dtype"] not in ("int8", "int4"):
            continue
        key = (r["model"], r["dtype"])
        llama, genai = find.get(key + ("llama_cpp",)), find.get(key + ("ort_genai",))

        def add(target, ours, peer, goal, higher_is_better=True, r=r):
            if ours is None or peer is None:
                return
            ratio = ours / peer if peer else float("inf")
            met = ratio >= goal if higher_is_better else ratio <= goal
            out.append({"model": r["model"], "dtype": r["dtype"], "engine": r["engine"],
                        "target": target, "ours": ours, "peer": peer, "ratio": ratio,
                        "goal": goal, "met": bool(met)})

        if llama:
            add("decode tok/s vs llama.cpp", r["decode_tok_s"], llama["decode_tok_s"], 1.0)
            add("prefill tok/s vs llama.cpp", r["prefill_tok_s"], llama["prefill_tok_s"],
                PREFILL_TARGET)
            add("peak RSS vs llama.cpp", r.get("peak_rss_mib"), llama.get("peak_rss_mib"),
                MEMORY_SLACK, higher_is_better=False)
            ours_ppl, llama_ppl = ppl_change_pct(r, ok), ppl_change_pct(llama, ok)
            if ours_ppl is not None and llama_ppl is not None:
                met = abs(ours_ppl) <= abs(llama_ppl)
                out.append({"model": r["model"], "dtype": r["dtype"], "engine": r["engine"],
                            "target": "abs. perplexity change vs llama.cpp (%)", "ours": ours_ppl,
                            "peer": llama_ppl, "ratio": None, "goal": None, "met": met})
        if genai:
            add("decode tok/s vs onnxruntime-genai", r["decode_tok_s"], genai["decode_tok_s"],
                1.0)
    return out


# ---- the plan and its estimate ----------------------------------------------------------------------

def model_shape(model: str, prompt: int, decode: int):
    """The ModelConfig a model will have (presets from configs/, SmolLM2 from its file)."""
    if model in E.REAL_MODELS:
        from geb_jax.checkpoint.published import published_model_config, smollm2_path
        return published_model_config(smollm2_path())
    return E.bench_model_config(model, prompt, decode)


def weight_counts(c) -> tuple[int, int]:
    """(weights of every matmul a token reads: layers + head, embedding table size)."""
    layer = c.d_model * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + \
        c.n_heads * c.head_dim * c.d_model + 3 * c.d_model * c.d_ff
    return c.n_layers * layer + c.vocab_size * c.d_model, c.vocab_size * c.d_model


BYTES_PER_WEIGHT = {"f32": 4.0, "bf16": 2.0, "int8": 36 / 32, "int4": 20 / 32}
# Planning constants (2-core AVX2/AVX-512 machine of docs/benchmarks.md, 2026-11-23 run):
PREFILL_FLOP_S = 120e9  # 2 x weights x tokens / prefill s of the f32 rows there (~110-130e9)
READ_GB_S = 20.0  # bandwidth there, 16-24 GB/s
DECODE_EFFICIENCY = {"f32": 0.8, "bf16": 0.5, "int8": 0.55, "int4": 0.5}
STEP_OVERHEAD_S = 0.002  # per decoded token: dispatch, argmax
PREPARE_S_PER_GB = {  # seconds per GB of float32 weights, per file (2-core machine, loaded)
    ("onnx", "f32"): 2, ("onnx", "int8"): 6, ("onnx", "int4"): 4,
    ("llama_cpp", "f32"): 2, ("llama_cpp", "int8"): 6, ("llama_cpp", "int4"): 4,
    ("ort_genai", "f32"): 8, ("ort_genai", "int8"): 10, ("ort_genai", "int4"): 10}
PREPARE_FIXED_S = {"onnx": 2, "llama_cpp": 2, "ort_genai": 8}  # per file; + 5 s per step


def estimate_row_s(c, engine: str, dtype: str, args, ppl_tokens: int = 0) -> float:
    weights, table = weight_counts(c)
    prefill = PREFILL_FLOP_S / (2 * weights)  # tok/s
    if engine == "numpy" and dtype != "f32":
        prefill *= 0.7
    efficiency = 0.1 if engine == "numpy" and dtype != "f32" else DECODE_EFFICIENCY[dtype]
    token_s = weights * BYTES_PER_WEIGHT[dtype] / (efficiency * READ_GB_S * 1e9) + STEP_OVERHEAD_S
    repeat = args.prompt / prefill + args.decode * token_s
    repeats = 1 if repeat > args.max_repeat_s else args.repeats
    load = 2 + (weights + table) * BYTES_PER_WEIGHT[dtype] / 1e9 * 1.0
    total = load + E.WARMUP_PROMPT / prefill + repeats * repeat + ppl_tokens / prefill
    if dtype in ("int8", "int4") and engine in E.OURS + ("ort_genai",) and \
            args.profile == "quantized":
        total += load + E.PROFILE_PROMPT / prefill + E.PROFILE_DECODE * token_s
    return total + 1.0  # the bandwidth probe before the row


def estimate_prepare_s(c, engine: str, dtypes: list[str]) -> float:
    weights, table = weight_counts(c)
    gb = (weights + table) * 4 / 1e9
    kind = "onnx" if engine in E.OURS else engine
    return 5 + gb + sum(PREPARE_FIXED_S[kind] + PREPARE_S_PER_GB[(kind, d)] * gb
                        for d in dtypes if (kind, d) in PREPARE_S_PER_GB)


def model_dtypes(model: str, args) -> list[str]:
    """The dtypes a model runs: f32 only for the --f32-models (the perplexity references)."""
    if "all" in args.f32_models or model in args.f32_models:
        return list(args.dtypes)
    return [d for d in args.dtypes if d != "f32"]


def plan(args, data: dict) -> list[dict]:
    """The steps still to run, in order: per model its folder, then per engine (RUN_ORDER) its
    files and one timed row per dtype. Rows already in --out with status ok are not rerun.

    Priority, so that --budget-min cuts the least needed rows: the real models first, then
    the random-weight models' PRIMARY_ENGINES (the peers and our fused graph), then their other
    engines (our plain graph, torch, numpy), whose model folders are kept until then."""
    done = {row_key(r) for r in data["rows"] if r.get("status") == "ok"}
    first, later = [], []
    for model in args.models:
        shape = model_shape(model, args.prompt, args.decode)
        ppl_tokens = args.ppl_docs * args.ppl_windows_per_doc * args.ppl_window \
            if model in E.REAL_MODELS or model in args.ppl_models else 0
        model_steps, deferred = [], []
        for engine in sorted(args.engines, key=RUN_ORDER.index):
            dtypes = [d for d in model_dtypes(model, args) if d in ENGINE_FORMATS[engine] and
                      (model, d, engine, args.prompt, args.decode, args.threads) not in done]
            if not dtypes:
                continue
            steps = deferred if model not in E.REAL_MODELS and \
                engine not in PRIMARY_ENGINES else model_steps
            if engine not in ("numpy", "torch"):
                steps.append({"kind": "prepare", "model": model, "engine": engine,
                              "dtypes": dtypes,
                              "estimate_s": estimate_prepare_s(shape, engine, dtypes)})
            for dtype in dtypes:
                steps.append({"kind": "time", "model": model, "engine": engine, "dtype": dtype,
                              "estimate_s": estimate_row_s(shape, engine, dtype, args,
                                                           ppl_tokens)})
        if model_steps or deferred:
            weights, table = weight_counts(shape)
            hf_s = 15 + (weights + table) * 4 / 1e9 * 3
            first.append({"kind": "hf", "model": model, "estimate_s": hf_s})
            first += model_steps
            later += deferred
    return first + later


def print_plan(steps: list[dict], args) -> float:
    fixed = 20.0  # bandwidth methods at start and end, compiling the helper
    total = fixed + sum(s["estimate_s"] for s in steps)
    rows = sum(s["kind"] == "time" for s in steps)
    print(f"plan: {rows} row(s) in {len(steps)} step(s), estimated {total / 60:.1f} min "
          f"(planning constants of bench_cpu.py, from smoke runs and earlier full runs on a "
          f"2-core machine; each step's real time goes to --out as runs[].steps[].took_s)"
          + (f"; --budget-min {args.budget_min:g}: no step starts after that" if
             args.budget_min else ""))
    elapsed, marked = fixed / 2, False
    for s in steps:
        if args.budget_min and not marked and elapsed > 60 * args.budget_min:
            print(f"  --- estimated to start after --budget-min {args.budget_min:g}: "
                  f"'not run' unless the run is faster than planned ---")
            marked = True
        what = {"hf": "model folder", "prepare": f"{s.get('engine')} files "
                                                 f"{','.join(s.get('dtypes', []))}",
                "time": f"{s.get('engine')} {s.get('dtype')}"}[s["kind"]]
        elapsed += s["estimate_s"]
        print(f"  {s['model']:<16} {s['kind']:<8} {what:<44} ~{s['estimate_s']:5.0f} s  "
              f"(at ~{elapsed / 60:4.1f} min)")
    print(flush=True)
    return total


# ---- the run --------------------------------------------------------------------------------------

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
        raise SystemExit(f"--out {path}: schema {data.get('schema')!r} is not {SCHEMA!r} (an "
                         f"older bench_cpu.py, or another script); pass another --out.")
    return data


def save_text(path: str, text: str) -> None:
    with atomic_file(path, "w", encoding="utf-8") as f:  # the usual file mode, not mkstemp's 0600
        f.write(text)


def save_results(path: str, data: dict) -> None:
    write_json_atomic(path, data, indent=1)


def missing_packages(engine: str) -> list[str]:
    sys.path.append(E.PEER_PYTHON)  # onnx_ir may live there
    try:
        return [p for p in E.ENGINE_PACKAGES[engine] if importlib.util.find_spec(p) is None]
    finally:
        sys.path.remove(E.PEER_PYTHON)


def run_stage(stage: str, spec: dict, workdir: str, threads: int,
              extra_path=()) -> tuple[dict | None, int]:
    """One child process of bench_cpu_engines.py; (its result or None, its exit status)."""
    fd, spec_file = tempfile.mkstemp(prefix=f"{stage}-", suffix=".json", dir=workdir)
    spec = dict(spec, result=spec_file + ".result")
    with os.fdopen(fd, "w") as f:
        json.dump(spec, f)
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(E.__file__), stage, spec_file],
                              env=E.child_env(threads, extra_path), check=False,
                              timeout=CHILD_TIMEOUT_S)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = 124
    result = None
    if code == 0 and os.path.exists(spec["result"]):
        with open(spec["result"]) as f:
            result = json.load(f)
    for name in (spec_file, spec["result"]):
        if os.path.exists(name):
            os.remove(name)
    return result, code


def _exit_text(code: int) -> str:
    if code == 124:
        return f"timed out after {CHILD_TIMEOUT_S} s"
    return f"signal {-code}" if code < 0 else f"exit status {code}"


class Run:
    """State of one invocation: the steps, the files on disk, rows as they come."""

    def __init__(self, args, data: dict, steps: list[dict]):
        self.args, self.data, self.steps = args, data, steps
        self.workdir = tempfile.mkdtemp(prefix="bench_cpu-", dir=args.workdir)
        self.started = time.perf_counter()
        self.models: dict = {}  # model -> facts of its hf stage
        self.files: dict = {}  # (model, engine) -> {dtype: {"path" | "error", "prepare_s"}}
        self.run_index = len(data["runs"])
        self.helper, how = E.compile_stream_helper(os.path.join(self.workdir, "helper"))
        nbytes = args.bandwidth_mib << 20
        self.llama_builds = self._llama_builds() if "llama_cpp" in args.engines else []
        versions = _versions(args.engines)
        self.genai_version = versions.get("onnxruntime_genai")
        data["runs"].append({
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": _command(), "device": E.device_info(), "versions": versions,
            "load_avg_1m": os.getloadavg()[0], "stream_helper": how,
            "llama_cpp_builds": self.llama_builds,
            "bandwidth": E.measure_bandwidth(args.threads, nbytes, self.helper),
            "planned_s": sum(s["estimate_s"] for s in steps)})
        self.run = data["runs"][-1]

    def _llama_builds(self) -> list[dict]:
        """The llama.cpp builds to try, fastest first: native (PEER_DIR) when it imports, then
        the venv's."""
        builds = []
        if os.path.isdir(E.LLAMA_CPP_NATIVE):
            builds.append(dict(E.llama_cpp_probe(E.LLAMA_CPP_NATIVE), build="native",
                               path=E.LLAMA_CPP_NATIVE))
        builds.append(dict(E.llama_cpp_probe(None), build="installed (venv)", path=None))
        return [b for b in builds if "error" not in b] + [b for b in builds if "error" in b]

    def out_of_time(self) -> bool:
        return bool(self.args.budget_min) and \
            time.perf_counter() - self.started > 60 * self.args.budget_min

    def spec(self, model: str) -> dict:
        a = self.args
        return dict(model=model, prompt=a.prompt, decode=a.decode, threads=a.threads,
                    seed=a.seed, repeats=a.repeats, max_repeat_s=a.max_repeat_s,
                    ppl_docs=a.ppl_docs, ppl_window=a.ppl_window,
                    ppl_windows_per_doc=a.ppl_windows_per_doc, profile=a.profile,
                    ppl=model in E.REAL_MODELS or model in a.ppl_models,
                    bandwidth_bytes=a.bandwidth_mib << 20, stream_helper=self.helper,
                    workdir=self.workdir)

    def emit(self, model: str, engine: str, dtype: str, row: dict) -> None:
        a = self.args
        row.update(model=model, engine=engine, dtype=dtype, format=ENGINE_FORMATS[engine][dtype],
                   prompt_tokens=a.prompt, decode_tokens=a.decode, threads=a.threads,
                   run=self.run_index)
        keys = {row_key(row)}
        self.data["rows"] = [r for r in self.data["rows"] if row_key(r) not in keys] + [row]
        if a.out:
            save_results(a.out, self.data)
        if row["status"] == "ok":
            print(f"  [{model} {engine} {dtype}] prefill {row['prefill_tok_s']:.1f} tok/s, "
                  f"decode {row['decode_tok_s']:.2f} tok/s, {row['achieved_gb_s']:.1f} GB/s, "
                  f"peak RSS {row.get('peak_rss_mib', 0):.0f} MiB"
                  + (f", ppl {row['ppl']['perplexity']:.3f}" if (row.get('ppl') or {}).get(
                      'perplexity') else "") + f" ({row['row_s']:.0f} s)", flush=True)
        else:
            print(f"  [{model} {engine} {dtype}] {row['status']}", flush=True)

    def step(self, s: dict) -> None:
        model = s["model"]
        if s["kind"] == "hf":
            folder = os.path.join(self.workdir, model)
            os.makedirs(folder, exist_ok=True)
            started = time.perf_counter()
            facts, code = run_stage("hf", dict(self.spec(model), folder=folder), self.workdir,
                                    self.args.threads)
            self.models[model] = facts or {"error": f"model folder: {_exit_text(code)}"}
            self.models[model]["hf_s"] = time.perf_counter() - started
            return
        facts = self.models.get(model, {"error": "no model folder"})
        engine = s["engine"]
        if s["kind"] == "prepare":
            folder = os.path.join(self.workdir, model, engine)
            if "error" in facts:
                self.files[(model, engine)] = {d: {"error": facts["error"]} for d in s["dtypes"]}
                return
            spec = dict(self.spec(model), engine=engine, dtypes=s["dtypes"], folder=folder,
                        hf=facts["hf"], config=facts["config"], tokenizer=facts["tokenizer"])
            result, code = run_stage("prepare", spec, self.workdir, self.args.threads)
            self.files[(model, engine)] = result or {
                d: {"error": f"preparing files: {_exit_text(code)}"} for d in s["dtypes"]}
            return
        dtype = s["dtype"]
        if "error" in facts:
            self.emit(model, engine, dtype, {"status": f"error: {facts['error']}"})
            return
        if engine in ("numpy", "torch"):
            file = {"path": facts["hf"], "prepare_s": 0.0}
        else:
            file = self.files.get((model, engine), {}).get(dtype, {"error": "no file"})
        if "error" in file:
            self.emit(model, engine, dtype, {"status": f"error: {file['error']}"})
            return
        spec = dict(self.spec(model), engine=engine, dtype=dtype, path=file["path"],
                    config=facts["config"], windows=facts.get("windows"))
        builds = self.llama_builds if engine == "llama_cpp" else [{"path": None}]
        notes = []
        for build in builds:
            started = time.perf_counter()
            extra = [build["path"]] if build.get("path") else []
            row, code = run_stage("time", spec, self.workdir, self.args.threads, extra)
            if row is not None:
                row["row_s"] = time.perf_counter() - started
                row["prepare_s"] = file.get("prepare_s")
                if engine == "llama_cpp":
                    row["llama_cpp_build"] = build.get("build")
                if notes:
                    row["notes"] = notes
                self.emit(model, engine, dtype, row)
                return
            notes.append(f"{build.get('build', engine)} build: {_exit_text(code)}")
        self.emit(model, engine, dtype, {"status": "error: " + "; ".join(notes)})

    def cleanup_after(self, s: dict, remaining: list[dict]) -> None:
        """Deletes files no later step needs (an engine's after its last row, a model's folder
        after its last step)."""
        model = s["model"]
        if s["kind"] == "time" and not any(
                r["model"] == model and r.get("engine") == s["engine"] for r in remaining):
            shutil.rmtree(os.path.join(self.workdir, model, s["engine"]), ignore_errors=True)
        if not any(r["model"] == model for r in remaining):
            shutil.rmtree(os.path.join(self.workdir, model), ignore_errors=True)

    def execute(self) -> None:
        try:
            for i, s in enumerate(self.steps):
                if s["kind"] == "time" and E.ENGINE_PACKAGES[s["engine"]] and \
                        missing_packages(s["engine"]):
                    self.emit(s["model"], s["engine"], s["dtype"], {
                        "status": f"not installed ({', '.join(missing_packages(s['engine']))})"})
                    continue
                if s["kind"] == "prepare" and missing_packages(s["engine"]):
                    continue
                if self.out_of_time():
                    if s["kind"] == "time":
                        self.emit(s["model"], s["engine"], s["dtype"],
                                  {"status": f"not run: --budget-min {self.args.budget_min:g} "
                                             f"reached"})
                    continue
                started = time.perf_counter()
                label = s.get("engine", "") + " " + s.get("dtype", ",".join(s.get("dtypes", [])))
                print(f"[{time.perf_counter() - self.started:6.0f} s] {s['model']} {s['kind']} "
                      f"{label.strip()} (~{s['estimate_s']:.0f} s)", flush=True)
                self.step(s)
                s["took_s"] = time.perf_counter() - started
                self.cleanup_after(s, self.steps[i + 1:])
        finally:
            self.run["bandwidth_end"] = E.measure_bandwidth(
                self.args.threads, self.args.bandwidth_mib << 20, self.helper)
            self.run["wall_s"] = time.perf_counter() - self.started
            self.run["steps"] = [{k: v for k, v in s.items() if k != "dtypes"} for s in self.steps]
            self.run["models"] = {m: {k: v for k, v in f.items() if k != "windows"}
                                  for m, f in self.models.items()}
            apply_bounds(self.data)
            if self.args.out:
                save_results(self.args.out, self.data)
            shutil.rmtree(self.workdir, ignore_errors=True)


# ---- the report -----------------------------------------------------------------------------------

def _fmt(value, digits=1) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def selected_rows(data: dict, args) -> list[dict]:
    order = {(m, d, e): (i, j, k) for i, m in enumerate(args.models)
             for j, d in enumerate(args.dtypes) for k, e in enumerate(args.engines)}
    rows = [r for r in data["rows"] if (r["model"], r["dtype"], r["engine"]) in order and
            (r["prompt_tokens"], r["decode_tokens"], r["threads"]) ==
            (args.prompt, args.decode, args.threads)]
    return sorted(rows, key=lambda r: order[(r["model"], r["dtype"], r["engine"])])


TABLE_HEAD = ("| model | dtype | engine | format | MiB read/token | prefill tok/s | decode tok/s | "
              "read GB/s | % of bound | peak RSS MiB | perplexity | Δ ppl vs f32 | "
              "decode x llama.cpp | prefill x llama.cpp | decode x genai |")


def markdown_table(rows: list[dict]) -> str:
    """One line per row; ratios against llama.cpp and onnxruntime-genai at the same model and
    dtype; perplexity and its change against the same engine's f32 (SmolLM2)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    find = {(r["model"], r["dtype"], r["engine"]): r for r in ok}
    lines = [TABLE_HEAD, "|" + "---|" * 15]
    for r in rows:
        cells = [r["model"], r["dtype"], r["engine"], r["format"]]
        if r.get("status") != "ok":
            lines.append("| " + " | ".join(cells + [r.get("status", "?")] + [""] * 10) + " |")
            continue
        llama = find.get((r["model"], r["dtype"], "llama_cpp"))
        genai = find.get((r["model"], r["dtype"], "ort_genai"))
        if r.get("pct_of_bound") is not None:
            bound = _fmt(r["pct_of_bound"], 0) + "%"
        else:
            bound = r.get("bound", "")
        ppl = r.get("ppl") or {}
        change = ppl_change_pct(r, ok)

        def ratio(peer, key):
            return _fmt(r[key] / peer[key], 2) if peer and peer is not r else ""

        cells += [_fmt(r["weight_bytes_per_token"] / 2**20), _fmt(r["prefill_tok_s"]),
                  _fmt(r["decode_tok_s"], 2), _fmt(r.get("achieved_gb_s"), 1), bound,
                  _fmt(r.get("peak_rss_mib"), 0),
                  _fmt(ppl.get("perplexity"), 3) if "perplexity" in ppl else
                  ppl.get("error", "")[:40],
                  "" if change is None else f"{change:+.2f} %",
                  ratio(llama, "decode_tok_s"), ratio(llama, "prefill_tok_s"),
                  ratio(genai, "decode_tok_s")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_section(rows: list[dict]) -> str:
    checks = check_targets(rows)
    if not checks:
        return "no quantized row of ours has a peer row at the same bits in this run."
    lines = ["| model | bits | our graph | target | ours | peer | ratio | goal | met |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in checks:
        goal = "" if c["goal"] is None else (f">= {c['goal']:.2f}x" if "RSS" not in c["target"]
                                             else f"<= {c['goal']:.2f}x")
        lines.append(f"| {c['model']} | {BITS_NAME[c['dtype']]} | {c['engine']} | {c['target']} "
                     f"| {_fmt(c['ours'], 2)} | {_fmt(c['peer'], 2)} | "
                     f"{_fmt(c['ratio'], 2) if c['ratio'] is not None else ''} | {goal} | "
                     f"{'yes' if c['met'] else '**no**'} |")
    return "\n".join(lines)


def profile_section(rows: list[dict], top: int = 8) -> str:
    """For each of our rows that missed a speed target: its onnxruntime profile (decode ms per
    token and prefill ms by op type) beside onnxruntime-genai's at the same bits."""
    checks = check_targets(rows)
    missed = {(c["model"], c["dtype"], c["engine"]) for c in checks
              if not c["met"] and "tok/s" in c["target"]}
    find = {(r["model"], r["dtype"], r["engine"]): r for r in rows if r.get("status") == "ok"}
    out = []
    for key in sorted(missed):
        ours = find[key]
        genai = find.get(key[:2] + ("ort_genai",))
        profiles = [(key[2], ours.get("profile"))] + ([("ort_genai", genai.get("profile"))]
                                                      if genai else [])
        out.append(f"\n{key[0]} {key[1]} {key[2]}: missed "
                   + ", ".join(c["target"] for c in checks if not c["met"] and
                               (c["model"], c["dtype"], c["engine"]) == key))
        for name, p in profiles:
            if not p or "error" in p:
                out.append(f"  {name}: no profile ({(p or {}).get('error', 'not profiled')})")
                continue
            dec, pre = p["decode_ms_per_token"], p["prefill_ms"]
            dec_total, pre_total = sum(dec.values()), sum(pre.values())
            row = ours if name == key[2] else genai
            out.append(f"  {name}: decode {1000 / row['decode_tok_s']:.2f} ms/token timed "
                       f"(Python loop, {row['prompt_tokens']}-token prompt); profiled "
                       f"({p['prefill_tokens']}-token prompt, {p['decode_runs']} steps): "
                       f"{_fmt(p.get('decode_run_ms_per_token'), 2)} ms per model run, "
                       f"{dec_total:.2f} ms in kernels; prefill {pre_total:.0f} ms in kernels "
                       f"of {_fmt(p.get('prefill_run_ms'), 0)} ms")
            out.append("    decode ms/token: " + ", ".join(
                f"{op} {ms:.3f} ({100 * ms / dec_total:.0f}%)"
                for op, ms in list(dec.items())[:top]))
            out.append("    prefill ms: " + ", ".join(
                f"{op} {ms:.0f} ({100 * ms / pre_total:.0f}%)"
                for op, ms in list(pre.items())[:top]))
    return "\n".join(out).strip()


def header(data: dict, rows: list[dict], args) -> str:
    out = []
    for i in sorted({r["run"] for r in rows if "run" in r}):
        run = data["runs"][i]
        d, v = run["device"], run.get("versions", {})
        simd = ", ".join(k for k, on in d.get("simd", {}).items() if on) or "none found"
        llc = d.get("llc_bytes")
        llc_text = f"LLC {llc / 2**20:.0f} MiB" if llc else "LLC unknown"
        out.append(f"run {i}: {run['date']}, {d['cpu']} ({d['usable_cpus']} usable of "
                   f"{d['logical_cpus']} CPUs, {d['memory_gib']} GiB, {llc_text}")
        out[-1] += (f", SIMD: {simd}), threads {args.threads}, load avg {run['load_avg_1m']:.2f}"
                    f" at the start; {_fmt(run.get('wall_s', 0) / 60)} min wall (planned "
                    f"{_fmt(run.get('planned_s', 0) / 60)} min)")
        out.append(f"  command: {run['command']}")
        out.append("  versions: " + ", ".join(f"{k} {val}" for k, val in v.items()
                                              if not k.endswith("system_info")))
        ran = sorted({(r.get("llama_cpp_build"), r.get("llama_cpp_system_info"))
                      for r in rows if r.get("run") == i and r["engine"] == "llama_cpp" and
                      r.get("status") == "ok"}, key=str)
        for build, info in ran:
            out.append(f"  llama.cpp build that ran: {build}; system_info: {info}")
        for b in run.get("llama_cpp_builds", []):
            if "error" in b:
                out.append(f"  llama.cpp {b['build']} build could not be imported: "
                           f"{b['error'][:200]}")
        bound = run.get("bound") or {}
        if bound.get("gb_s"):
            out.append(f"  read-bandwidth bound {bound['gb_s']:.2f} GB/s = the best method's "
                       f"median reading, or the fastest row's achieved read rate when an engine "
                       f"beat it; set by {bound['source']}; methods (median of readings, "
                       f"min-max): " + "; ".join(
                           f"{c['source'][len('median of '):]} {c['gb_s']:.2f} "
                           f"({c['min_gb_s']:.2f}-{c['max_gb_s']:.2f})"
                           for c in bound["candidates"] if "readings" in c)
                       + f" (helper: {run.get('stream_helper')})")
    out.append(f"batch 1, prompt {args.prompt} tokens, decode {args.decode} tokens, "
               f"{args.threads} threads, median of up to {args.repeats} repeats; read GB/s = "
               f"weight bytes per token x decode tok/s; % of bound = that / the bound")
    return "\n".join(out)


def report(data: dict, args) -> str:
    rows = selected_rows(data, args)
    parts = [header(data, rows, args), "", markdown_table(rows), "", "Targets (issue 15):", "",
             targets_section(rows)]
    profiles = profile_section(rows)
    if profiles:
        parts += ["", "onnxruntime profiles where a speed target is missed (time per op type; "
                      f"{E.PROFILE_PROMPT}-token prefill, {E.PROFILE_DECODE} decode steps):",
                  "", "```", profiles, "```"]
    not_offered = [f"{e} {d}" for e in args.engines for d in args.dtypes
                   if d not in ENGINE_FORMATS[e]]
    if not_offered:
        parts += ["", f"not offered by the engine: {', '.join(not_offered)}"]
    return "\n".join(parts) + "\n"


# ---- command line ---------------------------------------------------------------------------------

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
    presets = sorted(f[:-3] for f in os.listdir(E.CONFIG_DIR) if f.endswith(".py"))
    models = presets + sorted(E.REAL_MODELS)
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_list_arg(models, "--models: preset(s)"),
                   default="smollm2_135m,geb_1_3b,tinyllama_1_1b")
    p.add_argument("--dtypes", type=_list_arg(DTYPES, "--dtypes:"), default="f32,int8,int4")
    p.add_argument("--engines", type=_list_arg(ENGINES, "--engines:"),
                   default="llama_cpp,onnxruntime_fused,ort_genai,onnxruntime,torch")
    p.add_argument("--f32-models", type=lambda t: [s.strip() for s in t.split(",") if s.strip()],
                   default=sorted(E.REAL_MODELS),
                   help="models that also run f32 ('all' for every model); default the real "
                        "model(s), whose f32 rows are the perplexity references: on the 1B "
                        "shapes f32 decode is bandwidth-bound at ~4 tok/s and has no target")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens (prefill)")
    p.add_argument("--decode", type=int, default=128, help="tokens decoded after the prompt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="timed repeats (median)")
    p.add_argument("--max-repeat-s", type=float, default=30.0,
                   help="no further repeats once one repeat took this long")
    p.add_argument("--bandwidth-mib", type=int, default=1024,
                   help="buffer of the bandwidth methods (far larger than the LLC)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ppl-docs", type=int, default=4, help="SmolLM2 perplexity: documents")
    p.add_argument("--ppl-window", type=int, default=256, help="... tokens per window")
    p.add_argument("--ppl-windows-per-doc", type=int, default=2, help="... windows per document")
    p.add_argument("--ppl-models", type=lambda t: [s.strip() for s in t.split(",") if s.strip()],
                   default=sorted(E.REAL_MODELS),
                   help="models scored on held-out text (the real ones always are; a random-"
                        "weight model only exercises the code)")
    p.add_argument("--profile", choices=("quantized", "never"), default="quantized",
                   help="onnxruntime profiles (a second, short pass) of the quantized rows of "
                        "our graphs and onnxruntime-genai's; the report shows those of rows "
                        "that miss a target")
    p.add_argument("--budget-min", type=float, default=None,
                   help="start no new step after this many minutes (rows left: 'not run')")
    p.add_argument("--out", default=None, help="JSON results; rows already there are skipped")
    p.add_argument("--md", default=None, help="write the report here (Markdown)")
    p.add_argument("--plot", default=None, help="write plot_bench_cpu.py's figure here (PNG)")
    p.add_argument("--workdir", default=None, help="folder for the model files (default: tmp)")
    p.add_argument("--plan-only", action="store_true", help="print the plan and stop")
    args = p.parse_args(argv)
    for name in ("prompt", "decode", "threads", "repeats", "bandwidth_mib", "ppl_docs",
                 "ppl_window", "ppl_windows_per_doc"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got "
                    f"{getattr(args, name)}")
    for name in ("models", "dtypes", "engines"):  # defaults arrive as strings
        if isinstance(getattr(args, name), str):
            setattr(args, name, getattr(args, name).split(","))
    return args


def _exit_on_sigterm(signum, frame):
    raise SystemExit(f"stopped by signal {signum}; rows finished so far are in --out")


def _command() -> str:
    return " ".join(["python", os.path.relpath(os.path.abspath(__file__))] + sys.argv[1:])


def _versions(engines) -> dict:
    """Versions of the engines' packages (the venv's, or PEER_DIR/python's)."""
    import glob
    from importlib.metadata import PackageNotFoundError, version
    out = {"numpy": np.__version__}
    dists = {"llama_cpp": "llama-cpp-python"}
    for package in sorted({p for e in engines for p in E.ENGINE_PACKAGES[e]}):
        try:
            out[package] = version(dists.get(package, package.replace("_", "-")))
        except PackageNotFoundError:
            hits = glob.glob(os.path.join(E.PEER_PYTHON, package + "-*.dist-info"))
            if hits:
                out[package] = os.path.basename(hits[0])[len(package) + 1:-len(".dist-info")]
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if argv is None:  # a killed run still removes its work folder
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    data = load_results(args.out)
    steps = plan(args, data)
    if steps:
        print_plan(steps, args)
        if args.plan_only:
            return data
        run = Run(args, data, steps)
        print("bandwidth: " + "; ".join(f"{m['method']} {m['gb_s']:.2f} GB/s"
                                        for m in run.run["bandwidth"] if m.get("gb_s")),
              flush=True)
        run.execute()
    else:
        print(f"every requested row is already in {args.out}; nothing to run")
    apply_bounds(data)
    text = report(data, args)
    print("\n" + text)
    if args.md:
        save_text(args.md, text)
    if args.plot and any(r.get("status") == "ok" for r in data["rows"]):
        import plot_bench_cpu
        plot_bench_cpu.plot(data, args.plot)
        print(f"wrote {args.plot}")
    return data


if __name__ == "__main__":
    main()
