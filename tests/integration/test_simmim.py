"""SimMIM through the real entry point: 2 ranks, ZeRO-2, then export (timm, transformers) and supervised
init from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import transformers
from safetensors.torch import load_file

from pretrain.models.simmim import SimMIM
from tests.helpers import metrics, run, train


@pytest.fixture(scope="module")
def simmim_run(exported_run) -> Path:
    """200 steps of demo_simmim.yaml at its own batch size (micro 32, global 64) on 2 ranks, exported."""
    return exported_run("simmim", "schedule.total_steps=200", "schedule.warmup_steps=20", "log.every_steps=10",
                        "log.images_every_steps=100", "batch.micro_batch=32", "batch.global_batch=64",
                        config="configs/demo_simmim.yaml")


def test_loss_falls_by_a_third(simmim_run):
    losses = [m["train/loss"] for m in metrics(simmim_run) if "train/loss" in m]
    assert len(losses) == 20
    assert losses[-1] <= 0.7 * losses[0], losses


def test_reconstruction_pictures_are_written(simmim_run):
    pictures = sorted(p.name for p in (simmim_run / "images").glob("*.png"))
    assert pictures == ["eval_reconstruction-00000100.png", "eval_reconstruction-00000200.png"]
    from PIL import Image

    with Image.open(simmim_run / "images" / pictures[-1]) as im:
        assert im.width > im.height / 8 * 3 * 0.9  # 8 rows of 3 tiles: input, masked, reconstruction
    assert "eval/loss" in metrics(simmim_run)[-1]


def test_export_is_the_encoder_only_and_loads_into_a_timm_classifier(simmim_run):
    export = simmim_run / "export"
    config = json.loads((export / "config.json").read_text())
    weights = load_file(export / "model.safetensors")
    assert config["num_classes"] == 0 and config["pretrain"]["objective"] == "simmim"
    assert not any(k.startswith(("mask_token", "decoder", "encoder.")) for k in weights)
    model = timm.create_model(config["architecture"], **{**config["model_args"], "num_classes": 10})
    result = model.load_state_dict(weights, strict=False)
    assert sorted(result.missing_keys) == ["head.fc.bias", "head.fc.weight"] and not result.unexpected_keys
    model = timm.create_model(f"local-dir:{export}", pretrained=True, num_classes=10)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_supervised_run_starts_from_the_simmim_backbone(simmim_run, shards, tmp_path):
    run_dir = tmp_path / "finetune"
    # Step 1 runs at warmup_lr = 0, so the weights after it are the initial weights.
    proc = train(run_dir, shards, f"run.init_from={simmim_run / 'export'}", "schedule.total_steps=2",
                 "optim.warmup_lr=0", "schedule.warmup_steps=1", "checkpoint.every_steps=1", "precision=fp32")
    assert f"initialized 61 backbone tensors from {simmim_run / 'export'}" in proc.stdout
    run(["python", "-m", "pretrain.export", "--run", str(run_dir), "--out", str(tmp_path / "export"),
         "--tag", "step00000001"])
    pretrained = load_file(simmim_run / "export" / "model.safetensors")
    finetuned = load_file(tmp_path / "export" / "model.safetensors")
    assert set(finetuned) - set(pretrained) == {"head.fc.weight", "head.fc.bias"}
    for name, value in pretrained.items():
        assert torch.equal(finetuned[name], value), name


def test_hf_export_reproduces_the_runs_reconstructions_and_headless_is_the_encoder(simmim_run, tmp_path):
    """A trained 2-rank ZeRO-2 bf16 run: the whole SimMIM model in transformers, and the encoder alone."""
    whole, headless = tmp_path / "whole", tmp_path / "headless"
    run(["python", "-m", "pretrain.export", "--run", str(simmim_run), "--out", str(whole), "--format", "hf"])
    run(["python", "-m", "pretrain.export", "--run", str(simmim_run), "--out", str(headless), "--format", "hf",
         "--headless"])
    assert json.loads((whole / "config.json").read_text())["architectures"] == ["SwinForMaskedImageModeling"]
    assert json.loads((headless / "config.json").read_text())["architectures"] == ["SwinModel"]
    encoder = load_file(headless / "model.safetensors")
    masked = load_file(whole / "model.safetensors")
    assert {f"swin.{k}" for k in encoder} | {"swin.embeddings.mask_token", "decoder.0.weight",
                                             "decoder.0.bias"} == set(masked)
    for name, value in encoder.items():
        assert torch.equal(masked[f"swin.{name}"], value), name

    # The reconstruction of the run's own SimMIM model, rebuilt from its timm export, mask token
    # and decoder (read back from the hf file), against transformers' on the same masked images.
    model = transformers.AutoModelForMaskedImageModeling.from_pretrained(whole).eval()
    encoder_timm = timm.create_model(f"local-dir:{simmim_run / 'export'}", pretrained=True).eval()
    ours = SimMIM(encoder_timm).eval()
    ours.mask_token.data = masked["swin.embeddings.mask_token"].reshape(1, 1, 1, -1)
    ours.decoder.load_state_dict({"0.weight": masked["decoder.0.weight"], "0.bias": masked["decoder.0.bias"]})
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    mask = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(4)) < 0.6
    with torch.no_grad():
        theirs = model(pixel_values=x, bool_masked_pos=mask.flatten(1)).reconstruction
        torch.testing.assert_close(theirs, ours(x, mask.float()), rtol=0, atol=1e-4)
