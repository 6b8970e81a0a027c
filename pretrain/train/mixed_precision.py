"""bf16 weights with fp32 master weights, updated by one fused AdamW: plain data parallelism.

With ZeRO 1-3 or model parallelism DeepSpeed keeps the fp32 masters itself. Without ZeRO
it would wrap a client optimizer in its per-tensor ("unfused") mixed-precision optimizer,
which converts every gradient several times (overflow check, norm, update); on one
process that costs more than the forward pass of a small batch. For that layout the
masters live here instead and DeepSpeed treats the (already bf16) module as full
precision, with its own gradient all-reduce switched off. `step`

1. takes each parameter's gradient in fp32: accumulated over the micro-batches into the
   master's fp32 `.grad` by a hook as each bf16 gradient is produced (`accumulate_fp32`),
   or converted once from the bf16 `.grad`;
2. averages the gradients over the data-parallel group (in `comm_dtype`, in buckets of
   `bucket_size` elements), when there is more than one data-parallel rank;
3. takes the global norm in fp32 and clips to `clip_grad` (as torch's `clip_grad_norm_`);
4. runs torch's fused AdamW on the fp32 masters, which skips the update on the device when
   the norm is not finite or `skip_if` (the trainer's "a loss was not finite anywhere"
   flag) is set, leaving weights, moments and step counts as they were;
5. rounds the masters into the bf16 module weights.

Nothing here reads a value on the host: the norm and the skip decision stay on the
device (`global_grad_norm`, `skipped`), so the step never waits for the GPU to drain.
`overflow` stays False for DeepSpeed, whose own check would read it on the host; the
trainer counts skipped steps itself.

The state dict keeps the masters under `fp32_groups`, the key DeepSpeed's own
mixed-precision optimizers use, so exports read fp32 weights the same way.
"""

from __future__ import annotations

from typing import Any

import torch

from pretrain.parallel import comm


class MixedPrecisionAdamW(torch.optim.Optimizer):
    """AdamW over bf16 parameters, computed on fp32 master copies (see the module doc)."""

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float], eps: float, clip_grad: float,
                 accumulate_fp32: bool = True, dp_group: Any = None, dp_size: int = 1,
                 comm_dtype: torch.dtype = torch.float32, bucket_size: int = 50_000_000):
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0})
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.bfloat16:
                    raise ValueError(f"MixedPrecisionAdamW updates bf16 parameters; got one of {p.dtype}")
        # The masters are made where the parameters are: build this after the module is on its device.
        master_groups = [{**{k: v for k, v in group.items() if k != "params"},
                          "params": [p.detach().float() for p in group["params"]]} for group in self.param_groups]
        self.masters = torch.optim.AdamW(master_groups, lr=lr, betas=betas, eps=eps, fused=True)
        self.clip_grad = clip_grad
        self.dp_group, self.dp_size, self.comm_dtype, self.bucket_size = dp_group, dp_size, comm_dtype, bucket_size
        self.skip_if: torch.Tensor | None = None  # set by the trainer before each step: nonzero skips it
        self.skipped: torch.Tensor | None = None  # 1.0 on the device if the last step was skipped
        self.global_grad_norm: torch.Tensor | None = None
        self.overflow = False  # read by DeepSpeed after each step (see the module doc)
        self.accumulate_fp32 = accumulate_fp32
        if accumulate_fp32:
            for p, m in self._pairs():
                p.register_post_accumulate_grad_hook(self._accumulator(m))

    @property
    def _global_grad_norm(self) -> torch.Tensor | None:  # DeepSpeed's engine.get_global_grad_norm() reads this
        return self.global_grad_norm

    @staticmethod
    def _accumulator(master: torch.Tensor):
        def accumulate(p: torch.Tensor) -> None:
            if master.grad is None:
                master.grad = p.grad.float()
            else:
                master.grad.add_(p.grad)
            p.grad = None

        return accumulate

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
        for p, m in self._pairs():  # bf16 gradients the hooks did not take (or all, without accumulate_fp32)
            if p.grad is not None:
                m.grad = p.grad.float() if m.grad is None else m.grad.add_(p.grad)
                p.grad = None
        pairs = [(p, m) for p, m in self._pairs() if m.grad is not None]
        grads = [m.grad for _, m in pairs]
        if not grads:
            return
        if self.dp_size > 1:
            comm.average_(grads, self.dp_group, self.dp_size, self.comm_dtype, self.bucket_size)
        norm = torch.nn.utils.get_total_norm(grads)
        self.global_grad_norm = norm
        found_inf = (~torch.isfinite(norm)).float().reshape(())
        if self.skip_if is not None:
            found_inf = torch.maximum(found_inf, (self.skip_if.reshape(()) > 0).float().to(found_inf.device))
        if self.clip_grad > 0:
            # As torch's clip_grad_norm_: scale by max_norm / (norm + 1e-6) where that is below 1.
            torch._foreach_mul_(grads, (self.clip_grad / (norm + 1e-6)).clamp(max=1.0))
        self.masters.found_inf = found_inf  # fused AdamW leaves everything as it was when this is nonzero
        self.masters.step()
        self.skipped = found_inf
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
