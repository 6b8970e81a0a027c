"""sbatch scripts against a real Slurm cluster (CI starts one on loopback: .ci/slurm_up.sh)."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, cpu_env, metrics


def _cluster_up() -> bool:
    if not shutil.which("sbatch"):
        return False
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True)
    return proc.returncode == 0 and sum(s in ("idle", "mixed", "allocated") for s in proc.stdout.split()) >= 2


needs_slurm = pytest.mark.skipif(not _cluster_up(), reason="no Slurm cluster with 2 nodes (run .ci/slurm_up.sh)")


def job_state(job: str) -> dict[str, str]:
    text = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(1)
    pytest.fail(f"timed out waiting for {what}")


def cancel(job: str) -> None:
    """Stop `job` for good: the job body takes scancel's SIGTERM for a preemption and requeues
    the job, which a second scancel (of the pending job) ends."""
    subprocess.run(["scancel", job], check=False)
    deadline = time.time() + 60
    while time.time() < deadline and job_state(job).get("JobState") in ("RUNNING", "COMPLETING"):
        time.sleep(1)
    subprocess.run(["scancel", job], check=False)


CPUS_PER_TASK = 2  # not Slurm's default of 1, so that it shows whether the tasks got what the job asked


def submit(script: str, run_dir: Path, shards: Path, steps: int) -> str:
    """Our production sbatch script, shrunk to 2 CPU nodes x 1 task of CPUS_PER_TASK CPUs and the demo model/data."""
    sets = [f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}", "model.arch=swin_debug",
            "model.img_size=0", "model.window_size=0", "objective.num_classes=0", f"data.root={shards}",
            "data.workers=1", "batch.micro_batch=16", "batch.global_batch=32", f"schedule.total_steps={steps}",
            "schedule.warmup_steps=5", "checkpoint.every_steps=1000", "log.every_steps=5", "eval.every_steps=0"]
    cmd = ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", f"--cpus-per-task={CPUS_PER_TASK}",
           "--gpus-per-node=0", "--time=15", f"--output={run_dir.parent}/slurm-%j.out", script]
    cmd += [a for s in sets for a in ("--set", s)]
    out = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, check=True).stdout
    return out.strip().split(";")[0]


@needs_slurm
@pytest.mark.parametrize("target", ["tasks", "batch shell"])
def test_preempted_job_checkpoints_requeues_and_resumes(tmp_path, shards, target):
    run_dir = tmp_path / "run"
    job = submit("slurm/swin_l_22k.sh", run_dir, shards, steps=200)
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and len(metrics(run_dir)) >= 3, 240,
                 "the job to train a few steps")
        # Preemption: USR1 straight to the tasks, or to the batch shell (what --signal=B:USR1@180 does).
        flags = ["--batch"] if target == "batch shell" else []
        subprocess.run(["scancel", "--signal=USR1", *flags, job], check=True)
        wait_for(lambda: job_state(job).get("Restarts") == "1", 120, "the job to requeue itself")
        # Slurm holds a requeued job until its old job credential expires (about 2 minutes); forcing
        # an earlier start races with the credential's revocation, so the test waits it out.
        wait_for(lambda: job_state(job).get("JobState") == "COMPLETED", 420, "the requeued job to finish")
    finally:
        cancel(job)
    log = (run_dir.parent / f"slurm-{job}.out").read_text()
    stopped = int(re.search(r"stopped at step (\d+) on SIGUSR1", log).group(1))
    assert f"resumed from step {stopped}" in log and "requeueing job" in log
    steps = [m["step"] for m in metrics(run_dir) if "train/loss" in m]
    assert steps[-1] == 200 and steps == sorted(steps)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000200"
    assert (run_dir / "logs" / "rank1.log").is_file()
    # srun is handed the job's CPUs per task (Slurm 22.05-23.02 would start each task with
    # one), and the first task of each node reports what it got, in both runs of the job.
    assert log.count(f"srun --kill-on-bad-exit=1 --cpus-per-task={CPUS_PER_TASK}") == 2
    reported = re.findall(r"^rank (\d+) on \S+: (\d+) CPUs \(SLURM_CPUS_PER_TASK=(\S+)\)$", log, re.MULTILINE)
    assert sorted(rank for rank, _, _ in reported) == ["0", "0", "1", "1"], reported
    assert all(int(cpus) >= CPUS_PER_TASK and asked == str(CPUS_PER_TASK) for _, cpus, asked in reported), reported


@needs_slurm
def test_hostfile_inside_an_allocation(tmp_path):
    write = f"[ $SLURM_PROCID = 0 ] && {REPO / '.venv/bin/python'} -m launch.hostfile --slots 4 || true"
    out = subprocess.run(["srun", "--nodes=2", "--ntasks=2", "--gpus-per-node=0", "bash", "-c", write],
                         cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["node1 slots=4", "node2 slots=4"]
