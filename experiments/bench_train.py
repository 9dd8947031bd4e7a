"""Training throughput of the real train step: tokens/s and MFU for any preset and batch.

    python experiments/bench_train.py --config configs/tiny.py --peer torch
    python experiments/bench_train.py --config configs/geb_1_3b.py --config.train.batch_size=8 \
        --config.train.seq_len=4096 --steps 20

    python experiments/bench_train.py --config configs/geb_1_3b.py --config.train.batch_size=4 \
        --config.train.seq_len=4096 --aot        # compiled memory only, on abstract shapes
    python experiments/bench_train.py --config configs/geb_1_3b.py --config.train.batch_size=4 \
        --config.train.seq_len=4096 --config.model.attention_impl=pallas_gpu --aot \
        --interpret_kernels                      # ... of the flash-kernel path, on a CPU

The step is train/program.py's, the object train/loop.py runs (same loss, optimizer chain,
LoRA split, shardings, donation, logical-axis rules), compiled ahead of time once (compile time
and XLA's memory_analysis reported separately), run `--warmup` times, then timed over
`--steps` steps with the result fetched at the end. Batches are random token ids (throughput
does not depend on the data). MFU = tokens/s x FLOPs per token / peak FLOP/s of the devices,
with FLOPs per token = 6 x non-embedding parameters + 12 x layers x heads x head_dim x seq_len
(PaLM's accounting; ModelConfig.flops_per_token). CPUs have no published peak: pass
--peak_flops to get an MFU there.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from geb_jax.model import ModelConfig, layers
from geb_jax.parallel.mesh import check_batch_divides, make_mesh
from geb_jax.train.metrics_log import peak_flops_per_device
from geb_jax.train.program import build_step_program, compile_ahead, step_context
from geb_jax.train.state import init_sharded_state
from geb_jax.train.step import global_batch

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<preset>.py[:arg]")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_PEAK = flags.DEFINE_float("peak_flops", 0.0, "Peak FLOP/s per device (0: known GPUs/TPUs).")
_JSON = flags.DEFINE_string("json", "", "Also write the result to this JSON file.")
_PEER = flags.DEFINE_enum("peer", "none", ["none", "torch", "torch_compile"],
                          "Also time the peer in the same run: Hugging Face LlamaForCausalLM + "
                          "torch.optim.AdamW + clipping, same shapes and batch; eager or "
                          "torch.compile (bfloat16 autocast on CUDA).")
_AOT = flags.DEFINE_bool("aot", False, "Only compile the step ahead of time on abstract shapes "
                         "and report its memory (no weights allocated, nothing run).")
_INTERPRET = flags.DEFINE_bool(
    "interpret_kernels", False, "With --aot: compile a Pallas attention_impl through Pallas' "
    "interpreter, so a CPU reports the memory of the kernel path (no (B, N, T, T) scores).")


def random_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict:
    """One packed-document pretraining batch of random ids (two documents per row)."""
    rng = np.random.default_rng(seed)
    segments = np.where(np.arange(seq_len) < seq_len // 2, 1, 2).astype(np.int32)
    positions = np.where(segments == 1, np.arange(seq_len), np.arange(seq_len) - seq_len // 2)
    return {"inputs": rng.integers(0, vocab_size, (batch_size, seq_len), dtype=np.int32),
            "targets": rng.integers(0, vocab_size, (batch_size, seq_len), dtype=np.int32),
            "positions": np.broadcast_to(positions.astype(np.int32), (batch_size, seq_len)),
            "segment_ids": np.broadcast_to(segments, (batch_size, seq_len)),
            "loss_mask": np.ones((batch_size, seq_len), np.float32)}


def benchmark(config, steps: int, warmup: int, peak_flops: float = 0.0) -> dict:
    """Times train/program.py's step -- the object train/loop.py runs -- on random batches."""
    mesh = make_mesh(config.mesh)
    batch_size, seq_len = config.train.batch_size, config.train.seq_len
    check_batch_divides(batch_size, mesh)
    model_config = ModelConfig.from_dict(config.model)
    host_batch = random_batch(batch_size // jax.process_count(), seq_len, model_config.vocab_size)
    program = build_step_program(config, "pretrain", mesh, host_batch)
    t0 = time.perf_counter()
    compiled, memory = compile_ahead(program, host_batch)
    compile_s = time.perf_counter() - t0
    with step_context(mesh):
        state = init_sharded_state(model_config, program.optimizer, config.seed,
                                   program.state_sh, lora=program.lora)
        batch = global_batch(host_batch, program.batch_sh)
        for _ in range(warmup):
            state, metrics = compiled(state, batch, None)
        jax.block_until_ready(metrics) if warmup else None
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, batch, None)
        loss = float(jax.device_get(metrics["loss"]))  # waits for the last step
        elapsed = time.perf_counter() - t0
    tokens_per_step = batch_size * seq_len
    tokens_per_s = steps * tokens_per_step / elapsed
    flops_per_token = model_config.flops_per_token(seq_len)
    peak = peak_flops or peak_flops_per_device()
    return {
        **_describe(program, batch_size, seq_len),
        "compile_s": compile_s, "compiled_memory": memory, "step_s": elapsed / steps,
        "tokens_per_s": tokens_per_s, "flops_per_token": flops_per_token,
        "mfu": tokens_per_s * flops_per_token / (peak * jax.device_count()) if peak else None,
        "final_loss": loss}


