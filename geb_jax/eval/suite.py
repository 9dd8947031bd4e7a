"""A named set of evaluations on one model, from the CLI or every N steps of training.

Tasks (comma-separated in EvalConfig.tasks):
  perplexity       perplexity and bits per byte on held-out text (the built-in corpus' valid
                   split unless texts are given)
  sft_exact_match  greedy exact match (and pass@k / maj1@k with samples > 0) on the built-in
                   SFT tasks' valid split
  dpo_preference   preference accuracy on the built-in DPO pairs' valid split (implicit reward
                   with a reference model, plain log-prob margin without)
  refusal          greedy refusal rates on those pairs' held-out unethical and benign prompts
  mc:PATH          a local multiple-choice JSONL file (tasks.py), `shots`-shot

`evaluate_during_training(params, model_config, tokenizer, eval_config)` returns a flat
{"perplexity/bits_per_byte": v, ...} dict of floats for the metrics log.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from geb_jax.eval.generation import evaluate_sft_generation
from geb_jax.eval.multiple_choice import evaluate_multiple_choice
from geb_jax.eval.perplexity import perplexity
from geb_jax.eval.preference import preference_accuracy
from geb_jax.eval.refusal import refusal_rates
from geb_jax.eval.scorer import LanguageModel
from geb_jax.eval.tasks import LAYOUTS, STYLES, load_task_file
from geb_jax.config_sections import Section
from geb_jax.errors import ConfigError

BUILTIN_TASKS = ("perplexity", "sft_exact_match", "dpo_preference", "refusal")


@dataclasses.dataclass(frozen=True)
class EvalConfig(Section):
    SECTION = "eval.suite"

    tasks: str = "perplexity"  # comma-separated, see the module docstring; "" = none
    max_documents: int = 16  # held-out documents for perplexity, evenly spaced; 0 = all
    stride: int = 0  # sliding-window stride in tokens; 0 = max_length (disjoint windows)
    max_length: int = 0  # positions the model reads at once; 0 = the model's max_seq_len
    max_examples: int = 0  # SFT conversations / DPO pairs / MC questions, evenly spaced; 0 = all
    # (refusal always asks all held-out unethical and benign prompts)
    max_new_tokens: int = 64
    samples: int = 0  # sampled replies per SFT problem for pass@k and maj1@k; 0 = greedy only
    temperature: float = 0.8  # for the samples
    shots: int = 0  # few-shot examples for mc: tasks
    mc_layout: str = "mmlu"  # mmlu | ceval | cmmlu
    mc_style: str = "letter"  # letter (score " A") | text (score " <choice>")
    dpo_beta: float = 0.1
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self):
        for name in ("max_documents", "stride", "max_length", "max_examples", "samples", "shots",
                     "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"eval.{name} must be an integer >= 0, got "
                                  f"{getattr(self, name)!r}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("eval.max_new_tokens and eval.batch_size must be positive")
        if self.mc_layout not in LAYOUTS or self.mc_style not in STYLES:
            raise ConfigError(f"eval.mc_layout must be one of {sorted(LAYOUTS)} and "
                              f"eval.mc_style one of {STYLES}")
        if not self.temperature >= 0:
            raise ConfigError(f"eval.temperature must be >= 0, got {self.temperature}")
        task_names(self.tasks)  # validates

    def window(self, max_seq_len: int) -> int:
        """Positions the evaluated model reads at once: max_length, at most max_seq_len."""
        return min(self.max_length or max_seq_len, max_seq_len)


def task_names(tasks: str) -> list[str]:
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    for name in names:
        if name not in BUILTIN_TASKS and not (name.startswith("mc:") and len(name) > 3):
            raise ConfigError(f"unknown eval task {name!r}; use {', '.join(BUILTIN_TASKS)} or "
                              f"mc:PATH.jsonl")
    return names


def evenly_spaced(items: Sequence, limit: int) -> list:
    """At most `limit` items spread over the sequence (all of them when limit is 0)."""
    items = list(items)
    if not limit or limit >= len(items):
        return items
    return [items[int(k * len(items) / limit)] for k in range(limit)]


def held_out_texts(max_documents: int) -> list[str]:
    from geb_jax.data.corpus import builtin_texts
    return evenly_spaced(builtin_texts("valid"), max_documents)


def run_suite(model: LanguageModel, config: EvalConfig, *,
              reference: LanguageModel | None = None,
              texts: Sequence[str] | None = None) -> dict[str, dict]:
    """{task: {metric: value}} for every task in config.tasks."""
    from geb_jax.data.demo_tasks import builtin_dpo_pairs, builtin_sft_conversations
    results = {}
    for name in task_names(config.tasks):
        if name == "perplexity":
            docs = held_out_texts(config.max_documents) if texts is None else texts
            results[name] = perplexity(model, docs, stride=config.stride or None)
        elif name == "sft_exact_match":
            conversations = evenly_spaced(builtin_sft_conversations("valid"), config.max_examples)
            results[name] = evaluate_sft_generation(
                model, conversations, max_tokens=config.max_new_tokens, samples=config.samples,
                temperature=config.temperature, seed=config.seed)
        elif name == "dpo_preference":
            pairs = evenly_spaced(builtin_dpo_pairs("valid"), config.max_examples)
            results[name] = preference_accuracy(model, pairs, reference=reference,
                                                beta=config.dpo_beta)
        elif name == "refusal":
            results[name] = refusal_rates(model, builtin_dpo_pairs("valid"),
                                          max_tokens=min(config.max_new_tokens, 32))
        else:
            items = load_task_file(name[3:])
            # Shots come from the whole file; the questions asked may be a subset.
            results[name] = evaluate_multiple_choice(
                model, evenly_spaced(items, config.max_examples), shots=config.shots,
                fewshot_pool=items, layout=config.mc_layout, style=config.mc_style)
    return results


def flatten(results: Mapping[str, Mapping]) -> dict[str, float]:
    """{"task/metric": float} (nested dicts joined with "/"; booleans and counts included)."""
    flat = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if isinstance(value, Mapping):
                for sub, v in value.items():
                    flat[f"{task}/{key}/{sub or 'all'}"] = float(v)
            else:
                flat[f"{task}/{key}"] = float(value)
    return flat


def evaluate_during_training(params, model_config, tokenizer, config: EvalConfig | Mapping,
                             reference_params=None, texts: Sequence[str] | None = None
                             ) -> dict[str, float]:
    """Run the suite on live (possibly sharded) parameters; flat floats for the metrics log.

    Cheap to call repeatedly: the jitted forward passes are cached per ModelConfig.
    Generation tasks decode with the numpy engine's KV cache on a host copy of the weights.
    """
    from geb_jax.eval.jax_model import JaxLanguageModel, JaxScoringEngineDecoding
    if not isinstance(config, EvalConfig):
        config = EvalConfig.from_dict(config)
    window = config.window(model_config.max_seq_len)
    model = JaxScoringEngineDecoding(params, model_config, tokenizer, config.batch_size,
                                     max_length=window)
    reference = (None if reference_params is None else
                 JaxLanguageModel(reference_params, model_config, tokenizer, config.batch_size,
                                  max_length=window))
    return flatten(run_suite(model, config, reference=reference, texts=texts))
