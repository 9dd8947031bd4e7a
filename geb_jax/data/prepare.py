"""Clean a corpus with the cleaning chain and write it as JSONL.gz plus a report.

    python -m geb_jax.data.prepare --config configs/tiny.py --output data/clean_tiny
    python -m geb_jax.data.prepare --config configs/tiny.py --input 'raw/*.jsonl' \\
        --config.data.clean.perplexity=false --output data/clean_raw

Input: with --input (repeatable; a glob or a path) local files are read: `.jsonl` / `.jsonl.gz`
(one JSON object a line with a string "text" field; "lang" and "source" are kept when present)
and `.txt` / `.txt.gz` (one document a file; its source is the file name, its lang is detected).
Bad input - empty files, invalid UTF-8, records over data.max_record_bytes, lines that are not
JSON objects with a string "text" - is skipped and counted in the report ("input_skipped"),
never a crash mid-run; input with nothing usable is one error naming the files.
Without --input, config.data.source decides; "builtin" reads the built-in corpus (--split
train | valid | all, default train).

Output, in --output DIR: `documents.jsonl.gz` (the kept documents, one JSON object a line,
keys sorted), `report.md` and `report.json` (per-step drops and edits; see
geb_jax.data.clean.chain.Report). Each file is written to a temporary name in DIR and renamed
into place, so a reader never sees a half-written file and an interrupted run leaves the
previous output intact.

`--tokens DIR` also pre-tokenizes the kept documents into DIR (the layout of
geb_jax.data.pretokenize; train with data.source=pretokenized). `--runner=FnApiRunner` (or
FlinkRunner, DataflowRunner, ...) runs the same chain as an Apache Beam pipeline
(geb_jax/data/beam/, the [beam] extra) with the same outputs; any other unknown --option then
goes to Beam. docs/data.md, "At scale".

Config: the `data.clean` section (defaults: geb_jax.data.clean.chain.default_cleaning_config);
`--config.data.clean.<field>=<value>` overrides a field. A config without a `data.clean`
section gets the defaults.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

import ml_collections

from geb_jax.config_loader import apply_overrides, load_config, split_overrides
from geb_jax.data import bad_input as B
from geb_jax.data.bad_input import SkipReport, SourceError
from geb_jax.data.prepare_io import (PrepareError, builtin_input, count_builtin, read_files,
                                     resolve_inputs, write_documents, write_reports)
from geb_jax.errors import ConfigError

# Modules that register the scorers of data.clean.perplexity_model="model:<path>" (data/ imports
# no model code itself); imported here and, under Beam, by each worker before it scores.
SCORER_PLUGINS = ("geb_jax.eval.filter_scorer",)


def load_prepare_config(spec: str, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Loads the preset, adds default data.clean if missing, applies the overrides."""
    from geb_jax.data.clean.chain import default_cleaning_config
    config = load_config(spec)
    if "data" not in config:
        config.data = ml_collections.ConfigDict(dict(source="builtin"))
    if "clean" not in config.data:
        config.data.clean = ml_collections.ConfigDict(default_cleaning_config())
    return apply_overrides(config, list(overrides)) if overrides else config


def parse_args(argv: Sequence[str]):
    parser = argparse.ArgumentParser(
        prog="python -m geb_jax.data.prepare",
        description="Clean a corpus (GEB/LLaMA-style chain) and write documents.jsonl.gz, "
                    "report.md and report.json. Override config fields with "
                    "--config.data.clean.<field>=<value>. With --runner the same chain runs "
                    "as an Apache Beam pipeline; other --options then go to Beam.")
    parser.add_argument("--config", required=True, help="configs/<preset>.py[:arg]")
    parser.add_argument("--input", action="append", default=[],
                        help="a .jsonl[.gz] / .txt[.gz] file or glob (repeatable); default: "
                             "config.data.source")
    parser.add_argument("--split", default="train", choices=("train", "valid", "all"),
                        help="built-in corpus split (data.source=builtin, no --input)")
    parser.add_argument("--output", required=True, help="output directory (created)")
    parser.add_argument("--tokens", default=None,
                        help="also pre-tokenize the kept documents into this folder (the "
                             "layout of geb_jax.data.pretokenize: train with "
                             "data.source=pretokenized, data.path=FOLDER)")
    parser.add_argument("--shard-mb", type=float, default=256.0,
                        help="with --tokens: start a new array_record shard after this many MB")
    parser.add_argument("--runner", default=None,
                        help="an Apache Beam runner (FnApiRunner locally; FlinkRunner, "
                             "DataflowRunner, ...): run the chain as a Beam pipeline; needs "
                             'pip install -e ".[beam]". Default: one Python process')
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    rest, overrides = split_overrides(argv)
    args, beam_args = parser.parse_known_args(rest)
    if beam_args and args.runner is None:
        parser.error(f"unrecognized arguments: {' '.join(beam_args)} (Beam pipeline options "
                     f"need --runner)")
    if args.tokens and args.split == "all":
        parser.error("--tokens writes one split: use --split train or --split valid")
    args.beam_args = [f"--runner={args.runner}", *beam_args] if args.runner else []
    return args, overrides


