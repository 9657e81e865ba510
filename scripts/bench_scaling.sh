#!/usr/bin/env bash
# Multi-GPU scaling of lowbit training: tokens/s of INT4 fully quantized training vs bf16 on 1, 2, 4... GPUs
# (DDP and FSDP2), through `lowbit train --nproc-per-node N` (torchrun --standalone on one host).
#
#   scripts/bench_scaling.sh                    (repository root, on a machine with several GPUs)
#
# Weak scaling: every GPU keeps PER_GPU_BATCH sequences, so the global batch is PER_GPU_BATCH * N. Each run
# trains STEPS steps of MODEL on the bundled Shakespeare corpus and writes OUT/<parallel>-<precision>-<N>/.
# The throughput of a run is the median of its metrics lines' tokens_per_s after the first LOG_EVERY steps
# (warm-up excluded): metrics.jsonl counts the global batch (every rank's tokens). The table (Markdown) goes to stdout and
# OUT/scaling.md; docs/benchmarks.md takes it by hand with the date, device and this command.
#
# Settings (environment): GPUS (default "1 2 4", capped at the GPUs present), PARALLEL ("ddp fsdp2"),
# PRECISIONS ("bf16 int4"), RECIPE (hq-lss), MODEL (gpt-medium), PER_GPU_BATCH (8), BLOCK (1024), STEPS (60),
# LOG_EVERY (10), OPTIMIZER (adamw), OUT (runs/scaling).
set -uo pipefail
OUT=${OUT:-runs/scaling}
MODEL=${MODEL:-gpt-medium}
PER_GPU_BATCH=${PER_GPU_BATCH:-8}
BLOCK=${BLOCK:-1024}
STEPS=${STEPS:-60}
LOG_EVERY=${LOG_EVERY:-10}
OPTIMIZER=${OPTIMIZER:-adamw}
RECIPE=${RECIPE:-hq-lss}
PARALLEL=${PARALLEL:-ddp fsdp2}
PRECISIONS=${PRECISIONS:-bf16 int4}
PRESENT=$(python3 -c "import torch; print(torch.cuda.device_count())")
GPUS=${GPUS:-1 2 4}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version --format=csv >"$OUT/gpu.txt" 2>&1 || true

for parallel in $PARALLEL; do
  for precision in $PRECISIONS; do
    for n in $GPUS; do
      if [ "$n" -gt "$PRESENT" ]; then echo "skip $n GPUs: $PRESENT present" >&2; continue; fi
      run="$OUT/$parallel-$precision-$n"
      extra=()
      [ "$precision" = int4 ] && extra+=(--recipe "$RECIPE")
      [ "$n" -gt 1 ] && extra+=(--nproc-per-node "$n" --parallel "$parallel")
      [ "$n" -eq 1 ] && [ "$parallel" != ddp ] && continue   # one GPU: the same run for every mode
      python3 -m lowbit.cli train --model "$MODEL" --data shakespeare --out "$run" --steps "$STEPS" \
        --batch-size $((PER_GPU_BATCH * n)) --block-size "$BLOCK" --precision "$precision" \
        --optimizer "$OPTIMIZER" --log-every "$LOG_EVERY" --eval-every 0 --eval-batches 1 --save-every 0 \
        --no-progress "${extra[@]}" >"$run.log" 2>&1 || echo "FAILED: $run (see $run.log)" >&2
    done
  done
done

python3 - "$OUT" "$LOG_EVERY" <<'PY' | tee "$OUT/scaling.md"
import json, os, statistics, sys
out, log_every = sys.argv[1], int(sys.argv[2])
rows = {}
for name in sorted(os.listdir(out)):
    path = os.path.join(out, name, "metrics.jsonl")
    if not os.path.isfile(path):
        continue
    parallel, precision, n = name.rsplit("-", 2)
    lines = [json.loads(l) for l in open(path)]
    tps = [r["tokens_per_s"] for r in lines if "tokens_per_s" in r and r["step"] > log_every]
    if tps:
        rows[(parallel, precision, int(n))] = statistics.median(tps)  # already the global batch
print("| parallel | precision | GPUs | tokens/s | vs 1 GPU | INT4 / bf16 |")
print("|---|---|---|---|---|---|")
for (parallel, precision, n), tok in sorted(rows.items()):
    one = rows.get(("ddp", precision, 1))
    bf16 = rows.get((parallel if n > 1 else "ddp", "bf16", n))
    print(f"| {parallel if n > 1 else '-'} | {precision} | {n} | {tok:,.0f} | "
          f"{tok / one:.2f}x | {tok / bf16:.2f}x |" if one and bf16 else
          f"| {parallel} | {precision} | {n} | {tok:,.0f} | - | - |")
PY
