"""Run by test_model_parallel under torchrun (2 processes): a tensor-parallel Swin against the whole model.

Prints (rank 0, for both ranks) the largest difference of the outputs and of the gradients
(shards gathered and merged back) relative to the largest magnitude of each tensor, the same
for DeepSpeed's activation checkpointing with and without partitioning, and the bytes each
keeps for the backward pass.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pretrain.models.backbones import build_backbone  # noqa: E402
from pretrain.models.blocks import swin_blocks  # noqa: E402
from pretrain.parallel.activation_ckpt import (  # noqa: E402
    apply_activation_checkpointing,
    configure_deepspeed_checkpointing,
)
from pretrain.parallel.tensor import apply_tensor_parallel, merge, split_rule  # noqa: E402
from pretrain.parallel.topology import discover, init_distributed  # noqa: E402
from pretrain.train.optim import freeze  # noqa: E402


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def block_inputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    hooks = [b.register_forward_pre_hook(lambda _, args: seen.append(args[0])) for b in swin_blocks(model)]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return seen


def checkpoint_bytes(out: torch.Tensor) -> int:
    """Bytes DeepSpeed's checkpoint nodes in `out`'s autograd graph keep for the recompute."""
    total, seen, todo = 0, set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for t in getattr(node, "deepspeed_saved_tensors", ()):
            # A partitioned input keeps its part in `saved_data` and only a placeholder as data.
            for held in (t, getattr(t, "saved_data", None)):
                total += held.numel() * held.element_size() if torch.is_tensor(held) else 0
        todo.extend(next_node for next_node, _ in node.next_functions)
    return total


def main() -> None:
    topo = discover(tensor=2)
    init_distributed(topo)
    report: list[str] = []
    torch.manual_seed(0)
    whole = build_backbone(sys.argv[1], 10)
    split = copy.deepcopy(whole)
    assert apply_tensor_parallel(split, topo.tp_rank, topo.tensor)
    # A frozen part stays frozen when its layers are replaced by their shards (linear probe).
    probe = copy.deepcopy(whole)
    freeze(probe, ["patch_embed", "layers", "norm"])
    apply_tensor_parallel(probe, topo.tp_rank, topo.tensor)
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["head.fc.weight", "head.fc.bias"]

    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected, got = whole(x), split(x)
    report.append(f"max output difference {relative(got, expected):.3g}")
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
    report.append(f"max gradient difference {worst:.3g}")

    # Checkpointed blocks keep only their inputs (DeepSpeed's checkpointing); partitioned,
    # each rank of the tensor-parallel group keeps half of every one.
    kept = {}
    for partition in (False, True):
        model = copy.deepcopy(split)
        model.zero_grad()
        configure_deepspeed_checkpointing(partition, False, topo)
        apply_activation_checkpointing(model, "blocks", by_deepspeed=True)
        out = model(x)
        kept[partition] = checkpoint_bytes(out)
        out.square().sum().backward()
        grads = dict(split.named_parameters())
        worst = max(relative(p.grad, grads[n].grad) for n, p in model.named_parameters())
        report.append(f"max checkpointed gradient difference {worst:.3g}")
    inputs = sum(t.numel() for t in block_inputs(split, x)) * x.element_size()
    report.append(f"kept bytes whole {kept[False]} partitioned {kept[True]} block inputs {inputs}")
    reports: list = [None] * topo.world_size
    dist.all_gather_object(reports, report)
    if topo.rank == 0:  # one writer: lines of two processes would interleave
        print("\n".join(line for lines in reports for line in lines), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
