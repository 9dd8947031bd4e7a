"""Per-document steps in Beam: the chain's own steps, run by the chain's own runner.

`chain.build_steps` builds each step (same config, same functions) on the worker, and
`chain._run` applies a run of them to one document: its rule that a step returning blank text
drops the document, and its per-step counting into a Report, are used as they are.
"""
from __future__ import annotations

import dataclasses
import importlib

import apache_beam as beam

from geb_jax.data.beam import counters
from geb_jax.data.clean.chain import CleaningConfig, _run, build_steps

INDEX_KEY = "__beam_index__"  # carries the index through the batched perplexity step only


def steps_named(config: CleaningConfig, names) -> list:
    """The chain's steps called `names`, freshly built (the scorer only when asked for)."""
    if "perplexity" not in names:
        config = dataclasses.replace(config, perplexity=False)
    return [s for s in build_steps(config) if s.name in names]


class _Counted(beam.DoFn):
    """Fills one Report per bundle and adds its `fields` to the counters at bundle end."""
    fields: tuple[str, ...] = counters.STEP_FIELDS
    names: tuple[str, ...] = ()

    def start_bundle(self):
        self.report = counters.bundle_report(self.names)

    def finish_bundle(self):
        counters.publish(self.report, self.fields)


class RunSteps(_Counted):
    """(index, doc) -> (index, doc) through consecutive per-document steps (or dropped)."""

    def __init__(self, config: CleaningConfig, names: tuple[str, ...]):
        self.config, self.names = config, tuple(names)

    def setup(self):
        self.steps = steps_named(self.config, self.names)

    def process(self, item):
        index, doc = item
        for out in _run([doc], self.steps, self.report):
            yield index, out


class Perplexity(_Counted):
    """The batched perplexity step on one batch of (index, doc); drop_fraction must be 0.

    With drop_fraction 0 each document's decision is its own score against the ceiling, so
    batching by bundle gives the chain's decisions (a model scorer may differ in the last
    float digits with another batch make-up; the n-gram scorer does not batch).
    """
    names = ("perplexity",)

    def __init__(self, config: CleaningConfig, plugins: tuple[str, ...] = ()):
        self.config, self.plugins = config, tuple(plugins)

    def setup(self):
        # a worker process imports the modules that register model scorers (data/ itself
        # imports no model code; the CLI names them), as the launching process did
        for module in self.plugins:
            importlib.import_module(module)
        self.steps = steps_named(self.config, self.names)

    def process(self, batch):
        tagged = [{**doc, INDEX_KEY: index} for index, doc in batch]
        for out in _run(tagged, self.steps, self.report):
            index = out.pop(INDEX_KEY)
            yield index, out


class CountDocuments(_Counted):
    """Adds each document to the report's input (or output) counts; passes it on."""

    def __init__(self, output: bool):
        self.output = output
        self.fields = counters.OUTPUT_FIELDS if output else counters.INPUT_FIELDS

    def process(self, item):
        (self.report.add_output if self.output else self.report.add_input)(item[1])
        yield item
