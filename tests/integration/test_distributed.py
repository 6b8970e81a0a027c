"""Real multi-process runs (2 ranks, gloo, swin_debug) through the entry points users run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from pretrain.config import Config
from pretrain.evaluate import evaluate_export
from pretrain.models.backbones import build_backbone
from pretrain.train.optim import build_schedule
from tests.helpers import final_eval, metrics, run, train, train_losses

STAGES = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def stage_runs(exported_run) -> dict[int, Path]:
    """The same fp32 run (seed, data, global batch) under ZeRO 0, 1, 2 and 3, each exported."""
    return {stage: exported_run(f"zero{stage}", f"parallel.zero_stage={stage}", "precision=fp32") for stage in STAGES}


def test_loss_agrees_across_zero_stages(stage_runs):
    reference = train_losses(stage_runs[0])
    assert sorted(reference) == [1, 2, 3, 4]
    for stage in STAGES[1:]:
        losses = train_losses(stage_runs[stage])
        for step, loss in reference.items():
            assert losses[step] == pytest.approx(loss, rel=1e-4), f"ZeRO-{stage} step {step}"
    assert reference[4] < reference[1]


@pytest.mark.parametrize("stage", STAGES)
def test_export_loads_in_stock_timm(stage_runs, shards, stage):
    export = stage_runs[stage] / "export"
    config = json.loads((export / "config.json").read_text())
    weights = load_file(export / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert not any("relative_position_index" in k or "attn_mask" in k for k in weights)
    model = timm.create_model(config["architecture"], pretrained=False, **config["model_args"])
    model.load_state_dict(weights, strict=True)
    assert config["label_names"] == [str(d) for d in range(10)]
    assert config["pretrain"]["step"] == 4 and config["pretrain"]["arch"] == "swin_debug"
    # Stock timm on the export reproduces the trainer's own end-of-run evaluation.
    trainer_eval = final_eval(stage_runs[stage])
    timm_eval = evaluate_export(export, shards)
    assert timm_eval["samples"] == trainer_eval["eval/samples"] == 179
    assert timm_eval["top1"] == pytest.approx(trainer_eval["eval/top1"], abs=1e-9)
    assert timm_eval["top5"] == pytest.approx(trainer_eval["eval/top5"], abs=1e-9)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_export_logits_equal_the_trained_model(stage_runs, stage):
    """Without ZeRO-3 the model-states file holds the full fp32 module as trained."""
    run_dir = stage_runs[stage]
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    states = torch.load(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)
    trained = build_backbone("swin_debug", 10)
    trained.load_state_dict(states["module"], strict=True)
    exported = timm.create_model(f"local-dir:{run_dir / 'export'}", pretrained=True)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        diff = (exported.eval()(x) - trained.eval()(x)).abs().max().item()
    assert diff < 1e-5


def test_exports_of_all_stages_hold_the_same_weights(stage_runs):
    reference = load_file(stage_runs[0] / "export" / "model.safetensors")
    for stage in STAGES[1:]:
        weights = load_file(stage_runs[stage] / "export" / "model.safetensors")
        assert weights.keys() == reference.keys()
        for k in reference:
            assert torch.allclose(weights[k], reference[k], atol=1e-4), f"ZeRO-{stage} {k}"


def test_headless_export(stage_runs, tmp_path):
    run(["python", "-m", "pretrain.export", "--run", str(stage_runs[2]), "--out", str(tmp_path), "--headless"])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_classes"] == 0 and "label_names" not in config
    backbone = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    full = timm.create_model(f"local-dir:{stage_runs[2] / 'export'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(backbone(x), full.forward_head(full.forward_features(x), pre_logits=True), atol=1e-6)


def test_export_errors_are_one_line(tmp_path):
    proc = run(["python", "-m", "pretrain.export", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
               check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("export error: --run") and "Traceback" not in proc.stderr


def test_bf16_zero2_with_accumulation_logs_and_schedules(tmp_path, shards):
    run_dir = tmp_path / "bf16"
    proc = train(run_dir, shards, "batch.micro_batch=8", "batch.global_batch=32", "schedule.total_steps=6",
                 "schedule.warmup_steps=2", "log.every_steps=2")
    rows = [m for m in metrics(run_dir) if "train/loss" in m]
    assert [m["step"] for m in rows] == [2, 4, 6]
    cfg = Config()
    cfg.batch.global_batch, cfg.schedule.total_steps, cfg.schedule.warmup_steps = 32, 6, 2
    cfg.optim.base_lr, cfg.optim.min_lr, cfg.optim.warmup_lr = 8e-3, 8e-5, 8e-6
    schedule = build_schedule(cfg)
    for m in rows:
        assert m["train/lr"] == pytest.approx(schedule.lr(m["step"] - 1))
        assert math.isfinite(m["train/grad_norm"]) and m["train/grad_norm"] > 0
        assert m["train/images_per_s"] > 0 and m["train/samples_seen"] == 32 * m["step"]
    assert "eval/top1" in metrics(run_dir)[-1]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert "step 6/6" in proc.stdout and "eval top1" in proc.stdout
    assert (run_dir / "config.yaml").is_file()


def test_bf16_without_zero_exports_the_fp32_master_weights(tmp_path, shards):
    run_dir = tmp_path / "bf16z0"
    train(run_dir, shards, "parallel.zero_stage=0")
    run(["python", "-m", "pretrain.export", "--run", str(run_dir), "--out", str(tmp_path / "export")])
    exported = load_file(tmp_path / "export" / "model.safetensors")
    states = torch.load(run_dir / "checkpoints" / "step00000004" / "mp_rank_00_model_states.pt", weights_only=False)
    for name, bf16 in states["module"].items():
        assert bf16.dtype == torch.bfloat16
        assert torch.equal(exported[name].bfloat16(), bf16), name  # the bf16 weights are the rounded masters
    assert any(not torch.equal(exported[n], b.float()) for n, b in states["module"].items())

    # The masters and moments come back on resume (train/mixed_precision.py holds them).
    proc = train(run_dir, shards, "parallel.zero_stage=0", "schedule.total_steps=6")
    assert "resumed from step 4" in proc.stdout
    losses = train_losses(run_dir)
    assert sorted(losses)[-2:] == [5, 6] and all(math.isfinite(v) for v in losses.values())

    # Another precision keeps its masters elsewhere: a one-line error, not a failed load.
    proc = train(run_dir, shards, "parallel.zero_stage=0", "precision=fp32", "schedule.total_steps=8",
                 launcher="python", nproc=1, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"config error: precision=fp32: checkpoint {run_dir / 'checkpoints' / 'step00000006'} was saved with "
        "precision=bf16; resume with that value (or run.auto_resume=false)")


def test_rerun_resumes_from_the_latest_checkpoint(tmp_path, shards):
    run_dir = tmp_path / "resume"
    common = ["checkpoint.every_steps=5", "checkpoint.keep_last=2", "schedule.warmup_steps=2"]
    train(run_dir, shards, "schedule.total_steps=10", *common)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000010"
    proc = train(run_dir, shards, "schedule.total_steps=20", *common)
    assert "resumed from step 10" in proc.stdout
    steps = [m["step"] for m in metrics(run_dir) if "train/loss" in m]
    assert steps == list(range(1, 21))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000020"
    tags = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
    assert tags == ["step00000015", "step00000020"]
    resumed = [m for m in metrics(run_dir) if m.get("step") == 11 and "train/lr" in m][0]
    cfg = Config()
    cfg.batch.global_batch, cfg.schedule.total_steps, cfg.schedule.warmup_steps = 32, 20, 2
    cfg.optim.base_lr, cfg.optim.min_lr, cfg.optim.warmup_lr = 8e-3, 8e-5, 8e-6
    assert resumed["train/lr"] == pytest.approx(build_schedule(cfg).lr(10))
    assert resumed["train/samples_seen"] == 11 * 32


@pytest.mark.parametrize("launcher, nproc", [("torchrun", 2), ("python", 1)])
def test_other_launchers(tmp_path, shards, launcher, nproc):
    run_dir = tmp_path / launcher
    train(run_dir, shards, "schedule.total_steps=2", "parallel.zero_stage=1", launcher=launcher, nproc=nproc)
    assert sorted(train_losses(run_dir)) == [1, 2]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000002"
    assert final_eval(run_dir)["eval/samples"] == 179  # the whole val split, once, on 1 or 2 ranks


def test_uneven_shards_over_two_ranks_neither_hang_nor_miscount(tmp_path, shards):
    """3 training shards in passes over 2 ranks, 3 validation shards: ranks hold unequal amounts."""
    run_dir = tmp_path / "uneven"
    train(run_dir, shards, "data.train_urls=train-{000000..000002}.tar", "data.resampled=false",
          f"data.val_urls=[val-000000.tar, val-000001.tar, 'pipe:cat {shards}/val-000001.tar']",
          "schedule.total_steps=30", "eval.every_steps=10", "eval.micro_batch=16")
    evals = [m for m in metrics(run_dir) if "eval/top1" in m]
    assert [m["step"] for m in evals] == [10, 20, 30]
    assert all(m["eval/samples"] == 179 + 79 for m in evals)  # val-000001 counted twice: listed twice


@pytest.mark.parametrize("stage", [1, 3])
def test_universal_checkpoint_resumes_two_ranks_on_one(tmp_path, shards, stage):
    run_dir = tmp_path / f"zero{stage}"
    common = (f"parallel.zero_stage={stage}", "batch.global_batch=32", "schedule.total_steps=8")
    train(run_dir, shards, *common, nproc=2)
    before = final_eval(run_dir)
    assert json.loads((run_dir / "checkpoints" / "step00000008" / "layout.json").read_text()) == {
        "dp_world_size": 2, "zero_stage": stage, "pipeline_stages": 1, "tensor_parallel": 1, "precision": "bf16"}

    # One rank, same global batch: the step-8 checkpoint is converted once and loaded; with no step
    # left to take, the run only evaluates, which shows the weights came back exactly.
    out = train(run_dir, shards, *common, nproc=1).stdout
    assert "converting checkpoint step00000008 to universal form" in out and "resumed from step 8" in out
    after = final_eval(run_dir)
    assert after["eval/top1"] == before["eval/top1"] and after["eval/top5"] == before["eval/top5"]
    assert after["eval/loss"] == pytest.approx(before["eval/loss"], rel=1e-5)

    # The loss curve goes on from there: the schedule continues at step 9 and a new checkpoint of
    # the one-rank layout is written.
    out = train(run_dir, shards, *common[:2], "schedule.total_steps=12", nproc=1).stdout
    assert "converting" not in out and "resumed from step 8" in out
    losses = train_losses(run_dir)
    assert sorted(losses)[-4:] == [9, 10, 11, 12] and all(math.isfinite(v) for v in losses.values())
    assert json.loads((run_dir / "checkpoints" / "step00000012" / "layout.json").read_text()) == {
        "dp_world_size": 1, "zero_stage": stage, "pipeline_stages": 1, "tensor_parallel": 1, "precision": "bf16"}

    # ZeRO-0 checkpoints are not partitioned, so there is nothing to convert to or from.
    proc = train(run_dir, shards, "parallel.zero_stage=0", "batch.global_batch=32", "schedule.total_steps=16",
                 launcher="python", nproc=1, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"config error: parallel.zero_stage=0: checkpoint {run_dir / 'checkpoints' / 'step00000012'} was saved with "
        f"ZeRO stage {stage}")


def test_memory_options_and_a_frozen_stem_under_zero3(tmp_path, shards, exported_run):
    """Checkpointing and sequential attention change nothing in a real 2-rank ZeRO-3 run, and a
    frozen stem stays exactly as initialized while the rest trains."""
    common = ("parallel.zero_stage=3", "precision=fp32", "optim.frozen=[patch_embed]")
    plain = tmp_path / "plain"
    train(plain, shards, *common)
    memory = exported_run("memory", *common, "parallel.activation_checkpointing=blocks",
                          "parallel.sequential_attention=[0, 1]", "parallel.attention_chunk_windows=3")
    reference = train_losses(plain)
    for step, loss in train_losses(memory).items():
        assert loss == pytest.approx(reference[step], rel=1e-4), f"step {step}"

    trained = load_file(memory / "export" / "model.safetensors")
    torch.manual_seed(0)  # run.seed of the demo config: the initial weights every rank starts from
    initial = build_backbone("swin_debug", 10).state_dict()
    for name, value in trained.items():
        if name.startswith("patch_embed."):
            assert torch.equal(value, initial[name]), name
    assert not torch.equal(trained["layers.0.blocks.0.mlp.fc1.weight"], initial["layers.0.blocks.0.mlp.fc1.weight"])
