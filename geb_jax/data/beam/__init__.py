"""The cleaning, dedup and pre-tokenisation chain as an Apache Beam pipeline.

    python -m geb_jax.data.prepare --config configs/tiny.py --output DIR --tokens DIR/tokens \
        --runner=FnApiRunner --direct_num_workers=2

Same rules, same config, same outputs as the single-process chain (geb_jax.data.clean.clean):
every rule is the pure function (or filter object) that `chain.build_steps` builds, called from
a DoFn. Only the stateful stream steps change shape, into GroupByKey stages whose keep rule is
"the lowest input index wins", so the result never depends on bundle order:

    reading.py     input shards in parallel (prepare_io.read_file), bad records as counters
    rules.py       runs of per-document steps, the batched perplexity step, in/out counts
    paragraphs.py  paragraph dedup: digest -> GroupByKey -> first occurrence -> CoGroupByKey
    near_dedup.py  MinHash-LSH: signature -> exact groups -> band keys -> GroupByKey ->
                   verified pairs -> connected components (one worker) -> drop non-roots
    writing.py     per input shard: sort by index, documents part + array_record shards
    counters.py    Report <-> Beam counters (namespace geb_jax.prepare)
    pipeline.py    the assembly, the run, the commit of the outputs
apache-beam is the [beam] extra: `pip install -e ".[beam]"`. docs/data.md "At scale".
"""
from geb_jax.errors import ConfigError


class BeamError(ConfigError):
    """The Beam runner cannot do what was asked (missing package, unsupported setting)."""


def require_beam():
    """apache_beam, or one clear error that says how to install it."""
    try:
        import apache_beam
    except ImportError as e:
        raise BeamError('--runner needs apache-beam, which is not installed: '
                        'pip install -e ".[beam]"') from e
    return apache_beam
