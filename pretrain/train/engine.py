"""Model + objective + optimizer -> DeepSpeed engine, in the fixed order every run uses.

1. the objective builds the model (a timm Swin, or SimMIM around one), with identical
   initial weights on every rank;
2. optional initial weights from an export (`run.init_from`), frozen parameters;
3. activation checkpointing and sequential attention (memory), then the speed switches
   (attention kernel, compile);
4. AdamW parameter groups, the LR schedule, and DeepSpeed ZeRO from our config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pretrain.config import Config
from pretrain.models.backbones import load_backbone_weights
from pretrain.models.objectives import build_objective
from pretrain.models.speed import apply_speedups
from pretrain.parallel.activation_ckpt import apply_activation_checkpointing
from pretrain.parallel.deepspeed_config import deepspeed_config
from pretrain.parallel.sequential_attention import apply_sequential_attention
from pretrain.parallel.topology import Topology
from pretrain.train.optim import WarmupCosine, build_optimizer, build_schedule, freeze, param_groups


@dataclass
class Training:
    engine: Any
    objective: Any
    schedule: WarmupCosine
    param_group_names: list[list[str]]
    init_message: str = ""


def build_training(cfg: Config, topo: Topology, num_classes: int, load_universal: bool = False) -> Training:
    import deepspeed

    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    objective = build_objective(cfg, num_classes)
    model = objective.build_model()
    message = ""
    if cfg.run.init_from:
        loaded = load_backbone_weights(getattr(model, "encoder", model), cfg.run.init_from)
        message = f"initialized {loaded} backbone tensors from {cfg.run.init_from}"
    freeze(getattr(model, "encoder", model), cfg.optim.frozen)
    apply_activation_checkpointing(model, cfg.parallel.activation_checkpointing, cfg.parallel.checkpoint_every_k)
    apply_sequential_attention(model, cfg.parallel.sequential_attention, cfg.parallel.attention_chunk_windows)
    apply_speedups(model, cfg.speed.sdpa_attention, cfg.speed.compile)
    groups, group_names = param_groups(model, cfg.optim.weight_decay)
    schedule = build_schedule(cfg)
    optimizer = build_optimizer(cfg, groups, schedule.peak)
    ds_config = deepspeed_config(cfg, topo, load_universal)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    torch.manual_seed(cfg.run.seed * 1000 + topo.rank)  # per-rank stochastic depth, Mixup, ...
    return Training(engine, objective, schedule, group_names, message)
