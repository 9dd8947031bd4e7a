"""Runs three train steps of a tiny model on a given mesh and saves losses and parameters.

Used by test_sharding.py in subprocesses, because the simulated device count must be set
(XLA_FLAGS) before JAX starts. Usage: python -m tests.sharded_run OUT.npz data fsdp tensor [n]
With GEB_JAX_COORDINATOR_ADDRESS etc. set, each process feeds its own rows of the batch.
"""
import sys

import flax.linen as nn
import jax
import numpy as np

from geb_jax.model import ModelConfig, make_apply
from geb_jax.parallel import distributed
from geb_jax.parallel.mesh import LOGICAL_AXIS_RULES, make_mesh
from geb_jax.train.losses import cross_entropy_loss
from geb_jax.train.optimizer import OptimizerConfig, make_optimizer
from geb_jax.train.state import init_sharded_state, state_shardings
from geb_jax.train.step import batch_shardings, global_batch, jit_train_step, make_train_step

# Every sharded dimension divisible by the 8-device meshes the tests build (parallel/mesh.py
# refuses to replicate a dimension silently): 8 query heads, 4 KV heads (kv_heads on a
# 2-way tensor axis), vocab 128.
CONFIG = ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=8, n_kv_heads=4,
                     head_dim=4, d_ff=64, max_seq_len=32)


def batches(steps=3, batch=8, seq=16):
    rng = np.random.default_rng(0)
    for _ in range(steps):
        tokens = rng.integers(0, CONFIG.vocab_size, (batch, seq + 1)).astype(np.int32)
        segments = np.where(np.arange(seq) < 10, 1, 2)[None].repeat(batch, 0).astype(np.int32)
        positions = np.where(segments == 1, np.arange(seq), np.arange(seq) - 10).astype(np.int32)
        mask = (rng.random((batch, seq)) > 0.2).astype(np.float32)
        mask[:, 9] = 0  # target crosses the document boundary
        yield {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions,
               "segment_ids": segments, "loss_mask": mask}


def run(out, shape, num_devices, microbatches=1):
    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)), jax.devices()[:num_devices])
    rows = len(next(batches())["inputs"]) // jax.process_count()
    local = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
    # Adam divides by sqrt(v): on entries whose gradient is ~0, reduction-order noise (~1e-10)
    # becomes an update of up to ~1.3% of lr (measured: 1.28e-5 at lr 1e-3 on 1 of 4096 entries
    # of this config), so lr 5e-4 keeps that under the tests' 1e-5; a sharding or accumulation
    # bug moves parameters by ~lr per step, 50x more.
    hp = OptimizerConfig.from_dict(dict(peak_learning_rate=5e-4, min_learning_rate=5e-5,
                                        warmup_steps=1, total_steps=3, microbatches=microbatches))
    optimizer = make_optimizer(hp)
    apply = make_apply(CONFIG)
    loss_fn = lambda p, b, reference_params=None: cross_entropy_loss(p, b, apply)
    state_sh = state_shardings(CONFIG, optimizer, mesh)
    state = init_sharded_state(CONFIG, optimizer, 0, state_sh)
    data = list(batches())
    batch_sh = batch_shardings(data[0], mesh)
    step = jit_train_step(make_train_step(loss_fn, optimizer, microbatches=microbatches),
                          mesh, state_sh, batch_sh)
    losses = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        for host_batch in data:
            host_rows = {k: v[local] for k, v in host_batch.items()}
            state, metrics = step(state, global_batch(host_rows, batch_sh), None)
            losses.append(float(metrics["loss"]))
    from jax.experimental import multihost_utils  # gathers shards held by other processes
    params = multihost_utils.process_allgather(state.params, tiled=True)
    if jax.process_index() != 0:
        return
    leaves = jax.tree_util.tree_leaves_with_path(params)
    np.savez(out, losses=np.array(losses),
             **{jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves})


if __name__ == "__main__":
    distributed.initialize()
    out, *dims = sys.argv[1:]
    dims = [int(d) for d in dims]
    run(out, tuple(dims[:3]), int(np.prod(dims[:3])), *(dims[3:] or []))
    if jax.process_count() > 1:
        jax.distributed.shutdown()
