"""Analytic FLOPs of a Swin forward pass, and the MFU they imply.

Counted from the backbone's shapes: patch embedding, per block the qkv / attention /
projection / MLP matmuls (windowed attention: each token attends to window^2 tokens),
patch merging and the head. Norms, softmax and the position bias are left out (< 1%).
A multiply-add counts as 2 FLOPs; a training step costs 3x the forward (backward = 2x).
Swin-B at 224 px is 15.4 G multiply-adds, as published.
"""

from __future__ import annotations

from pretrain.models.backbones import BACKBONES, resolve_geometry

# Dense (not sparse) bf16 peak per device, FLOP/s, by a substring of the device name.
GPU_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12,
                 "B200": 2250e12, "A10G": 70e12}


def forward_macs(arch: str, img_size: int = 0, window_size: int = 0, num_classes: int = 0) -> int:
    """Multiply-adds of one image's forward pass through backbone `arch` (and a head)."""
    spec = BACKBONES[arch]
    img, window = resolve_geometry(spec, img_size, window_size)
    side = img // spec.patch_size
    dim = spec.embed_dim
    macs = side * side * 3 * spec.patch_size**2 * dim
    for stage, depth in enumerate(spec.depths):
        if stage > 0:
            side //= 2
            macs += side * side * (4 * dim) * (2 * dim)  # patch merging: 4C -> 2C
            dim *= 2
        tokens, win = side * side, min(window, side)
        qkv, attention, proj, mlp = 3 * dim * dim, 2 * win * win * dim, dim * dim, 2 * 4 * dim * dim
        macs += depth * tokens * (qkv + attention + proj + mlp)
    return macs + dim * num_classes


def train_flops_per_image(arch: str, img_size: int = 0, window_size: int = 0, num_classes: int = 0) -> float:
    return 3 * 2 * forward_macs(arch, img_size, window_size, num_classes)


def device_peak_flops(configured_tflops: float = 0.0) -> float | None:
    """The configured peak, else the known bf16 peak of this GPU, else None (MFU not reported)."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peak in GPU_BF16_PEAK.items():
            if key in name:
                return peak
    return None
