#!/usr/bin/env bash
# One GPU, one call, under 8 minutes: our train step (train/program.py, the loop's program)
# against the peer (transformers Llama + torch.compile, bf16 autocast, AdamW) at the same shapes,
# in the same run. Writes $OUT/gpu_check.json and $OUT/gpu_check.md (OUT defaults to runs/gpu_check).
#
#   bash experiments/gpu_check.sh            # on the device machine, from the repository root
#
# The device image has jax (CUDA), flax, optax, orbax, torch and transformers; a package it lacks
# (ml_collections, grain) travels as wheels in .whl/ and is installed here without the network.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install --quiet --no-deps --no-index .whl/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  | tee "$OUT/gpu.txt" || echo "no nvidia-smi: not a GPU machine" | tee "$OUT/gpu.txt"

# name|config|batch|seq, space-separated; GPU_CHECK_RUNS replaces them (a CPU smoke test).
RUNS="${GPU_CHECK_RUNS:-geb_1_3b|configs/geb_1_3b.py|4|4096 tinyllama_1_1b|configs/tinyllama_1_1b.py|8|2048}"
STEPS="${GPU_CHECK_STEPS:-10}"
for run in $RUNS; do
  IFS="|" read -r name config batch seq <<< "$run"
  timeout 200 "$PY" experiments/bench_train.py --config "$config" \
    --config.train.batch_size="$batch" --config.train.seq_len="$seq" \
    --config.model.dtype=bfloat16 --steps "$STEPS" --warmup 2 --peer torch_compile \
    --json "$OUT/$name.json" 2>&1 | grep -v "^[IW][0-9]" | tee "$OUT/$name.log" \
    || echo "$name failed or timed out (see $OUT/$name.log)"
done

"$PY" - "$OUT" $RUNS <<'EOF'
import json, os, sys
out = sys.argv[1]
rows, results = [], {}
for name in (run.split("|")[0] for run in sys.argv[2:]):
    path = os.path.join(out, name + ".json")
    if not os.path.exists(path):
        rows.append(f"| {name} | failed | | | | | |")
        continue
    r = results[name] = json.load(open(path))
    peer_tps = r.get("peer", {}).get("tokens_per_s")
    mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
    peak = r["compiled_memory"].get("peak_bytes")
    peak_cell = f"{peak / 2**30:.1f} GiB" if peak else "n/a"
    peer_cells = (f"{peer_tps:,.0f} | {r['tokens_per_s'] / peer_tps:.2f}x" if peer_tps
                  else "failed | ")
    rows.append(f"| {name} | {r['batch_size']} x {r['seq_len']} | {r['tokens_per_s']:,.0f} "
                f"| {mfu} | {peak_cell} | {peer_cells} |")
table = ("| model | batch x seq | geb_jax tokens/s | MFU | compiled peak | torch.compile tokens/s "
         "| ratio |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows))
print(table)
open(os.path.join(out, "gpu_check.md"), "w").write(table + "\n")
json.dump(results, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
EOF
