"""Pipeline and tensor parallelism: real runs (gloo, 2 and 4 processes) through pretrain/main.py.

A run's data depends only on its data-parallel layout, so every model-parallel layout is
compared with the plain run of the same data-parallel size: with the same seed and global
batch the losses, the evaluation and the exported weights must agree.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import BIN, REPO, final_eval, free_port, metrics, run, train, train_losses


# name -> (processes, overrides, the plain run it must match): the same fp32 run under each layout.
LAYOUTS = {
    "single": (1, [], None),
    "tensor2": (2, ["parallel.tensor_parallel=2"], "single"),
    "pipeline2": (2, ["parallel.pipeline_stages=2"], "single"),
    "pipeline2_tensor2": (4, ["parallel.pipeline_stages=2", "parallel.tensor_parallel=2"], "single"),
    "data2": (2, [], None),
    "data2_tensor2": (4, ["parallel.tensor_parallel=2"], "data2"),  # ZeRO-1 over the data groups
}
COMPARED = [name for name, (_, _, reference) in LAYOUTS.items() if reference]
# Random erasing draws from Python's `random` on the batch: tensor-parallel peers only match
# the plain run if every RNG is seeded per data-parallel rank.
COMMON = ["precision=fp32", "parallel.zero_stage=1", "model.drop_path=0", "batch.global_batch=32",
          "eval.every_steps=2", "augment.random_erasing=0.5"]


@pytest.fixture(scope="module")
def layout_runs(exported_run) -> dict[str, Path]:
    return {name: exported_run(name, *COMMON, *overrides, nproc=nproc, launcher="deepspeed" if nproc > 1 else "python")
            for name, (nproc, overrides, _) in LAYOUTS.items()}


@pytest.mark.parametrize("layout", COMPARED)
def test_loss_and_evaluation_match_the_plain_run(layout_runs, layout):
    plain = LAYOUTS[layout][2]
    reference = train_losses(layout_runs[plain])
    losses = train_losses(layout_runs[layout])
    assert sorted(losses) == [1, 2, 3, 4]
    for step, loss in reference.items():
        assert losses[step] == pytest.approx(loss, rel=1e-4), f"{layout} step {step}"
    evals = [m for m in metrics(layout_runs[layout]) if "eval/top1" in m]
    reference_evals = [m for m in metrics(layout_runs[plain]) if "eval/top1" in m]
    assert [m["step"] for m in evals] == [2, 4]  # mid-run evaluation, then training goes on
    for ours, theirs in zip(evals, reference_evals):
        assert ours["eval/samples"] == theirs["eval/samples"] == 179  # every sample once
        assert ours["eval/loss"] == pytest.approx(theirs["eval/loss"], rel=1e-4)
        assert ours["eval/top1"] == pytest.approx(theirs["eval/top1"], abs=1e-9)


@pytest.mark.parametrize("layout", COMPARED)
def test_exports_of_every_layout_hold_the_same_weights(layout_runs, layout):
    reference = load_file(layout_runs[LAYOUTS[layout][2]] / "export" / "model.safetensors")
    weights = load_file(layout_runs[layout] / "export" / "model.safetensors")
    assert weights.keys() == reference.keys()
    for name, tensor in reference.items():
        assert weights[name].shape == tensor.shape, name
        torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


def test_pipeline_checkpoint_resumes_on_more_gpus_and_refuses_another_split(tmp_path, shards):
    run_dir = tmp_path / "pipeline"
    common = [*COMMON, "parallel.pipeline_stages=2"]
    train(run_dir, shards, *common, "schedule.total_steps=2")
    before = final_eval(run_dir)
    # Twice the GPUs, two data-parallel pipelines: the checkpoint is converted to universal
    # form and loaded; with no step left the run only evaluates, showing the weights came back.
    out = train(run_dir, shards, *common, "schedule.total_steps=2", nproc=4).stdout
    assert "converting checkpoint step00000002 to universal form" in out and "resumed from step 2" in out
    after = final_eval(run_dir)
    assert after["eval/top1"] == before["eval/top1"]
    assert after["eval/loss"] == pytest.approx(before["eval/loss"], rel=1e-6)
    out = train(run_dir, shards, *common, "schedule.total_steps=4", nproc=4).stdout
    assert "resumed from step 2" in out and sorted(train_losses(run_dir))[-2:] == [3, 4]
    assert json.loads((run_dir / "checkpoints" / "step00000004" / "layout.json").read_text())["dp_world_size"] == 2
    # The split itself must stay: another pipeline or tensor degree is a config error.
    proc = train(run_dir, shards, *COMMON, "parallel.tensor_parallel=2", "schedule.total_steps=6", check=False)
    assert proc.returncode == 2
    assert "parallel.pipeline_stages=1: checkpoint" in proc.stdout + proc.stderr
    assert "was saved with pipeline_stages=2" in proc.stdout + proc.stderr


def test_simmim_swinv2_under_tensor_and_pipeline_parallelism(tmp_path, shards):
    """SwinV2 (continuous position bias, per-head logit scale) split by heads, and SimMIM cut
    into a pipeline, both in bf16, against one process."""
    runs = {}
    for name, nproc, overrides in [("single", 1, []), ("tensor2", 2, ["parallel.tensor_parallel=2"]),
                                   ("pipeline2", 2, ["parallel.pipeline_stages=2"])]:
        run_dir = tmp_path / name
        args = ["model.arch=swinv2_debug", "parallel.zero_stage=1", "batch.global_batch=32", *overrides]
        train(run_dir, shards, *args, config="configs/demo_simmim.yaml", nproc=nproc,
              launcher="deepspeed" if nproc > 1 else "python")
        runs[name] = run_dir
    reference = train_losses(runs["single"])
    for name in ("tensor2", "pipeline2"):
        for step, loss in train_losses(runs[name]).items():
            assert loss == pytest.approx(reference[step], rel=2e-2), f"{name} step {step}"
        assert final_eval_loss(runs[name]) == pytest.approx(final_eval_loss(runs["single"]), rel=2e-2)


def final_eval_loss(run_dir: Path) -> float:
    return [m for m in metrics(run_dir) if "eval/loss" in m][-1]["eval/loss"]


@pytest.mark.parametrize("arch", ["swin_debug", "swinv2_debug"])
def test_tensor_parallel_blocks_compute_the_same_function(arch):
    """Outputs and every gradient (shards put back together) of a 2-way split model equal the
    whole model's, in fp32; with DeepSpeed's partitioned activation checkpointing the
    gradients stay the same and each rank keeps less for the backward pass."""
    port = free_port()
    proc = run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port),
                str(REPO / "tests" / "integration" / "tensor_parallel_check.py"), arch])
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("max", "kept"))]
    assert len(lines) == 2 * 5, proc.stdout
    for line in lines:
        if line.startswith("max"):
            assert float(line.rsplit(" ", 1)[1]) < 1e-5, line
        else:
            whole, partitioned, inputs = (int(v) for v in re.findall(r"\d+", line))
            assert whole == inputs and partitioned <= 0.51 * inputs, line
