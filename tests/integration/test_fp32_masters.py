"""A bf16 checkpoint consolidates into the fp32 master weights its optimizer held, bit for bit: under
pipeline x tensor parallelism (4 processes) and under ZeRO-1 data parallelism (2 processes).

Each run goes through the real launcher with `fp32_masters_check.py`, which trains with
pretrain/main.py's own code and, after the final checkpoint, saves what every rank's live
optimizer holds (and the module's bf16 weights) next to the run. The tests then consolidate
that checkpoint with `consolidated_state_dict` and compare.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pretrain.config import load_config
from pretrain.parallel.tensor import shard, split_rule
from pretrain.train.checkpoint import CheckpointError, checkpoint_dir, latest_tag
from pretrain.train.consolidate import consolidated_state_dict, optim_states_file
from tests.helpers import BIN, REPO, free_port, run

CHECK = REPO / "tests" / "integration" / "fp32_masters_check.py"
# Two steps: the second (past the one warmup step) moves the masters off bf16's grid.
COMMON = ["precision=bf16", "parallel.zero_stage=1", "schedule.total_steps=2", "schedule.warmup_steps=1",
          "log.every_steps=1", "checkpoint.every_steps=100", "eval.every_steps=0", "data.workers=1",
          "batch.micro_batch=16", "batch.global_batch=32", "model.drop_path=0"]


def trained(run_dir: Path, shards: Path, nproc: int, *overrides: str) -> Path:
    """A demo run through the deepspeed launcher with the check script; returns run_dir."""
    sets = [f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}", f"data.root={shards}", *COMMON, *overrides]
    port = free_port()
    run([str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port), str(CHECK),
         "--config", "configs/demo.yaml", *[a for s in sets for a in ("--set", s)]])
    leaked = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not leaked, f"leaked shared memory: {leaked}"
    return run_dir


def consolidated(run_dir: Path, ckpt_dir: Path | None = None) -> dict[str, torch.Tensor]:
    ckpt_dir = ckpt_dir or checkpoint_dir(run_dir)
    return consolidated_state_dict(load_config(run_dir / "config.yaml"), ckpt_dir, latest_tag(ckpt_dir))


def live(run_dir: Path) -> list[dict]:
    """What each rank's optimizer and module held after the final checkpoint (fp32_masters_check.py)."""
    return [torch.load(path, weights_only=True) for path in sorted((run_dir / "masters").glob("rank*.pt"))]


def own_part(state: dict[str, torch.Tensor], name: str, rank: dict) -> torch.Tensor:
    """The consolidated tensor `name` as the rank held it: its tensor-parallel shard, or all of it."""
    rule = split_rule(name)
    return state[name] if rule is None else shard(state[name], rule, rank["tp_rank"], rank["tensor"])


def assert_export_is_the_masters(state: dict[str, torch.Tensor], ranks: list[dict]) -> None:
    """Every parameter's master on every rank equals the export bit for bit; the export is fp32 and is
    not the bf16 module weights (which are the masters rounded)."""
    assert state and all(t.dtype == torch.float32 for t in state.values())
    seen, moved_off_bf16 = set(), []
    for rank in ranks:
        assert rank["masters"].keys() == rank["weights"].keys()  # every parameter has its master
        for name, master in rank["masters"].items():
            ours = own_part(state, name, rank)
            assert ours.dtype == master.dtype == torch.float32, name
            assert torch.equal(ours, master), f"{name} (stage {rank['stage']}, tensor rank {rank['tp_rank']})"
            weight = rank["weights"][name]
            assert weight.dtype == torch.bfloat16 and torch.equal(ours.bfloat16(), weight), name
            if not torch.equal(ours, weight.float()):
                moved_off_bf16.append(name)
            seen.add(name)
    assert seen == state.keys()  # swin_debug's state dict holds parameters only: all of them compared
    assert moved_off_bf16, "the export equals the bf16 module weights: not the fp32 masters"


@pytest.fixture(scope="module")
def model_parallel_run(tmp_path_factory, shards) -> Path:
    return trained(tmp_path_factory.mktemp("masters") / "pipeline2_tensor2", shards, 4,
                   "parallel.pipeline_stages=2", "parallel.tensor_parallel=2")


def test_pipeline_and_tensor_parallel_export_is_the_optimizers_fp32_masters(model_parallel_run):
    ranks = live(model_parallel_run)
    grid = sorted((r["stage"], r["tp_rank"], r["dp_rank"]) for r in ranks)
    assert grid == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]
    assert_export_is_the_masters(consolidated(model_parallel_run), ranks)


def test_missing_or_broken_optimizer_file_is_one_line_naming_it(model_parallel_run, tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    shutil.copytree(checkpoint_dir(model_parallel_run), ckpt_dir)
    target = ckpt_dir / latest_tag(ckpt_dir) / optim_states_file(0, 3, "bf16")  # the last stage's second shard
    target.write_bytes(target.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as broken:
        consolidated(model_parallel_run, ckpt_dir)
    target.unlink()
    with pytest.raises(CheckpointError) as missing:
        consolidated(model_parallel_run, ckpt_dir)
    for error, why in ((broken, "cannot be read"), (missing, "is missing")):
        message = str(error.value)
        assert str(target) in message and why in message and "\n" not in message, message


def test_zero1_data_parallel_bf16_export_is_the_optimizers_fp32_masters(tmp_path, shards):
    """DeepSpeed's BF16_Optimizer writes ZeRO-1's files in a form its zero_to_fp32 refuses."""
    run_dir = trained(tmp_path / "data2", shards, 2)
    ranks = live(run_dir)
    assert sorted((r["stage"], r["tp_rank"], r["dp_rank"]) for r in ranks) == [(0, 0, 0), (0, 0, 1)]
    assert_export_is_the_masters(consolidated(run_dir), ranks)
