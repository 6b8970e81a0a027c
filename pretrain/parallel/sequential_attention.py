"""Sequential window attention: attend a few windows at a time to cap peak memory.

At high resolution the early Swin stages hold thousands of windows per image, and the
attention scores of all of them (windows x heads x N x N) are the largest tensor of the
model. Here the window attention of the chosen stages runs over chunks of
`chunk_windows` windows of every image of the batch; under autograd every chunk is
checkpointed, so only one chunk's scores exist at a time in the forward and in the
backward pass. The arithmetic per window is unchanged, so the results equal timm's (up to
the summation order of matmul kernels on other shapes).

Chunks are cut along the windows of an image, not along the batch: the number of chunks
then depends only on the resolution, so every rank calls the attention layers equally
often whatever its batch size, which ZeRO-3 requires (each call gathers the layer's
weights collectively).
"""

from __future__ import annotations

import functools
import math
import re
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

STAGE_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.blocks\.\d+$")

Attention = Callable[..., torch.Tensor]


def _windows_per_image(block: nn.Module) -> int:
    """Windows of one image at the block's current input size (padded to whole windows)."""
    (h, w), (wh, ww) = block.input_resolution, block.window_size
    return math.ceil(h / wh) * math.ceil(w / ww)


def _chunked(attention: Attention, block: nn.Module, chunk_windows: int) -> Attention:
    @functools.wraps(attention)
    def run(x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        per_image = _windows_per_image(block)
        windows = x.view(-1, per_image, *x.shape[1:])  # (images, windows, tokens, channels)
        outputs = []
        for start in range(0, per_image, chunk_windows):
            end = min(start + chunk_windows, per_image)
            part = windows[:, start:end].reshape(-1, *x.shape[1:])
            part_mask = None if mask is None else mask[start:end]
            if torch.is_grad_enabled():
                out = checkpoint(attention, part, part_mask, use_reentrant=False)
            else:
                out = attention(part, part_mask)
            outputs.append(out.view(windows.shape[0], end - start, *out.shape[1:]))
        return torch.cat(outputs, dim=1).flatten(0, 1)

    return run


def apply_sequential_attention(model: nn.Module, stages: list[int], chunk_windows: int) -> list[str]:
    """Chunk the window attention of `stages` (0-based) of `model`; returns the modules changed."""
    changed = []
    for name, block in model.named_modules():
        found = STAGE_BLOCK.search(name)
        if found and int(found.group(1)) in stages:
            block.attn.forward = _chunked(block.attn.forward, block, chunk_windows)
            changed.append(f"{name}.attn")
    return changed
