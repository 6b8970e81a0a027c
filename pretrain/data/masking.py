"""SimMIM masks: random square patches of the input, at the model's token resolution.

The input (e.g. 192 px) is divided into mask patches (e.g. 32 px, a 6x6 grid); exactly
round(ratio x patches) of them are masked, chosen uniformly. The mask is returned at token
resolution (input / model patch, e.g. 48x48 for patch 4), where each mask patch covers
(mask_patch / model_patch)^2 tokens. Generated in the data workers, one per image.
"""

from __future__ import annotations

import math

import torch


class MaskGenerator:
    def __init__(self, input_size: int, mask_patch_size: int, model_patch_size: int, mask_ratio: float):
        if input_size % mask_patch_size or mask_patch_size % model_patch_size:
            raise ValueError(f"mask patch {mask_patch_size} must divide the input {input_size} and be a multiple "
                             f"of the model patch {model_patch_size}")
        self.grid = input_size // mask_patch_size
        self.scale = mask_patch_size // model_patch_size
        self.count = math.ceil(self.grid**2 * mask_ratio)

    def __call__(self) -> torch.Tensor:
        """A (tokens, tokens) uint8 mask, 1 = masked."""
        order = torch.randperm(self.grid**2)
        mask = torch.zeros(self.grid**2, dtype=torch.uint8)
        mask[order[: self.count]] = 1
        mask = mask.view(self.grid, self.grid)
        return mask.repeat_interleave(self.scale, 0).repeat_interleave(self.scale, 1)
