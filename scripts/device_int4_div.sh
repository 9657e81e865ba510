#!/usr/bin/env bash
# One device call: GPU tests of the quantizer kernels, then the per-kernel profile of this tree and of
# a previous quantizer (BASE), put in place of hadamard_quant.py; make it first (not kept in the repository):
#   git show e586db0:src/lowbit/kernels/hadamard_quant.py > scripts/_hq_before.py
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
if [[ ${TESTS:-1} == 1 ]]; then
timeout 200 python3 -m pytest -q -n 4 -m gpu -p no:cacheprovider tests/kernels/test_hadamard_quant.py \
    tests/kernels/test_int4_linear.py >"$OUT/pytest.log" 2>&1; echo "pytest exit $?"; tail -3 "$OUT/pytest.log"
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head
fi
KS=${KSHAPES:-16384x4096x4096,8192x1024x4096,8192x4096x1024}
timeout 150 python3 scripts/int4_profile.py --parts kernels --kshapes "$KS" --recipes ours-hq,ours-hq-lss \
    --wdtype "${WDTYPE:-bfloat16}" --out "$OUT/new" 2>&1 | grep -E "^(==|--|copy)|bit_split|hq_kernel" | head -60
cp src/lowbit/kernels/hadamard_quant.py /tmp/hq_new.py; cp scripts/_hq_before.py src/lowbit/kernels/hadamard_quant.py
timeout 150 python3 scripts/int4_profile.py --parts kernels --kshapes "$KS" --recipes ours-hq,ours-hq-lss \
    --wdtype "${WDTYPE:-bfloat16}" --out "$OUT/old" 2>&1 | grep -E "^(==|--|copy)|bit_split|hq_kernel" | head -60
# then (LINEAR=1) the per-layer benchmark on this tree: CUDA graphs, torchao beside (carry .whl_ao)
cp /tmp/hq_new.py src/lowbit/kernels/hadamard_quant.py
if [[ ${LINEAR:-0} == 1 ]]; then
    METHODS=${METHODS:-bf16-eager,bf16-compiled,torchao-float8-compiled,ours-rtn,ours-hq,ours-hq-lss} \
    SHAPES=${SHAPES:-16384,4096,4096;8192,1024,4096} LINEAR_BUDGET=${LINEAR_BUDGET:-150} \
        bash scripts/device_int4_round.sh linear
fi
