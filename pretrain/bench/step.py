"""Training step throughput and MFU: our DeepSpeed engine vs stock timm + AdamW + autocast.

Both paths live in one process and take turns, one step each (the order alternating from
pair to pair: reference-ours, ours-reference, ...), and each pair starts with one timed
bf16 matmul. Machine noise (other jobs, clock changes) then lands on both sides and on the
peak alike. Each pair gives a ratio (ours over the reference, in images/s) and each side's
MFU against that pair's matmul sample; results hold min / median / max of each. On CUDA
every timing synchronizes the device first and last, and each side's memory is its own:
what it holds after building and a first step, plus the most one of its steps adds.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pretrain.bench.timing import timed, timed_steps
from pretrain.config import DTYPES, Config
from pretrain.data.shards import Batch
from pretrain.models.backbones import BACKBONES, model_args, resolve_geometry
from pretrain.parallel import comm
from pretrain.parallel.topology import discover, init_distributed
from pretrain.train.engine import build_training
from pretrain.train.flops import peak_flops_and_source, train_flops_per_image

Step = Callable[[], None]
SIDES = ("reference", "ours")
GIB = 2**30
# Square bf16 matmul sizes tried for the peak, and matmuls per timed peak sample, per device.
PEAK_SIZES = {"cuda": (4096, 8192), "cpu": (4096, 6144)}
MATMULS_PER_SAMPLE = {"cuda": 5, "cpu": 1}


def device_of() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else "cpu"


def min_median_max(values: list[float]) -> list[float]:
    return [min(values), statistics.median(values), max(values)]


class MatmulPeak:
    """Timed bf16 matmuls at the fastest of `sizes` (chosen once), one sample at a time."""

    def __init__(self, device: str, sizes: tuple[int, ...] | None = None, repeats: int = 3):
        self.device = device
        self.per_sample = MATMULS_PER_SAMPLE[device]
        best = (0.0, 0)
        for n in sizes or PEAK_SIZES[device]:
            self._allocate(n)
            self._run()  # warm-up
            best = max(best, max((self.sample(), n) for _ in range(repeats)))
        self.size = best[1]
        self._allocate(self.size)

    def _allocate(self, n: int) -> None:
        self.a = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        self.b = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        self.c = torch.empty(n, n, device=self.device, dtype=torch.bfloat16)

    def _run(self) -> None:
        for _ in range(self.per_sample):
            torch.matmul(self.a, self.b, out=self.c)

    def sample(self) -> float:
        """FLOP/s of one sample."""
        n = self.a.shape[0]
        return self.per_sample * 2 * n**3 / timed(self._run, self.device)


def _reference_step(arch: str, micro: int, img: int, window: int, device: str) -> Step:
    """Stock timm + torch AdamW defaults + bf16 autocast."""
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


def training_step(cfg, num_classes: int) -> Step:
    """One training step of this pipeline's engine for `cfg` on a fixed synthetic batch.

    Starts the process group if need be (one process: launch/env.py fills in the variables).
    Returns the step as a closure; supervised and SimMIM alike.
    """
    topo = discover()
    if not dist.is_initialized():
        init_distributed(topo)
    else:  # a group from an earlier call: this process's device is the one it reduces on
        topo.device = comm.device()
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


def _engine_step(arch: str, micro: int, img: int, window: int, sdpa: bool, compile_blocks: bool,
                 zero_stage: int) -> Step:
    """This pipeline's engine: DeepSpeed at `zero_stage`, bf16 weights, fp32 masters, fused AdamW."""
    cfg = Config()
    cfg.model.arch, cfg.model.img_size, cfg.model.window_size, cfg.model.drop_path = arch, img, window, 0.0
    cfg.batch.micro_batch = cfg.batch.global_batch = micro
    cfg.parallel.zero_stage, cfg.precision = zero_stage, "bf16"
    cfg.speed.sdpa_attention, cfg.speed.compile = sdpa, compile_blocks
    return training_step(cfg, num_classes=1000)


