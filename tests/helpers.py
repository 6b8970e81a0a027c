"""What the test modules share: running the real entry points on CPU in subprocesses,
reading a run's metrics, small synthetic inputs, and a pickle payload that must never run."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from launch.env import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def cpu_env() -> dict[str, str]:
    env = dict(os.environ)
    env["DS_ACCELERATOR"] = "cpu"
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def run(cmd: list[str], timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command from the repository root on CPU; fail with its output if it fails."""
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                    f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def train(run_dir: Path, shards: Path, *overrides: str, launcher: str = "deepspeed", nproc: int = 2,
          check: bool = True, config: str = "configs/demo.yaml") -> subprocess.CompletedProcess:
    """Train with the demo config, tiny and short, through a real launcher."""
    sets = [
        f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}", f"data.root={shards}",
        "schedule.total_steps=4", "schedule.warmup_steps=1", "log.every_steps=1",
        "checkpoint.every_steps=100", "eval.every_steps=0", "data.workers=1", "batch.micro_batch=16",
        f"batch.global_batch={16 * nproc}",
        *overrides,
    ]
    args = ["pretrain/main.py", "--config", config] + [a for s in sets for a in ("--set", s)]
    port = free_port()
    if launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port)] + args
    elif launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(port)] + args
    else:
        cmd = [sys.executable] + args
    proc = run(cmd, check=check)
    # DeepSpeed's CPU backend leaves a ~70 MB /dev/shm segment per rank unless we remove it;
    # a suite of runs would otherwise fill the machine's memory.
    leaked = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not leaked, f"leaked shared memory: {leaked}"
    return proc


def plan(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The memory planner's command line, `python -m pretrain.plan`, with these arguments."""
    return run([sys.executable, "-m", "pretrain.plan", *args], check=check)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in metrics(run_dir) if "train/loss" in m}


def final_eval(run_dir: Path) -> dict:
    return [m for m in metrics(run_dir) if "eval/top1" in m][-1]


def photo(width: int, height: int, seed: int) -> bytes:
    """A JPEG of a real photograph (two to choose from) at the given size."""
    from sklearn.datasets import load_sample_image  # only the tests that need photos pay for sklearn

    im = Image.fromarray(load_sample_image("china.jpg" if seed % 2 else "flower.jpg")).resize((width, height))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class Payload:
    """Unpickling this runs a shell command that leaves `marker` behind."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)
