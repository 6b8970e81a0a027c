"""Training objectives: the model they train, its inputs and targets, the loss, eval metrics.

Both objectives (supervised classification, SimMIM) satisfy one `Objective` protocol,
the only thing the trainer, the engine, the pipeline's loss, the step benchmark and
export ask of them; `OBJECTIVES` names them for `objective.kind`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup
from torchvision.utils import make_grid

from pretrain.config import Config
from pretrain.data.shards import Batch
from pretrain.models.backbones import BACKBONES, build_backbone
from pretrain.models.simmim import SimMIM, denormalize_patches, masked_l1, normalize_patches, pixel_mask


@runtime_checkable
class Objective(Protocol):
    """What the trainer, the engine, the pipeline and export use of an objective."""

    eval_sums_size: int  # length of the vector `eval_sums` returns

    def build_model(self) -> nn.Module:
        """The module DeepSpeed wraps; identical on every rank for one torch seed."""
        ...

    def prepare(self, images: torch.Tensor, batch: Batch, training: bool) -> tuple[tuple[torch.Tensor, ...], Any]:
        """(model inputs, loss targets) from normalized images on the device and their batch."""
        ...

    def loss(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        """The scalar training loss of the model's outputs."""
        ...

    def eval_sums(self, outputs: torch.Tensor, targets: Any, valid: torch.Tensor) -> torch.Tensor:
        """`eval_sums_size` sums over the rows weighted by `valid`, added up over batches and ranks."""
        ...

    def eval_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        """Named metrics, "eval/samples" among them, from the summed `eval_sums`."""
        ...

    def backbone_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The timm backbone's weights out of a trained state dict (static: export calls it on the class)."""
        ...

    def visualize(self, outputs: Any, images: torch.Tensor, batch: Batch) -> torch.Tensor | None:
        """A (3, H, W) picture in [0, 1] of the outputs for TensorBoard, or None."""
        ...


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, as bools: (label is the top-1 class, label is among the top `k`); `k` is capped
    at the number of classes."""
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
    hits = top.eq(labels.to(top.device).unsqueeze(1))
    return hits[:, 0], hits.any(dim=1)


class SupervisedObjective:
    """Classification over `num_classes` with soft-target cross-entropy.

    Labels become soft targets (label smoothing, and Mixup/CutMix when enabled), so one
    loss covers every setting. Evaluation uses hard labels and reports top-1/top-5.
    """

    eval_sums_size = 4  # length of what eval_sums returns

    def __init__(self, cfg: Config, num_classes: int):
        o = cfg.objective
        self.cfg = cfg
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

    def build_model(self) -> nn.Module:
        m = self.cfg.model
        return build_backbone(m.arch, self.num_classes, m.img_size, m.window_size, m.drop_path)

    def prepare(self, images: torch.Tensor, batch: Batch, training: bool):
        """((inputs,), targets): soft targets in training, the labels in evaluation."""
        labels = batch.labels.to(images.device)
        if not training:
            return (images,), labels
        # timm's Mixup mixes pairs within the batch and needs an even batch size.
        if self.mixup is not None and images.shape[0] % 2 == 0:
            images, targets = self.mixup(images, labels)
            return (images,), targets
        off = self.label_smoothing / self.num_classes
        targets = torch.full((labels.shape[0], self.num_classes), off, device=labels.device)
        targets.scatter_(1, labels.unsqueeze(1), 1.0 - self.label_smoothing + off)
        return (images,), targets

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Soft-target cross-entropy, computed in fp32 whatever the model's precision."""
        return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()

    def eval_sums(self, logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Sums [samples, top-1 hits, top-5 hits, loss] over the `valid` rows, on the logits' device."""
        logits = logits.float()
        labels = labels.to(logits.device)
        top1, top5 = topk_hits(logits, labels)
        nll = F.cross_entropy(logits, labels, reduction="none")
        v = valid.to(logits.device).float()
        return torch.stack([v.sum(), (top1.float() * v).sum(), (top5.float() * v).sum(),
                            (nll * v).sum()]).double()

    @staticmethod
    def eval_metrics(sums: torch.Tensor) -> dict[str, float]:
        n = max(1.0, float(sums[0]))
        return {"eval/top1": float(sums[1]) / n, "eval/top5": float(sums[2]) / n, "eval/loss": float(sums[3]) / n,
                "eval/samples": float(sums[0])}

    @staticmethod
    def backbone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state

    def visualize(self, outputs, images: torch.Tensor, batch: Batch) -> torch.Tensor | None:
        return None


class SimMIMObjective:
    """Masked image modeling: L1 reconstruction of the masked pixels (SimMIM)."""

    eval_sums_size = 2

    def __init__(self, cfg: Config, num_classes: int):
        self.cfg = cfg
        self.patch_size = BACKBONES[cfg.model.arch].patch_size
        self.norm_target = cfg.objective.norm_target
        self.mask_patch_size = cfg.objective.mask_patch_size

    def build_model(self) -> nn.Module:
        m = self.cfg.model
        return SimMIM(build_backbone(m.arch, 0, m.img_size, m.window_size, m.drop_path))

    def prepare(self, images: torch.Tensor, batch: Batch, training: bool):
        masks = batch.masks.to(images.device)
        target = normalize_patches(images, self.mask_patch_size) if self.norm_target else images
        return (images, masks), (target, masks)

    def loss(self, reconstruction: torch.Tensor, targets) -> torch.Tensor:
        target, masks = targets
        return masked_l1(reconstruction, target, masks, self.patch_size)

    def eval_sums(self, reconstruction: torch.Tensor, targets, valid: torch.Tensor) -> torch.Tensor:
        """Sums [samples, masked-L1 x samples] over the `valid` rows, on the reconstruction's device."""
        target, masks = targets
        losses = torch.stack([masked_l1(reconstruction[i:i + 1], target[i:i + 1], masks[i:i + 1], self.patch_size)
                              for i in range(target.shape[0])])
        v = valid.to(losses.device).float()
        return torch.stack([v.sum(), (losses * v).sum()]).double()

    @staticmethod
    def eval_metrics(sums: torch.Tensor) -> dict[str, float]:
        n = max(1.0, float(sums[0]))
        return {"eval/loss": float(sums[1]) / n, "eval/samples": float(sums[0])}

    @staticmethod
    def backbone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The encoder's weights under timm's names: no mask token, no decoder."""
        return {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}

    def visualize(self, reconstruction: torch.Tensor, images: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Rows of [input | masked input | reconstruction], de-normalized to [0, 1], as one (3, H, W) image."""
        mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
        p = self.patch_size
        images = images.float().cpu()
        mask = pixel_mask(batch.masks.cpu(), p)
        recon = reconstruction.float().cpu()
        if self.norm_target:  # predictions are per-patch normalized: show them in the input's patch statistics
            recon = denormalize_patches(recon, images, self.mask_patch_size)
        # Masked pixels at 0 in normalized space show as the dataset's mean color. The loss
        # only sees masked pixels, so the reconstruction is shown there, on the visible input.
        shown = [images, images * (1 - mask), images * (1 - mask) + recon * mask]
        tiles = [(t * std + mean).clamp(0, 1) for t in shown]
        rows = torch.stack(tiles, dim=1).flatten(0, 1)  # image0: in, masked, recon; image1: ...
        if rows.shape[-1] < 96:  # enlarge tiny inputs (the demo's 32 px) so they can be seen
            rows = F.interpolate(rows, scale_factor=96 // rows.shape[-1], mode="nearest")
        return make_grid(rows, nrow=3, padding=2, pad_value=1.0)


OBJECTIVES = {"supervised": SupervisedObjective, "simmim": SimMIMObjective}


def build_objective(cfg: Config, num_classes: int) -> Objective:
    """The objective named by `objective.kind`."""
    return OBJECTIVES[cfg.objective.kind](cfg, num_classes)
