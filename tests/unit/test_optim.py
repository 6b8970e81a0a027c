"""Parameter groups (no weight decay on norms, biases and position tables) and the warmup + cosine
learning-rate schedule, scaled by the global batch and a function of the step alone."""

from __future__ import annotations

import pytest

from pretrain.config import Config
from pretrain.models.backbones import build_backbone
from pretrain.train.optim import WarmupCosine, build_schedule, param_groups


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
