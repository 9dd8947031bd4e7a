"""Training throughput of the real train step: tokens/s and MFU for any preset and batch.

    python experiments/bench_train.py --config configs/tiny.py --peer torch
    python experiments/bench_train.py --config configs/geb_1_3b.py --config.train.batch_size=8 \
        --config.train.seq_len=4096 --steps 20

The step is the one train/loop.py runs (same loss, optimizer chain, shardings, donation),
compiled once (compile time reported separately), run `--warmup` times, then timed over
`--steps` steps with the result fetched at the end. Batches are random token ids (throughput
does not depend on the data). MFU = tokens/s x FLOPs per token / peak FLOP/s of the devices,
with FLOPs per token = 6 x non-embedding parameters + 12 x layers x heads x head_dim x seq_len
(PaLM's accounting; ModelConfig.flops_per_token). CPUs have no published peak: pass
--peak_flops to get an MFU there.
"""
from __future__ import annotations

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

from geb_jax.model import ModelConfig, make_apply
from geb_jax.parallel.mesh import check_batch_divides, make_mesh
from geb_jax.train.loop import bind_loss
from geb_jax.train.metrics_log import peak_flops_per_device
from geb_jax.train.optimizer import OptimizerConfig, make_optimizer
from geb_jax.train.state import init_sharded_state, state_shardings
from geb_jax.train.step import (SpikeConfig, batch_shardings, global_batch, jit_train_step,
                                make_train_step)

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<preset>.py[:arg]")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_PEAK = flags.DEFINE_float("peak_flops", 0.0, "Peak FLOP/s per device (0: known GPUs/TPUs).")
_JSON = flags.DEFINE_string("json", "", "Also write the result to this JSON file.")
_PEER = flags.DEFINE_enum("peer", "none", ["none", "torch"],
                          "Also time the peer in the same run: torch = Hugging Face "
                          "LlamaForCausalLM + torch.optim.AdamW + clipping, same shapes and batch.")


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
    model_config = ModelConfig.from_dict(config.model)
    opt_config = OptimizerConfig.from_dict(config.optimizer)
    mesh = make_mesh(config.mesh)
    batch_size, seq_len = config.train.batch_size, config.train.seq_len
    check_batch_divides(batch_size, mesh)
    optimizer = make_optimizer(opt_config)
    state_sh = state_shardings(model_config, optimizer, mesh)
    host_batch = random_batch(batch_size // jax.process_count(), seq_len, model_config.vocab_size)
    batch_sh = batch_shardings(host_batch, mesh)
    step_fn = jit_train_step(
        make_train_step(bind_loss("pretrain", make_apply(model_config), config.train), optimizer,
                        microbatches=opt_config.microbatches,
                        spike=SpikeConfig.from_dict(config.train.spike)),
        mesh, state_sh, batch_sh)
    with jax.set_mesh(mesh):
        state = init_sharded_state(model_config, optimizer, config.seed, state_sh)
        batch = global_batch(host_batch, batch_sh)
        t0 = time.perf_counter()
        compiled = step_fn.lower(state, batch, None).compile()
        compile_s = time.perf_counter() - t0
        for _ in range(warmup):
            state, metrics = compiled(state, batch, None)
        jax.block_until_ready(metrics)
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
        "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
        "mesh": dict(mesh.shape), "params": model_config.num_params(),
        "batch_size": batch_size, "seq_len": seq_len, "microbatches": opt_config.microbatches,
        "dtype": model_config.dtype, "remat": model_config.remat_policy,
        "compile_s": compile_s, "step_s": elapsed / steps, "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_per_token,
        "mfu": tokens_per_s * flops_per_token / (peak * jax.device_count()) if peak else None,
        "final_loss": loss}


def benchmark_torch(config, steps: int, warmup: int) -> dict:
    """The peer: the same model and batch as a transformers Llama, trained by PyTorch (eager,
    float32, SDPA attention; one document per row, since HF has no packed-document mask)."""
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel

    from geb_jax.export.hf import hf_config_from_model_config  # pylint: disable=import-outside-toplevel
    model_config = ModelConfig.from_dict(config.model)
    hf_config = transformers.LlamaConfig(**hf_config_from_model_config(model_config))
    model = transformers.LlamaForCausalLM(hf_config).train()
    opt = config.optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.peak_learning_rate,
                                  betas=(opt.b1, opt.b2), eps=opt.eps,
                                  weight_decay=opt.weight_decay)
    batch = random_batch(config.train.batch_size, config.train.seq_len, model_config.vocab_size)
    inputs = torch.from_numpy(batch["inputs"].astype(np.int64))
    targets = torch.from_numpy(batch["targets"].astype(np.int64))

    def step() -> float:
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip_norm)
        optimizer.step()
        return float(loss.detach())

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - t0
    tokens = config.train.batch_size * config.train.seq_len
    return {"engine": f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
            "step_s": elapsed / steps, "tokens_per_s": steps * tokens / elapsed}


def main(argv):
    del argv
    result = benchmark(_CONFIG.value, _STEPS.value, _WARMUP.value, _PEAK.value)
    result.update(date=datetime.date.today().isoformat(), host=platform.processor() or
                  platform.machine(), command=" ".join(["python"] + sys.argv))
    mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a (pass --peak_flops)"
    print(f"{result['params']:,} params on {result['devices']} x {result['device']} "
          f"mesh {result['mesh']}, batch {result['batch_size']} x {result['seq_len']}\n"
          f"compile {result['compile_s']:.1f} s; step {result['step_s'] * 1e3:.1f} ms; "
          f"{result['tokens_per_s']:,.0f} tokens/s; MFU {mfu} "
          f"(FLOPs/token = 6N + 12*L*H*Dh*T = {result['flops_per_token']:.4g})")
    if _PEER.value == "torch":
        peer = benchmark_torch(_CONFIG.value, _STEPS.value, _WARMUP.value)
        result["peer"] = peer
        print(f"peer {peer['engine']}: step {peer['step_s'] * 1e3:.1f} ms; "
              f"{peer['tokens_per_s']:,.0f} tokens/s; geb_jax / peer = "
              f"{result['tokens_per_s'] / peer['tokens_per_s']:.2f}x")
    if _JSON.value:
        with open(_JSON.value + ".tmp", "w") as f:
            json.dump(result, f, indent=2)
        os.replace(_JSON.value + ".tmp", _JSON.value)


if __name__ == "__main__":
    app.run(main)
