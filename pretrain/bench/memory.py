"""Peak activation memory and step time with and without activation checkpointing.

For each mode the model (bf16 weights and activations, as the DeepSpeed bf16 engine trains)
takes two warm-up steps, so its gradients exist, then timed steps, then one more step whose
allocations are recorded. Activation memory is the most bytes that step had allocated at
once beyond what existed before it: what forward and backward add on top of weights and
gradients. On GPUs that is CUDA's allocator peak; on CPU the profiler's allocation records,
replayed in order, give the same figure.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from pretrain.bench.step import training_step
from pretrain.bench.timing import timed_steps
from pretrain.config import Config
from pretrain.models.backbones import build_backbone
from pretrain.parallel.activation_ckpt import apply_activation_checkpointing

MODES = (("none", 1), ("every_k", 2), ("blocks", 1))


def peak_allocated(step, device: str) -> int:
    """Most bytes the step has allocated at once, beyond what was allocated before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    # On CPU, the profiler's allocation records replayed in time order give the same figure.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak


def measure(arch: str, micro: int, img: int, mode: str, every_k: int, steps: int, threads: int) -> dict:
    """One mode in this process: activation bytes at peak and the median step time."""
    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    # bf16 weights and activations, as the DeepSpeed bf16 engine trains (it keeps fp32 copies
    # only in the optimizer).
    model = build_backbone(arch, 1000, img_size=img).to(device, torch.bfloat16).train()
    chosen = apply_activation_checkpointing(model, mode, every_k)
    size = model.patch_embed.img_size
    x = torch.randn(micro, 3, size[0], size[1], device=device, dtype=torch.bfloat16)
    y = torch.randint(0, 1000, (micro,), device=device)

    def step() -> None:
        F.cross_entropy(model(x).float(), y).backward()
        model.zero_grad(set_to_none=False)  # gradients stay allocated: they are not activations

    # Two warm-up steps: kernels pick their algorithms on the first calls of each shape.
    times = timed_steps(step, 2, steps, device)
    peak = peak_allocated(step, device)  # its own step: profiling slows the timed ones
    return {"mode": mode if mode != "every_k" else f"every_{every_k}", "checkpointed_blocks": len(chosen),
            "activation_mib": peak / 2**20, "step_s": statistics.median(times)}


def bench_memory(arch: str, micro: int, img: int, steps: int, threads: int) -> dict:
    """All modes, with ratios against `none`."""
    rows = [measure(arch, micro, img, mode, k, steps, threads) for mode, k in MODES]
    base = rows[0]
    for row in rows:
        row["memory_ratio"] = base["activation_mib"] / row["activation_mib"]
        row["time_ratio"] = row["step_s"] / base["step_s"]
    return {"arch": arch, "micro_batch": micro, "img_size": img, "rows": rows}


def measure_step(cfg: Config, num_classes: int) -> tuple[float, float | None]:
    """Peak bytes of one training step of the real engine in this process (one rank), and on
    CUDA the peak the caching allocator reserved (what the GPU must really hold), else None.

    Everything the run allocates (engine, weights, optimizer) up to the end of a first step,
    plus the most a second step adds on top: the figure `estimate(cfg, classes, 1).total`
    predicts. GPU: CUDA's allocator; CPU: the profiler's allocation records.
    """
    cfg.batch.global_batch = cfg.batch.micro_batch
    if torch.cuda.is_available():
        step = training_step(cfg, num_classes)
        step()
        allocated = torch.cuda.memory_allocated() + peak_allocated(step, "cuda")
        return allocated, float(torch.cuda.max_memory_reserved())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step = training_step(cfg, num_classes)
        step()
    held = sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    return held + peak_allocated(step, "cpu"), None
