"""Sequential window attention: attend a few windows at a time to cap peak memory.

At high resolution the early Swin stages hold thousands of windows per image, and the
attention scores of all of them (windows x heads x N x N) are the largest tensor of the
model. Here the window attention of the chosen stages runs over chunks of `chunk_windows`
windows; under autograd every chunk is checkpointed, so only one chunk's scores exist at a
time in the forward and in the backward pass. The arithmetic per window is unchanged, so
the results equal timm's (up to the summation order of matmul kernels on other shapes).

Chunks never straddle two images: the shifted-window mask is indexed per window of an
image, and timm's attention expects a mask that covers the windows it is given.
"""

from __future__ import annotations

import functools
import re
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

ATTENTION_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.blocks\.\d+\.attn$")

Attention = Callable[..., torch.Tensor]


def _chunked(attention: Attention, chunk_windows: int) -> Attention:
    @functools.wraps(attention)
    def run(x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        windows_per_image = x.shape[0] if mask is None else mask.shape[0]
        outputs = []
        for image_start in range(0, x.shape[0], windows_per_image):
            for start in range(0, windows_per_image, chunk_windows):
                end = min(start + chunk_windows, windows_per_image)
                part = x[image_start + start:image_start + end]
                part_mask = None if mask is None else mask[start:end]
                if torch.is_grad_enabled():
                    outputs.append(checkpoint(attention, part, part_mask, use_reentrant=False))
                else:
                    outputs.append(attention(part, part_mask))
        return torch.cat(outputs)

    return run


def apply_sequential_attention(model: nn.Module, stages: list[int], chunk_windows: int) -> list[str]:
    """Chunk the window attention of `stages` (0-based) of `model`; returns the modules changed."""
    changed = []
    for name, module in model.named_modules():
        found = ATTENTION_NAME.search(name)
        if found and int(found.group(1)) in stages:
            module.forward = _chunked(module.forward, chunk_windows)
            changed.append(name)
    return changed
