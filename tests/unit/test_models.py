"""Backbone table, the supervised objective and the SimMIM objective."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer_v2 import SwinTransformerV2

from pretrain.config import Config
from pretrain.models.backbones import BACKBONES, build_backbone, count_parameters
from pretrain.data.shards import Batch
from pretrain.models.objectives import SimMIMObjective, SupervisedObjective


@pytest.mark.parametrize("arch, millions", [("swin_b", 86.7), ("swin_l", 195.0), ("swinv2_g", 2998.0)])
def test_parameter_counts_without_head(arch, millions):
    model = build_backbone(arch, num_classes=0, device="meta")
    assert round(count_parameters(model) / 1e6, 1 if millions < 1000 else 0) == millions


@pytest.mark.parametrize("arch", list(BACKBONES))
def test_every_backbone_is_a_stock_timm_class(arch):
    model = build_backbone(arch, num_classes=21841, device="meta")
    assert type(model) is (SwinTransformerV2 if BACKBONES[arch].is_v2 else SwinTransformer)
    assert model.head.fc.out_features == 21841


def test_swinv2_g_geometry():
    model = build_backbone("swinv2_g", num_classes=0, device="meta")
    assert [len(stage.blocks) for stage in model.layers] == [2, 2, 42, 4]
    assert model.embed_dim == 512 and model.num_features == 4096


def test_debug_backbone_runs():
    model = build_backbone("swin_debug", num_classes=10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_soft_target_loss_matches_label_smoothed_cross_entropy():
    cfg = Config()
    cfg.objective.label_smoothing = 0.1
    obj = SupervisedObjective(cfg, num_classes=7)
    logits, labels = torch.randn(6, 7), torch.randint(0, 7, (6,))
    _, targets = obj.prepare(torch.zeros(6, 3, 8, 8), Batch(torch.zeros(6), labels, 0), training=True)
    assert torch.allclose(targets.sum(1), torch.ones(6))
    expected = F.cross_entropy(logits, labels, label_smoothing=0.1)
    assert obj.loss(logits, targets).item() == pytest.approx(expected.item(), rel=1e-5)


def test_mixup_and_cutmix_make_soft_targets():
    import numpy as np

    np.random.seed(0)  # timm draws the mixing factor from numpy
    cfg = Config()
    cfg.objective.mixup, cfg.objective.cutmix = 0.8, 1.0
    obj = SupervisedObjective(cfg, num_classes=5)
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 5
    (mixed,), targets = obj.prepare(images.clone(), Batch(images, labels, 0), training=True)
    assert mixed.shape == images.shape and not torch.equal(mixed, images)
    assert torch.allclose(targets.sum(1), torch.ones(8))
    assert (targets > 0.2).sum() > 8  # two classes carry weight in mixed rows


def test_eval_counts_top1_top5_and_padding():
    logits = torch.tensor([[9.0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 5, 9], [9.0, 0, 0, 0, 0, 0]])
    labels = torch.tensor([0, 4, 3])
    valid = torch.tensor([1.0, 1.0, 0.0])  # the last row is padding
    sums = SupervisedObjective(Config(), 6).eval_sums(logits, labels, valid)
    assert sums.tolist()[:3] == [2, 1, 2]
    metrics = SupervisedObjective.eval_metrics(sums)
    assert metrics["eval/top1"] == 0.5 and metrics["eval/top5"] == 1.0 and metrics["eval/samples"] == 2


def test_mask_ratio_and_geometry():
    from pretrain.data.masking import MaskGenerator

    gen = MaskGenerator(input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6)
    masks = torch.stack([gen() for _ in range(50)])
    assert masks.shape == (50, 48, 48) and masks.dtype == torch.uint8
    assert torch.all(masks.float().mean(dim=(1, 2)) == 22 / 36)  # ceil(0.6 x 36) of the 6x6 mask patches
    blocks = masks.view(50, 6, 8, 6, 8).float()
    assert torch.all(blocks.amax(dim=(2, 4)) == blocks.amin(dim=(2, 4))), "each 32px patch is masked whole"
    assert not torch.equal(masks[0], masks[1])


def simmim_cfg(norm_target: bool = False) -> Config:
    cfg = Config()
    cfg.objective.kind, cfg.objective.mask_patch_size, cfg.objective.norm_target = "simmim", 8, norm_target
    return cfg


def test_simmim_model_shapes_and_no_decay():
    from pretrain.train.optim import param_groups

    obj = SimMIMObjective(simmim_cfg(), 0)
    model = obj.build_model()
    images, masks = torch.randn(2, 3, 32, 32), torch.zeros(2, 8, 8, dtype=torch.uint8)
    assert model(images, masks).shape == (2, 3, 32, 32)
    _, (decay, no_decay) = param_groups(model, 0.05)
    assert "mask_token" in no_decay and "decoder.0.weight" in decay
    assert any("relative_position_bias_table" in n for n in no_decay)
    v2 = SimMIMObjective(simmim_cfg(), 0)
    v2.cfg.model.arch, v2.cfg.model.img_size, v2.cfg.model.window_size = "swinv2_b", 64, 4
    _, (decay, no_decay) = param_groups(v2.build_model(), 0.05)
    assert any("cpb_mlp" in n for n in no_decay) and any("logit_scale" in n for n in no_decay)
    assert not any("cpb_mlp" in n or "logit_scale" in n for n in decay)


def test_mask_token_replaces_only_masked_tokens():
    obj = SimMIMObjective(simmim_cfg(), 0)
    model = obj.build_model().eval()
    images = torch.randn(1, 3, 32, 32)
    masks = torch.zeros(1, 8, 8, dtype=torch.uint8)
    masks[0, :4, :4] = 1
    with torch.no_grad():
        model.mask_token.fill_(123.0)
        embedded = model.encoder.patch_embed(images)
        w = masks.unsqueeze(-1).float()
        expected = embedded * (1 - w) + 123.0 * w
        seen = {}
        hook = model.encoder.layers.register_forward_pre_hook(lambda m, i: seen.update(x=i[0]))
        model(images, masks)
        hook.remove()
    assert torch.equal(seen["x"], expected)


@pytest.mark.parametrize("norm_target", [False, True])
def test_loss_counts_masked_pixels_only(norm_target):
    obj = SimMIMObjective(simmim_cfg(norm_target), 0)
    images = torch.randn(2, 3, 32, 32)
    masks = (torch.rand(2, 8, 8) < 0.5).to(torch.uint8)
    (_, _), (target, m) = obj.prepare(images, Batch(images, torch.zeros(2), 0, masks), training=True)
    pixel_mask = masks.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).float()
    wrong_outside = target + (1 - pixel_mask) * torch.randn_like(target) * 10
    assert obj.loss(wrong_outside, (target, m)).item() == 0.0
    wrong_inside = target + pixel_mask * 0.5
    assert obj.loss(wrong_inside, (target, m)).item() == pytest.approx(0.5, rel=1e-4)  # mean over masked area


def test_simmim_backbone_state_is_the_timm_encoder():
    obj = SimMIMObjective(simmim_cfg(), 0)
    state = SimMIMObjective.backbone_state(obj.build_model().state_dict())
    assert not any(k.startswith(("mask_token", "decoder")) for k in state)
    build_backbone("swin_debug", 0).load_state_dict(state, strict=True)