@contextlib.contextmanager
def pallas_interpreted():
    """The model's attention with Pallas kernels in interpret mode (what tests/
    test_attention_kernels.py checks against XLA): lets a CPU compile a GPU/TPU kernel path."""
    original = layers.attend

    def attend(q, k, v, segment_ids, impl="auto", **kwargs):
        return original(q, k, v, segment_ids, impl, interpret=impl.startswith("pallas"),
                        **kwargs)

    layers.attend = attend
    try:
        yield
    finally:
        layers.attend = original


def compile_only(config) -> dict:
    """The step compiled ahead of time on abstract shapes: its memory, nothing allocated (so
    GEB-1.3B at 4 x 4096 fits on a laptop's CPU backend)."""
    mesh = make_mesh(config.mesh)
    batch_size, seq_len = config.train.batch_size, config.train.seq_len
    check_batch_divides(batch_size, mesh)
    rows = batch_size // jax.process_count()
    batch_like = {k: jax.ShapeDtypeStruct((rows, seq_len), v.dtype)  # names and dtypes only
                  for k, v in random_batch(1, 2, 2).items()}
    program = build_step_program(config, "pretrain", mesh, batch_like)
    t0 = time.perf_counter()
    _, memory = compile_ahead(program, batch_like)
    return {**_describe(program, batch_size, seq_len), "compile_s": time.perf_counter() - t0,
            "compiled_memory": memory}


def _describe(program, batch_size: int, seq_len: int) -> dict:
    c = program.model_config
    return {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
            "devices": jax.device_count(), "mesh": dict(program.mesh.shape),
            "params": c.num_params(), "batch_size": batch_size, "seq_len": seq_len,
            "microbatches": program.opt_config.microbatches, "dtype": c.dtype,
            "remat": c.remat_policy, "loss_chunk_size": c.loss_chunk_size,
            "attention_impl": c.attention_impl}


