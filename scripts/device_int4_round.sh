#!/usr/bin/env bash
# Issue 4, one device call (repository root; carry .whl_ao for torchao):
#   bash scripts/device_int4_round.sh [tests,linear,train]   -> $OUT/{pytest_int4.log,linear.json,train*.json,*.log}
#   tests:  GPU tests of the INT4 kernels, the custom ops and the Triton backend of Int4Linear
#   linear: lowbit bench int4-linear (eager and CUDA-graph timings, host time), torchao beside
#   train:  lowbit bench int4-train, GPT-350m, torch.compile mode reduce-overhead (CUDA graphs) for all
#   eager:  the same in torch.compile's default mode (no CUDA graphs: the launchers' host time shows)
set -uo pipefail
PARTS=${1:-tests,linear,train}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl_ao/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/peers .whl_ao/*.whl \
        && export PYTHONPATH=/tmp/peers
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
T0=$(date +%s)
t() { echo "[$(($(date +%s) - T0)) s] $*"; }
if [[ $PARTS == *tests* ]]; then
    t "GPU tests"
    timeout "${TESTS_S:-200}" python3 -m pytest -q -n 4 -m gpu -p no:cacheprovider tests/kernels/test_int4_linear.py \
        tests/kernels/test_hadamard_quant.py tests/int4 >"$OUT/pytest_int4.log" 2>&1
    echo "pytest exit $?"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_int4.log" | head -20; tail -1 "$OUT/pytest_int4.log"
    grep -E "step 0:" "$OUT/pytest_int4.log" | head -4 | cut -c1-400
fi
if [[ $PARTS == *linear* ]]; then
    t "int4-linear"
    timeout "${LINEAR_S:-240}" python3 -m lowbit.bench.int4_linear --kernels none --time-budget "${LINEAR_BUDGET:-200}" \
        --shapes "${SHAPES:-16384,4096,4096;8192,1024,4096;16384,4096,11008}" \
        --methods "${METHODS:-bf16-eager,bf16-compiled,torchao-float8-compiled,ours-rtn,ours-hq,ours-hq-lss,ours-hq+tensor,ours-hq-lss+tensor}" \
        --json "$OUT/linear.json" >"$OUT/linear.log" 2>&1
    echo "exit $?"; sed -n '/^| M/,$p' "$OUT/linear.log" | head -30
fi
if [[ $PARTS == *train* ]]; then
    t "int4-train (reduce-overhead)"
    timeout "${TRAIN_S:-300}" python3 -m lowbit.cli bench int4-train --compile-mode reduce-overhead \
        --methods "${TRAIN_METHODS:-bf16,int4-hq,int4-hq-lss}" --json "$OUT/train_ro.json" >"$OUT/train_ro.log" 2>&1
    echo "exit $?"; grep -A6 "^method" "$OUT/train_ro.log"; grep -i -m5 "skipping cudagraphs\|error\|Traceback" "$OUT/train_ro.log"
fi
if [[ $PARTS == *eager* ]]; then
    t "int4-train (default compile mode: no CUDA graphs)"
    timeout "${EAGER_S:-200}" python3 -m lowbit.cli bench int4-train --methods "${EAGER_METHODS:-bf16,int4-hq}" \
        --json "$OUT/train_default.json" >"$OUT/train_default.log" 2>&1
    echo "exit $?"; grep -A4 "^method" "$OUT/train_default.log"
fi
t "done"
