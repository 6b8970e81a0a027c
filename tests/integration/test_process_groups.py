"""Process groups of a real 2-process pipeline run (gloo): how many, and their timeout."""

from __future__ import annotations

import re

from tests.helpers import BIN, REPO, free_port, run


def test_pipeline_run_builds_one_set_of_groups_all_with_the_runs_timeout():
    proc = run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                str(REPO / "tests" / "integration" / "process_groups_check.py")])
    reports = re.findall(r"^groups (\d) init (\d+) training (\d+) stock-pipeline (\d+) timeouts (\S+) "
                         r"device (\S+)$", proc.stdout, re.MULTILINE)
    assert sorted(r[0] for r in reports) == ["0", "1"], proc.stdout
    for rank, init, training, stock, timeouts, device in reports:
        # The default group plus DeepSpeed's grid: model (here every rank), data, pipe and tensor groups.
        assert int(init) == 5, f"rank {rank}"
        # Building the pipeline and the engine adds none; DeepSpeed's own PipelineModule, left
        # to itself, builds a second grid and a copy of the world group.
        assert int(training) == 0, f"rank {rank}"
        assert int(stock) == 5, f"rank {rank}"
        # Every group, also those created later by DeepSpeed, waits 4.5 minutes (torch's
        # default for groups made without a timeout would be 30 minutes under gloo).
        assert timeouts == "270", f"rank {rank}"
        assert device == "cpu", f"rank {rank}"  # gloo: collectives on the CPU
