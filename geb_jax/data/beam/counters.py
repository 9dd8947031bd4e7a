"""Report <-> Beam counters: each DoFn fills a small Report per bundle and adds its numbers.

The driver rebuilds the whole run's Report from the committed counters (Report.from_counts),
so the report's arithmetic stays in chain.Report and is never written twice.
"""
from __future__ import annotations

import json

from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter

from geb_jax.data.bad_input import MAX_EXAMPLES, SkipReport
from geb_jax.data.clean.chain import FilterCounts, Report

NAMESPACE = "geb_jax.prepare"
STEP_FIELDS = ("filters|", "by_lang|")
INPUT_FIELDS = ("documents_in", "bytes_in", "lang_in|")
OUTPUT_FIELDS = ("documents_out", "bytes_out", "lang_out|")
SKIPPED = "input_skipped|"
EXAMPLES = "input_examples"


def bundle_report(steps=()) -> Report:
    return Report(filters={name: FilterCounts() for name in steps})


def publish(report: Report, fields: tuple[str, ...]) -> None:
    """Adds the report's numbers whose path starts with one of `fields` to the counters."""
    for path, value in report.counts().items():
        if path.startswith(fields):
            Metrics.counter(NAMESPACE, path).inc(value)


def publish_skipped(skipped: SkipReport, file_index: int) -> None:
    """Bad records of one input file: a counter per reason, its examples in a string set."""
    state = skipped.as_dict()
    for reason, n in state["skipped"].items():
        Metrics.counter(NAMESPACE, SKIPPED + reason).inc(n)
    examples = Metrics.string_set(NAMESPACE, EXAMPLES)
    for j, text in enumerate(state["examples"]):
        examples.add(json.dumps([file_index, j, text]))


def collect(result, steps) -> tuple[Report, SkipReport]:
    """The finished run's Report and bad-input SkipReport, from its committed metrics."""
    query = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    counts: dict[str, int] = {}
    for c in query["counters"]:
        counts[c.key.metric.name] = counts.get(c.key.metric.name, 0) + c.result
    skipped = SkipReport()
    for path in [k for k in counts if k.startswith(SKIPPED)]:
        skipped.counts[path[len(SKIPPED):]] += counts.pop(path)
    examples = set()
    for s in query.get("string_sets", []):
        examples |= set(s.result)
    # the first examples in input order, as the single-process reader keeps them
    skipped.examples.extend(text for *_, text in sorted(map(json.loads, examples))[:MAX_EXAMPLES])
    report = Report.from_counts(steps, counts)
    report.input_skipped = skipped.as_dict()
    return report, skipped
