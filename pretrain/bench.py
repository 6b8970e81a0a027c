"""Benchmarks that print ratios against a baseline measured in the same run.

    python -m pretrain.bench data --images DIR [--img-size 224] [--samples 400] [--repeats 3]
    python -m pretrain.bench data --photos 500x375 [--count 200]    # make ImageNet-like JPEGs first
    python -m pretrain.bench step --arch swin_b --micro-batch 8 [--img-size 224] [--compile] [--sdpa] [--json]
    python -m pretrain.bench scaling --arch swin_b --sizes 224 384 512 [--micro-batch 4]

`step`: the full training step (forward, backward, optimizer) of our engine path (the
DeepSpeed engine this pipeline builds: bf16 weights, fp32 master weights, fused AdamW)
against the plain reference (stock timm model + torch AdamW with its defaults + bf16
autocast, the way timm's train script runs), same model, batch and process, after warm-up;
median of several steps. FLOPs are analytic (pretrain/flops.py); the peak is the best dense
bf16 matmul (4096 and 6144) measured in the same run.

`scaling`: our step time per image at several resolutions, against the pixel count.

`data`: decode + augment throughput of one data worker (one process, one thread), our
shard loader against torchvision's `ImageFolder` with timm's `create_transform`, both with
the same augmentation (random resized crop 0.08-1, flip, RandAugment m9-mstd0.5, color
jitter 0.4, random erasing 0.25, bicubic) and both ending in a normalized float batch.
Runs alternate between the two and the median of the repeats is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def make_photos(out: Path, width: int, height: int, count: int, seed: int = 0) -> Path:
    """JPEGs cut from scikit-learn's bundled photographs, resized to width x height, in 2 class folders."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    for i in range(count):
        src = photos[i % len(photos)]
        h, w = src.shape[:2]
        s = rng.uniform(0.5, 1.0)
        ch, cw = int(h * s), int(w * s)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        im = Image.fromarray(src[y:y + ch, x:x + cw]).resize((width, height), Image.BICUBIC)
        folder = out / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        im.save(folder / f"{i:05d}.jpg", quality=90)
    return out


def _baseline_rate(images: Path, img_size: int, samples: int, batch: int) -> float:
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    transform = create_transform(img_size, is_training=True, scale=(0.08, 1.0), hflip=0.5,
                                 auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.4, re_prob=0.25,
                                 interpolation="bicubic")
    dataset = ImageFolder(str(images), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=min(batch, len(dataset)), shuffle=True, num_workers=0,
                                         drop_last=True)
    done, start = 0, time.perf_counter()
    while done < samples:
        for x, _ in loader:
            done += x.shape[0]
            if done >= samples:
                break
    return done / (time.perf_counter() - start)


def _our_rate(shards: Path, img_size: int, samples: int, batch: int) -> float:
    from pretrain.config import Config
    from pretrain.data.shards import train_loader
    from pretrain.data.transforms import BatchPreprocess

    cfg = Config()
    cfg.data.root, cfg.data.workers, cfg.data.shuffle_buffer = str(shards), 0, 200
    cfg.batch.micro_batch = batch
    info = json.loads((shards / "dataset.json").read_text())
    preprocess = BatchPreprocess(cfg, training=True, device=torch.device("cpu"))
    batches = iter(train_loader(cfg, info, img_size, rank=0, world=1, start_step=0))
    done, start = 0, time.perf_counter()
    while done < samples:
        images = next(batches).images
        preprocess(images)
        done += images.shape[0]
    return done / (time.perf_counter() - start)