def benchmark_torch(config, steps: int, warmup: int, compiled: bool = False) -> dict:
    """The peer: the same model and batch as a transformers Llama trained by PyTorch with AdamW
    and clipping; one document per row (HF has no packed-document mask). On CUDA: bfloat16
    autocast and SDPA (flash) attention; `compiled` wraps the model in torch.compile."""
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel

    from geb_jax.export.hf import hf_config_from_model_config  # pylint: disable=import-outside-toplevel
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_config = ModelConfig.from_dict(config.model)
    hf_config = transformers.LlamaConfig(**hf_config_from_model_config(model_config),
                                         attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(hf_config).to(device).train()
    opt = config.optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.peak_learning_rate,
                                  betas=(opt.b1, opt.b2), eps=opt.eps,
                                  weight_decay=opt.weight_decay, fused=device == "cuda")
    forward = torch.compile(model) if compiled else model
    batch = random_batch(config.train.batch_size, config.train.seq_len, model_config.vocab_size)
    inputs = torch.from_numpy(batch["inputs"].astype(np.int64)).to(device)
    targets = torch.from_numpy(batch["targets"].astype(np.int64)).to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step() -> None:
        with autocast:
            logits = forward(input_ids=inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                                     targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip_norm)
        optimizer.step()

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(max(warmup, 1 if compiled else 0)):
        step()
    sync()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    elapsed = time.perf_counter() - t0
    tokens = config.train.batch_size * config.train.seq_len
    peak_memory = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"engine": f"torch {torch.__version__} {device}"
                      + (" torch.compile" if compiled else " eager")
                      + (" bf16 autocast" if device == "cuda" else
                         f" float32 ({torch.get_num_threads()} threads)"),
            "warmup_s": compile_s, "step_s": elapsed / steps,
            "tokens_per_s": steps * tokens / elapsed, "peak_memory_bytes": peak_memory}


def _gib(n) -> str:
    return f"{n / 2**30:.2f} GiB" if n is not None else "n/a"


def main(argv):
    del argv
    info = dict(date=datetime.date.today().isoformat(),
                host=platform.processor() or platform.machine(),
                command=" ".join(["python"] + sys.argv))
    if _AOT.value:
        with pallas_interpreted() if _INTERPRET.value else contextlib.nullcontext():
            result = {**compile_only(_CONFIG.value), **info}
        memory = result["compiled_memory"]
        print(f"{result['params']:,} params, batch {result['batch_size']} x {result['seq_len']}"
              f" on {result['devices']} x {result['device']} mesh {result['mesh']}, compiled "
              f"ahead of time in {result['compile_s']:.1f} s: peak {_gib(memory.get('peak_bytes'))}"
              f" (temp {_gib(memory.get('temp_bytes'))}, arguments "
              f"{_gib(memory.get('argument_bytes'))}, outputs {_gib(memory.get('output_bytes'))},"
              f" aliased {_gib(memory.get('alias_bytes'))})")
    else:
        result = {**benchmark(_CONFIG.value, _STEPS.value, _WARMUP.value, _PEAK.value), **info}
        mfu = (f"{result['mfu']:.1%}" if result["mfu"] is not None
               else "n/a (pass --peak_flops)")
        print(f"{result['params']:,} params on {result['devices']} x {result['device']} "
              f"mesh {result['mesh']}, batch {result['batch_size']} x {result['seq_len']}\n"
              f"compile {result['compile_s']:.1f} s; step {result['step_s'] * 1e3:.1f} ms; "
              f"{result['tokens_per_s']:,.0f} tokens/s; MFU {mfu} "
              f"(FLOPs/token = 6N + 12*L*H*Dh*T = {result['flops_per_token']:.4g}); compiled "
              f"peak memory {_gib(result['compiled_memory'].get('peak_bytes'))}")
        if _PEER.value != "none":
            peer = benchmark_torch(_CONFIG.value, _STEPS.value, _WARMUP.value,
                                   compiled=_PEER.value == "torch_compile")
            result["peer"] = peer
            print(f"peer {peer['engine']}: step {peer['step_s'] * 1e3:.1f} ms; "
                  f"{peer['tokens_per_s']:,.0f} tokens/s; peak memory "
                  f"{_gib(peer['peak_memory_bytes'])}; geb_jax / peer = "
                  f"{result['tokens_per_s'] / peer['tokens_per_s']:.2f}x")
    if _JSON.value:
        with open(_JSON.value + ".tmp", "w") as f:
            json.dump(result, f, indent=2)
        os.replace(_JSON.value + ".tmp", _JSON.value)


if __name__ == "__main__":
    app.run(main)
