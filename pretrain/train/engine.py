"""Model + objective + optimizer -> DeepSpeed engine, in the fixed order every run uses.

1. the objective builds the model (a timm Swin, or SimMIM around one), with identical
   initial weights on every rank;
2. optional initial weights from an export (`run.init_from`), frozen parameters;
3. `parallel/prepare.py`'s `prepare_model`: tensor parallelism, activation checkpointing,
   sequential attention, then the speed switches (attention kernel, compile);
4. pipeline parallelism: the model cut into this rank's pipeline stage;
5. AdamW parameter groups (of this stage's parameters), the LR schedule, and DeepSpeed
   ZeRO from our config, over the topology's data-parallel groups (bf16 without ZeRO or
   model parallelism: the module is cast here and the fp32 masters live in our fused
   optimizer, `train/mixed_precision.py`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import deepspeed
import numpy as np
import torch

from pretrain.config import Config
from pretrain.models.backbones import BACKBONES, load_backbone_weights, resolve_geometry
from pretrain.models.objectives import Objective, build_objective
from pretrain.models.speed import CompileSummary
from pretrain.parallel.deepspeed_config import deepspeed_config, uses_fused_mixed_precision
from pretrain.parallel.pipeline import build_pipeline
from pretrain.parallel.prepare import prepare_model
from pretrain.parallel.topology import Topology
from pretrain.train.optim import WarmupCosine, build_optimizer, build_schedule, freeze, param_groups


@dataclass
class Training:
    """Everything the trainer trains with: the engine, the objective, the schedule, and the model's facts."""

    engine: Any
    objective: Objective
    schedule: WarmupCosine
    param_group_names: list[list[str]]
    num_classes: int  # of the classification head (the dataset's, for SimMIM's FLOP count)
    img_size: int  # the model's input size (model.img_size resolved for the architecture)
    init_message: str = ""
    skip_target: Any = None  # the optimizer to hand the trainer's "skip this update" flag (train/optim.py)
    compile_summary: CompileSummary | None = None  # what speed.compile did, reported after the first step


def build_training(cfg: Config, topo: Topology, num_classes: int, load_universal: bool = False) -> Training:
    if topo.device.type == "cuda":
        # fp32 matmuls on the tensor cores as TF32 unless asked not to (torch's default is full fp32).
        torch.set_float32_matmul_precision("high" if cfg.speed.tf32 else "highest")
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    objective = build_objective(cfg, num_classes)
    model = objective.build_model()
    messages = []
    if cfg.run.init_from:
        loaded = load_backbone_weights(getattr(model, "encoder", model), cfg.run.init_from)
        messages.append(f"initialized {loaded} backbone tensors from {cfg.run.init_from}")
    freeze(getattr(model, "encoder", model), cfg.optim.frozen)
    p = cfg.parallel
    compile_summary = prepare_model(model, cfg, topo)
    groups, group_names = param_groups(model, cfg.optim.weight_decay)  # named as in the whole model
    module, mpu = model, topo.grid
    if topo.pipeline > 1:
        module, mpu = build_pipeline(model, objective, topo, p.pipeline_partition), None  # the module carries topo.grid
        bounds = module.bounds
        sizes = ", ".join(str(b - a) for a, b in zip(bounds, bounds[1:]))
        messages.append(f"pipeline: {bounds[-1]} layers over {topo.pipeline} stages ({sizes} layers, "
                        f"balanced by {p.pipeline_partition})")
        groups, group_names = _owned(groups, group_names, module)
    schedule = build_schedule(cfg)
    own_masters = uses_fused_mixed_precision(cfg, topo)
    if own_masters:
        model.to(torch.bfloat16)  # DeepSpeed sees a full-precision run; the optimizer keeps the fp32 masters
    # On the device before the optimizer exists: optimizers that copy the weights (our fp32
    # masters) must make those copies where the weights will be, not on the host.
    module.to(topo.device)
    optimizer = build_optimizer(cfg, groups, schedule.peak, topo)
    ds_config = deepspeed_config(cfg, topo, load_universal)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config, mpu=mpu)
    if own_masters or (topo.dp_size == 1 and p.zero_stage == 0 and topo.pipeline == 1):
        # Our optimizer averages its own fp32 gradients; with one data-parallel rank there is
        # nothing to average, and DeepSpeed would still copy every gradient through buckets.
        engine.enable_backward_allreduce = False
    seed_everything(cfg.run.seed * 1000 + topo.dp_rank)
    # ZeRO 1-3 skip a step whose gradient norm is not finite themselves (DeepSpeed's check);
    # without ZeRO the trainer flags it on our optimizer. Pipelines step inside DeepSpeed.
    skip_target = optimizer if p.zero_stage == 0 and topo.pipeline == 1 else None
    img_size, _ = resolve_geometry(BACKBONES[cfg.model.arch], cfg.model.img_size, cfg.model.window_size)
    return Training(engine, objective, schedule, group_names, num_classes, img_size, "\n".join(messages), skip_target,
                    compile_summary)


def seed_everything(seed: int) -> None:
    """Seed every RNG that shapes activations: torch (CPU and every GPU), numpy, Python's `random`.

    Per data-parallel rank: the ranks of one tensor-parallel group hold the same activations
    and must draw the same stochastic depth, random erasing (timm's uses `random`) and Mixup
    (timm's uses numpy).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _owned(groups: list[dict], names: list[list[str]], module: torch.nn.Module) -> tuple[list[dict], list[list[str]]]:
    """The parameter groups restricted to the parameters `module` (this pipeline stage) holds."""
    own = {id(p) for p in module.parameters()}
    kept_groups, kept_names = [], []
    for group, group_names in zip(groups, names):
        pairs = [(p, n) for p, n in zip(group["params"], group_names) if id(p) in own]
        kept_groups.append({**group, "params": [p for p, _ in pairs]})
        kept_names.append([n for _, n in pairs])
    return kept_groups, kept_names
