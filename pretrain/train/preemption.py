"""Stop signals: SIGUSR1 / SIGTERM (Slurm preemption, scancel) remembered until the trainer asks.

The handler only records the signal. Agreement happens in the trainer: each rank's flag
rides in the small tensor every optimizer step reduces anyway, so every rank learns of a
signal to any rank at the same step, checkpoints, and stops there.
"""

from __future__ import annotations

import signal
from typing import Any

from launch.env import STOP_SIGNALS


class StopSignal:
    """Remembers the first SIGUSR1 / SIGTERM this process received."""

    def __init__(self) -> None:
        self.received: str | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name
