"""What the training loop counts and reports: its state, one logging window, and formatting."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class TrainState:
    step: int = 0
    samples_seen: int = 0
    skipped_samples: int = 0  # over all ranks, up to the checkpoint this run resumed from
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss


@dataclass
class Window:
    """What happened since the last log line."""

    start: float = field(default_factory=time.time)
    steps: int = 0
    wait: float = 0.0
    losses: list[float] = field(default_factory=list)
    lr: float = 0.0
    grad_norm: float = 0.0

    def add(self, lr: float, loss: float | None, grad_norm: float) -> None:
        self.steps += 1
        self.lr, self.grad_norm = lr, grad_norm
        if loss is not None:
            self.losses.append(loss)

    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")


def peak_memory_gb() -> float:
    """Peak GPU memory allocated by this process, or its peak resident memory on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
