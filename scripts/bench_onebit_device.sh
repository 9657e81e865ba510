#!/usr/bin/env bash
# One call on a CUDA machine: GPU tests of the OneBit kernels, then the whole benchmark (kernel table with
# its bf16 and unpack-then-matmul baselines and the copy bandwidth, tile sweep, SmolLM2-shaped decode).
#
#   bash scripts/bench_onebit_device.sh            # from the repository root; results in $OUT (or /tmp/...)
#
# Compiling the ~60 kernel variants is the slow part, so it runs first in parallel processes that only
# compile (python -m lowbit.bench.onebit --warm-shard I/N fills Triton's on-disk cache) while pytest runs
# the GPU tests; the timed run then loads every kernel from the cache. pytest is installed from the wheels
# in .onebit_whl/ when the machine has none (carry that folder).
set -uo pipefail
OUT=${OUT:-/tmp/onebit_bench_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SHARDS=${SHARDS:-12}
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/env.txt"
$PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/env.txt"
if ! $PY -c "import pytest" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/onebit_site .onebit_whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/onebit_site"
fi

stamp "compiling in $SHARDS processes; the GPU tests meanwhile, in 3 groups"
for i in $(seq 0 $((SHARDS - 1))); do
  timeout 90 $PY -m lowbit.bench.onebit --sweep --warm-shard "$i/$SHARDS" > "/tmp/onebit_warm_$i.log" 2>&1 &
done
PYT="$PY -m pytest -q -m gpu tests/kernels/test_onebit.py -p no:cacheprovider -rfE"
timeout 90 $PYT -k "dispatch" > /tmp/onebit_pytest_1.log 2>&1 &
timeout 90 $PYT -k "paths" > /tmp/onebit_pytest_2.log 2>&1 &
timeout 90 $PYT -k "not dispatch and not paths" > /tmp/onebit_pytest_3.log 2>&1 &
wait
cat /tmp/onebit_pytest_*.log > "$OUT/pytest.txt"
grep -h -E "passed|failed|error|FAILED|ERROR" /tmp/onebit_pytest_*.log | tail -n 30
for i in $(seq 0 $((SHARDS - 1))); do tail -n 40 "/tmp/onebit_warm_$i.log"; done > "$OUT/warm.txt"
grep -h -A2 '"errors": \[$' /tmp/onebit_warm_*.log | head -n 20
stamp "timed run"
timeout 120 $PY -m lowbit.bench.onebit --sweep --json-out "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
echo "exit status of the timed run: $?"
cp "$OUT/bench.json.partial.jsonl" "$OUT/partial.jsonl" 2>/dev/null; rm -f "$OUT/bench.json.partial.jsonl"
stamp "done"
# the summary table (the JSON is in $OUT/bench.json)
if grep -q '^device: ' "$OUT/bench.txt"; then sed -n '/^device: /,$p' "$OUT/bench.txt"; else tail -n 60 "$OUT/bench.txt"; fi
