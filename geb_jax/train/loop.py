"""The training loop for one stage (pretrain, SFT or DPO), read top to bottom.

    train = build_stage -> restore_or_init -> [run_eval at step 0] -> train_steps -> summary
    train_steps: one update -> the spike policy's response -> log / eval / save_at

Running the same command again resumes from the newest good checkpoint in the stage's
directory, with the data iterator exactly where it was.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from geb_jax.checkpoint import Checkpointer, install_signal_save, published
from geb_jax.eval import EvalConfig, evaluate_during_training
from geb_jax.eval.suite import task_names
from geb_jax.model import ModelConfig
from geb_jax.model.attention import resolve_attention_impl
from geb_jax.parallel.mesh import check_batch_divides, make_mesh
from geb_jax.run_config import RunConfig, run_config
from geb_jax.train import inputs
from geb_jax.train.losses import check_batch_has_targets
from geb_jax.train.metrics_log import MetricsLog, peak_flops_per_device
from geb_jax.train.optimizer import learning_rate_at
from geb_jax.train.program import (StepProgram, build_step_program, check_mesh_fits,
                                   step_context)
from geb_jax.train.spikes import (NumberedBatches, SpikeConfig, SpikeResponse,
                                  parse_batch_numbers, rewind_window)
from geb_jax.train.state import (init_sharded_state, merged_params_jit, num_params,
                                 restore_stage_state, saved_lora_config)
from geb_jax.train.step import global_batch

# LLaMA paper's energy estimate: Wh = GPU-hours x power x PUE; tCO2eq = MWh x 0.385.
PUE, TCO2_PER_MWH = 1.1, 0.385
DEVICE_WATTS = {"H100": 700.0, "H200": 700.0, "A100": 400.0, "cpu": 100.0}


def stage_dir(config: ml_collections.ConfigDict | RunConfig, stage: str) -> str:
    return os.path.join(config.workdir, stage)


def energy_estimate(hours: float) -> dict:
    kind = jax.devices()[0].device_kind
    watts = next((w for k, w in DEVICE_WATTS.items() if k.lower() in kind.lower()), 100.0)
    device_hours = hours * jax.device_count()
    mwh = device_hours * watts * PUE / 1e6
    return {"device_hours": device_hours, "energy_kwh": mwh * 1e3, "tco2eq": mwh * TCO2_PER_MWH}


def train(config: ml_collections.ConfigDict | RunConfig, stage: str | None = None,
          init_params_from: str | None = None) -> dict:
    """Trains one stage to config.train.steps; returns a summary dict. A ConfigDict is typed
    as it is (run_stages passes each stage's RunConfig, its overrides merged)."""
    config = typed_stage(config, stage)
    run = build_stage(config, config.train.stage, init_params_from)
    state, batches, start, resumed = restore_or_init(run)
    log = MetricsLog(run.workdir, run.stage, run.total_steps, start)
    log_start(run, log, state, start, resumed)
    with install_signal_save() as stop, step_context(run.mesh):
        if config.eval.every and config.eval.at_start and start == 0:
            run_eval(run, log, state, 0)  # the model the stage starts from: every "before"
        state, batches, step, history = train_steps(run, log, stop, state, batches, start)
    run.checkpointer.wait()
    run.checkpointer.close()
    summary = stage_summary(run, state, batches, step, history)
    log.write(step, {k: v for k, v in summary.items() if isinstance(v, (int, float))},
              split="summary")
    log.message(f"[{run.stage}] done: " + ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    log.close()
    return summary


@dataclasses.dataclass
class Stage:
    """Everything one stage's run is built from (build_stage), read by the named steps."""
    config: RunConfig
    stage: str
    workdir: str
    init_params_from: str | None
    mesh: Any
    model_config: ModelConfig
    tokenizer: Any
    dataset: Any
    eval_batches: Any
    eval_suite: EvalConfig
    program: StepProgram
    reference_params: Any
    checkpointer: Checkpointer
    spike: SpikeConfig
    skip: frozenset
    inject: frozenset
    total_steps: int
    started: float = dataclasses.field(default_factory=time.time)
    compile_s: float | None = None
    events: dict = dataclasses.field(default_factory=dict)

    @property
    def tokens_per_step(self) -> int:
        return self.config.train.batch_size * self.config.train.seq_len

    def numbered(self, data_iter, drawn: int) -> NumberedBatches:
        return NumberedBatches(data_iter, drawn, self.skip, self.inject, self.spike.inject_kind,
                               self.model_config.vocab_size)

    def restore(self, step: int | None = None):
        """(state, batches, step) of a checkpoint: the newest good one unless `step`."""
        state, data_state, _, restored = self.checkpointer.restore(self.program.abstract, step)
        data_iter = inputs.restore_iterator(self.dataset, data_state["iterator"])
        return state, self.numbered(data_iter, data_state["batches_drawn"]), restored


def typed_stage(config: ml_collections.ConfigDict | RunConfig, stage: str | None) -> RunConfig:
    """config's typed sections, with train.stage set to `stage` when given."""
    config = run_config(config)
    if stage and stage != config.train.stage:
        config = config.replace(train=config.train.replace(stage=stage))
    return config


def build_stage(config: RunConfig, stage: str,
                init_params_from: str | None) -> Stage:
    """Mesh (its divisibility checked first), input, the compiled step, DPO's reference and the
    checkpointer: everything before the first update."""
    mesh = make_mesh(config.mesh.to_dict())
    check_batch_divides(config.train.batch_size, mesh)
    model_config = config.model
    check_mesh_fits(model_config, mesh)
    tokenizer = inputs.stage_tokenizer(config, model_config)
    dataset = inputs.train_dataset(config, stage, tokenizer)
    eval_suite = config.eval.suite
    if jax.process_count() > 1:
        eval_suite = dataclasses.replace(eval_suite, tasks="")  # single-process for now
    program = build_step_program(config, stage, mesh, next(iter(dataset)))
    reference_params = None
    if stage == "dpo":  # the model the stage starts from (merged, if that stage used LoRA)
        reference_params = (start_params(init_params_from, program) if init_params_from else
                            inputs.load_reference_params(init_params_from, program.abstract))
    spike = config.train.spike
    workdir = stage_dir(config, stage)
    return Stage(
        config=config, stage=stage, workdir=workdir, init_params_from=init_params_from,
        mesh=mesh, model_config=model_config, tokenizer=tokenizer, dataset=dataset,
        eval_batches=inputs.eval_batches(config, stage, tokenizer), eval_suite=eval_suite,
        program=program, reference_params=reference_params,
        checkpointer=Checkpointer(os.path.join(workdir, "checkpoints"),
                                  save_every=config.checkpoint.every, keep=config.checkpoint.keep),
        spike=spike, skip=config.train.skip,
        inject=parse_batch_numbers(spike.inject_batches, "train.spike.inject_batches"),
        total_steps=config.train.steps)


def restore_or_init(run: Stage):
    """(state, batches, start step, how it started): resume from the newest good checkpoint,
    else a fresh state -- from scratch, a published model or the previous stage."""
    if run.checkpointer.latest_good_step() is not None:
        state, batches, start = run.restore()
        return state, batches, start, f"resumed from step {start}"
    p = run.program
    state = init_sharded_state(p.model_config, p.optimizer, run.config.seed, p.state_sh,
                               lora=p.lora)
    if run.init_params_from:  # under LoRA: the frozen base the adapters start on
        state = state.replace(params=start_params(run.init_params_from, p))
    return state, run.numbered(iter(run.dataset), 0), 0, "from " + (
        run.init_params_from or "scratch")


def log_start(run: Stage, log: MetricsLog, state, start: int, resumed: str) -> None:
    """The run's first log line (size, what trains, mesh, tokens per step, how it started, the
    attention kernel chosen and why) and
    the bad input records the data pipeline left out, by reason (an "input_skipped" event)."""
    lora = run.program.lora
    trained = (f" (frozen; LoRA rank {lora.rank} on {','.join(lora.targets)} trains "
               f"{num_params(state.lora):,})" if lora.enabled else "")
    c = run.model_config
    impl, why = resolve_attention_impl(c.attention_impl, jax.default_backend(), c.dtype,
                                          c.head_dim, run.config.train.seq_len)
    log.message(f"[{run.stage}] {num_params(state.params):,} parameters{trained}, mesh "
                f"{dict(run.mesh.shape)}, {run.tokens_per_step:,} tokens/step, {resumed}; "
                f"attention: {impl} ({why})")
    for note in run.config.notes:  # what stage_overrides changed, a total_steps mismatch
        log.message(f"[{run.stage}] {note}")
    skipped = inputs.input_report(run.dataset)["skipped"]
    if skipped and start == 0:
        log.event(start, "input_skipped", **skipped)


def run_eval(run: Stage, log: MetricsLog, state, at_step: int) -> None:
    """Held-out loss (and DPO metrics) on the eval batches; the task suite at its steps."""
    params = run.program.model_params(state) if run.program.lora.enabled else state.params
    log.write(at_step, evaluate(run.program.eval_step, params, run.eval_batches,
                                run.program.batch_sh, run.reference_params), split="eval")
    if at_step == 0 and not run.config.eval.suite_at_start:
        return
    suite_every = run.config.eval.suite_every
    if run.eval_suite.tasks and (not suite_every or at_step % suite_every == 0
                                 or at_step == run.total_steps):
        log.write(at_step, evaluate_during_training(
            params, run.model_config, run.tokenizer, run.eval_suite,
            reference_params=run.reference_params), split="eval_suite")


def train_steps(run: Stage, log: MetricsLog, stop, state, batches, start: int):
    """Updates until train.steps or a stop signal: one step, the spike policy's response, then
    log / eval / save at their intervals. Returns (state, batches, step, [(step, loss)])."""
    config, spikes = run.config, SpikeResponse(run.spike)
    window = ThroughputWindow(run, start)
    history, step = [], start
    config_dict = config.to_dict()  # the resolved config each checkpoint stores
    while step < run.total_steps:
        step += 1
        host_batch = next(batches)
        check_batch_has_targets(host_batch)
        state, metrics = run.program.train_step(
            state, global_batch(host_batch, run.program.batch_sh), run.reference_params)
        action = spikes.after_step(metrics, run.checkpointer.latest_good_step)
        if action == "replace":
            log.event(step, "replaced", batch=batches.drawn)
            step -= 1  # the same update again, on the next batch
            continue
        if action == "rewind":
            spike_batch = batches.drawn
            state, batches, step = run.restore(run.checkpointer.latest_good_step())
            skipped = rewind_window(batches.drawn, spike_batch, run.spike.rewind_skip_batches)
            batches.skip_later(skipped)
            log.event(step, "rewound", spike_batch=spike_batch,
                      skipped_batches=f"{skipped.start}-{skipped.stop - 1}")
            window.restart(step)
            continue
        window.after_step(step, metrics, log)
        if step % config.train.log_every == 0 or step == run.total_steps:
            metrics = window.close(step, jax.device_get(metrics))
            log.write(step, metrics)
            history.append((step, float(metrics["loss"])))
            log.progress(step, {"loss": f"{float(metrics['loss']):.3f}",
                                **window.postfix(metrics)})
            if not np.isfinite(metrics["loss"]):
                log.message(f"step {step}: loss is not finite")
        if config.eval.every and (step % config.eval.every == 0 or step == run.total_steps):
            with window.paused():  # tokens/s counts training only
                run_eval(run, log, state, step)
        save_at(run, stop, state, batches, step, config_dict)
        if stop.should_stop():
            log.message(f"signal received: saved step {step}, exiting")
            break
    run.events.update(spikes.events)
    return state, batches, step, history


def save_at(run: Stage, stop, state, batches, step: int, config_dict: dict) -> None:
    """A checkpoint at the save interval, the last step or a stop signal; the data iterator's
    state is serialised only then."""
    force = stop.should_stop() or step == run.total_steps
    if force or run.checkpointer.should_save(step):
        data_state = {"iterator": inputs.iterator_state(batches.iterator),
                      "batches_drawn": batches.drawn}
        run.checkpointer.maybe_save(step, state, data_state, config_dict, force=force)


class ThroughputWindow:
    """tokens/s and MFU over the steps between two logged ones, leaving out the first step
    (compilation: its time is reported as compile_s) and evaluations."""

    def __init__(self, run: Stage, start: int):
        self.run, self.t_last, self.last_logged = run, time.time(), start
        self.peak = peak_flops_per_device()
        self.flops_per_token = run.model_config.flops_per_token(run.config.train.seq_len)

    def after_step(self, step: int, metrics, log: MetricsLog) -> None:
        if self.run.compile_s is None:  # the first step compiled: keep it out of the windows
            jax.block_until_ready(metrics)
            self.run.compile_s = time.time() - self.t_last
            log.message(f"step {step}: compiled and ran in {self.run.compile_s:.1f} s (not "
                        "counted in tokens/s)")
            self.restart(step)

    def restart(self, step: int) -> None:
        self.t_last, self.last_logged = time.time(), step

    @contextlib.contextmanager
    def paused(self):
        started = time.time()
        yield
        self.t_last += time.time() - started

    def close(self, step: int, metrics: dict) -> dict:
        """The window's tokens/s and MFU (none for an empty window) and the learning rate."""
        now = time.time()
        metrics["learning_rate"] = learning_rate_at(self.run.program.opt_config, step)
        if step > self.last_logged:
            metrics["tokens_per_s"] = ((step - self.last_logged) * self.run.tokens_per_step
                                       / max(now - self.t_last, 1e-9))
            if self.peak:
                metrics["mfu"] = (metrics["tokens_per_s"] * self.flops_per_token
                                  / (self.peak * jax.device_count()))
        self.t_last, self.last_logged = now, step
        return metrics

    @staticmethod
    def postfix(metrics: dict) -> dict:
        out = {}
        if "tokens_per_s" in metrics:
            out["tok/s"] = f"{metrics['tokens_per_s']:,.0f}"
        if "mfu" in metrics:
            out["mfu"] = f"{metrics['mfu']:.1%}"
        return out


def stage_summary(run: Stage, state, batches, step: int, history) -> dict:
    """What the stage did: steps, tokens, first/last loss, spikes, compile time, DPO's held-out
    preference accuracy before and after, and the LLaMA paper's energy estimate."""
    p = run.program
    with_preference = (run.stage == "dpo" and run.config.eval.every
                       and "dpo_preference" in task_names(run.eval_suite.tasks))
    return {"stage": run.stage, "steps": step, "tokens_seen": batches.drawn * run.tokens_per_step,
            "first_loss": history[0][1] if history else None,
            "final_loss": history[-1][1] if history else None,
            "skipped_updates": int(jax.device_get(state.skipped)),
            "replaced": run.events.get("replaced", 0), "rewound": run.events.get("rewound", 0),
            **({"compile_s": run.compile_s} if run.compile_s is not None else {}),
            **(dpo_preference_summary(
                p.model_params(state) if p.lora.enabled else state.params,
                run.reference_params, run.model_config, run.tokenizer, run.eval_suite,
                run.mesh) if with_preference else {}),
            **energy_estimate((time.time() - run.started) / 3600)}


def dpo_preference_summary(params, reference_params, model_config: ModelConfig, tokenizer,
                           suite: EvalConfig, mesh) -> dict:
    """Held-out preference accuracy (the suite's dpo_preference pairs) before and after DPO:
    [logp(chosen) > logp(rejected)] under the reference (the model the stage started from) and
    under the trained policy; and the policy's implicit-reward accuracy against the reference
    (TRL's rewards/accuracies, what the suite logs for the dpo stage)."""
    suite = dataclasses.replace(suite, tasks="dpo_preference")

    def accuracy(model_params, reference=None) -> float:
        return evaluate_during_training(model_params, model_config, tokenizer, suite,
                                        reference_params=reference)["dpo_preference/accuracy"]

    with jax.set_mesh(mesh):
        return {"pref_accuracy_before": accuracy(reference_params),
                "pref_accuracy_after": accuracy(params),
                "reward_accuracy": accuracy(params, reference_params)}


def start_params(path: str, program: StepProgram):
    """The parameters a stage starts from (and DPO's reference): a published model, or the
    final parameters of an earlier stage -- merged with its adapters if it trained LoRA.

    Without LoRA on either side this is inputs.load_params, as before LoRA existed; otherwise
    the earlier stage's state is restored with *its* saved config.lora (it may differ from this
    stage's, e.g. full pretraining then LoRA SFT) and its adapters are merged into its base.
    """
    abstract = program.abstract
    if published.is_published(path):
        return inputs.load_params(path, abstract)
    previous = saved_lora_config(path)
    if not previous.enabled and not program.lora.enabled:
        return inputs.load_params(path, abstract)
    state = restore_stage_state(path, program.model_config, program.optimizer, program.mesh,
                                previous)
    params_sh = jax.tree.map(lambda x: x.sharding, abstract.params)
    return merged_params_jit(previous, params_sh)(state)


def evaluate(eval_step, params, eval_batches, batch_sh, reference_params) -> dict:
    """Token-weighted mean of eval metrics over the held-out batches."""
    totals, weight = {}, 0.0
    for host_batch in eval_batches:
        metrics = jax.device_get(eval_step(params, global_batch(host_batch, batch_sh),
                                           reference_params))
        w = float(metrics.get("tokens", metrics.get("pairs", 1.0)))
        weight += w
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + w * float(v)
    metrics = {k: v / max(weight, 1e-9) for k, v in totals.items()}
    if "loss" in metrics and "tokens" in metrics:
        metrics["perplexity"] = float(np.exp(metrics["loss"]))
        metrics["tokens"] = weight
    return metrics

