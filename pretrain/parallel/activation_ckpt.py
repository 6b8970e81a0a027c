"""Which Swin blocks recompute their activations in the backward pass.

A checkpointed block keeps only its input during the forward pass and runs again inside
the backward pass to rebuild what its gradients need. The block's `forward` is wrapped on
the instance, so module names and the state-dict layout stay exactly timm's.

Modes (`parallel.activation_checkpointing`):
- `none`: keep everything (fastest, most memory).
- `blocks`: every Swin block recomputes (least memory, about one extra forward).
- `every_k`: every k-th block recomputes (`parallel.checkpoint_every_k`), a point in between.

torch's non-reentrant checkpoint is used because it gives correct gradients when the block
input does not require grad (a frozen stem) and with ZeRO-3's parameter hooks, and it
restores the RNG state so drop-path draws the same masks when the block runs again.

Where the kept block inputs themselves are too large (high resolution, many micro-batches
in a pipeline), DeepSpeed's checkpointing keeps them elsewhere: `partition_activations`
splits each one over the tensor-parallel group (every rank holds 1/T and they are
gathered for the recompute) and `cpu_checkpointing` keeps them in host memory.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any, Callable

import deepspeed
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from pretrain.models.blocks import swin_blocks

def _recomputed(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    @functools.wraps(forward)
    def run(x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # eval: nothing to save, nothing to recompute
            return forward(x)
        return checkpoint(forward, x, use_reentrant=False)

    run.recompute_wrapper = _recomputed  # type: ignore[attr-defined]  # see models/blocks.py, set_block_forward
    return run


def _recomputed_by_deepspeed(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    @functools.wraps(forward)
    def run(x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return forward(x)
        if not x.requires_grad:  # DeepSpeed's (reentrant) checkpoint back-propagates only into inputs that need it
            x = x.detach().requires_grad_()
        return deepspeed.checkpointing.checkpoint(forward, x)

    run.recompute_wrapper = _recomputed_by_deepspeed  # type: ignore[attr-defined]
    return run


def apply_activation_checkpointing(model: nn.Module, mode: str, every_k: int = 1, by_deepspeed: bool = False,
                                   ) -> list[int]:
    """Make the chosen blocks of `model` recompute in backward; returns their indices.

    `by_deepspeed`: through DeepSpeed's checkpointing, as `configure_deepspeed_checkpointing` set it up.
    """
    blocks = swin_blocks(model)
    step = {"none": 0, "blocks": 1, "every_k": every_k}[mode]
    chosen = list(range(0, len(blocks), step)) if step else []
    wrap = _recomputed_by_deepspeed if by_deepspeed else _recomputed
    for i in chosen:
        blocks[i].forward = wrap(blocks[i].forward)
    return chosen


def configure_deepspeed_checkpointing(partition: bool, cpu: bool, topo: Any) -> None:
    """Where DeepSpeed's checkpointing keeps block inputs: split over `topo`'s tensor-parallel group, in CPU memory."""
    # DeepSpeed reads the tensor-parallel group under Megatron's method names.
    mpu = SimpleNamespace(
        get_tensor_model_parallel_rank=lambda: topo.tp_rank,
        get_tensor_model_parallel_world_size=lambda: topo.tensor,
        get_tensor_model_parallel_group=lambda: topo.grid.get_slice_parallel_group() if topo.grid else None,
    )
    deepspeed.checkpointing.configure(mpu, partition_activations=partition, checkpoint_in_cpu=cpu)
