"""AdamW with the usual Swin parameter groups, and the per-step LR schedule.

- No weight decay on norms, biases (every tensor with fewer than 2 dims) and on the
  position tables the model lists in `no_weight_decay()` (relative position bias,
  absolute position embedding, SwinV2's logit scale and position-bias MLP).
- Learning rates in the config are given at global batch 512 and scaled linearly.
- Linear warmup from warmup_lr to the peak, then cosine decay to min_lr, per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from deepspeed.ops.adam import DeepSpeedCPUAdam

from pretrain.config import DTYPES, Config
from pretrain.parallel.topology import Topology
from pretrain.parallel.deepspeed_config import uses_fused_mixed_precision
from pretrain.train.mixed_precision import MixedPrecisionAdamW

LR_REFERENCE_BATCH = 512
NO_DECAY_KEYWORDS = ("relative_position_bias_table", "absolute_pos_embed", "logit_scale", "cpb_mlp")


def matches(name: str, prefixes: list[str]) -> bool:
    """Whether parameter `name` lies under one of the dotted `prefixes` (whole name components)."""
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def freeze(backbone: nn.Module, prefixes: list[str]) -> int:
    """Stop training the backbone parameters under one of `prefixes`; returns how many."""
    frozen = 0
    for name, p in backbone.named_parameters():
        if matches(name, prefixes):
            p.requires_grad_(False)
            frozen += 1
    return frozen


def param_groups(model: nn.Module, weight_decay: float) -> tuple[list[dict], list[list[str]]]:
    """Two AdamW groups (decay, no decay) and the parameter names of each, in order."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name in skip or any(k in name for k in NO_DECAY_KEYWORDS):
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return groups, [decay_names, no_decay_names]


def scaled_lr(lr: float, global_batch: int) -> float:
    return lr * global_batch / LR_REFERENCE_BATCH


@dataclass
class WarmupCosine:
    """Learning rate as a function of the optimizer step.

    The trainer sets the LR from this before every step. The schedule holds no state
    of its own, so a resumed run with a longer `total_steps` follows the new schedule.
    """

    peak: float
    start: float
    final: float
    warmup_steps: int
    total_steps: int

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start + (self.peak - self.start) * step / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.final + 0.5 * (self.peak - self.final) * (1.0 + math.cos(math.pi * progress))


def build_schedule(cfg: Config) -> WarmupCosine:
    g = cfg.batch.global_batch
    return WarmupCosine(
        peak=scaled_lr(cfg.optim.base_lr, g),
        start=scaled_lr(cfg.optim.warmup_lr, g),
        final=scaled_lr(cfg.optim.min_lr, g),
        warmup_steps=cfg.schedule.warmup_steps,
        total_steps=cfg.schedule.total_steps,
    )


def skip_update_if(optimizer: torch.optim.Optimizer, flag: torch.Tensor) -> None:
    """Make `optimizer`'s next step a no-op on the device when `flag` (a 1-element device tensor) is nonzero.

    torch's fused AdamW takes the flag as `found_inf` (as with a gradient scaler) and leaves
    weights, moments and step counts untouched; ours takes it as `skip_if`. No host read.
    """
    if isinstance(optimizer, MixedPrecisionAdamW):
        optimizer.skip_if = flag
    else:
        optimizer.found_inf = (flag.reshape(()) > 0).float()  # 0-dim, like the step counts


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def build_optimizer(cfg: Config, groups: list[dict], peak_lr: float, topo: Topology) -> torch.optim.Optimizer:
    """AdamW: DeepSpeed's CPU Adam when optimizer state is offloaded; for bf16 without ZeRO or
    model parallelism our fused mixed-precision AdamW; otherwise torch's fused AdamW (over the
    fp32 masters DeepSpeed keeps)."""
    o, p = cfg.optim, cfg.parallel
    if uses_fused_mixed_precision(cfg, topo):
        return MixedPrecisionAdamW(groups, lr=peak_lr, betas=tuple(o.betas), eps=o.eps, clip_grad=o.clip_grad,
                                   accumulate_fp32=p.grad_accum_dtype == "fp32", dp_size=topo.dp_size,
                                   comm_dtype=DTYPES[p.comm_dtype], bucket_size=p.bucket_size)
    if cfg.parallel.offload_optimizer:
        return DeepSpeedCPUAdam(groups, lr=peak_lr, betas=tuple(o.betas), eps=o.eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=peak_lr, betas=tuple(o.betas), eps=o.eps, fused=True)
