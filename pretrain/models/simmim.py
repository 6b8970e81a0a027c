"""SimMIM: masked image modeling around an unmodified timm Swin / SwinV2 encoder.

After timm's patch embedding, the embeddings of masked tokens are replaced by a learned
mask token; the rest is timm's own stages and final norm. A 1x1 convolution to
stride^2 x 3 channels and a PixelShuffle(stride) turn the last feature map back into an
image (stride = total downsampling, 32 for the standard Swin). The encoder keeps timm's
parameter names under `encoder.`, so exporting it is a prefix strip.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import trunc_normal_


class SimMIM(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder  # a timm SwinTransformer(V2) without head
        self.patch_size = encoder.patch_embed.patch_size[0]
        self.stride = self.patch_size * 2 ** (len(encoder.layers) - 1)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, encoder.embed_dim))
        trunc_normal_(self.mask_token, std=0.02)
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, self.stride**2 * 3, kernel_size=1),
            nn.PixelShuffle(self.stride),
        )

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Reconstruct `images` (B, 3, H, W) from its unmasked part; `mask` is (B, H/patch, W/patch), 1 = masked."""
        x = with_mask_tokens(self.encoder.patch_embed(images), mask, self.mask_token)
        x = self.encoder.norm(self.encoder.layers(x))
        return self.decoder(x.permute(0, 3, 1, 2))

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"} | {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)


def with_mask_tokens(x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """Patch embeddings `x` (B, h, w, C), timm's NHWC layout, with masked tokens replaced by `mask_token`."""
    w = mask.unsqueeze(-1).to(x.dtype)
    return x * (1.0 - w) + mask_token.to(x.dtype) * w


def pixel_mask(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """A patch mask (B, h, w) blown up to pixels: (B, 1, h * patch_size, w * patch_size), float, 1 = masked."""
    return mask.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1).float()


def masked_l1(reconstruction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Mean absolute error over masked pixels only (all channels), in fp32."""
    pixels = pixel_mask(mask, patch_size)
    error = (reconstruction.float() - target.float()).abs() * pixels
    return error.sum() / (pixels.sum() * target.shape[1] + 1e-5)


def _patch_stats(images: torch.Tensor, patch: int):
    b, c, h, w = images.shape
    x = images.float().reshape(b, c, h // patch, patch, w // patch, patch)
    return x, x.mean(dim=(3, 5), keepdim=True), (x.var(dim=(3, 5), keepdim=True, unbiased=False) + 1e-6).sqrt()


def normalize_patches(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Each channel of each patch x patch square shifted to mean 0 and scaled to variance 1."""
    x, mean, std = _patch_stats(images, patch)
    return ((x - mean) / std).reshape(images.shape)


def denormalize_patches(normalized: torch.Tensor, images: torch.Tensor, patch: int) -> torch.Tensor:
    """Undo normalize_patches with the statistics of `images` (for pictures only)."""
    _, mean, std = _patch_stats(images, patch)
    x = normalized.float().reshape(mean.shape[0], mean.shape[1], mean.shape[2], patch, mean.shape[4], patch)
    return (x * std + mean).reshape(images.shape)
