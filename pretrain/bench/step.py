"""Training step throughput and MFU: our DeepSpeed engine vs stock timm + AdamW + autocast."""

from __future__ import annotations

import statistics
import time

import torch


def matmul_peak(sizes: tuple[int, ...] = (4096, 6144), device: str = "cpu", repeats: int = 3) -> float:
    """Best dense bf16 matmul FLOP/s over square sizes `sizes`."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        a @ b  # warm-up
        for _ in range(repeats):
            _sync(device)
            t = time.perf_counter()
            a @ b
            _sync(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(step, warmup: int, steps: int, device: str) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
    return times


def _reference_step(arch: str, micro: int, img: int, window: int, device: str):
    """Stock timm + torch AdamW defaults + bf16 autocast."""
    import timm
    import torch.nn.functional as F

    from pretrain.models.backbones import BACKBONES, model_args

    spec = BACKBONES[arch]
    model = timm.create_model(spec.timm_name, pretrained=False, num_classes=1000,
                              **model_args(spec, img, window)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    x = torch.randn(micro, 3, img, img, device=device)
    y = torch.randint(0, 1000, (micro,), device=device)

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def training_step(cfg, num_classes: int):
    """One training step of this pipeline's engine for `cfg` on a fixed synthetic batch.

    Starts the process group if need be (one process: launch/env.py fills in the variables).
    Returns the step as a closure; supervised and SimMIM alike.
    """
    import torch.distributed as dist

    from pretrain.data.shards import Batch
    from pretrain.parallel.topology import discover, init_distributed
    from pretrain.train.engine import build_training
    from pretrain.train.trainer import DTYPES

    topo = discover()
    if not dist.is_initialized():
        init_distributed(topo)
    training = build_training(cfg, topo, num_classes)
    engine, objective = training.engine, training.objective
    encoder = getattr(engine.module, "encoder", engine.module)
    img, patch = encoder.patch_embed.img_size[0], encoder.patch_embed.patch_size[0]
    micro = cfg.batch.micro_batch
    images = torch.randn(micro, 3, img, img, device=engine.device)
    masks = torch.randint(0, 2, (micro, img // patch, img // patch), dtype=torch.uint8)
    batch = Batch(images, torch.randint(0, max(num_classes, 1), (micro,)), 0, masks)

    def step():
        inputs, targets = objective.prepare(images, batch, training=True)
        loss = objective.loss(engine(inputs[0].to(DTYPES[cfg.precision]), *inputs[1:]), targets)
        engine.backward(loss)
        engine.step()

    return step


def _engine_step(arch: str, micro: int, img: int, window: int, sdpa: bool, compile_blocks: bool, zero_stage: int):
    """This pipeline's engine: DeepSpeed at `zero_stage`, bf16 weights, fp32 masters, fused AdamW."""
    from pretrain.config import Config

    cfg = Config()
    cfg.model.arch, cfg.model.img_size, cfg.model.window_size, cfg.model.drop_path = arch, img, window, 0.0
    cfg.batch.micro_batch = cfg.batch.global_batch = micro
    cfg.parallel.zero_stage, cfg.precision = zero_stage, "bf16"
    cfg.speed.sdpa_attention, cfg.speed.compile = sdpa, compile_blocks
    return training_step(cfg, num_classes=1000)


def bench_step(arch: str, micro: int, img: int, window: int, warmup: int, steps: int, sdpa: bool,
               compile_blocks: bool, zero_stage: int = 0) -> dict:
    import os

    from pretrain.flops import train_flops_per_image
    from pretrain.models.backbones import BACKBONES, resolve_geometry

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    img, window = resolve_geometry(BACKBONES[arch], img, window)
    peak = matmul_peak(device=device)
    flops = train_flops_per_image(arch, img, window, 1000)
    result: dict = {"arch": arch, "img_size": img, "window": window, "micro_batch": micro, "device": device,
                    "zero_stage": zero_stage,
                    "peak_tflops": peak / 1e12, "gflop_per_image": flops / 1e9}
    for name, step in (("reference", _reference_step(arch, micro, img, window, device)),
                       ("ours", _engine_step(arch, micro, img, window, sdpa, compile_blocks, zero_stage))):
        times = _time(step, warmup, steps, device)
        median = statistics.median(times)
        result[name] = {"step_s": [round(t, 4) for t in (min(times), median, max(times))],
                        "images_per_s": micro / median, "tflops": flops * micro / median / 1e12,
                        "mfu": flops * micro / median / peak}
    result["ratio"] = result["ours"]["images_per_s"] / result["reference"]["images_per_s"]
    return result


def bench_scaling(arch: str, sizes: list[int], micro: int, warmup: int, steps: int) -> list[dict]:
    """Our step time per image at each size, against pixels and analytic FLOPs; windows chosen
    to tile each resolution (attention cost per token grows with the window's area)."""
    from pretrain.flops import train_flops_per_image

    rows = []
    for img in sizes:
        window = {224: 7, 384: 12, 512: 16}.get(img, 0)
        times = _time(_engine_step(arch, micro, img, window, False, False, 0), warmup, steps, "cpu")
        per_image = statistics.median(times) / micro
        flops = train_flops_per_image(arch, img, window, 1000)
        first = rows[0] if rows else {"s_per_image": per_image, "gflop_per_image": flops / 1e9}
        rows.append({"img_size": img, "window": window, "s_per_image": per_image, "gflop_per_image": flops / 1e9,
                     "pixels_ratio": (img / sizes[0]) ** 2, "flops_ratio": flops / 1e9 / first["gflop_per_image"],
                     "time_ratio": per_image / first["s_per_image"]})
    return rows
