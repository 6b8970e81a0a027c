"""The Swin blocks of a timm model: which modules they are, and how their forward is replaced.

Checkpointing (`parallel/activation_ckpt.py`), tensor parallelism (`parallel/tensor.py`) and
compile (`models/speed.py`) all act on the same unit, the Swin block, found here by class name
so that a module holding a Swin (SimMIM's, a pipeline stage) is searched the same way.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

V1_BLOCK, V2_BLOCK = "SwinTransformerBlock", "SwinTransformerV2Block"
SWIN_BLOCKS = (V1_BLOCK, V2_BLOCK)


def swin_blocks(model: nn.Module) -> list[nn.Module]:
    """Every Swin block of `model` (a timm Swin or a module holding one), in forward order."""
    return [m for m in model.modules() if type(m).__name__ in SWIN_BLOCKS]


def set_block_forward(block: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Make `forward` the block's computation, inside its recompute wrapper if it has one.

    A recompute wrapper (activation checkpointing) marks itself with a `recompute_wrapper`
    attribute naming the function that wraps; so a compiled forward installed after
    checkpointing is still what gets recomputed, and checkpointing applied later wraps it
    like any other forward.
    """
    wrap = getattr(block.__dict__.get("forward"), "recompute_wrapper", None)
    block.forward = wrap(forward) if wrap else forward
