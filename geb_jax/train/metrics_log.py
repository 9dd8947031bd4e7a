"""Side effects of logging, kept at the edge: metrics.jsonl, TensorBoard events, a progress bar.

Only process 0 writes. The JSONL file is appended line by line and flushed, so a killed run
keeps every line it logged; on resume, lines from steps after the restored checkpoint are
superseded by the new run's lines for the same steps (readers keep the last line per step).
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
import tqdm

# Dense bf16 peak FLOP/s per device, for MFU; unknown devices (CPUs) report no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5p": 459e12}


def peak_flops_per_device() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


class MetricsLog:
    def __init__(self, workdir: str, stage: str, total_steps: int, start_step: int):
        self.enabled = jax.process_index() == 0
        self.stage = stage
        self._tb = None
        self._bar = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard", stage))
        except ImportError:  # TensorBoard is optional; JSONL always works
            self._tb = None
        self._bar = tqdm.tqdm(total=total_steps, initial=start_step, desc=stage,
                              dynamic_ncols=True, mininterval=1.0)

    def write(self, step: int, metrics: dict, split: str = "train") -> None:
        if not self.enabled:
            return
        values = {k: float(np.asarray(v)) for k, v in metrics.items()}
        record = {"stage": self.stage, "split": split, "step": step, "time": time.time(), **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"{split}/{k}", v, step)

    def event(self, step: int, name: str, **details) -> None:
        """A one-off happening (a replaced batch, a rewind): a JSONL line and a message."""
        if not self.enabled:
            return
        record = {"stage": self.stage, "split": "event", "step": step, "time": time.time(),
                  "event": name, **details}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        self.message(f"step {step}: {name} " + " ".join(f"{k}={v}" for k, v in details.items()))

    def progress(self, step: int, postfix: dict) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.refresh()

    def message(self, text: str) -> None:
        if self.enabled:
            (self._bar.write if self._bar is not None else print)(text)

    def close(self) -> None:
        if not self.enabled:
            return
        self._bar.close()
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
