"""How much gradient precision bf16 accumulation and bf16 averaging lose, against fp64 sums.

A bf16 run produces one bf16 gradient per micro-batch. It is then summed over the
accumulation steps (DeepSpeed's default: in bf16, rounding after every addition) and
averaged over the data-parallel ranks (default: in bf16, a ring all-reduce rounds after
each of its N-1 additions). Numerically both are a running sum of n bf16 gradients in the
accumulator's dtype, measured here on real Swin gradients: n micro-batch gradients of one
model summed in bf16 and in fp32, each compared with the exact fp64 sum of the same bf16
gradients. Relative error = ||approximate - exact|| / ||exact|| over all parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.models.backbones import BACKBONES, build_backbone, resolve_geometry


def micro_batch_gradients(arch: str, count: int, micro: int, seed: int = 0) -> list[torch.Tensor]:
    """`count` flattened bf16 gradients of a bf16 `arch` classifier, one per random micro-batch."""
    torch.manual_seed(seed)
    model = build_backbone(arch, 100).to(torch.bfloat16).train()
    img, _ = resolve_geometry(BACKBONES[arch], 0, 0)
    grads = []
    for _ in range(count):
        x = torch.randn(micro, 3, img, img, dtype=torch.bfloat16)
        y = torch.randint(0, 100, (micro,))
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).float(), y).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]))
    return grads


def _relative_error(approximate: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approximate.double() - exact).norm() / exact.norm())


def running_sum(grads: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Sum as an accumulator of `dtype` does: rounding to `dtype` after every addition."""
    total = grads[0].to(dtype)
    for g in grads[1:]:
        total = total + g.to(dtype)
    return total


def bench_grad_dtypes(arch: str, micro: int, counts: list[int]) -> dict:
    """Relative error of summing n bf16 gradients in bf16 and in fp32, for each n in `counts`
    (n = accumulation steps, or data-parallel ranks averaging their gradients)."""
    grads = micro_batch_gradients(arch, max(counts), micro)
    rows = []
    for n in counts:
        exact = sum(g.double() for g in grads[:n])
        rows.append({"n": n, **{name: _relative_error(running_sum(grads[:n], dtype), exact)
                                for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))}})
    return {"arch": arch, "micro_batch": micro, "parameters": grads[0].numel(), "rows": rows}
