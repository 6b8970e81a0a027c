"""The step and scaling benchmarks run through `python -m pretrain.bench` (tiny sizes, no timing assertions)."""

from __future__ import annotations

import json
import sys

import pytest

from tests.helpers import run


def test_step_benchmark_interleaves_the_two_paths():
    out = run([sys.executable, "-m", "pretrain.bench", "step", "--arch", "swin_debug", "--micro-batch", "2",
               "--warmup", "1", "--steps", "2", "--peak-sizes", "256", "--json"]).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["gflop_per_image"] > 0 and result["peak_tflops"] > 0 and result["peak_size"] == 256
    assert (result["device"], result["steps"], result["warmup"]) == ("cpu", 2, 1)
    pairs = result["pairs"]
    assert len(pairs) == 2
    for pair in pairs:
        assert pair["ratio"] == pytest.approx(pair["reference_s"] / pair["ours_s"]) and pair["peak_tflops"] > 0
    low, median, high = result["ratio_min_median_max"]
    assert low <= median <= high and median == result["ratio"]
    assert low == pytest.approx(min(p["ratio"] for p in pairs)) and high == pytest.approx(max(p["ratio"] for p in pairs))
    for side in ("reference", "ours"):
        # No bound on MFU: a CPU without bf16 instructions runs a large bf16 matmul slower than the model's small ones.
        x = result[side]
        assert x["images_per_s"] == pytest.approx(2 / x["step_s"][1], rel=1e-2) and x["mfu"] > 0
        assert x["tflops"] == pytest.approx(result["gflop_per_image"] * x["images_per_s"] / 1e3)
        assert x["step_s"] == sorted(x["step_s"]) and x["mfu_min_median_max"] == sorted(x["mfu_min_median_max"])
        assert x["mfu"] == x["mfu_min_median_max"][1]
        assert x["mfu_datasheet"] is None and x["peak_allocated_gib"] is None  # CPU: no datasheet peak, no CUDA memory
    assert "MFU not reported" in result["datasheet_peak_source"]


def test_scaling_benchmark_runs():
    out = run([sys.executable, "-m", "pretrain.bench", "scaling", "--arch", "swin_debug", "--sizes", "32", "64",
               "--micro-batch", "2", "--warmup", "1", "--steps", "1", "--json"]).stdout
    rows = json.loads(out.strip().splitlines()[-1])
    assert [r["img_size"] for r in rows] == [32, 64] and rows[0]["time_ratio"] == rows[0]["flops_ratio"] == 1.0
    assert rows[1]["pixels_ratio"] == 4.0 and rows[1]["flops_ratio"] > 3  # same window: about linear in pixels
    assert all(r["s_per_image"] > 0 for r in rows)
