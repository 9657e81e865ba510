#!/usr/bin/env bash
# INT4 training kernels on one GPU, in one call: GPU tests, then `lowbit bench int4-linear`.
#
#   scripts/bench_int4_device.sh [main|full|all]      (repository root, on the device machine)
#
#   main: GPU tests of tests/kernels/{test_hadamard_quant,test_int4_matmul,test_int4_linear}.py, then the
#         benchmark at 16384x4096x4096 with every variant of ours, the per-kernel table and the tile sweeps
#   full: the benchmark at the other three shapes of the issue (bf16 eager / compiled, torchao float8, ours)
#   all:  main, then full
#   one:  the whole issue table in one benchmark run (four shapes, default methods, kernels of the first
#         shape), no tests: python3 -m lowbit.bench.int4_linear (time budget ONE_BUDGET, default 220 s)
#
# torchao comes from a wheel the call carries (.whl, ignored by git); install it first, e.g.
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/torchao*.whl && export PYTHONPATH=/tmp/site
# Results (logs, JSON) go to $OUT (default runs/device). Time limits: TEST_TIMEOUT, MAIN_BUDGET, FULL_BUDGET
# (seconds); the benchmark skips what is left past its budget and still writes its JSON.
set -uo pipefail
PHASE=${1:-all}
OUT=${OUT:-runs/device}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
T0=$(date +%s)

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu \
    --format=csv >"$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
python3 -c "import torchao; print('torchao', torchao.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"

if [[ $PHASE == main || $PHASE == all ]]; then
    echo "== GPU tests ($(($(date +%s) - T0)) s)"
    timeout "${TEST_TIMEOUT:-110}" python3 -m pytest -q -n 4 -m gpu -p no:cacheprovider \
        tests/kernels/test_hadamard_quant.py tests/kernels/test_int4_matmul.py tests/kernels/test_int4_linear.py \
        >"$OUT/pytest.log" 2>&1
    echo "pytest exit $?"
    grep -E "passed|failed|error" "$OUT/pytest.log" | tail -3
    grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -20

    echo "== benchmark, main shape ($(($(date +%s) - T0)) s)"
    python3 -m lowbit.bench.int4_linear --shapes 16384,4096,4096 \
        --methods "${MAIN_METHODS:-bf16-eager,torchao-float8-compiled,bf16-compiled,ours-hq,ours-hq-lss,ours-hq-lss+fp8dw,ours-rtn,ours-hq+tensor,ours-hq-lss+tensor+fp8dw,ours-hq-lss+fp8dw+dx=fp8x2,ours-hq+dx=cublas}" \
        --kernels first --sweep --time-budget "${MAIN_BUDGET:-140}" --json "$OUT/bench_main.json" \
        >"$OUT/bench_main.log" 2>&1
    echo "bench exit $?"
fi

if [[ $PHASE == one ]]; then
    echo "== benchmark, one run ($(($(date +%s) - T0)) s)"
    python3 -m lowbit.bench.int4_linear --time-budget "${ONE_BUDGET:-220}" --json "$OUT/bench_one.json" \
        >"$OUT/bench_one.log" 2>&1
    echo "bench exit $?"
fi

if [[ $PHASE == full || $PHASE == all ]]; then
    echo "== benchmark, all shapes ($(($(date +%s) - T0)) s)"
    python3 -m lowbit.bench.int4_linear --shapes "16384,4096,11008;8192,8192,8192;16384,2048,2048" \
        --methods "${FULL_METHODS:-bf16-eager,torchao-float8-compiled,bf16-compiled,ours-hq,ours-hq-lss,ours-hq-lss+fp8dw,ours-rtn}" \
        --kernels none --time-budget "${FULL_BUDGET:-150}" --json "$OUT/bench_full.json" \
        >"$OUT/bench_full.log" 2>&1
    echo "bench exit $?"
fi

echo "== done ($(($(date +%s) - T0)) s)"
for f in "$OUT"/bench_*.log; do
    [[ -f $f ]] && { echo "--- $f"; grep -E "^\||^[0-9]{4}-|Error|error" "$f" | cut -c1-160; }
done
exit 0
