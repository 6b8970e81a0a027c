"""Analytic FLOPs of a Swin forward pass, and the MFU they imply.

Counted from the backbone's shapes: patch embedding, per block the qkv / attention /
projection / MLP matmuls (windowed attention: each token attends to window^2 tokens),
patch merging and the head. Norms, softmax and the position bias are left out (< 1%).
A multiply-add counts as 2 FLOPs; a training step costs 3x the forward (backward = 2x).
Swin-B at 224 px is 15.4 G multiply-adds, as published.
"""

from __future__ import annotations

import torch

from pretrain.models.backbones import BACKBONES, resolve_geometry

# Dense (not sparse) bf16 tensor-core peak, TFLOP/s, by the exact name torch.cuda.get_device_name()
# reports (the names of NVIDIA's driver list of supported GPUs). Figures from NVIDIA's datasheets,
# which mostly print the 2:4-sparse figure: the dense one is half of it. Any other name (a MIG
# slice's too) gets no peak, and MFU is not reported unless log.peak_tflops is set.
GPU_BF16_PEAK_TFLOPS: dict[str, float] = {
    # Hopper
    "NVIDIA H100 80GB HBM3": 989,  # H100 SXM5
    "NVIDIA H100 PCIe": 756,
    "NVIDIA H100 NVL": 835,
    "NVIDIA H200": 989,  # H200 SXM
    "NVIDIA H200 NVL": 835,
    "NVIDIA GH200 480GB": 989,
    "NVIDIA GH200 120GB": 989,
    "NVIDIA GH200 144G HBM3e": 989,
    "NVIDIA H800": 989,  # H800 SXM5
    "NVIDIA H800 PCIe": 756,
    "NVIDIA H20": 148,
    # Blackwell
    "NVIDIA B200": 2250,
    "NVIDIA B100": 1750,  # name as the others are formed; the driver list seen had no B100
    "NVIDIA GB200": 2500,  # per GPU, at GB200's 1.2 kW
    # Ampere
    "NVIDIA A100-SXM4-40GB": 312,
    "NVIDIA A100-SXM4-80GB": 312,
    "NVIDIA A100-PCIE-40GB": 312,
    "NVIDIA A100 80GB PCIe": 312,
    "NVIDIA A800-SXM4-40GB": 312,
    "NVIDIA A800-SXM4-80GB": 312,
    "NVIDIA A800 80GB PCIe": 312,
    "NVIDIA A10": 125,
    "NVIDIA A10G": 70,
    # Ada
    "NVIDIA L40S": 362,
    "NVIDIA L40": 181,
    "NVIDIA L4": 121,
}
NOT_REPORTED = "MFU not reported (set log.peak_tflops to the device's dense bf16 peak)"


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


def table_peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of the GPU named exactly `device_name`, in FLOP/s, or None if unknown."""
    tflops = GPU_BF16_PEAK_TFLOPS.get(device_name.strip())
    return None if tflops is None else tflops * 1e12


def peak_for(configured_tflops: float, device_name: str | None) -> tuple[float | None, str]:
    """The peak FLOP/s that MFU divides by, and one line saying where it came from.

    The configured peak wins; else the device table by exact name; else None (no MFU).
    `device_name` is None when no CUDA device is visible.
    """
    if configured_tflops < 0:
        raise ValueError(f"log.peak_tflops must be >= 0 (0 = look the device up), got {configured_tflops:g}")
    if configured_tflops > 0:
        return configured_tflops * 1e12, f"MFU peak {configured_tflops:g} TFLOP/s from log.peak_tflops"
    if device_name is None:
        return None, f"no CUDA device: {NOT_REPORTED}"
    peak = table_peak_flops(device_name)
    if peak is None:
        return None, f"unknown device {device_name!r}: {NOT_REPORTED}"
    return peak, (f"MFU peak {peak / 1e12:g} TFLOP/s dense bf16 for {device_name!r} "
                  f"(device table in pretrain/train/flops.py)")


def peak_flops_and_source(configured_tflops: float) -> tuple[float | None, str]:
    """`peak_for` this process's CUDA device (the current one), if any."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return peak_for(configured_tflops, name)


def device_peak_flops(configured_tflops: float = 0.0) -> float | None:
    """The configured peak, else the known bf16 peak of this GPU, else None (MFU not reported)."""
    return peak_flops_and_source(configured_tflops)[0]
