"""bf16 weights with fp32 master weights, updated by one fused AdamW: plain data parallelism.

With ZeRO 1-3 or model parallelism DeepSpeed keeps the fp32 masters itself. Without ZeRO
it would wrap a client optimizer in its per-tensor ("unfused") mixed-precision optimizer,
which converts every gradient several times (overflow check, norm, update); on one
process that costs more than the forward pass of a small batch. For that layout the
masters live here instead and DeepSpeed treats the (already bf16) module as full
precision: it averages the bf16 gradients over the data-parallel ranks, as it would
anyway, and then calls `step`, which

1. converts each gradient to fp32 once,
2. takes the global norm in fp32; a non-finite norm skips the update (`overflow`, which
   DeepSpeed counts as a skipped step) and leaves weights and moments as they were,
3. clips to `clip_grad` (as torch's `clip_grad_norm_` does),
4. runs torch's fused AdamW on the fp32 masters, and
5. rounds the masters into the bf16 module weights.

The state dict keeps the masters under `fp32_groups`, the key DeepSpeed's own
mixed-precision optimizers use, so exports read fp32 weights the same way.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pretrain.config import Config
from pretrain.parallel.topology import Topology


def uses_fused_mixed_precision(cfg: Config, topo: Topology) -> bool:
    """Whether this run's fp32 masters live in `MixedPrecisionAdamW` rather than in DeepSpeed."""
    return (cfg.precision == "bf16" and cfg.parallel.zero_stage == 0 and topo.pipeline == 1
            and topo.tensor == 1)


class MixedPrecisionAdamW(torch.optim.Optimizer):
    """AdamW over bf16 parameters, computed on fp32 master copies (see the module doc)."""

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float], eps: float, clip_grad: float):
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0})
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.bfloat16:
                    raise ValueError(f"MixedPrecisionAdamW updates bf16 parameters; got one of {p.dtype}")
        master_groups = [{**{k: v for k, v in group.items() if k != "params"},
                          "params": [p.detach().float() for p in group["params"]]} for group in self.param_groups]
        self.masters = torch.optim.AdamW(master_groups, lr=lr, betas=betas, eps=eps, fused=True)
        self.clip_grad = clip_grad
        self.overflow = False  # read by DeepSpeed after each step
        self._global_grad_norm: float | None = None  # read by DeepSpeed (engine.get_global_grad_norm)

    def _pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(p, m) for group, masters in zip(self.param_groups, self.masters.param_groups)
                for p, m in zip(group["params"], masters["params"])]

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ValueError("MixedPrecisionAdamW.step takes no closure: run forward and backward before step()")
        for group, masters in zip(self.param_groups, self.masters.param_groups):
            for key in ("lr", "betas", "eps", "weight_decay"):  # the trainer sets the LR on this optimizer
                masters[key] = group[key]
        pairs = [(p, m) for p, m in self._pairs() if p.grad is not None]
        for p, m in pairs:
            m.grad = p.grad.float()
            p.grad = None
        grads = [m.grad for _, m in pairs]
        self._global_grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        self.overflow = not math.isfinite(self._global_grad_norm)
        if not self.overflow:
            # As torch's clip_grad_norm_: scale by max_norm / (norm + 1e-6) where that is below 1.
            clip = self.clip_grad / (self._global_grad_norm + 1e-6) if self.clip_grad > 0 else 1.0
            if clip < 1.0:
                for grad in grads:
                    grad.mul_(clip)
            self.masters.step()
            torch._foreach_copy_([p for p, _ in pairs], [m for _, m in pairs])
        for _, m in pairs:
            m.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self.masters.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"adamw": self.masters.state_dict(),
                "fp32_groups": [list(group["params"]) for group in self.masters.param_groups]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "adamw" not in state_dict:
            raise ValueError("this optimizer state was not saved by MixedPrecisionAdamW (bf16 without ZeRO); "
                             "resume with the precision and ZeRO stage the checkpoint was written with")
        saved_masters = [t for group in state_dict["fp32_groups"] for t in group]
        pairs = self._pairs()
        if len(saved_masters) != len(pairs):
            raise ValueError(f"the optimizer state holds {len(saved_masters)} fp32 master tensors, "
                             f"this model trains {len(pairs)}")
        with torch.no_grad():
            for (p, m), saved in zip(pairs, saved_masters):
                m.copy_(saved)
                p.copy_(saved)
        self.masters.load_state_dict(state_dict["adamw"])