def bench_data(images: Path, img_size: int, samples: int, repeats: int, batch: int = 32) -> dict:
    from pretrain.data.write_shards import write_shards

    batch = max(1, min(batch, samples))
    torch.set_num_threads(1)  # one data worker = one core
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp)
        write_shards(images, shards, val_fraction=0.0, shard_samples=100, workers=1)
        ours, base = [], []
        _our_rate(shards, img_size, batch, batch), _baseline_rate(images, img_size, batch, batch)  # warm-up
        for _ in range(repeats):
            ours.append(_our_rate(shards, img_size, samples, batch))
            base.append(_baseline_rate(images, img_size, samples, batch))
    result = {
        "img_size": img_size,
        "samples": samples,
        "ours_images_per_s": [round(r, 1) for r in ours],
        "baseline_images_per_s": [round(r, 1) for r in base],
        "ratio_median": statistics.median(ours) / statistics.median(base),
    }
    return result


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


def _engine_step(arch: str, micro: int, img: int, window: int, sdpa: bool, compile_blocks: bool):
    """This pipeline's engine: DeepSpeed ZeRO-1, bf16 weights, fp32 masters, fused AdamW."""
    import torch.distributed as dist

    from pretrain.config import Config
    from pretrain.data.shards import Batch
    from pretrain.parallel.topology import discover, init_distributed
    from pretrain.train.engine import build_training

    cfg = Config()
    cfg.model.arch, cfg.model.img_size, cfg.model.window_size, cfg.model.drop_path = arch, img, window, 0.0
    cfg.batch.micro_batch = cfg.batch.global_batch = micro
    cfg.parallel.zero_stage, cfg.precision = 1, "bf16"
    cfg.speed.sdpa_attention, cfg.speed.compile = sdpa, compile_blocks
    topo = discover()
    if not dist.is_initialized():
        init_distributed(topo)
    training = build_training(cfg, topo, num_classes=1000)
    engine, objective = training.engine, training.objective
    images = torch.randn(micro, 3, img, img, device=engine.device)
    batch = Batch(images, torch.randint(0, 1000, (micro,)), 0)

    def step():
        (inputs,), targets = objective.prepare(images, batch, training=True)
        loss = objective.loss(engine(inputs.to(torch.bfloat16)), targets)
        engine.backward(loss)
        engine.step()

    return step


def bench_step(arch: str, micro: int, img: int, window: int, warmup: int, steps: int, sdpa: bool,
               compile_blocks: bool) -> dict:
    import os
    import statistics

    from pretrain.flops import train_flops_per_image
    from pretrain.models.backbones import BACKBONES, resolve_geometry

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    img, window = resolve_geometry(BACKBONES[arch], img, window)
    peak = matmul_peak(device=device)
    flops = train_flops_per_image(arch, img, window, 1000)
    result: dict = {"arch": arch, "img_size": img, "window": window, "micro_batch": micro, "device": device,
                    "peak_tflops": peak / 1e12, "gflop_per_image": flops / 1e9}
    for name, step in (("reference", _reference_step(arch, micro, img, window, device)),
                       ("ours", _engine_step(arch, micro, img, window, sdpa, compile_blocks))):
        times = _time(step, warmup, steps, device)
        median = statistics.median(times)
        result[name] = {"step_s": [round(t, 4) for t in (min(times), median, max(times))],
                        "images_per_s": micro / median, "tflops": flops * micro / median / 1e12,
                        "mfu": flops * micro / median / peak}
    result["ratio"] = result["ours"]["images_per_s"] / result["reference"]["images_per_s"]
    return result


