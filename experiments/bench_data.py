"""Packed tokens/s per CPU core of the pretrain pipeline: tokenizing on the fly vs pre-tokenized.

    python experiments/bench_data.py                      # ~4 MB of the built-in corpus
    python experiments/bench_data.py --mb 8 --vocab 32000 --seq-len 4096
    python experiments/bench_data.py prepare [...]        # the cleaning chain: experiments/bench_prepare.py

The built-in train split is repeated to --mb megabytes and written as one JSONL file; one full
epoch of packed (batch, seq_len) batches is read with a single read thread and no prefetch, so
CPU seconds ~ one core's work. Reported: packed tokens per wall second and per CPU second
(process time: all threads of this process, so the per-core figure), for
  * on the fly:     data.source="local" (JSONL read + SentencePiece + packing)
  * pre-tokenized:  data.source="pretokenized" (array_record read + packing), after a one-off
                    `geb_jax.data.pretokenize` pass whose time is reported separately.
Compare with what a training step consumes, e.g. ~50k tokens/s for GEB-1.3B on one H100.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from geb_jax.config_base import base_config  # noqa: E402
from geb_jax.data import pretokenize, pretrain_pipeline, sources  # noqa: E402
from geb_jax.data.corpus import builtin_documents  # noqa: E402
from geb_jax.data.tokenizer import builtin_tokenizer  # noqa: E402


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_corpus(path: str, megabytes: float) -> tuple[int, int]:
    """The built-in train split repeated to `megabytes` MB of text; (documents, bytes)."""
    docs = list(builtin_documents("train"))
    n_docs = n_bytes = 0
    with open(path, "w", encoding="utf-8") as f:
        while n_bytes < megabytes * 1e6:
            for doc in docs:
                f.write(json.dumps({"text": doc["text"]}, ensure_ascii=False) + "\n")
                n_docs += 1
                n_bytes += len(doc["text"].encode("utf-8"))
    return n_docs, n_bytes


def measure(texts_source, tokenizer, seq_len: int, batch_size: int) -> dict:
    ds = pretrain_pipeline.pretrain_dataset(texts_source, tokenizer, seq_len=seq_len,
                                   batch_size=batch_size, seed=0, num_epochs=1,
                                   read_threads=1, prefetch=0)
    wall, cpu = time.perf_counter(), time.process_time()
    batches = sum(1 for _ in ds)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    tokens = batches * batch_size * seq_len
    return {"batches": batches, "tokens": tokens, "wall_s": wall, "cpu_s": cpu,
            "tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu}


def main() -> None:
    if sys.argv[1:2] == ["prepare"]:  # documents/s of data.prepare, single process vs Beam
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_prepare  # pylint: disable=import-outside-toplevel
        bench_prepare.main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=4.0, help="corpus size in MB of text")
    parser.add_argument("--vocab", type=int, default=64_896, help="built-in tokenizer size")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    print(f"command: python {' '.join(sys.argv)}")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"device: {cpu_name()}, {os.cpu_count()} CPU cores "
          f"visible, load average {os.getloadavg()[0]:.2f}, python {platform.python_version()}")
    tokenizer = builtin_tokenizer(args.vocab)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.jsonl")
        n_docs, n_bytes = write_corpus(corpus, args.mb)
        config = base_config()
        config.model.vocab_size = tokenizer.vocab_size
        config.data.update(source="local", path=corpus, valid_fraction=0.0)
        print(f"corpus: {n_docs:,} documents, {n_bytes / 1e6:.2f} MB (built-in train split "
              f"repeated); tokenizer vocab {tokenizer.vocab_size:,}; batches "
              f"({args.batch_size}, {args.seq_len}), 1 read thread, no prefetch")

        fly = measure(sources.texts_source_from_config(config.data, "train", seed=0),
                      tokenizer, args.seq_len, args.batch_size)
        folder = os.path.join(tmp, "tokens")
        start, cpu = time.perf_counter(), time.process_time()
        pretokenize.pretokenize(config, folder, ("train",), progress=False,
                                tokenizer=tokenizer)
        pre_wall, pre_cpu = time.perf_counter() - start, time.process_time() - cpu
        config.data.update(source="pretokenized", path=folder)
        pre = measure(sources.texts_source_from_config(config.data, "train", seed=0,
                                                       tokenizer=tokenizer),
                      tokenizer, args.seq_len, args.batch_size)

    print(f"\n| path | packed tokens | wall s | CPU s | tokens/s (wall) | tokens/s per core |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in (("on the fly", fly), ("pre-tokenized", pre)):
        print(f"| {name} | {r['tokens']:,} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | "
              f"{r['tokens_per_s']:,.0f} | {r['tokens_per_cpu_s']:,.0f} |")
    print(f"\none-off pre-tokenization: {pre_wall:.2f} s wall, {pre_cpu:.2f} s CPU "
          f"({n_bytes / 1e6 / pre_wall:.2f} MB/s)")


if __name__ == "__main__":
    main()
