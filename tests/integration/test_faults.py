"""Crashes, corrupt checkpoints, non-finite losses, stalled data and out-of-memory in real runs never
lose work or show tracebacks."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from pretrain.train.checkpoint import latest_tag, problem_with
from tests.helpers import BIN, REPO, cpu_env, free_port, metrics, run


def training_command(run_dir: Path, shards: Path, *overrides: str) -> list[str]:
    sets = [f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}", f"data.root={shards}",
            "data.workers=1", "batch.micro_batch=16", "batch.global_batch=32", "schedule.warmup_steps=1",
            "log.every_steps=1", "eval.every_steps=0", "checkpoint.every_steps=2", "checkpoint.keep_last=2",
            *overrides]
    return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "pretrain/main.py",
            "--config", "configs/demo.yaml"] + [a for s in sets for a in ("--set", s)]


def rank_pids(run_dir: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"run.name={run_dir.name}.*--local_rank|--local_rank.*run.name={run_dir.name}"],
                         capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_kill_9_of_one_rank_always_resumes_from_a_complete_checkpoint(tmp_path, shards):
    rng = random.Random(0)
    for trial in range(10):
        run_dir = tmp_path / f"trial{trial}"
        proc = subprocess.Popen(training_command(run_dir, shards, "schedule.total_steps=400"), cwd=REPO,
                                env=cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Wait for training to start, then kill one rank at a random moment: checkpoints are written
        # every 2 steps, so many kills land inside a save.
        deadline = time.time() + 120
        while time.time() < deadline and not (run_dir / "metrics.jsonl").is_file():
            time.sleep(0.2)
        time.sleep(rng.uniform(0.0, 3.0))
        victims = rank_pids(run_dir)
        assert victims, "no rank processes found"
        os.kill(rng.choice(victims), signal.SIGKILL)
        proc.wait(timeout=120)
        ckpt_dir = run_dir / "checkpoints"
        tag = latest_tag(ckpt_dir) if ckpt_dir.is_dir() else None
        if tag is not None:
            assert problem_with(ckpt_dir / tag) is None, f"trial {trial}: latest {tag} is not complete"
        resumed_at = int(tag.removeprefix("step")) if tag else 0
        out = run(training_command(run_dir, shards, f"schedule.total_steps={resumed_at + 2}")).stdout
        if tag:
            assert f"resumed from step {resumed_at}" in out, f"trial {trial}"
        assert latest_tag(ckpt_dir) == f"step{resumed_at + 2:08d}"


def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(tmp_path, shards):
    run_dir = tmp_path / "corrupt"
    run(training_command(run_dir, shards, "schedule.total_steps=6"))
    states = next((run_dir / "checkpoints" / "step00000006").glob("*optim_states.pt"))
    states.write_bytes(states.read_bytes()[:100])  # truncated on disk
    proc = run(training_command(run_dir, shards, "schedule.total_steps=8"))
    assert "resumed from step 4" in proc.stdout
    assert "step00000006 is incomplete" in (run_dir / "logs" / "rank0.log").read_text()


def test_a_nan_batch_is_skipped_without_touching_the_weights(tmp_path, shards):
    run_dir = tmp_path / "nan"
    cmd = training_command(run_dir, shards, "schedule.total_steps=5", "checkpoint.every_steps=1",
                           "checkpoint.keep_last=10", "precision=fp32")
    proc = subprocess.run(cmd, cwd=REPO, env={**cpu_env(), "PRETRAIN_FAULT_NAN_STEPS": "3"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 3: non-finite loss, update skipped (1 in a row)" in proc.stdout
    for tag in ("step00000002", "step00000003"):
        run([sys.executable, "-m", "pretrain.export", "--run", str(run_dir), "--out", str(tmp_path / tag),
             "--tag", tag])
    before, after = (load_file(tmp_path / t / "model.safetensors") for t in ("step00000002", "step00000003"))
    assert all((before[k] == after[k]).all() for k in before)
    rows = {m["step"]: m for m in metrics(run_dir) if "train/loss" in m}
    assert rows[5]["train/skipped_steps"] == 1 and rows[4]["train/loss"] == rows[4]["train/loss"]  # finite again


def test_consecutive_non_finite_losses_stop_the_run_and_keep_the_checkpoint(tmp_path, shards):
    run_dir = tmp_path / "diverged"
    cmd = [sys.executable, "pretrain/main.py", "--config", "configs/demo.yaml"]
    for s in (f"run.output_dir={tmp_path}", "run.name=diverged", f"data.root={shards}", "data.workers=1",
              "batch.micro_batch=16", "batch.global_batch=16", "schedule.total_steps=20", "schedule.warmup_steps=1",
              "checkpoint.every_steps=2", "eval.every_steps=0", "run.max_bad_steps=3"):
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=REPO, env={**cpu_env(), "PRETRAIN_FAULT_NAN_STEPS": "5,6,7,8"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 4
    # Steps 5-7 are skipped (weights unchanged, so the step-6 save holds the step-4 weights); step 7 stops.
    assert "stopping: 3 consecutive steps had a non-finite loss (run.max_bad_steps); the last checkpoint " \
           "step00000006 is intact" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert latest_tag(run_dir / "checkpoints") == "step00000006"


def test_a_stalled_data_source_stops_every_rank_with_a_one_line_error(tmp_path, shards):
    """A pipe: source that sends nothing: both ranks stop after data.stall_timeout_s instead of hanging."""
    run_dir = tmp_path / "stalled"
    # exec + redirection: the orphaned sleep must not hold this test's stderr pipe open after the run.
    cmd = training_command(run_dir, shards, "schedule.total_steps=4",
                           'data.train_urls=["pipe:exec sleep 599 2>/dev/null"]', "data.stall_timeout_s=5")
    started = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    subprocess.run(["pkill", "-f", "^sleep 599$"])
    assert proc.returncode == 5, proc.stderr[-3000:]
    assert "training data, rank " in proc.stderr
    assert "no batch from the data workers in 5 s (a stalled source or a stuck worker; data.stall_timeout_s)" \
        in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.time() - started < 150  # start-up + 5 s; the source would block for 599 s
    assert not rank_pids(run_dir), "rank processes outlived the run"


OOM_AT_FIRST_STEP = """
import sys, torch
sys.path.insert(0, {repo!r})
from pretrain import main as entry
from pretrain.train.trainer import Trainer
def fit(self):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
Trainer.fit = fit
sys.exit(entry.main(sys.argv[1:]))
"""


def test_out_of_memory_is_one_line_with_the_layout_and_the_planner_command(tmp_path, shards):
    run_dir = tmp_path / "oom"
    cmd = training_command(run_dir, shards, "schedule.total_steps=4", "precision=fp32")
    cmd = [sys.executable, "-c", OOM_AT_FIRST_STEP.format(repo=str(REPO)), *cmd[cmd.index("pretrain/main.py") + 1:]]
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 6, proc.stderr[-3000:]
    line = [text for text in proc.stderr.splitlines() if text.startswith("out of GPU memory")]
    assert len(line) == 1, proc.stderr[-3000:]
    assert "on rank 0 at step 1: layout data 1 x pipeline 1 x tensor 1, ZeRO-2, batch.micro_batch=16, " \
           "precision=fp32, activation_checkpointing=none" in line[0]
    assert "`python -m pretrain.plan --config configs/demo.yaml --set " in line[0] and "--gpus 1" in line[0]
    assert "Traceback" not in proc.stderr
