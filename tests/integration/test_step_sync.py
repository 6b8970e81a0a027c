"""The training step waits for nothing: no host read of a device value and one small
all-reduce per optimizer step, except at log steps (through the real entry point)."""

from __future__ import annotations

import json
import sys

from tests.helpers import REPO, run


def test_steps_between_log_lines_make_one_collective_and_no_host_read(tmp_path, shards):
    layout = ["precision=bf16", "parallel.zero_stage=0"]  # our optimizer: fp32 masters, device-side skip
    sets = [f"run.output_dir={tmp_path}", "run.name=sync", f"data.root={shards}", "schedule.total_steps=4",
            "schedule.warmup_steps=1", "log.every_steps=2", "eval.every_steps=0", "data.workers=1",
            "batch.micro_batch=8", "batch.global_batch=32", *layout]  # 4 micro-batches per step
    proc = run([sys.executable, str(REPO / "tests" / "integration" / "step_sync_check.py"), "--config", "configs/demo.yaml",
                *[a for s in sets for a in ("--set", s)]])
    steps = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    for s in steps:
        if s["log_step"]:
            continue
        assert len(s["collectives"]) == 1 and s["collectives"][0].startswith("pretrain/parallel/comm.py:"), s
        assert s["host_reads"] == [], s
    assert [s["log_step"] for s in steps] == [False, True, False, True]
