"""The training loop for one stage (pretrain, SFT or DPO), read top to bottom.

    config -> mesh -> input -> update step -> checkpoint (restore or init) -> loop -> summary

Running the same command again resumes from the newest good checkpoint in the stage's
directory, with the data iterator exactly where it was.
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import ml_collections
import numpy as np

from geb_jax.checkpoint import Checkpointer, install_signal_save, published
from geb_jax.eval import EvalConfig, evaluate_during_training
from geb_jax.eval.suite import task_names
from geb_jax.model import ModelConfig
from geb_jax.model.lora import LoraConfig
from geb_jax.parallel.mesh import check_batch_divides, make_mesh
from geb_jax.train import inputs
from geb_jax.train.losses import check_batch_has_targets
from geb_jax.train.metrics_log import MetricsLog, peak_flops_per_device
from geb_jax.train.optimizer import learning_rate_at
from geb_jax.train.program import build_step_program, check_mesh_fits, step_context
from geb_jax.train.spikes import NumberedBatches, parse_batch_numbers, rewind_window
from geb_jax.train.state import (init_sharded_state, merged_params_jit, num_params,
                                 restore_stage_state, saved_lora_config)
from geb_jax.train.step import SpikeConfig, global_batch

# LLaMA paper's energy estimate: Wh = GPU-hours x power x PUE; tCO2eq = MWh x 0.385.
PUE, TCO2_PER_MWH = 1.1, 0.385
DEVICE_WATTS = {"H100": 700.0, "H200": 700.0, "A100": 400.0, "cpu": 100.0}


def stage_dir(config: ml_collections.ConfigDict, stage: str) -> str:
    return os.path.join(config.workdir, stage)


def energy_estimate(hours: float) -> dict:
    kind = jax.devices()[0].device_kind
    watts = next((w for k, w in DEVICE_WATTS.items() if k.lower() in kind.lower()), 100.0)
    device_hours = hours * jax.device_count()
    mwh = device_hours * watts * PUE / 1e6
    return {"device_hours": device_hours, "energy_kwh": mwh * 1e3, "tco2eq": mwh * TCO2_PER_MWH}


def train(config: ml_collections.ConfigDict, stage: str | None = None,
          init_params_from: str | None = None) -> dict:
    """Trains one stage to config.train.steps; returns a summary dict."""
    stage = stage or config.train.stage
    workdir = stage_dir(config, stage)

    # ---- Mesh and input --------------------------------------------------------------------
    mesh = make_mesh(config.mesh)
    check_batch_divides(config.train.batch_size, mesh)
    model_config = ModelConfig.from_dict(config.model)
    check_mesh_fits(model_config, mesh)
    tokenizer = inputs.stage_tokenizer(config, model_config)
    dataset = inputs.train_dataset(config, stage, tokenizer)
    eval_batches = inputs.eval_batches(config, stage, tokenizer)
    eval_suite = EvalConfig.from_dict(config.eval.suite)
    if jax.process_count() > 1:
        eval_suite = dataclasses.replace(eval_suite, tasks="")  # single-process for now

    # ---- Update step (train/program.py: the program bench_train.py times) --------------------
    program = build_step_program(config, stage, mesh, next(iter(dataset)))
    opt_config, lora, optimizer = program.opt_config, program.lora, program.optimizer
    state_sh, abstract, batch_sh = program.state_sh, program.abstract, program.batch_sh
    train_step, eval_step, model_params = (program.train_step, program.eval_step,
                                           program.model_params)
    spike = SpikeConfig.from_dict(config.train.spike)
    total_steps = config.train.steps
    load_start = lambda path: start_params(path, abstract, model_config, optimizer, mesh, lora)
    reference_params = None
    if stage == "dpo":  # the model the stage starts from (merged, if that stage used LoRA)
        reference_params = (load_start(init_params_from) if init_params_from else
                            inputs.load_reference_params(init_params_from, abstract))

    # ---- Checkpoint: resume, or start from scratch / from the previous stage ----------------
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                                save_every=config.checkpoint.every, keep=config.checkpoint.keep)
    skip = parse_batch_numbers(config.train.skip_batches, "train.skip_batches")
    inject = parse_batch_numbers(spike.inject_batches, "train.spike.inject_batches")

    def numbered(data_iter, drawn: int) -> NumberedBatches:
        return NumberedBatches(data_iter, drawn, skip, inject, spike.inject_kind,
                               model_config.vocab_size)

    def restore(step: int | None = None):
        state, data_state, _, restored_step = checkpointer.restore(abstract, step)
        data_iter = inputs.restore_iterator(dataset, data_state["iterator"])
        return state, numbered(data_iter, data_state["batches_drawn"]), restored_step

    if checkpointer.latest_good_step() is not None:
        state, batches, start = restore()
        resumed = f"resumed from step {start}"
    else:
        state = init_sharded_state(model_config, optimizer, config.seed, state_sh, lora=lora)
        if init_params_from:  # under LoRA: the frozen base the adapters start on
            state = state.replace(params=load_start(init_params_from))
        batches = numbered(iter(dataset), 0)
        start, resumed = 0, "from " + (init_params_from or "scratch")

    # ---- Loop ------------------------------------------------------------------------------
    log = MetricsLog(workdir, stage, total_steps, start)
    tokens_per_step = config.train.batch_size * config.train.seq_len
    flops_per_step = model_config.flops_per_token(config.train.seq_len) * tokens_per_step
    peak = peak_flops_per_device()
    trained = (f" (frozen; LoRA rank {lora.rank} on {','.join(lora.targets)} trains "
               f"{num_params(state.lora):,})" if lora.enabled else "")
    log.message(f"[{stage}] {num_params(state.params):,} parameters{trained}, mesh "
                f"{dict(mesh.shape)}, {tokens_per_step:,} tokens/step, {resumed}")
    skipped = inputs.input_report(dataset)["skipped"]  # bad records left out, by reason
    if skipped and start == 0:
        log.event(start, "input_skipped", **skipped)
    watch_spikes = spike.policy in ("replace", "rewind")  # costs one host sync per step
    events = {"replaced": 0, "rewound": 0}
    history, t_start, t_last = [], time.time(), time.time()
    step, last_logged, retries, compile_s = start, start, 0, None
    config_dict = config.to_dict()  # what each checkpoint stores beside the state

    suite_every = config.eval.get("suite_every", 0)

    def run_eval(at_step: int) -> None:
        params = state.params if not lora.enabled else model_params(state)
        log.write(at_step, evaluate(eval_step, params, eval_batches, batch_sh,
                                    reference_params), split="eval")
        if at_step == 0 and not config.eval.get("suite_at_start", True):
            return
        if eval_suite.tasks and (not suite_every or at_step % suite_every == 0
                                 or at_step == total_steps):
            log.write(at_step, evaluate_during_training(
                params, model_config, tokenizer, eval_suite,
                reference_params=reference_params), split="eval_suite")

    with install_signal_save() as stop, step_context(mesh):
        if config.eval.every and config.eval.get("at_start") and start == 0:
            run_eval(0)  # the model the stage starts from: the "before" of every metric
            t_last = time.time()  # tokens/s counts training only
        while step < total_steps:
            step += 1
            host_batch = next(batches)
            check_batch_has_targets(host_batch)
            state, metrics = train_step(state, global_batch(host_batch, batch_sh),
                                        reference_params)
            if watch_spikes and float(metrics["spike"]):
                if spike.policy == "replace" and retries < spike.max_replacements:
                    retries += 1
                    events["replaced"] += 1
                    log.event(step, "replaced", batch=batches.drawn)
                    step -= 1  # the same update again, on the next batch
                    continue
                good = checkpointer.latest_good_step()
                if (spike.policy == "rewind" and good is not None
                        and events["rewound"] < spike.max_rewinds):
                    spike_batch = batches.drawn
                    state, batches, step = restore(good)
                    window = rewind_window(batches.drawn, spike_batch, spike.rewind_skip_batches)
                    batches.skip_later(window)
                    events["rewound"] += 1
                    log.event(step, "rewound", spike_batch=spike_batch,
                              skipped_batches=f"{window.start}-{window.stop - 1}")
                    last_logged = step
                    continue
            retries = 0
            if compile_s is None:  # the first step compiled: keep it out of tokens/s and MFU
                jax.block_until_ready(metrics)
                compile_s = time.time() - t_last
                log.message(f"step {step}: compiled and ran in {compile_s:.1f} s (not counted "
                            "in tokens/s)")
                t_last, last_logged = time.time(), step
            if step % config.train.log_every == 0 or step == total_steps:
                metrics = jax.device_get(metrics)
                now = time.time()
                metrics["learning_rate"] = learning_rate_at(opt_config, step)
                if step > last_logged:  # a window of steps after compilation
                    metrics["tokens_per_s"] = ((step - last_logged) * tokens_per_step
                                               / max(now - t_last, 1e-9))
                    if peak:
                        metrics["mfu"] = metrics["tokens_per_s"] * flops_per_step / (
                            tokens_per_step * peak * jax.device_count())
                t_last, last_logged = now, step
                log.write(step, metrics)
                history.append((step, float(metrics["loss"])))
                log.progress(step, {"loss": f"{float(metrics['loss']):.3f}",
                                    **({"tok/s": f"{metrics['tokens_per_s']:,.0f}"}
                                       if "tokens_per_s" in metrics else {}),
                                    **({"mfu": f"{metrics['mfu']:.1%}"} if "mfu" in metrics
                                       else {})})
                if not np.isfinite(metrics["loss"]):
                    log.message(f"step {step}: loss is not finite")
            if config.eval.every and (step % config.eval.every == 0 or step == total_steps):
                t_eval = time.time()
                run_eval(step)
                t_last += time.time() - t_eval  # tokens/s counts training only
            force_save = stop.should_stop() or step == total_steps
            if force_save or checkpointer.should_save(step):  # the iterator state only then
                data_state = {"iterator": inputs.iterator_state(batches.iterator),
                              "batches_drawn": batches.drawn}
                checkpointer.maybe_save(step, state, data_state, config_dict, force=force_save)
            if stop.should_stop():
                log.message(f"signal received: saved step {step}, exiting")
                break
    checkpointer.wait()
    checkpointer.close()
    hours = (time.time() - t_start) / 3600
    summary = {"stage": stage, "steps": step, "tokens_seen": batches.drawn * tokens_per_step,
               "first_loss": history[0][1] if history else None,
               "final_loss": history[-1][1] if history else None,
               "skipped_updates": int(jax.device_get(state.skipped)), **events,
               **({"compile_s": compile_s} if compile_s is not None else {}),
               **(dpo_preference_summary(
                   state.params if not lora.enabled else model_params(state), reference_params,
                   model_config, tokenizer, eval_suite, mesh)
                  if stage == "dpo" and config.eval.every
                  and "dpo_preference" in task_names(eval_suite.tasks) else {}),
               **energy_estimate(hours)}
    log.write(step, {k: v for k, v in summary.items()
                     if isinstance(v, (int, float))}, split="summary")
    log.message(f"[{stage}] done: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float)
                                                else f"{k}={v}" for k, v in summary.items()))
    log.close()
    return summary


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


def start_params(path: str, abstract, model_config: ModelConfig, optimizer, mesh,
                 lora: LoraConfig):
    """The parameters a stage starts from (and DPO's reference): a published model, or the
    final parameters of an earlier stage -- merged with its adapters if it trained LoRA.

    Without LoRA on either side this is inputs.load_params, as before LoRA existed; otherwise
    the earlier stage's state is restored with *its* saved config.lora (it may differ from this
    stage's, e.g. full pretraining then LoRA SFT) and its adapters are merged into its base.
    """
    if published.is_published(path):
        return inputs.load_params(path, abstract)
    previous = saved_lora_config(path)
    if not previous.enabled and not lora.enabled:
        return inputs.load_params(path, abstract)
    state = restore_stage_state(path, model_config, optimizer, mesh, previous)
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

