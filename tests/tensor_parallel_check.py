"""Run by test_model_parallel under torchrun (2 processes): a tensor-parallel Swin against the whole model.

Prints, per rank, the largest difference of the outputs and of the gradients (shards
gathered and merged back), relative to the largest magnitude of each tensor.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pretrain.models.backbones import build_backbone  # noqa: E402
from pretrain.parallel.tensor import apply_tensor_parallel, merge, split_rule  # noqa: E402
from pretrain.parallel.topology import discover, init_distributed  # noqa: E402


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def main() -> None:
    topo = discover(tensor=2)
    init_distributed(topo)
    torch.manual_seed(0)
    whole = build_backbone(sys.argv[1], 10)
    split = copy.deepcopy(whole)
    assert apply_tensor_parallel(split, topo.tp_rank, topo.tensor)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected, got = whole(x), split(x)
    print(f"max output difference {relative(got, expected):.3g}", flush=True)
    expected.square().sum().backward()
    got.square().sum().backward()
    whole_grads = dict(whole.named_parameters())
    worst = 0.0
    for name, p in split.named_parameters():
        grad = p.grad
        rule = split_rule(name)
        if rule is not None:
            parts = [torch.empty_like(grad) for _ in range(topo.tensor)]
            dist.all_gather(parts, grad.contiguous(), group=topo.grid.get_slice_parallel_group())
            grad = merge(parts, rule)
        worst = max(worst, relative(grad, whole_grads[name].grad))
    print(f"max gradient difference {worst:.3g}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
