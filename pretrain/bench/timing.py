"""The benchmarks' clocks: timed calls with the device drained, timed step series, item rates."""

from __future__ import annotations

import time
from typing import Callable, Iterable

import torch


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on CPU."""
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    """Seconds `fn` takes, the device drained before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def timed_steps(step: Callable[[], object], warmup: int, steps: int, device: str) -> list[float]:
    """`warmup` untimed calls of `step`, then the seconds of each of `steps` timed calls."""
    for _ in range(warmup):
        step()
    return [timed(step, device) for _ in range(steps)]


def rate(counts: Iterable[int], until: int) -> float:
    """Items per second of consuming `counts` (items done per element) until `until` items are done."""
    done, start = 0, time.perf_counter()
    for n in counts:
        done += n
        if done >= until:
            break
    return done / (time.perf_counter() - start)
