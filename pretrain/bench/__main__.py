"""python -m pretrain.bench {data,step,scaling,memory,plan} ... (see pretrain/bench/__init__.py)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from launch.env import default_accelerator

default_accelerator()  # before DeepSpeed is first imported (below): it picks its accelerator then

import torch  # noqa: E402

from pretrain.bench.data import bench_data, make_photos  # noqa: E402
from pretrain.bench.memory import bench_memory, measure_step  # noqa: E402
from pretrain.bench.step import bench_scaling, bench_step  # noqa: E402
from pretrain.config import ConfigError, load_config  # noqa: E402
from pretrain.plan import GB, estimate, num_classes_of, report  # noqa: E402
from pretrain.preflight import check_run  # noqa: E402


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
    st.add_argument("--warmup", type=int, default=2, help="untimed steps of each path first (>= 1)")
    st.add_argument("--steps", type=int, default=12, help="timed pairs (one step of each path per pair)")
    st.add_argument("--peak-sizes", type=int, nargs="+", default=None, metavar="N",
                    help="square bf16 matmul sizes tried for the peak (default: 4096 8192 on CUDA, 4096 6144 on CPU)")
    st.add_argument("--sdpa", action="store_true", help="attention through scaled_dot_product_attention")
    st.add_argument("--compile", action="store_true", help="torch.compile every Swin block")
    st.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3),
                    help="our engine's ZeRO stage (one process: 0 partitions nothing and costs least)")
    st.add_argument("--json", action="store_true")
    sc = sub.add_parser("scaling", help="step time per image vs image size")
    sc.add_argument("--arch", default="swin_b")
    sc.add_argument("--sizes", type=int, nargs="+", default=[224, 384, 512])
    sc.add_argument("--micro-batch", type=int, default=4)
    sc.add_argument("--warmup", type=int, default=1)
    sc.add_argument("--steps", type=int, default=3)
    sc.add_argument("--json", action="store_true")
    me = sub.add_parser("memory", help="peak activation memory and step time with and without checkpointing")
    me.add_argument("--arch", default="swin_b")
    me.add_argument("--micro-batch", type=int, default=8)
    me.add_argument("--img-size", type=int, default=0, help="0 = the backbone's default")
    me.add_argument("--steps", type=int, default=3)
    me.add_argument("--threads", type=int, default=torch.get_num_threads())
    me.add_argument("--json", action="store_true")
    pl = sub.add_parser("plan", help="the memory planner's figure for one rank against a real training step here")
    pl.add_argument("--config", required=True)
    pl.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    pl.add_argument("--gpu-mem-gb", type=float, required=True, help="memory of one GPU in GB (for the plan)")
    args = ap.parse_args(argv)
    if args.what == "plan":
        return plan_against_step(args.config, args.overrides, args.gpu_mem_gb)
    if args.what == "memory":
        r = bench_memory(args.arch, args.micro_batch, args.img_size, args.steps, args.threads)
        if args.json:
            print(json.dumps(r))
            return 0
        print(f"{r['arch']} micro-batch {r['micro_batch']}, bf16 weights and activations, forward + backward")
        for row in r["rows"]:
            print(f"  {row['mode']:8s} ({row['checkpointed_blocks']:2d} blocks recomputed): activations "
                  f"{row['activation_mib']:8.1f} MiB  step {row['step_s']:.3f} s  "
                  f"memory /{row['memory_ratio']:.2f}  time x{row['time_ratio']:.2f}")
        return 0
    if args.what == "step":
        if args.warmup < 1 or args.steps < 1 or args.micro_batch < 1:
            print("error: bench step needs --warmup >= 1, --steps >= 1 and --micro-batch >= 1", file=sys.stderr)
            return 2
        r = bench_step(args.arch, args.micro_batch, args.img_size, args.window_size, args.warmup, args.steps,
                       args.sdpa, args.compile, args.zero_stage, tuple(args.peak_sizes or ()) or None)
        print(json.dumps(r) if args.json else "\n".join(step_report(r)))
        return 0
    if args.what == "scaling":
        rows = bench_scaling(args.arch, args.sizes, args.micro_batch, args.warmup, args.steps)
        if args.json:
            print(json.dumps(rows))
            return 0
        for row in rows:
            print(f"  {row['img_size']}px window {row['window']}: {row['s_per_image']:.3f} s/image  "
                  f"pixels x{row['pixels_ratio']:.2f}  FLOPs x{row['flops_ratio']:.2f}  time x{row['time_ratio']:.2f}")
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
        print(f"  ours (shards, scaled decode, torch resize): {r['ours_images_per_s']} images/s")
        print(f"  ImageFolder + timm create_transform:        {r['baseline_images_per_s']} images/s")
        print(f"  ratio (median): {r['ratio_median']:.2f}x")
    return 0


def plan_against_step(config: str, overrides: list[str], gpu_mem_gb: float) -> int:
    """Print the plan of `config` on one GPU, then one measured training step of it in this process.

    Exit code as the planner's: 0 the plan fits, 1 it does not (measured all the same), 2 a config error.
    """
    try:
        cfg = load_config(config, overrides)
        check_run(cfg, 1, check_data=False)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    text, ok = report(cfg, 1, gpu_mem_gb)
    print(text)
    classes = num_classes_of(cfg)
    planned = estimate(cfg, classes, 1).total
    measured, reserved = measure_step(cfg, classes)
    # On CUDA the allocator's reserve is what must fit on the GPU: compare the plan with it.
    compared, what = (reserved, "reserved") if reserved else (measured, "measured")
    print(f"one rank here: planned {planned / GB:.3f} GB, measured {measured / GB:.3f} GB allocated"
          + (f", {reserved / GB:.3f} GB reserved" if reserved else "")
          + f" (plan / {what} {planned / compared:.2f})")
    return 0 if ok else 1


def _mmm(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    return " / ".join(f"{scale * v:.{digits}g}" for v in values)


def _memory(x: dict) -> str:
    if x["peak_allocated_gib"] is None:
        return ""
    return f"  memory {x['peak_allocated_gib']:.2f} GiB allocated, {x['max_reserved_gib']:.2f} GiB reserved"


def step_report(r: dict) -> list[str]:
    """The human-readable `bench step` result."""
    lines = [f"{r['arch']} {r['img_size']}px micro-batch {r['micro_batch']} on {r['device']} ({r['device_name']}): "
             f"{r['gflop_per_image']:.4g} GFLOP per trained image; {r['steps']} interleaved pairs after "
             f"{r['warmup']} warm-up steps of each path",
             f"  bf16 matmul peak ({r['peak_size']}^3, one sample per pair) min / median / max "
             f"{_mmm(r['peak_tflops_min_median_max'], digits=4)} TFLOP/s; datasheet: {r['datasheet_peak_source']}",
             f"  ours = DeepSpeed ZeRO-{r['zero_stage']}, bf16 weights, fp32 masters, fused AdamW; "
             f"sdpa {'on' if r['sdpa'] else 'off'}, compile {'on' if r['compile'] else 'off'}"]
    for name in ("reference", "ours"):
        x = r[name]
        datasheet = f" (datasheet {100 * x['mfu_datasheet']:.1f}%)" if x["mfu_datasheet"] else ""
        lines.append(f"  {name:9s}: {x['images_per_s']:8.2f} images/s  step min / median / max "
                     f"{_mmm(x['step_s'])} s  MFU {_mmm(x['mfu_min_median_max'], 100)}%{datasheet}"
                     f"{_memory(x)}")
    lines.append(f"  ratio ours / reference per pair, min / median / max: {_mmm(r['ratio_min_median_max'])}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