def open_input(config: ml_collections.ConfigDict, inputs: Sequence[str], split: str,
               skipped: SkipReport):
    """(paths or None for the built-in corpus, documents, how many or None)."""
    if inputs:
        paths = resolve_inputs(inputs)
        max_bytes = config.data.get("max_record_bytes", B.DEFAULT_MAX_RECORD_BYTES)
        return paths, read_files(paths, skipped, max_bytes), None
    source = config.data.get("source", "builtin")
    if source != "builtin":
        raise PrepareError(f"config.data.source={source!r} is not readable by prepare; "
                           f"use data.source='builtin' or pass --input GLOB.")
    return None, builtin_input(split), count_builtin(split)


def _check_output(output: str) -> None:
    if os.path.exists(output) and not os.path.isdir(output):
        raise PrepareError(f"--output {output!r} exists and is not a directory.")


def prepare(config: ml_collections.ConfigDict, output: str, inputs: Sequence[str] = (),
            split: str = "train", progress: bool = True, tokens: str | None = None,
            shard_mb: float = 256.0):
    """Runs the chain in this process and writes the outputs; returns the Report."""
    import tqdm

    from geb_jax.data.clean import clean
    for module in SCORER_PLUGINS:
        importlib.import_module(module)

    skipped = SkipReport()
    paths, documents, total = open_input(config, inputs, split, skipped)
    _check_output(output)
    os.makedirs(output, exist_ok=True)
    bar = None

    def counted():  # the bar counts documents read (the chain's input)
        for doc in documents:
            yield doc
            bar.update(1)

    docs, report = clean(counted(), config.data.clean)  # config errors raise here
    bar = tqdm.tqdm(total=total, unit="doc", desc="cleaning", disable=not progress,
                    dynamic_ncols=True)  # created after the perplexity model is trained
    kept = [] if tokens else None

    def keep(stream):
        for doc in stream:
            if kept is not None:
                kept.append(doc)
            yield doc
    try:
        write_documents(os.path.join(output, "documents.jsonl.gz"), keep(docs))
    finally:
        bar.close()
    report.input_skipped = skipped.as_dict()
    if tokens:
        from geb_jax.data import pretokenize
        pretokenize.write_documents_tokens(
            tokens, kept, pretokenize.run_tokenizer(config), config.data,
            "train" if paths is not None else split, shard_mb=shard_mb, progress=progress)
    write_reports(output, report)
    return report


def prepare_beam(config: ml_collections.ConfigDict, output: str, inputs: Sequence[str],
                 split: str, beam_args: Sequence[str], tokens: str | None = None,
                 shard_mb: float = 256.0):
    """The same chain and outputs as `prepare`, as an Apache Beam pipeline (data/beam/)."""
    from geb_jax.data.beam import require_beam
    require_beam()  # one error line before any work when apache-beam is missing
    from geb_jax.data.beam.pipeline import run
    paths, _, _ = open_input(config, inputs, split, SkipReport())
    _check_output(output)
    return run(config, output, paths, split, beam_args, tokens, shard_mb, SCORER_PLUGINS)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, overrides = parse_args(argv)
        config = load_prepare_config(args.config, overrides)
        if args.runner:
            report = prepare_beam(config, args.output, args.input, args.split,
                                  args.beam_args, args.tokens, args.shard_mb)
        else:
            report = prepare(config, args.output, args.input, args.split,
                             progress=not args.no_progress, tokens=args.tokens,
                             shard_mb=args.shard_mb)
    except (ConfigError, PrepareError, SourceError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.to_markdown())
    print(f"kept {report.documents_out:,} of {report.documents_in:,} documents "
          f"({report.bytes_out:,} of {report.bytes_in:,} bytes) -> "
          f"{os.path.join(args.output, 'documents.jsonl.gz')}; report: "
          f"{os.path.join(args.output, 'report.md')}"
          + (f"; tokens: {args.tokens}" if args.tokens else ""))
    return 0


if __name__ == "__main__":  # run the imported module's main, so that its error classes are
    from geb_jax.data.prepare import main as _main  # the ones data/beam/ raises
    sys.exit(_main())
