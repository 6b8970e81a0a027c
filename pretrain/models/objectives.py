"""Training objectives: what the model is asked to predict, and the loss.

An objective turns a decoded batch (images, integer labels) into model inputs and
targets (Mixup/CutMix happen here, on the batch) and scores the model's output.
The trainer only talks to this interface, so a new objective is a new class here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.data import Mixup

from pretrain.config import Config


class SupervisedObjective:
    """Classification over `num_classes` with soft-target cross-entropy.

    Labels become soft targets (label smoothing, and Mixup/CutMix when enabled), so one
    loss covers every setting. Evaluation uses hard labels and reports top-1/top-5.
    """

    def __init__(self, cfg: Config, num_classes: int):
        o = cfg.objective
        self.num_classes = num_classes
        self.label_smoothing = o.label_smoothing
        self.mixup = None
        if o.mixup > 0 or o.cutmix > 0:
            self.mixup = Mixup(
                mixup_alpha=o.mixup,
                cutmix_alpha=o.cutmix,
                prob=o.mixup_prob,
                switch_prob=o.mixup_switch_prob,
                label_smoothing=o.label_smoothing,
                num_classes=num_classes,
            )

    def prepare(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (inputs, soft targets) for one training micro-batch."""
        if self.mixup is not None:
            # timm's Mixup mixes pairs within the batch and needs an even batch size.
            if images.shape[0] % 2 == 0:
                return self.mixup(images, labels)
        off = self.label_smoothing / self.num_classes
        targets = torch.full((labels.shape[0], self.num_classes), off, device=labels.device)
        targets.scatter_(1, labels.unsqueeze(1), 1.0 - self.label_smoothing + off)
        return images, targets

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Soft-target cross-entropy, computed in fp32 whatever the model's precision."""
        return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()

    @staticmethod
    def eval_counts(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Per-batch sums [samples, top-1 hits, top-5 hits, loss] over the `valid` rows."""
        logits = logits.float()
        k = min(5, logits.shape[-1])
        topk = logits.topk(k, dim=-1).indices
        hits = topk.eq(labels.unsqueeze(1))
        nll = F.cross_entropy(logits, labels, reduction="none")
        v = valid.float()
        return torch.stack([
            v.sum(),
            (hits[:, 0].float() * v).sum(),
            (hits.any(dim=1).float() * v).sum(),
            (nll * v).sum(),
        ])


def build_objective(cfg: Config, num_classes: int) -> SupervisedObjective:
    """The objective named by `objective.kind`."""
    objectives = {"supervised": SupervisedObjective}
    return objectives[cfg.objective.kind](cfg, num_classes)
