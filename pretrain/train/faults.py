"""Faults injected on purpose, for the tests of what the trainer does about them.

`PRETRAIN_FAULT_NAN_STEPS=3,5` turns rank 0's loss into NaN at optimizer steps 3 and 5
(steps of the non-pipelined engine). The entry point reads it once, at start-up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import torch


@dataclass(frozen=True)
class FaultInjection:
    nan_steps: frozenset[int] = frozenset()  # optimizer steps whose loss this rank makes NaN

    @classmethod
    def from_env(cls, rank: int, environ: Mapping[str, str] = os.environ) -> FaultInjection:
        steps = environ.get("PRETRAIN_FAULT_NAN_STEPS", "") if rank == 0 else ""
        return cls(frozenset(int(s) for s in steps.split(",") if s))

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """`loss` of optimizer step `step`, NaN if a fault is due then; reads nothing from the device."""
        return loss * float("nan") if step in self.nan_steps else loss


NO_FAULTS = FaultInjection()
