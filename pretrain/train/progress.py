"""What the training loop counts and reports: its state, one logging window, and formatting."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TrainState:
    step: int = 0
    samples_seen: int = 0
    skipped_samples: int = 0  # over all ranks, up to the checkpoint this run resumed from
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss


# Positions in the small tensor every optimizer step reduces over all ranks (one collective per step).
BAD, STOP, LOSS = 0, 1, 2
STEP_FLAGS = 3


@dataclass
class Window:
    """What happened since the last log line; device values stay on the device until it is written."""

    start: float = field(default_factory=time.time)
    steps: int = 0
    wait: float = 0.0
    flags: list[torch.Tensor] = field(default_factory=list)  # each step's reduced [bad, stop, loss sum]
    lr: float = 0.0
    grad_norm: Any = None  # of the window's last step: a device tensor, a float, or None

    def add(self, lr: float, flags: torch.Tensor, grad_norm: Any = None) -> None:
        self.steps += 1
        self.lr, self.grad_norm = lr, grad_norm
        self.flags.append(flags)

    def mean_loss(self, ranks: int) -> float:
        """Mean loss over the window's finite steps (one host read); `ranks` added their losses."""
        if not self.flags:
            return float("nan")
        rows = torch.stack(self.flags).double().cpu()
        finite = rows[:, BAD] == 0
        return float(rows[finite, LOSS].sum() / ranks / finite.sum()) if finite.any() else float("nan")


def host_number(value: Any) -> float:
    """A device scalar, a float or None as a float (0.0 for None): for log steps only."""
    if value is None:
        return 0.0
    return float(value.detach().float().cpu()) if isinstance(value, torch.Tensor) else float(value)


def memory_gb() -> tuple[float, float]:
    """(peak allocated, peak reserved) GPU memory of this process since the last call, in GiB.

    On CPU both are the peak resident memory since start (the kernel keeps no window).
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        torch.cuda.reset_peak_memory_stats()
        return allocated / 2**30, reserved / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return rss, rss


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
