"""Evaluation: perplexity / bits per byte, multiple choice, generation, preference accuracy.

Read scorer.py first: every evaluation talks to a `LanguageModel` (loglikelihood,
loglikelihood_rolling, generate), backed by the JAX model (jax_model, also inside training)
or the numpy engine (engine_model, for exports).

    from geb_jax.eval import EvalConfig, evaluate_during_training
    metrics = evaluate_during_training(params, model_config, tokenizer,
                                       EvalConfig(tasks="perplexity,sft_exact_match"))

CLI: python -m geb_jax.eval --workdir runs/x --stage sft --tasks perplexity,mc:file.jsonl

The exports are resolved on first use (PEP 562): `import geb_jax.eval.lm_eval_adapter`, or
scoring an export with the numpy engine, must not import jax, flax and orbax (about 3.5 s)
through this package's __init__.
"""
import importlib

# Eager, and cheap (stdlib only): the function shares its submodule's name, and a lazy export
# would lose to the submodule attribute that `import geb_jax.eval.perplexity` sets.
from geb_jax.eval.perplexity import perplexity

_EXPORTS = {
    "EngineLanguageModel": "engine_model",
    "evaluate_sft_generation": "generation", "maj_at_k": "generation",
    "majority_vote": "generation", "pass_at_k": "generation",
    "JaxLanguageModel": "jax_model",
    "EvalError": "loading", "load_stage": "loading",
    "choice_predictions": "multiple_choice", "evaluate_multiple_choice": "multiple_choice",
    "preference_accuracy": "preference",
    "LanguageModel": "scorer", "encode_pair": "scorer", "loglikelihood_rolling": "scorer",
    "rolling_windows": "scorer",
    "EvalConfig": "suite", "evaluate_during_training": "suite", "flatten": "suite",
    "run_suite": "suite",
    "LAYOUTS": "tasks", "MultipleChoiceItem": "tasks", "TaskFileError": "tasks",
    "few_shot_prompt": "tasks", "load_task_file": "tasks",
}

__all__ = sorted([*_EXPORTS, "perplexity"])


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
