"""The Beam pipeline: assembly (the chain's step order), run, commit of the outputs."""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
import uuid
from typing import Sequence

from geb_jax.data.beam import BeamError, require_beam
from geb_jax.data.clean.chain import CleaningConfig, build_steps

STATEFUL = ("dedup_paragraphs", "near_dedup", "perplexity")


def step_names(config: CleaningConfig) -> list[str]:
    """The enabled steps in chain order (without building the perplexity scorer)."""
    names = [s.name for s in build_steps(dataclasses.replace(config, perplexity=False))]
    return names + (["perplexity"] if config.perplexity else [])


def check_supported(config: CleaningConfig) -> None:
    if config.perplexity and config.perplexity_drop_fraction > 0:
        raise BeamError(
            f"data.clean.perplexity_drop_fraction={config.perplexity_drop_fraction}: the Beam "
            f"runner does not take a percentile cut (the stream takes it from the first "
            f"perplexity_window documents of each language, an order-dependent rule); set it "
            f"to 0 (the absolute perplexity_max_bpb_* ceilings still apply) or run without "
            f"--runner.")


def near_dedup_stage(config: CleaningConfig, deduper):
    from geb_jax.data.beam.near_dedup import NearDedup
    from geb_jax.data.clean import lsh
    # the stream deduper's own layout where it has one (issue16-lsh), else the S-curve choice
    bands, rows = getattr(deduper, "bands", 0), getattr(deduper, "rows", 0)
    if not (bands and rows):
        bands, rows = lsh.choose_bands(deduper.num_perm, deduper.threshold)
    return NearDedup(threshold=deduper.threshold, num_perm=deduper.num_perm,
                     ngram=deduper.ngram, bands=bands, rows=rows,
                     seed=getattr(deduper, "seed", 1))


def stages(config: CleaningConfig, plugins: Sequence[str] = ()) -> list:
    """The chain as PTransforms: runs of per-document steps, then each stateful step
    (`plugins`: modules a worker imports before building the perplexity scorer)."""
    import apache_beam as beam

    from geb_jax.data.beam.paragraphs import ParagraphDedup
    from geb_jax.data.beam.rules import Perplexity, RunSteps
    built = {s.name: s for s in build_steps(dataclasses.replace(config, perplexity=False))}
    out, run = [], []

    def close_run():
        if run:
            out.append((f"rules {run[0]}..{run[-1]}", beam.ParDo(RunSteps(config, tuple(run)))))
            run.clear()

    for name in step_names(config):
        if name not in STATEFUL:
            run.append(name)
            continue
        close_run()
        if name == "dedup_paragraphs":
            out.append((name, ParagraphDedup(built[name].fn)))
        elif name == "near_dedup":
            out.append((name, near_dedup_stage(config, built[name].fn)))
        else:
            out.append((name, beam.BatchElements(min_batch_size=64, max_batch_size=64)
                        | beam.ParDo(Perplexity(config, tuple(plugins)))))
    close_run()
    return out


def build(p, config, clean: CleaningConfig, paths, split: str, temp_root: str,
          tokens: bool, shard_bytes: int, plugins: Sequence[str] = ()):
    import apache_beam as beam

    from geb_jax.data import bad_input as B
    from geb_jax.data.beam.reading import ReadInput
    from geb_jax.data.beam.rules import CountDocuments
    from geb_jax.data.beam.writing import WriteGroup, by_group
    max_bytes = config.data.get("max_record_bytes", B.DEFAULT_MAX_RECORD_BYTES)
    docs = (p | "read" >> ReadInput(paths, split, max_bytes, temp_root)
            | "count in" >> beam.ParDo(CountDocuments(output=False)))
    for label, stage in stages(clean, plugins):
        docs = docs | label >> stage
    tokens_split = "train" if paths is not None else split
    return (docs | "count out" >> beam.ParDo(CountDocuments(output=True))
            | "by input shard" >> beam.Map(by_group) | "group" >> beam.GroupByKey()
            | "write" >> beam.ParDo(WriteGroup(config, temp_root, tokens_split, shard_bytes,
                                               tokens)))


def run(config, output: str, paths: Sequence[str] | None, split: str,
        pipeline_args: Sequence[str], tokens_dir: str | None = None,
        shard_mb: float = 256, plugins: Sequence[str] = ()):
    """Runs the pipeline and commits documents.jsonl.gz, the report and the token folder."""
    beam = require_beam()
    from apache_beam.options.pipeline_options import PipelineOptions

    from geb_jax.data import pretokenize
    from geb_jax.data.beam import counters, writing
    from geb_jax.data.prepare_io import nothing_usable, write_reports
    clean = CleaningConfig.from_config(config.data.clean)
    check_supported(clean)
    os.makedirs(output, exist_ok=True)
    temp_root = os.path.join(os.path.abspath(output), f".beam-tmp-{uuid.uuid4().hex[:12]}")
    os.makedirs(temp_root)
    start = time.time()
    try:
        options = PipelineOptions(list(pipeline_args))
        p = beam.Pipeline(options=options)
        build(p, config, clean, paths, split, temp_root, tokens_dir is not None,
              int(shard_mb * 2**20), plugins)
        runner = options.get_all_options().get("runner")
        print(f"beam: running the cleaning pipeline on {runner} (temp {temp_root}); Beam's "
              f"runner reports progress (a Flink / Dataflow job page lists each stage)",
              file=sys.stderr, flush=True)
        result = p.run()
        result.wait_until_finish()
        print(f"beam: pipeline done in {time.time() - start:.0f}s; committing outputs",
              file=sys.stderr, flush=True)
        report, skipped = counters.collect(result, step_names(clean), temp_root)
        if paths is not None and report.documents_in == 0:
            raise nothing_usable(paths, skipped)
        writing.commit_documents(temp_root, os.path.join(output, "documents.jsonl.gz"))
        if tokens_dir is not None:
            writing.commit_tokens(temp_root, tokens_dir, pretokenize.run_tokenizer(config),
                                  config.data, "train" if paths is not None else split,
                                  time.time() - start)
        write_reports(output, report)
    finally:
        shutil.rmtree(temp_root, ignore_errors=True)
    return report
