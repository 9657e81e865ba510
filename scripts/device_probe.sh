#!/usr/bin/env bash
# Kernel timings of issues 4, 6 and 7 in one device call (repository root; carry .whl for the peers).
#   bash scripts/device_probe.sh            -> $OUT/{onebit_probe.json,optim.json,bench_one.json,*.log}
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peers \
        .whl/*.whl && export PYTHONPATH=/tmp/peers
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
T0=$(date +%s)
echo "== onebit probe"
timeout "${ONEBIT_S:-230}" python3 scripts/onebit_kernel_probe.py --check-timeout 80 --budget 120 \
    >"$OUT/onebit_probe.log" 2>&1; echo "exit $? ($(($(date +%s) - T0)) s)"
grep -E "^checks|FAIL|copy" "$OUT/onebit_probe.log" | head -20
echo "== optim bench"
timeout "${OPTIM_S:-150}" python3 -m lowbit.cli bench optim --json "$OUT/optim.json" >"$OUT/optim.log" 2>&1
echo "exit $? ($(($(date +%s) - T0)) s)"; head -30 "$OUT/optim.log"
echo "== int4-linear bench"
ONE_BUDGET=${INT4_S:-170} OUT=$OUT timeout 230 bash scripts/bench_int4_device.sh one
echo "done ($(($(date +%s) - T0)) s)"
