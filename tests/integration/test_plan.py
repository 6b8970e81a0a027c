"""The memory planner's figure against a real DeepSpeed training step on this machine."""

from __future__ import annotations

import re
import sys

import pytest

from tests.helpers import run


@pytest.mark.parametrize("config,sets", [
    ("configs/demo.yaml", ["parallel.zero_stage=1"]),
    ("configs/demo.yaml", ["parallel.zero_stage=3", "parallel.activation_checkpointing=blocks"]),
    ("configs/demo_simmim.yaml", ["model.img_size=192", "model.window_size=6"]),
])
def test_plan_matches_a_real_training_step(config, sets):
    """The whole per-rank figure against the DeepSpeed engine's own step on this machine."""
    common = ["model.arch=swin_t", "model.drop_path=0", "batch.micro_batch=2", "batch.global_batch=2", *sets]
    out = run([sys.executable, "-m", "pretrain.bench", "plan", "--config", config, "--gpu-mem-gb", "80",
               *[a for s in common for a in ("--set", s)]]).stdout
    ratio = float(re.search(r"plan / measured ([0-9.]+)", out).group(1))
    assert 0.75 <= ratio <= 1.25, out
