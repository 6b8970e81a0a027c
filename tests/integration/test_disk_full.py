"""A disk that fills up during a save: one line and exit code 7 on every rank, resumable afterwards.

The run's checkpoint directory is a small tmpfs: the first checkpoint fits, the second does
not. (Only that directory: the run's log files stay on a disk with room, so what the test
reads is the save's own failure.)
"""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from pretrain.train.checkpoint import latest_tag
from tests.helpers import train

slow = pytest.mark.slow

EXIT_SAVE_FAILED = 7
# One swin_debug checkpoint (bf16, ZeRO-2) is about 2 MB, whatever the number of ranks.
DISK = "3m"


@contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def grow(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def assert_one_line_error(proc: subprocess.CompletedProcess, run_dir: Path) -> None:
    assert proc.returncode == EXIT_SAVE_FAILED, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "could not save checkpoint" in line]
    assert lines, proc.stderr[-3000:]
    assert lines[0].startswith(f"could not save checkpoint step00000002 in {run_dir / 'checkpoints'}: "
                               f"the disk is full (")
    assert " free there" in lines[0] and "step00000001 stays the latest checkpoint" in lines[0]
    assert "Traceback" not in proc.stderr and "inline_container" not in proc.stderr
    assert latest_tag(run_dir / "checkpoints") == "step00000001"


@slow
def test_a_full_disk_stops_one_rank_with_one_line_and_the_next_start_cleans_up(tmp_path, shards):
    run_dir = tmp_path / "run"
    with small_disk(run_dir / "checkpoints", DISK) as disk:
        args = ("schedule.total_steps=2", "checkpoint.every_steps=1", "checkpoint.keep_last=2")
        proc = train(run_dir, shards, *args, launcher="python", nproc=1, check=False)
        assert_one_line_error(proc, run_dir)
        assert (run_dir / "checkpoints" / "step00000002").is_dir()  # half-written

        grow(disk, "64m")
        proc = train(run_dir, shards, *args, launcher="python", nproc=1)
        assert f"removed checkpoint {run_dir / 'checkpoints' / 'step00000002'}: its save did not finish " \
               f"(step00000001 is the latest)" in proc.stdout
        assert "resumed from step 1" in proc.stdout
        assert latest_tag(run_dir / "checkpoints") == "step00000002"


@slow
def test_a_full_disk_stops_both_ranks_together(tmp_path, shards):
    run_dir = tmp_path / "run"
    with small_disk(run_dir / "checkpoints", DISK):
        proc = train(run_dir, shards, "schedule.total_steps=2", "checkpoint.every_steps=1",
                     "checkpoint.keep_last=2", check=False)
        assert_one_line_error(proc, run_dir)
        # Both ranks reached the agreement and left on their own (none was stopped by the launcher).
        for rank in (0, 1):
            assert "could not save checkpoint step00000002" in (run_dir / "logs" / f"rank{rank}.log").read_text()
