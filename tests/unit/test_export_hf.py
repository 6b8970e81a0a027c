"""The transformers format on tiny Swin and SwinV2 models (CPU, fp32): every key in place when
transformers loads it, and its outputs equal the timm model's (classifier, encoder, SimMIM)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from pretrain.export import hf_format
from pretrain.export.exported import Exported, ExportError
from pretrain.models.backbones import BACKBONES, build_backbone
from pretrain.models.simmim import SimMIM

ARCHS = ["swin_debug", "swinv2_debug"]
TOLERANCE = 1e-4


def exported_model(arch: str, num_classes: int, simmim: bool = False, seed: int = 0) -> Exported:
    torch.manual_seed(seed)
    model = build_backbone(arch, 0 if simmim else num_classes)
    whole = SimMIM(model).eval() if simmim else None
    with torch.no_grad():  # away from the init: biases, norms and scales all matter
        for p in (whole or model).parameters():
            p.add_(torch.randn_like(p) * 0.05)
    labels = ["n01440764", "n01443537", "7"][:num_classes] + [f"c{i}" for i in range(max(0, num_classes - 3))]
    return Exported(arch=arch, spec=BACKBONES[arch], img_size=32, window_size=4, objective="simmim" if simmim else
                    "supervised", model=model.eval(), simmim=whole, label_names=[] if simmim else labels,
                    mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, crop_pct=0.875, interpolation="bicubic",
                    facts={"step": 4, "label_map_version": "abc"})


def written_and_loaded(exported: Exported, out_dir, auto_class) -> torch.nn.Module:
    """Write the hf export, load it with a transformers Auto class; every key must be in place."""
    hf_format.write(exported, out_dir)
    model, info = auto_class.from_pretrained(out_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("arch", ARCHS)
def test_classifier_loads_with_every_key_and_gives_the_timm_logits(tmp_path, arch):
    exported = exported_model(arch, 10)
    model = written_and_loaded(exported, tmp_path, transformers.AutoModelForImageClassification)
    expected_class = {"swin_debug": transformers.SwinForImageClassification,
                      "swinv2_debug": transformers.Swinv2ForImageClassification}[arch]
    assert type(model) is expected_class
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, exported.model(x), rtol=0, atol=TOLERANCE)
    assert hf_format.verify(exported, tmp_path) <= TOLERANCE
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["id2label"]["0"] == "tench, Tinca tinca"  # readable names where timm knows the synset
    assert config["id2label"]["2"] == "7" and len(config["id2label"]) == 10
    assert config["window_size"] == 4 and config["depths"] == [2, 2] and config["image_size"] == 32


@pytest.mark.parametrize("arch", ARCHS)
def test_headless_is_the_bare_encoder_with_timms_pooled_features(tmp_path, arch):
    exported = exported_model(arch, 0)
    model = written_and_loaded(exported, tmp_path, transformers.AutoModel)
    assert type(model).__name__ == {"swin_debug": "SwinModel", "swinv2_debug": "Swinv2Model"}[arch]
    x = images()
    with torch.no_grad():
        pooled = exported.model.forward_head(exported.model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(model(pixel_values=x).pooler_output, pooled, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("arch", ARCHS)
def test_simmim_reconstructions_are_reproduced_in_transformers(tmp_path, arch):
    exported = exported_model(arch, 0, simmim=True)
    model = written_and_loaded(exported, tmp_path, transformers.AutoModelForMaskedImageModeling)
    x = images()
    mask = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(2)) < 0.6
    with torch.no_grad():
        ours = exported.simmim(x, mask.float())
        theirs = model(pixel_values=x, bool_masked_pos=mask.flatten(1)).reconstruction
    assert ours.shape == (3, 3, 32, 32)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=TOLERANCE)
    assert hf_format.verify(exported, tmp_path) <= TOLERANCE


def test_the_image_processor_is_the_runs_evaluation_preprocessing(tmp_path):
    exported = exported_model("swin_debug", 3)
    hf_format.write(exported, tmp_path)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    assert list(processor.image_mean) == pytest.approx(IMAGENET_DEFAULT_MEAN)
    assert list(processor.image_std) == pytest.approx(IMAGENET_DEFAULT_STD)
    assert processor.crop_pct == 0.875
    picture = (torch.rand(3, 40, 50, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8)
    pixels = processor(images=picture, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)


def test_a_wrong_weight_fails_verification(tmp_path):
    exported = exported_model("swinv2_debug", 4)
    hf_format.write(exported, tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["swinv2.encoder.layers.0.blocks.1.attention.self.logit_scale"] += 0.5
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match="differs from the trained model's"):
        hf_format.verify(exported, tmp_path)


def test_a_window_transformers_swin_cannot_hold_is_one_line(tmp_path):
    exported = exported_model("swin_debug", 2)
    exported.window_size = 8  # stage 1's map is 4x4: timm clamps, transformers' Swin would not
    with pytest.raises(ExportError, match="stage 1 of swin_debug at img_size 32 has a 4x4 feature map") as e:
        hf_format.write(exported, tmp_path)
    assert "\n" not in str(e.value)
