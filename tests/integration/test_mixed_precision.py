"""Our bf16 optimizer (fp32 masters, ZeRO-0) in a real one-process run through the entry point."""

from __future__ import annotations

import pytest

from tests.helpers import metrics, train, train_losses


def test_one_process_without_zero_trains_like_deepspeeds_zero1(tmp_path, shards):
    """bf16 on one process: our masters (ZeRO-0, no gradient all-reduce) against DeepSpeed's (ZeRO-1)."""
    runs = {}
    for stage in (0, 1):
        runs[stage] = tmp_path / f"zero{stage}"
        train(runs[stage], shards, f"parallel.zero_stage={stage}", "precision=bf16", launcher="python", nproc=1)
    ours, deepspeed = train_losses(runs[0]), train_losses(runs[1])
    assert sorted(ours) == [1, 2, 3, 4]
    for step, loss in deepspeed.items():
        assert ours[step] == pytest.approx(loss, rel=1e-4), f"step {step}"
    norms = [{m["step"]: m["train/grad_norm"] for m in metrics(run) if "train/grad_norm" in m} for run in runs.values()]
    for step, norm in norms[1].items():
        assert norms[0][step] == pytest.approx(norm, rel=1e-4), f"grad norm at step {step}"
