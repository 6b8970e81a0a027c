"""What every export format is written from: one trained model, verified once, and its facts.

`Exported` is built by `pretrain.export.run` from the consolidated fp32 checkpoint; each
format writer (`timm_format`, `hf_format`, `official_format`) and the model card read it
and nothing else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pretrain.models.backbones import BackboneSpec

# An export reproduces the trained model's outputs on a random batch to this (fp32, CPU).
OUTPUT_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    pass


@dataclass
class Exported:
    """The trained model as exported (fp32, eval mode, CPU) and what the model card says of it."""

    arch: str
    spec: BackboneSpec
    img_size: int
    window_size: int
    objective: str
    # The timm backbone: with the run's head, a head subset's head, or none (headless, SimMIM).
    model: nn.Module
    # A SimMIM run, not headless: the whole model (timm encoder under `encoder.`, `mask_token`,
    # `decoder`), which the hf format writes whole.
    simmim: nn.Module | None
    label_names: list[str]  # of the exported head's rows; empty without a head
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    interpolation: str
    facts: dict[str, Any] = field(default_factory=dict)  # step, samples, label maps, evaluation, command

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def probe(self) -> torch.Tensor:
        """The fixed random batch every format's outputs are compared on."""
        return torch.randn(2, 3, self.img_size, self.img_size, generator=torch.Generator().manual_seed(0))

    def probe_mask(self) -> torch.Tensor:
        """A fixed random patch mask (2, h, w) of the probe, 1 = masked, for SimMIM reconstructions."""
        side = self.img_size // self.spec.patch_size
        return torch.rand(2, side, side, generator=torch.Generator().manual_seed(1)) < 0.6


def check_close(what: str, ours: torch.Tensor, theirs: torch.Tensor, where: Path) -> float:
    """The largest difference of two outputs; ExportError naming the export if it is over the tolerance."""
    if ours.shape != theirs.shape:
        raise ExportError(f"{where}: {what} has shape {tuple(theirs.shape)}, the trained model's {tuple(ours.shape)}")
    diff = (ours.float() - theirs.float()).abs().max().item()
    if diff > OUTPUT_TOLERANCE:
        raise ExportError(f"{where}: {what} differs from the trained model's by {diff:.3g} (> {OUTPUT_TOLERANCE})")
    return diff


def _user_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share_as_umask_allows(out_dir: Path, names: list[str] | tuple[str, ...]) -> None:
    """Give the export's files 0o666 & ~umask, as for any file the user creates.

    safetensors writes model.safetensors to a private temporary file (mode 0600) and renames it,
    so without this the weights are unreadable to everyone but their owner. (Directories need
    nothing: `mkdir` already gives new ones 0o777 & ~umask, and an existing one keeps its mode.)
    """
    mask = _user_umask()
    for name in names:
        (out_dir / name).chmod(0o666 & ~mask)
