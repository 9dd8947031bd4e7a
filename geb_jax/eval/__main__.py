"""python -m geb_jax.eval: evaluate a trained stage or an exported model, print a table,
write eval.json.

    python -m geb_jax.eval --workdir runs/tiny --stage sft \\
        --tasks perplexity,sft_exact_match,dpo_preference,mc:tests/data/mc_tiny.jsonl --shots 2
    python -m geb_jax.eval --model runs/tiny/export --tasks perplexity --output eval.json

--workdir/--stage restores the stage's newest good checkpoint (JAX); --model loads an export
with geb_jax.infer.load_model (numpy engine). For dpo_preference on the dpo stage the
reference model is the sft stage of the same workdir (--reference-stage to change, "" for
none); with --model, --reference-model names one. eval.json (default: workdir/<stage>/eval.json,
or ./eval.json with --model) is written atomically.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from geb_jax.atomic_io import write_json_atomic
from geb_jax.eval.suite import EvalConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m geb_jax.eval", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a training run's workdir (with <stage>/checkpoints)")
    src.add_argument("--model", help="an exported model for the numpy engine")
    p.add_argument("--stage", default="pretrain", help="pretrain | sft | dpo (with --workdir)")
    p.add_argument("--reference-stage", default=None,
                   help="dpo_preference reference stage (default: sft when --stage dpo)")
    p.add_argument("--reference-model", default=None, help="reference export (with --model)")
    p.add_argument("--tokenizer", default=None, help="override the run's tokenizer.model")
    p.add_argument("--texts", default=None,
                   help="held-out texts for perplexity: a .txt (one document) or .jsonl "
                        "({\"text\": ...} per line); default: the built-in corpus' valid split")
    p.add_argument("--output", default=None, help="where to write eval.json")
    defaults = EvalConfig()
    for field in dataclasses.fields(EvalConfig):
        value = getattr(defaults, field.name)
        p.add_argument("--" + field.name.replace("_", "-"), type=type(value), default=value,
                       dest=field.name)
    return p


def _read_texts(path: str) -> list[str]:
    from geb_jax.eval.loading import EvalError
    if not os.path.isfile(path):
        raise EvalError(f"--texts file not found: {path}")
    with open(path, encoding="utf-8") as f:
        if not path.endswith(".jsonl"):
            return [f.read()]
        texts = []
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise EvalError(f"{path}:{number}: expected a JSON object with a \"text\" field "
                                f"({type(e).__name__}: {e})") from None
        return texts


def _load_models(args, config: EvalConfig):
    """(model, reference or None, description dict)."""
    if args.model:
        from geb_jax.eval.engine_model import EngineLanguageModel
        from geb_jax.infer import Engine, load_model

        def load(path):
            weights, tokenizer = load_model(path, tokenizer_path=args.tokenizer)
            engine = Engine(weights, max_len=config.window(weights.config.max_seq_len))
            return EngineLanguageModel(engine, tokenizer, config.batch_size)
        reference = load(args.reference_model) if args.reference_model else None
        return load(args.model), reference, {"model": args.model}
    from geb_jax.eval.jax_model import JaxLanguageModel
    from geb_jax.eval.loading import load_stage
    params, model_config, tokenizer, step = load_stage(args.workdir, args.stage, args.tokenizer)
    window = config.window(model_config.max_seq_len)
    model = JaxLanguageModel(params, model_config, tokenizer, config.batch_size, window)
    ref_stage = args.reference_stage
    if ref_stage is None:
        ref_stage = "sft" if args.stage == "dpo" else ""
    reference = None
    if ref_stage and "dpo_preference" in config.tasks:
        ref_params, ref_config, _, _ = load_stage(args.workdir, ref_stage, args.tokenizer)
        if ref_config != model_config:
            from geb_jax.eval.loading import EvalError
            raise EvalError(f"reference stage {ref_stage!r} has a different model config")
        reference = JaxLanguageModel(ref_params, model_config, tokenizer, config.batch_size,
                                     window)
    return model, reference, {"workdir": args.workdir, "stage": args.stage, "step": step,
                              "reference_stage": ref_stage or None}


def format_table(results: dict) -> str:
    from geb_jax.eval.suite import flatten
    rows = [(task, name[len(task) + 1:], value) for task, metrics in results.items()
            for name, value in flatten({task: metrics}).items()]
    width_task = max([4] + [len(r[0]) for r in rows])
    width_metric = max([6] + [len(r[1]) for r in rows])
    lines = [f"{'task':<{width_task}}  {'metric':<{width_metric}}  value",
             f"{'-' * width_task}  {'-' * width_metric}  -----"]
    for task, metric, value in rows:
        shown = f"{value:.0f}" if value == int(value) and abs(value) >= 2 else f"{value:.4f}"
        lines.append(f"{task:<{width_task}}  {metric:<{width_metric}}  {shown}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from geb_jax.checkpoint import CheckpointError
    from geb_jax.data.tokenizer import TokenizerError
    from geb_jax.eval.loading import EvalError
    from geb_jax.eval.suite import run_suite
    from geb_jax.eval.tasks import TaskFileError
    from geb_jax.infer import ModelFileError
    from geb_jax.errors import ConfigError
    try:
        config = EvalConfig(**{f.name: getattr(args, f.name)
                               for f in dataclasses.fields(EvalConfig)})
        texts = _read_texts(args.texts) if args.texts else None
        model, reference, source = _load_models(args, config)
        start = time.time()
        results = run_suite(model, config, reference=reference, texts=texts)
    except (EvalError, TaskFileError, TokenizerError, CheckpointError, ConfigError,
            ModelFileError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(results))
    output = args.output or (os.path.join(args.workdir, args.stage, "eval.json") if args.workdir
                             else "eval.json")
    write_json_atomic(output, {**source, "config": dataclasses.asdict(config),
                               "seconds": time.time() - start, "results": results},
                      indent=2, ensure_ascii=False, sort_keys=True)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
