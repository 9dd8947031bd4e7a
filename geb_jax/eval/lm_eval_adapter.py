"""lm-evaluation-harness adapter: `--model geb_jax` scores and generates with the numpy Engine.

    python -m geb_jax.eval.lm_eval_adapter --model geb_jax \
        --model_args pretrained=runs/tiny/export --tasks hellaswag --batch_size 8
    python -m geb_jax.eval.lm_eval_adapter --model geb_jax \
        --model_args pretrained=runs/tiny,stage=sft --tasks <task or task.yaml> ...

The arguments are exactly lm_eval's (`run`, `ls`, `validate` subcommands included): this module
registers the model, then hands the command line to lm_eval's own CLI entry point.

Why not the plain `lm_eval` command: lm_eval 0.4.x resolves `--model` in a registry that holds
only its built-in models (lm_eval/models/__init__.py); it reads no entry points and imports no
user code before the model is built (`--include_path` is for task YAMLs only), so an outside
package cannot add a model to the stock CLI without editing lm_eval. Later lm_eval releases
discover models from the "lm_eval.models" entry-point group; with the entry point in setup.py
(`geb_jax = geb_jax.eval.lm_eval_adapter:GebJaxLM`) plain `lm_eval --model geb_jax` then works
too, and `register()` leaves such an entry alone. From Python: import this module, then
`lm_eval.simple_evaluate(model="geb_jax", model_args="pretrained=...", tasks=[...])`.

model_args (comma-separated key=value):
  pretrained   an exported model (folder from save_npz_model, or whatever `load_model` reads),
               or a training workdir (with stage=) or one stage folder of it (<workdir>/<stage>)
  stage        the stage of a workdir to read (pretrain, sft, dpo)
  step         checkpoint step (default: the newest one whose checksums verify)
  quantize     int8 / int4 weight-only quantization (geb_jax.infer.quantize)
  tokenizer    a tokenizer .model file replacing the model's own
  max_length   context length used (default and maximum: the model's max_seq_len)
  max_gen_toks default number of new tokens when a task does not set it (256)
  add_bos_token   start every encoded context with bos, as in training (default True)
  threads      BLAS threads; seed: base seed of sampled generations (request i uses seed + i)
lm_eval's --batch_size is the number of (context, continuation) pairs per forward pass
("auto" means 8); --device is ignored (the engine is numpy on the CPU).

Definitions follow lm_eval's HF backend: contexts start with bos and are left-truncated to fit
max_length; loglikelihood_rolling scores every token of a document (no bos of its own) after
bos, in lm_eval's rolling windows when it is longer than max_length; generate_until is greedy
unless do_sample=True and stops at the task's `until` strings, eos or <|end|>, or max_gen_toks.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from tqdm import tqdm

from geb_jax.checkpoint.reader import read_stage, stages_with_checkpoints
from geb_jax.data.tokenizer_files import SENTENCEPIECE_FILE, load_tokenizer
from geb_jax.data.chat import render_chat, reply_stop_ids, uses_template
from geb_jax.data.chat_template import render_template
from geb_jax.data.tokenizer import Tokenizer
from geb_jax.infer import Engine, SamplingParams, Weights, generate, load_model, quantize_weights

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("geb_jax.eval.lm_eval_adapter needs lm-evaluation-harness: "
                      "pip install 'lm_eval>=0.4.13,<0.5'") from e

MODEL_NAME = "geb_jax"
DEFAULT_BATCH_SIZE = 8  # for --batch_size auto: the engine has no memory probe to size it
SCORE_CHUNK = 256  # pairs per Engine.score call (the progress bar advances per chunk)


class ModelArgsError(ValueError):
    """A --model_args value that is missing, unknown or does not fit the model path."""


# ---- model folders and training workdirs ----------------------------------------------------

def stage_directory(pretrained: str, stage: str | None) -> str | None:
    """The stage folder (holding checkpoints/) that `pretrained` and `stage` name, or None when
    `pretrained` is not a training workdir (then it is an exported model for `load_model`)."""
    if not os.path.isdir(pretrained):
        if stage is not None:
            raise ModelArgsError(f"stage={stage} needs pretrained= to be a training workdir, "
                                 f"but {pretrained} is not a folder")
        return None
    if os.path.isdir(os.path.join(pretrained, "checkpoints")):
        if stage is not None:
            raise ModelArgsError(f"pretrained={pretrained} is already a stage folder (it holds "
                                 f"checkpoints/); drop stage={stage} or pass its workdir")
        return pretrained
    stages = stages_with_checkpoints(pretrained)
    if stage is None:
        if stages:
            raise ModelArgsError(f"pretrained={pretrained} is a training workdir: add "
                                 f"stage=<one of {stages}> to --model_args")
        return None
    if stage not in stages:
        raise ModelArgsError(f"{os.path.join(pretrained, stage, 'checkpoints')} does not exist; "
                             f"stages with checkpoints in {pretrained}: {stages}")
    return os.path.join(pretrained, stage)


def _read_checkpoint(stage_dir: str, step: int | None):
    """geb_jax.checkpoint.read_stage, with its CheckpointError as a ModelArgsError."""
    from geb_jax.checkpoint import CheckpointError  # pylint: disable=import-outside-toplevel

    try:
        return read_stage(stage_dir, step)
    except CheckpointError as e:
        raise ModelArgsError(str(e)) from e


def weights_from_checkpoint(stage_dir: str, step: int | None = None) -> tuple[Weights, int]:
    """(Weights, step) from a stage's orbax checkpoint, through geb_jax.checkpoint.read_stage:
    read-only (a run may still be training in this workdir: nothing is deleted), checksums
    verified. With step=None a damaged newest step is skipped with a WARNING; an explicit step
    is read or raises ModelArgsError."""
    checkpoint = _read_checkpoint(stage_dir, step)
    return Weights.from_params(checkpoint.params, checkpoint.config["model"]), checkpoint.step


def load_for_eval(pretrained: str, stage: str | None = None, step: int | None = None,
                  quantize: str | None = None, tokenizer: str | None = None
                  ) -> tuple[Weights, Tokenizer, dict]:
    """(Weights, Tokenizer, provenance dict) for an exported model or a workdir stage."""
    pretrained = os.fspath(pretrained)
    stage_dir = stage_directory(pretrained, stage)
    if stage_dir is None:
        if step is not None:
            raise ModelArgsError(f"step={step} applies to training checkpoints only; "
                                 f"{pretrained} is an exported model")
        weights, tok = load_model(pretrained, quantize=quantize, tokenizer_path=tokenizer)
        return weights, tok, {"model_source": pretrained}
    checkpoint = _read_checkpoint(stage_dir, step)
    weights = Weights.from_params(checkpoint.params, checkpoint.config["model"])
    tokenizer_path = tokenizer or checkpoint.tokenizer_path
    if tokenizer_path is None or not os.path.exists(tokenizer_path):
        missing = tokenizer_path or os.path.join(checkpoint.workdir, SENTENCEPIECE_FILE)
        raise ModelArgsError(f"tokenizer file {missing} not found (training copies the run's "
                             f"tokenizer there); pass tokenizer=<file.model>")
    tok = load_tokenizer(tokenizer_path)
    tok.check_matches_model(weights.config.vocab_size, allow_padding=True)
    info = {"model_source": checkpoint.stage_dir, "checkpoint_step": checkpoint.step}
    return quantize_weights(weights, quantize), tok, info


# ---- the lm_eval model ------------------------------------------------------------------------

def _batch_size(value: Any) -> int:
    if isinstance(value, str) and value.split(":")[0] == "auto":
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if size < 1 or isinstance(value, bool):
        raise ModelArgsError(f"batch_size={value!r}: expected a positive integer or 'auto'")
    return size


class GebJaxLM(TemplateLM):
    """lm_eval's loglikelihood, loglikelihood_rolling and generate_until on `Engine`.

    Built by lm_eval from --model_args (see the module docstring), or directly from Python.
    """

    backend = "causal"

    def __init__(self, pretrained: str, stage: str | None = None, step: int | None = None,
                 quantize: str | None = None, tokenizer: str | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256,
                 add_bos_token: bool = True, threads: int | None = None, seed: int = 1234,
                 batch_size: int | str = DEFAULT_BATCH_SIZE, max_batch_size: int | None = None,
                 device: str | None = None, **unknown):
        super().__init__()
        if unknown:
            raise ModelArgsError(f"unknown --model_args {sorted(unknown)} for --model "
                                 f"{MODEL_NAME}; known: pretrained, stage, step, quantize, "
                                 f"tokenizer, max_length, max_gen_toks, add_bos_token, "
                                 f"threads, seed")
        del max_batch_size, device  # lm_eval always passes them; the engine is CPU-only
        weights, self.tokenizer, self._info = load_for_eval(
            str(pretrained), None if stage is None else str(stage), step, quantize, tokenizer)
        self.engine = Engine(weights, max_len=max_length, threads=threads)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = bool(add_bos_token)
        self.seed = int(seed)
        self.batch_size = _batch_size(batch_size)
        self.stop_token_ids = reply_stop_ids(self.tokenizer)

    # -- what lm_eval reads ---------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """Conditions an empty context and the first rolling window: bos, as in training."""
        return self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self.engine.max_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return f"{MODEL_NAME}:{self.tokenizer.path}"

    def get_model_info(self) -> dict:
        c = self.engine.config
        return {**self._info, "max_length": self.max_length, "vocab_size": c.vocab_size,
                "n_layers": c.n_layers, "d_model": c.d_model,
                "quantization": self.engine.weights.quantization}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs) -> list[int]:
        """Text -> ids; with bos first unless add_special_tokens=False (or add_bos_token=False)."""
        del kwargs
        add_bos = self.add_bos_token if add_special_tokens is None else bool(add_special_tokens)
        ids = self.tokenizer.encode(string, add_bos=add_bos)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        del skip_special_tokens  # bos/eos/pad decode to nothing anyway
        return self.tokenizer.decode(tokens)

    # -- chat (for --apply_chat_template; the layout SFT trains on) -----------------------------
    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        if uses_template(self.tokenizer):
            return render_template(self.tokenizer.chat_template, chat_history,
                                   add_generation_prompt=add_generation_prompt)
        return render_chat(chat_history, add_generation_prompt=add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if chat_template is False or chat_template is None:
            return None
        if uses_template(self.tokenizer):
            return self.tokenizer.chat_template
        return "geb_jax.data.chat.render_chat: <|role|>content<|end|> ... <|assistant|>"

    # -- scoring --------------------------------------------------------------------------------
    def _score(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool,
               desc: str) -> list[tuple[float, bool]]:
        """Engine.score over (context ids, continuation ids), contexts left-truncated to fit."""
        prompts, continuations = [], []
        for context, continuation in pairs:
            if len(continuation) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens does not fit "
                                 f"max_length={self.max_length}")
            prompts.append(context[-(self.max_length + 1 - len(continuation)):])
            continuations.append(continuation)
        results: list[tuple[float, bool]] = []
        bar = tqdm(total=len(pairs), desc=desc, disable=disable_tqdm)
        for start in range(0, len(pairs), SCORE_CHUNK):
            stop = start + SCORE_CHUNK
            results.extend(self.engine.score(prompts[start:stop], continuations[start:stop],
                                             batch_size=self.batch_size))
            bar.update(len(results) - bar.n)
        bar.close()
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                              ) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) strings, context ids, continuation ids)."""
        del kwargs
        results = self._score([(ctx, cont) for _, ctx, cont in requests], disable_tqdm,
                              "geb_jax loglikelihood")
        for (key, _, _), answer in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of log p(token) over each whole document, conditioned on bos; documents longer
        than max_length are scored in lm_eval's rolling windows (each token once, with up to
        max_length tokens of context)."""
        pairs, owners = [], []
        for index, request in enumerate(requests):
            tokens = self.tok_encode(request.args[0], add_special_tokens=False)
            for window in get_rolling_token_windows(tokens, self.prefix_token_id,
                                                    self.max_length, context_len=1):
                pairs.append(make_disjoint_window(window))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._score(pairs, disable_tqdm,
                                                           "geb_jax loglikelihood_rolling")):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # -- generation -----------------------------------------------------------------------------
    def sampling_params(self, gen_kwargs: dict, index: int = 0) -> SamplingParams:
        """lm_eval generation_kwargs -> SamplingParams (greedy unless do_sample is true)."""
        options = dict(gen_kwargs or {})
        until = options.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = options.pop("max_gen_toks", self.max_gen_toks)
        do_sample = options.pop("do_sample", None)
        temperature = options.pop("temperature", 1.0 if do_sample else 0.0)
        if do_sample is False:
            temperature = 0.0
        params = dict(max_new_tokens=max_new, temperature=float(temperature),
                      top_p=float(options.pop("top_p", 1.0)), top_k=options.pop("top_k", 0),
                      repetition_penalty=float(options.pop("repetition_penalty", 1.0)),
                      seed=options.pop("seed", self.seed + index),
                      stop=tuple(s for s in until if s), stop_token_ids=self.stop_token_ids)
        if options:
            raise ValueError(f"generation_kwargs {sorted(options)} are not supported by "
                             f"--model {MODEL_NAME} (supported: until, max_gen_toks, do_sample, "
                             f"temperature, top_p, top_k, repetition_penalty, seed)")
        return SamplingParams(**params)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """One continuation per (context, gen_kwargs); the context is left-truncated so that
        it plus max_gen_toks fits max_length."""
        outputs = []
        for index, request in enumerate(tqdm(requests, desc="geb_jax generate_until",
                                             disable=disable_tqdm)):
            context, gen_kwargs = request.args
            params = self.sampling_params(gen_kwargs, index)
            room = self.max_length - params.max_new_tokens
            if room < 1:
                raise ValueError(f"max_gen_toks={params.max_new_tokens} leaves no room for a "
                                 f"prompt in max_length={self.max_length}")
            ids = self.tok_encode(context, left_truncate_len=room)
            text = "".join(generate(self.engine, self.tokenizer, ids, params))
            self.cache_hook.add_partial("generate_until", request.args, text)
            outputs.append(text)
        return outputs


# ---- registration and command line ------------------------------------------------------------

def register() -> type[GebJaxLM]:
    """Put GebJaxLM into lm_eval's model registry as "geb_jax" (idempotent).

    lm_eval's built-in names are loaded first: its get_model imports them only while the
    registry is empty, so registering into an empty registry would hide "hf", "dummy", ...
    A name that is already there (e.g. an entry point of a newer lm_eval) is left as is.
    """
    import lm_eval.models  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    from lm_eval.api.registry import model_registry  # pylint: disable=import-outside-toplevel

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME)(GebJaxLM)
    return GebJaxLM


def main() -> None:
    """lm_eval's CLI (arguments from sys.argv) with geb_jax registered."""
    from lm_eval.__main__ import cli_evaluate  # pylint: disable=import-outside-toplevel

    register()
    cli_evaluate()


if __name__ == "__main__":
    # Run through the importable module so that the registered class is
    # geb_jax.eval.lm_eval_adapter.GebJaxLM, not a second copy defined in __main__.
    from geb_jax.eval.lm_eval_adapter import main as _main

    _main()
else:
    register()
