"""Backbone table, parameter groups, LR schedule and the supervised objective."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer_v2 import SwinTransformerV2

from pretrain.config import Config
from pretrain.models.backbones import BACKBONES, build_backbone, count_parameters
from pretrain.models.objectives import SupervisedObjective
from pretrain.train.optim import WarmupCosine, build_schedule, param_groups


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


def test_no_weight_decay_on_norms_biases_and_position_tables():
    for arch in ("swin_debug", "swinv2_b"):
        model = build_backbone(arch, num_classes=10, device="meta")
        groups, (decay, no_decay) = param_groups(model, 0.05)
        assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
        assert len(decay) + len(no_decay) == len(list(model.parameters()))
        assert all(not n.endswith(".bias") and "norm" not in n for n in decay)
        assert all("relative_position_bias_table" not in n and "cpb_mlp" not in n and "logit_scale" not in n
                   for n in decay)
        assert any(n.endswith("qkv.weight") for n in decay) and "head.fc.weight" in decay
    assert any("relative_position_bias_table" in n for n in param_groups(build_backbone("swin_debug", 10), 0.05)[1][1])


def test_lr_scaling_warmup_and_cosine():
    cfg = Config()
    cfg.batch.global_batch = 4096
    cfg.optim.base_lr, cfg.optim.min_lr, cfg.optim.warmup_lr = 1.25e-4, 1.25e-6, 1.25e-7
    cfg.schedule.total_steps, cfg.schedule.warmup_steps = 1000, 100
    s = build_schedule(cfg)
    assert s.peak == pytest.approx(1e-3)  # 1.25e-4 x 4096 / 512
    assert s.lr(0) == pytest.approx(1e-6)
    assert s.lr(50) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert s.lr(100) == pytest.approx(1e-3)
    assert s.lr(550) == pytest.approx((1e-3 + 1e-5) / 2)
    assert s.lr(1000) == pytest.approx(1e-5)
    after = [s.lr(i) for i in range(100, 1001)]
    assert all(a >= b for a, b in zip(after, after[1:]))


def test_schedule_depends_only_on_step():
    a = WarmupCosine(1.0, 0.0, 0.0, 10, 100)
    assert a.lr(37) == WarmupCosine(1.0, 0.0, 0.0, 10, 100).lr(37)


def test_soft_target_loss_matches_label_smoothed_cross_entropy():
    cfg = Config()
    cfg.objective.label_smoothing = 0.1
    obj = SupervisedObjective(cfg, num_classes=7)
    logits, labels = torch.randn(6, 7), torch.randint(0, 7, (6,))
    _, targets = obj.prepare(torch.zeros(6, 3, 8, 8), labels)
    assert torch.allclose(targets.sum(1), torch.ones(6))
    expected = F.cross_entropy(logits, labels, label_smoothing=0.1)
    assert obj.loss(logits, targets).item() == pytest.approx(expected.item(), rel=1e-5)


def test_mixup_and_cutmix_make_soft_targets():
    cfg = Config()
    cfg.objective.mixup, cfg.objective.cutmix = 0.8, 1.0
    obj = SupervisedObjective(cfg, num_classes=5)
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 5
    mixed, targets = obj.prepare(images.clone(), labels)
    assert mixed.shape == images.shape and not torch.equal(mixed, images)
    assert torch.allclose(targets.sum(1), torch.ones(8))
    assert (targets > 0.2).sum() > 8  # two classes carry weight in mixed rows


def test_eval_counts_top1_top5_and_padding():
    logits = torch.tensor([[9.0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 5, 9], [9.0, 0, 0, 0, 0, 0]])
    labels = torch.tensor([0, 4, 3])
    valid = torch.tensor([1.0, 1.0, 0.0])  # the last row is padding
    n, top1, top5, _ = SupervisedObjective.eval_counts(logits, labels, valid).tolist()
    assert (n, top1, top5) == (2, 1, 2)
