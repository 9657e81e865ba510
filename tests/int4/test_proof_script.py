"""scripts/int4_proof.py runs end to end on the CPU (a 3-step smoke test of the GPU proof driver)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "int4_proof.py"


def test_parse_spec():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import int4_proof
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert int4_proof.parse_spec("hq-lss:scale_mode=lsq,block_size=auto,lss_keep_ratio=0.25") == (
        "hq-lss",
        {"scale_mode": "lsq", "block_size": "auto", "lss_keep_ratio": 0.25},
    )
    assert int4_proof.int4_config("bf16", 0) is None
    assert int4_proof.int4_config("hq:block_size=64", 3).block_size == 64
    with pytest.raises(ValueError, match="recipe must be one of"):
        int4_proof.int4_config("int3", 0)


def test_smoke_run_on_cpu(tmp_path):
    out = tmp_path / "proof"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--out",
        str(out),
        "--model",
        "gpt-tiny",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--block-size",
        "32",
        "--eval-batches",
        "1",
        "--finetune-steps",
        "0",
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--parallel",
        "1",
        "--threads",
        "1",
        "--runs",
        "fp32;hq-lss",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    runs = {r["run"]: r for r in results["runs"]}
    assert set(runs) == {"fp32", "hq-lss"}
    assert all(r["steps"] == 3 and math.isfinite(r["val_loss"]) for r in runs.values())
    assert runs["hq-lss"]["converted_layers"] == 16 and runs["fp32"]["converted_layers"] is None
    assert runs["fp32"]["tokens"] == runs["hq-lss"]["tokens"] == 3 * 2 * 32
    assert (out / "loss_curves.png").stat().st_size > 0
    assert "| hq-lss |" in (out / "results.md").read_text()