class Side:
    """One path under test: its step, its step times and (CUDA) its own memory."""

    def __init__(self, build: Callable[[], Step], device: str):
        self.device = device
        before = self._allocated()
        self.step = build()
        self.step()  # the first warm-up step allocates gradients and optimizer state
        self.held = self._allocated() - before
        self.times: list[float] = []
        self.peak = self.reserved = 0

    def _allocated(self) -> int:
        return torch.cuda.memory_allocated() if self.device == "cuda" else 0

    def run(self, timed_step: bool) -> None:
        if not timed_step:
            self.step()
            return
        if self.device == "cuda":
            start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        self.times.append(timed(self.step, self.device))
        if self.device == "cuda":
            self.peak = max(self.peak, self.held + torch.cuda.max_memory_allocated() - start)
            self.reserved = max(self.reserved, torch.cuda.max_memory_reserved())

    def summary(self, flops_per_step: float, micro: int, peaks: list[float], datasheet: float | None) -> dict:
        median = statistics.median(self.times)
        mfu = [flops_per_step / t / p for t, p in zip(self.times, peaks)]
        cuda = self.device == "cuda"
        return {"step_s": [round(t, 4) for t in min_median_max(self.times)], "images_per_s": micro / median,
                "tflops": flops_per_step / median / 1e12, "mfu": statistics.median(mfu),
                "mfu_min_median_max": min_median_max(mfu),
                "mfu_datasheet": flops_per_step / median / datasheet if datasheet else None,
                "held_gib": self.held / GIB if cuda else None,
                "peak_allocated_gib": self.peak / GIB if cuda else None,
                "max_reserved_gib": self.reserved / GIB if cuda else None}


def interleave(sides: dict[str, Side], peak: MatmulPeak, warmup: int, steps: int) -> list[dict]:
    """`warmup` more untimed turns, then `steps` timed pairs; each pair opens with a peak sample."""
    order = list(sides)
    for _ in range(warmup):
        for name in order:
            sides[name].run(timed_step=False)
    pairs = []
    for i in range(steps):
        flops = peak.sample()
        for name in order if i % 2 == 0 else order[::-1]:
            sides[name].run(timed_step=True)
        ref, ours = sides["reference"].times[-1], sides["ours"].times[-1]
        pairs.append({"reference_s": ref, "ours_s": ours, "ratio": ref / ours, "peak_tflops": flops / 1e12})
    return pairs


def bench_step(arch: str, micro: int, img: int, window: int, warmup: int, steps: int, sdpa: bool,
               compile_blocks: bool, zero_stage: int = 0, peak_sizes: tuple[int, ...] | None = None) -> dict:
    """Interleaved steps of the reference and our engine; `warmup` >= 1 untimed steps each first."""
    if warmup < 1 or steps < 1:
        raise ValueError(f"bench step needs --warmup >= 1 and --steps >= 1 (got {warmup} and {steps})")
    device = device_of()
    img, window = resolve_geometry(BACKBONES[arch], img, window)
    flops = train_flops_per_image(arch, img, window, 1000)
    datasheet, source = peak_flops_and_source(0.0)
    sides = {"reference": Side(lambda: _reference_step(arch, micro, img, window, device), device),
             "ours": Side(lambda: _engine_step(arch, micro, img, window, sdpa, compile_blocks, zero_stage), device)}
    peak = MatmulPeak(device, peak_sizes)
    pairs = interleave(sides, peak, warmup - 1, steps)
    peaks = [p["peak_tflops"] * 1e12 for p in pairs]
    result: dict = {"arch": arch, "img_size": img, "window": window, "micro_batch": micro, "device": device,
                    "device_name": device_name(device), "zero_stage": zero_stage, "sdpa": sdpa,
                    "compile": compile_blocks, "warmup": warmup, "steps": steps, "gflop_per_image": flops / 1e9,
                    "peak_size": peak.size, "peak_tflops": statistics.median(peaks) / 1e12,
                    "peak_tflops_min_median_max": [p / 1e12 for p in min_median_max(peaks)],
                    "datasheet_peak_tflops": datasheet / 1e12 if datasheet else None,
                    "datasheet_peak_source": source}
    for name, side in sides.items():
        result[name] = side.summary(flops * micro, micro, peaks, datasheet)
    ratios = [p["ratio"] for p in pairs]
    result["ratio"] = statistics.median(ratios)
    result["ratio_min_median_max"] = min_median_max(ratios)
    result["pairs"] = pairs
    return result


def bench_scaling(arch: str, sizes: list[int], micro: int, warmup: int, steps: int) -> list[dict]:
    """Our step time per image at each size, against pixels and analytic FLOPs; windows chosen
    to tile each resolution (attention cost per token grows with the window's area)."""
    device = device_of()
    rows = []
    for img in sizes:
        window = {224: 7, 384: 12, 512: 16}.get(img, 0)
        times = timed_steps(_engine_step(arch, micro, img, window, False, False, 0), warmup, steps, device)
        per_image = statistics.median(times) / micro
        flops = train_flops_per_image(arch, img, window, 1000)
        first = rows[0] if rows else {"s_per_image": per_image, "gflop_per_image": flops / 1e9}
        rows.append({"img_size": img, "window": window, "s_per_image": per_image, "gflop_per_image": flops / 1e9,
                     "pixels_ratio": (img / sizes[0]) ** 2, "flops_ratio": flops / 1e9 / first["gflop_per_image"],
                     "time_ratio": per_image / first["s_per_image"]})
    return rows
