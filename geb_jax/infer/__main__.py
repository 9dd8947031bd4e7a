"""Command line: stream a completion or chat with a model on the CPU (numpy only).

    python -m geb_jax.infer generate --model runs/tiny/export --prompt "Once upon a time"
    python -m geb_jax.infer chat --model runs/tiny/export --system "You are helpful."

--model takes what geb_jax.infer.loading.load_model accepts: a .gguf file (ours or any
published Llama-architecture one), an .onnx export, a Hugging Face folder, or a numpy export
folder. Chat uses the model's own chat template when it has one (published models), else ours. Text streams to stdout as it is decoded; prompts, notes and errors go to
stderr. In chat, type /reset to start over and /exit (or end of input) to leave; old turns are
dropped when the conversation no longer fits max_seq_len.
"""
from __future__ import annotations

import argparse
import sys
import time

from geb_jax.infer.engine import ContextLengthError, Engine
from geb_jax.infer.loading import load_model
from geb_jax.infer.sampling import SamplingOptionError, SamplingParams, generate
from geb_jax.infer.weights import ModelFileError


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=".gguf / .onnx file, Hugging Face folder, "
                   "or numpy export folder")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="max new tokens (default 256); generation stops earlier at the end of "
                        "the context (max_seq_len, or --max-len), with a note, as llama.cpp does")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="0 disables (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="1 disables (default 0.95)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 disables (default)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: fresh)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--quantize", choices=("none", "int8", "int4"), default="none",
                   help="weight-only quantization of the layer matmuls (default none)")
    p.add_argument("--quantize-embeddings", action="store_true",
                   help="also quantize the embedding table / lm head")
    p.add_argument("--threads", type=int, default=None,
                   help="limit numpy's BLAS threads (1 is often fastest for decoding on a "
                        "busy machine)")
    p.add_argument("--max-len", type=int, default=None,
                   help="KV-cache length (default: the model's max_seq_len)")
    p.add_argument("--verbose", action="store_true", help="print timing to stderr")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m geb_jax.infer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete a prompt, streaming to stdout")
    _add_common(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--no-bos", action="store_true", help="do not start the prompt with bos (models whose file says so never do)")
    chat = sub.add_parser("chat", help="multi-turn chat in the model's chat template")
    _add_common(chat)
    chat.add_argument("--system", default=None, help="system message")
    return parser


def _params(args, max_new_tokens: int, stop_token_ids=None) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed,
                          stop=tuple(args.stop), stop_token_ids=stop_token_ids)


def _stream(generation, out) -> float:
    start = time.perf_counter()
    for piece in generation:
        out.write(piece)
        out.flush()
    return time.perf_counter() - start


def _report(args, generation, seconds: float) -> None:
    if args.verbose:
        n = len(generation.token_ids)
        print(f"[{n} tokens in {seconds:.2f}s, {n / max(seconds, 1e-9):.1f} tokens/s, "
              f"finish: {generation.finish_reason}]", file=sys.stderr)


def _generate(args, engine, tokenizer) -> int:
    # A published model's file says whether its sequences start with bos (SmolLM2's do not).
    ids = tokenizer.encode(args.prompt, add_bos=getattr(tokenizer, "add_bos", True)
                           and not args.no_bos)
    if not ids:
        raise SamplingOptionError("the prompt is empty (and no bos is added)")
    room = engine.max_len - len(ids)
    if room < 1:
        raise ContextLengthError(
            f"the prompt ({len(ids)} tokens) fills the model's context ({engine.max_len} "
            "positions); shorten it" + ("" if args.max_len else " or pass a larger --max-len"))
    max_new = min(args.max_tokens, room)
    generation = generate(engine, tokenizer, ids, _params(args, max_new))
    seconds = _stream(generation, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if max_new < args.max_tokens and generation.finish_reason == "length":
        print(f"[stopped at the end of the context: {engine.max_len} positions, "
              f"{len(ids)} of them the prompt]", file=sys.stderr)
    _report(args, generation, seconds)
    return 0


def _fit(messages, tokenizer, room: int, chat_prompt):
    """Drop the oldest non-system messages until the prompt leaves `room` positions."""
    messages = list(messages)
    while True:
        ids = chat_prompt(tokenizer, messages)
        if len(ids) <= room:
            return messages, ids
        first = 1 if messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            return messages, None
        del messages[first]


def _chat(args, engine, tokenizer) -> int:
    from geb_jax.data.chat import chat_prompt, reply_stop_ids  # pylint: disable=import-outside-toplevel

    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    stop_ids = reply_stop_ids(tokenizer)
    min_reply = min(args.max_tokens, 32)
    while True:
        sys.stderr.write("user> ")
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            messages = list(system)
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        messages, ids = _fit(messages, tokenizer, engine.max_len - min_reply, chat_prompt)
        if ids is None:
            print(f"[this message does not fit max_seq_len {engine.max_len} with room for a "
                  f"reply; send a shorter one]", file=sys.stderr)
            messages.pop()
            continue
        max_new = min(args.max_tokens, engine.max_len - len(ids))
        generation = generate(engine, tokenizer, ids, _params(args, max_new, stop_ids))
        seconds = _stream(generation, sys.stdout)
        sys.stdout.write("\n")
        sys.stdout.flush()
        _report(args, generation, seconds)
        messages.append({"role": "assistant", "content": generation.text})
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        sys.stdout.reconfigure(encoding="utf-8")  # Chinese text whatever the locale
    except (AttributeError, ValueError):
        pass
    try:
        start = time.perf_counter()
        weights, tokenizer = load_model(args.model, quantize=args.quantize,
                                        quantize_embeddings=args.quantize_embeddings)
        engine = Engine(weights, max_len=args.max_len, threads=args.threads)
        if args.verbose:
            print(f"[loaded {args.model} ({weights.nbytes / 2**20:.1f} MiB, "
                  f"{args.quantize}) in {time.perf_counter() - start:.2f}s]", file=sys.stderr)
        if args.command == "generate":
            return _generate(args, engine, tokenizer)
        return _chat(args, engine, tokenizer)
    except (ModelFileError, ContextLengthError, SamplingOptionError, FileNotFoundError,
            ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
