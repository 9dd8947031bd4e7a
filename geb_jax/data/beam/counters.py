"""Report <-> Beam counters: each DoFn fills a small Report per bundle and adds its numbers.

The driver rebuilds the whole run's Report from the committed counters (Report.from_counts),
so the report's arithmetic stays in chain.Report and is never written twice.
"""
from __future__ import annotations

import glob
import json
import os

from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter

from geb_jax.atomic_io import write_json_atomic
from geb_jax.data.bad_input import MAX_EXAMPLES, SkipReport
from geb_jax.data.clean.chain import FilterCounts, Report

NAMESPACE = "geb_jax.prepare"
STEP_FIELDS = ("filters|", "by_lang|")
INPUT_FIELDS = ("documents_in", "bytes_in", "lang_in|")
OUTPUT_FIELDS = ("documents_out", "bytes_out", "lang_out|")
SKIPPED = "input_skipped|"
EXAMPLES = "skipped-{:05d}.json"


def bundle_report(steps=()) -> Report:
    return Report(filters={name: FilterCounts() for name in steps})


def publish(report: Report, fields: tuple[str, ...]) -> None:
    """Adds the report's numbers whose path starts with one of `fields` to the counters."""
    for path, value in report.counts().items():
        if path.startswith(fields):
            Metrics.counter(NAMESPACE, path).inc(value)


def publish_skipped(skipped: SkipReport, file_index: int, temp_root: str) -> None:
    """Bad records of one input file: a counter per reason; its examples go to a small file
    in the run's temp folder (Beam 2.77's FnApiRunner loses StringSet values across bundles).
    """
    state = skipped.as_dict()
    for reason, n in state["skipped"].items():
        Metrics.counter(NAMESPACE, SKIPPED + reason).inc(n)
    if state["examples"]:
        write_json_atomic(os.path.join(temp_root, EXAMPLES.format(file_index)),
                          state["examples"])


def collect(result, steps, temp_root: str) -> tuple[Report, SkipReport]:
    """The finished run's Report and bad-input SkipReport, from its committed metrics."""
    query = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    counts: dict[str, int] = {}
    for c in query["counters"]:
        counts[c.key.metric.name] = counts.get(c.key.metric.name, 0) + c.result
    skipped = SkipReport()
    for path in [k for k in counts if k.startswith(SKIPPED)]:
        skipped.counts[path[len(SKIPPED):]] += counts.pop(path)
    for path in sorted(glob.glob(os.path.join(temp_root, EXAMPLES.format(0).replace(
            "00000", "*")))):  # the first examples in input order, as the reader keeps them
        with open(path, encoding="utf-8") as f:
            skipped.examples.extend(json.load(f)[:MAX_EXAMPLES - len(skipped.examples)])
    report = Report.from_counts(steps, counts)
    report.input_skipped = skipped.as_dict()
    return report, skipped
