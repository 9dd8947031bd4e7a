"""Multi-host start-up through jax.distributed (no launcher of our own).

Flags (--coordinator_address, --num_processes, --process_id) or GEB_JAX_COORDINATOR_ADDRESS /
GEB_JAX_NUM_PROCESSES / GEB_JAX_PROCESS_ID name the job explicitly; otherwise, under a cluster
JAX recognises by its environment (SLURM, Open MPI, Kubernetes JobSet, Cloud TPU),
jax.distributed.initialize() finds everything itself. A single process needs nothing.
"""
from __future__ import annotations

import os

import jax

from geb_jax.errors import ConfigError

_CLUSTER_SIZE_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    coordinator_address = coordinator_address or os.environ.get("GEB_JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("GEB_JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["GEB_JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("GEB_JAX_PROCESS_ID"):
        process_id = int(os.environ["GEB_JAX_PROCESS_ID"])
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
        # CPU collectives across processes need gloo; harmless for a single process.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ConfigError("--coordinator_address needs --num_processes and --process_id "
                              "(or GEB_JAX_NUM_PROCESSES / GEB_JAX_PROCESS_ID).")
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"--process_id={process_id} must be in [0, {num_processes}).")
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    elif any(int(os.environ.get(v, "1") or 1) > 1 for v in _CLUSTER_SIZE_VARS):
        jax.distributed.initialize()  # the cluster environment says who is who