def bench_scaling(arch: str, sizes: list[int], micro: int, warmup: int, steps: int) -> list[dict]:
    """Our step time per image at each size; windows chosen to tile each resolution."""
    import statistics

    rows = []
    for img in sizes:
        window = {224: 7, 384: 12, 512: 16}.get(img, 0)
        times = _time(_engine_step(arch, micro, img, window, False, False), warmup, steps, "cpu")
        per_image = statistics.median(times) / micro
        rows.append({"img_size": img, "window": window, "s_per_image": per_image,
                     "pixels_ratio": (img / sizes[0]) ** 2, "time_ratio": per_image / rows[0]["s_per_image"]
                     if rows else 1.0})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.bench", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    d = sub.add_parser("data", help="decode + augment images/s per worker vs ImageFolder + timm transforms")
    d.add_argument("--images", type=Path, help="class-per-folder tree of images")
    d.add_argument("--photos", help="make WIDTHxHEIGHT JPEGs from sklearn's sample photos instead of --images")
    d.add_argument("--count", type=int, default=200, help="number of --photos to make")
    d.add_argument("--img-size", type=int, default=224)
    d.add_argument("--samples", type=int, default=400, help="images per timed run")
    d.add_argument("--repeats", type=int, default=3)
    d.add_argument("--json", action="store_true", help="print one JSON object")
    st = sub.add_parser("step", help="training step images/s and MFU vs stock timm + AdamW + autocast")
    st.add_argument("--arch", default="swin_b")
    st.add_argument("--micro-batch", type=int, default=8)
    st.add_argument("--img-size", type=int, default=0, help="0 = the backbone's default")
    st.add_argument("--window-size", type=int, default=0, help="0 = the backbone's default")
    st.add_argument("--warmup", type=int, default=2)
    st.add_argument("--steps", type=int, default=5)
    st.add_argument("--sdpa", action="store_true", help="attention through scaled_dot_product_attention")
    st.add_argument("--compile", action="store_true", help="torch.compile every Swin block")
    st.add_argument("--json", action="store_true")
    sc = sub.add_parser("scaling", help="step time per image vs image size")
    sc.add_argument("--arch", default="swin_b")
    sc.add_argument("--sizes", type=int, nargs="+", default=[224, 384, 512])
    sc.add_argument("--micro-batch", type=int, default=4)
    sc.add_argument("--warmup", type=int, default=1)
    sc.add_argument("--steps", type=int, default=3)
    sc.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.what == "step":
        r = bench_step(args.arch, args.micro_batch, args.img_size, args.window_size, args.warmup, args.steps,
                       args.sdpa, args.compile)
        if args.json:
            print(json.dumps(r))
            return 0
        print(f"{r['arch']} {r['img_size']}px micro-batch {r['micro_batch']} on {r['device']}: "
              f"{r['gflop_per_image']:.1f} GFLOP per trained image, measured bf16 peak {r['peak_tflops']:.2f} TFLOP/s")
        for name in ("reference", "ours"):
            x = r[name]
            print(f"  {name:9s}: {x['images_per_s']:7.2f} images/s  step min/median/max {x['step_s']} s  "
                  f"{x['tflops']:.3f} TFLOP/s  MFU {100 * x['mfu']:.1f}%")
        print(f"  ratio ours / reference: {r['ratio']:.2f}x")
        return 0
    if args.what == "scaling":
        rows = bench_scaling(args.arch, args.sizes, args.micro_batch, args.warmup, args.steps)
        if args.json:
            print(json.dumps(rows))
            return 0
        for row in rows:
            print(f"  {row['img_size']}px window {row['window']}: {row['s_per_image']:.3f} s/image  "
                  f"pixels x{row['pixels_ratio']:.2f}  time x{row['time_ratio']:.2f}")
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        images = args.images
        if args.photos:
            width, height = (int(v) for v in args.photos.lower().split("x"))
            images = make_photos(Path(tmp) / "photos", width, height, args.count)
        if images is None or not Path(images).is_dir():
            print("error: give --images DIR (a class-per-folder tree) or --photos WIDTHxHEIGHT", file=sys.stderr)
            return 2
        r = bench_data(Path(images), args.img_size, args.samples, args.repeats)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"data loader, one worker, {r['img_size']}px training augmentation, {r['samples']} images per run")
        print(f"  ours (shards, draft decode, batch normalize): {r['ours_images_per_s']} images/s")
        print(f"  ImageFolder + timm create_transform:          {r['baseline_images_per_s']} images/s")
        print(f"  ratio (median): {r['ratio_median']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
