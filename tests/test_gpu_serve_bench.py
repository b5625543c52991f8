"""bench/gpu_serve.py: the byte floor it divides by the bandwidth (pinned to shared/GPU.md's
figures), the table it prints, and (slow) the whole run on the CPU with a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

import gpu_serve  # noqa: E402
import gpu_serve_probe as probe  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _meta_model(quantization: str):
    from native.model.config import ErnieConfig
    from native.model.ernie import ErnieForCausalLM

    raw = dict(probe.checkpoint_config(28, tiny=False), model_type="ernie4_5_moe", torch_dtype="bfloat16")
    with torch.device("meta"):
        return ErnieForCausalLM(ErnieConfig.from_dict(raw), dtype=torch.bfloat16, quantization=quantization)


@pytest.mark.parametrize(
    "quantization, floors",
    [("bf16", (1.65, 8.82, 11.55)), ("wint4", (0.67, 2.62, 3.82))],
)
def test_byte_floor_is_gpu_md_s(quantization, floors):
    """shared/GPU.md: bytes a decode step reads at 1K context over 4.1 TB/s, batch 1 / 16 / 64."""
    model = _meta_model(quantization)
    got = [
        (probe.weight_bytes(model, b) + probe.kv_bytes(model, b, 1024, torch.bfloat16)) / 4.1e9
        for b in (1, 16, 64)
    ]
    assert got == pytest.approx(floors, abs=0.01)


def test_table_rows_ratios_and_misses():
    point = {
        "ttft_ms": {"p50": 50.0, "p99": 80.0}, "tpot_ms": {"p50": 26.0, "p99": 30.0},
        "itl_ms": {"p50": 22.0, "p99": 40.0}, "output_throughput": 3000.0, "failed": 0, "run": 0,
    }  # fmt: skip
    data = {
        "runs": [{"device": "NVIDIA H200", "date": "d", "commit": "abc", "command": "python3 bench/gpu_serve.py"}],
        "points": {"L28/pd/wint4/1024x256/c64": point, "L8/mixed/bf16/1024x256/c1": dict(point, failed=2)},
        "steps": {"L28/wint4/b64/ctx1152": {"step_ms": 20.0, "floor_ms": 3.8, "hbm_gbps": 4100.0, "run": 0}},
        "hf": {},
    }
    text = gpu_serve.format_table(data)
    rows = [line for line in text.splitlines() if line.startswith("| 8") or line.startswith("| 28")]
    assert rows[0].startswith("| 8 | mixed | bf16 |")  # fewer layers first
    assert "3000 (2 failed)" in rows[0] and rows[0].count("| - |") >= 3  # no step, floor, HF
    cells = [c.strip() for c in rows[1].split("|")[1:-1]]
    assert cells[12:16] == ["20.00", "3.80", "1.10", "1.30"]  # ITL/step met, TPOT/step met (<= 1.3)
    assert "HBM read 4100 GB/s" in text


@pytest.mark.slow
def test_the_cpu_smoke_run_fills_the_table_and_resumes(tmp_path):
    cmd = [sys.executable, "bench/gpu_serve.py", "--tiny", "--device", "cpu", "--layers", "2", "--systems", "mixed",
           "--modes", "bf16", "--concurrency", "1", "--shapes", "32x8", "--hf-batches", "1",
           "--results", str(tmp_path / "r.json"), "--out-dir", str(tmp_path / "out"), "--ckpt-dir", str(tmp_path / "ck")]  # fmt: skip
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr[-2000:]
    row = next(line for line in first.stdout.splitlines() if line.startswith("| 2 (tiny) | mixed | bf16 | 32x8 | 1 |"))
    assert row.split("|")[13].strip() != "-" and row.split("|")[17].strip() != "-"  # step alone, transformers
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["points"]["L2-tiny/mixed/bf16/32x8/c1"]["completed"] == 8
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "up at" not in again.stderr  # nothing left to measure: no server
    assert not (tmp_path / "ck" / "gpu_serve.pids").exists()
