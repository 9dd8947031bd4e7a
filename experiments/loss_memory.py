"""Compiled memory of the loss + gradient, dense (B, T, V) logits vs the chunked cross-entropy,
at a preset's shapes, ahead of time: abstract shapes only (jax.ShapeDtypeStruct), no weight is
allocated and nothing runs, so it works on a laptop CPU for GEB-1.3B.

    python experiments/loss_memory.py                        # GEB-1.3B, 4 x 4096, both parts
    python experiments/loss_memory.py --part head --chunks 0,256,512,1024,2048
    python experiments/loss_memory.py --config configs/tiny.py --batch 8 --seq 256 --json out.json

Two programs per chunk size (0 = dense, the verified reference), each `jax.jit(...).lower(...)
.compile().memory_analysis()` on the default backend:
  head: lm head + cross-entropy (pretraining, every token a target) and its gradient w.r.t. the
        lm head's input (B, T, D) and weight, from abstract final hidden states in the compute
        dtype; exactly the model's last einsum (dense) or train/losses.py's chunked path.
  model: the whole model's loss and gradient w.r.t. all float32 parameters (the train step's
        value_and_grad, without the optimizer); slower to compile. Its temporary memory also
        holds what attention and the layers' saved activations need (model.remat_policy).
Printed per program: temp (XLA's scratch: activations, logits, gradients in flight), argument
and output bytes, compile seconds. "temp" is the figure the chunking changes.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from geb_jax.config_loader import load_config
from geb_jax.model import ModelConfig, abstract_params, make_apply
from geb_jax.train.losses import cross_entropy_loss

GIB = 2.0 ** 30


def _stats(fn, *abstract_args) -> dict:
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*abstract_args).compile()
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    if stats is None:
        raise SystemExit(f"memory_analysis() is unavailable on {jax.default_backend()}")
    return {"temp_bytes": int(stats.temp_size_in_bytes),
            "argument_bytes": int(stats.argument_size_in_bytes),
            "output_bytes": int(stats.output_size_in_bytes),
            "compile_s": round(seconds, 1)}


def _batch(b: int, t: int) -> dict:
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
    return {"inputs": ids, "targets": ids, "positions": ids, "segment_ids": ids,
            "loss_mask": jax.ShapeDtypeStruct((b, t), jnp.float32)}


def head_only(config: ModelConfig, b: int, t: int, chunk: int, z_loss_weight: float) -> dict:
    """lm head + loss and its gradient on abstract final hidden states (B, T, D)."""
    dtype = jnp.dtype(config.dtype)

    def head_apply(params, tokens, positions, segments):  # the model's last einsum, dense
        del tokens, positions, segments
        return jnp.einsum("BTD,DV->BTV", params["hidden"], params["lm_head"].astype(dtype))

    head_apply.hidden_states = lambda params, *_: params["hidden"]
    head_apply.lm_head = lambda params: params["lm_head"].astype(dtype)
    head_apply.config = config

    def loss_and_grad(params, batch):
        return jax.value_and_grad(
            lambda p: cross_entropy_loss(p, batch, head_apply, z_loss_weight=z_loss_weight,
                                         loss_chunk_size=chunk), has_aux=True)(params)

    params = {"hidden": jax.ShapeDtypeStruct((b, t, config.d_model), dtype),
              "lm_head": jax.ShapeDtypeStruct((config.d_model, config.vocab_size), jnp.float32)}
    return _stats(loss_and_grad, params, _batch(b, t))


def whole_model(config: ModelConfig, b: int, t: int, chunk: int, z_loss_weight: float) -> dict:
    apply = make_apply(config)

    def loss_and_grad(params, batch):
        return jax.value_and_grad(
            lambda p: cross_entropy_loss(p, batch, apply, z_loss_weight=z_loss_weight,
                                         loss_chunk_size=chunk), has_aux=True)(params)

    return _stats(loss_and_grad, abstract_params(config), _batch(b, t))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/geb_1_3b.py")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--chunks", default="0,512",
                        help="comma-separated loss_chunk_size values; 0 = dense")
    parser.add_argument("--part", choices=("head", "model", "both"), default="both")
    parser.add_argument("--remat", default="", help="override model.remat_policy (none, "
                        "save_dots, full) for the model part")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args()

    config = load_config(args.config)
    model_config = ModelConfig.from_dict(config.model)
    if args.remat:
        model_config = model_config.replace(remat_policy=args.remat)
    z = float(config.train.z_loss_weight)
    b, t, v = args.batch, args.seq, model_config.vocab_size
    print(f"{args.config}: vocab {v}, d_model {model_config.d_model}, {model_config.n_layers} "
          f"layers, compute {model_config.dtype}, remat {model_config.remat_policy}; batch "
          f"{b} x {t}; backend {jax.default_backend()}, jax {jax.__version__}")
    print(f"(B, T, V) float32 logits: {b * t * v * 4 / GIB:.2f} GiB; "
          f"{model_config.dtype} logits: {b * t * v * jnp.dtype(model_config.dtype).itemsize / GIB:.2f} GiB")
    parts = {"head": head_only, "model": whole_model}
    results = []
    for part in (("head", "model") if args.part == "both" else (args.part,)):
        for chunk in (int(c) for c in args.chunks.split(",")):
            row = {"part": part, "loss_chunk_size": chunk,
                   **parts[part](model_config, b, t, chunk, z)}
            results.append(row)
            print(f"{part:5s} chunk {chunk:5d}: temp {row['temp_bytes'] / GIB:7.2f} GiB  "
                  f"arguments {row['argument_bytes'] / GIB:6.2f} GiB  output "
                  f"{row['output_bytes'] / GIB:6.2f} GiB  (compiled in {row['compile_s']} s)",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "batch": b, "seq": t, "vocab": v,
                       "dtype": model_config.dtype, "backend": jax.default_backend(),
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
