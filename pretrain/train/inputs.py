"""Batch -> model inputs: the one path from a batch to every forward the trainer runs."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from pretrain.data.shards import Batch
from pretrain.data.transforms import BatchPreprocess
from pretrain.models.objectives import Objective


class Inputs(NamedTuple):
    model: tuple[torch.Tensor, ...]  # the model's positional inputs; the image in the training precision
    targets: Any  # the objective's loss targets
    images: torch.Tensor  # the normalized images, before the objective and the cast


class InputPath:
    """A batch on the device, normalized (`preprocess`), turned into the objective's inputs
    and targets, the image input cast to the training precision."""

    def __init__(self, objective: Objective, device: torch.device, dtype: torch.dtype):
        self.objective = objective
        self.device = device
        self.dtype = dtype

    def __call__(self, batch: Batch, preprocess: BatchPreprocess, training: bool) -> Inputs:
        images = preprocess(batch.images.to(self.device, non_blocking=True))
        inputs, targets = self.objective.prepare(images, batch, training)
        return Inputs((inputs[0].to(self.dtype), *inputs[1:]), targets, images)
