"""Evaluation during training: the objective's metrics over the validation split, and its pictures.

Each validation sample is counted exactly once on every layout. Ranks may hold different
numbers of batches; with ZeRO-3 (and a pipeline) every forward is a collective, so a rank
that ran out runs zero-weight dummy batches until all are done. With a pipeline only the
first stage reads data and the last one computes the sums.
"""

from __future__ import annotations

from typing import Any

import torch

from pretrain.config import Config
from pretrain.data.info import DatasetInfo
from pretrain.data.shards import Batch, eval_loader
from pretrain.data.transforms import BatchPreprocess
from pretrain.models.backbones import BACKBONES
from pretrain.parallel import comm
from pretrain.parallel.pipeline import NO_DATA, pack, padded
from pretrain.parallel.topology import Topology
from pretrain.train.engine import Training
from pretrain.train.inputs import InputPath
from pretrain.train.metrics import Metrics


class PlainSums:
    """Evaluation sums of one batch, from the whole model's forward on this rank."""

    def __init__(self, engine: Any, inputs: InputPath):
        self.engine = engine
        self.inputs = inputs

    def begin(self) -> None:
        pass

    def end(self) -> None:
        pass

    def __call__(self, batch: Batch, valid: torch.Tensor, preprocess: BatchPreprocess) -> torch.Tensor | None:
        x = self.inputs(batch, preprocess, training=False)
        return self.inputs.objective.eval_sums(self.engine(*x.model), x.targets, valid)


class PipelineSums:
    """Evaluation sums of one batch through DeepSpeed's pipeline (on its last stage; None elsewhere).

    Batches are padded to `eval.micro_batch` rows with zero weight: the pipeline sends
    activations of one fixed shape. Evaluation micro-batches carry one more tensor (the
    valid rows) than training's, and the pipeline's loss returns the sums meanwhile.
    """

    def __init__(self, engine: Any, inputs: InputPath, reads_data: bool, micro_batch: int):
        self.engine = engine
        self.inputs = inputs
        self.reads_data = reads_data
        self.micro_batch = micro_batch

    def begin(self) -> None:
        self.engine.reset_activation_shape()
        self.engine.module.loss_fn.evaluating = True

    def end(self) -> None:
        self.engine.reset_activation_shape()
        self.engine.module.loss_fn.evaluating = False

    def __call__(self, batch: Batch, valid: torch.Tensor, preprocess: BatchPreprocess) -> torch.Tensor | None:
        micro = NO_DATA
        if self.reads_data:
            batch, valid = padded(batch, valid, self.micro_batch)
            x = self.inputs(batch, preprocess, training=False)
            micro = (*pack(x.model, x.targets), valid.to(self.inputs.device)), NO_DATA[1]
        # DeepSpeed sums every last-stage loss into `total_loss` and clears it only in
        # train_batch; our evaluation "loss" is a vector of sums, so start from nothing.
        self.engine.total_loss = None
        out = self.engine.eval_batch(iter([micro]), compute_loss=True, reduce_output=None, bcast_loss=False,
                                     num_micro_batches=1)
        return out[0] if self.engine.is_last_stage() else None


class Evaluation:
    def __init__(self, cfg: Config, topo: Topology, training: Training, dataset: DatasetInfo, metrics: Metrics,
                 inputs: InputPath, pin_memory: bool):
        self.cfg = cfg
        self.topo = topo
        self.engine = training.engine
        self.objective = training.objective
        self.img_size = training.img_size
        self.dataset = dataset
        self.metrics = metrics
        self.inputs = inputs
        self.device = inputs.device
        self.pin_memory = pin_memory
        self.reads_data = topo.stage == 0  # with a pipeline only the first stage reads data
        self.counts = 1 if topo.tp_rank == 0 else 0  # a tensor-parallel group's samples, counted once
        self.sums: PlainSums | PipelineSums
        if topo.pipeline > 1:
            self.sums = PipelineSums(self.engine, inputs, self.reads_data, cfg.eval.micro_batch)
            self.draws_pictures = False
            if cfg.objective.kind == "simmim":
                metrics.print("reconstruction pictures are not drawn with pipeline_stages > 1 (no rank holds the "
                              "whole model); the losses are logged as usual")
        else:
            self.sums = PlainSums(self.engine, inputs)
            self.draws_pictures = cfg.objective.kind == "simmim"
        self.fixed_batch: Batch | None = None

    def _dummy_batch(self) -> Batch:
        size, tokens = self.img_size, self.img_size // BACKBONES[self.cfg.model.arch].patch_size
        return Batch(torch.zeros(1, 3, size, size, dtype=torch.uint8), torch.zeros(1, dtype=torch.long), 0,
                     torch.zeros(1, tokens, tokens, dtype=torch.uint8))

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """The objective's metrics over the whole validation split, logged at `step`. Collective."""
        self.engine.eval()
        self.sums.begin()
        sums = None
        skipped = 0
        batches = iter(eval_loader(self.cfg, self.dataset, self.img_size, self.topo.dp_rank, self.topo.dp_size,
                                   pin_memory=self.pin_memory, patch_size=BACKBONES[self.cfg.model.arch].patch_size,
                                   )) if self.reads_data else iter(())
        preprocess = BatchPreprocess(self.cfg, training=False, device=self.device)
        while True:
            batch = next(batches, None)
            if batch is not None and batch.labels.numel() == 0:  # only skipped samples at the end of a shard
                skipped += batch.skipped
                continue
            if comm.to_host(comm.all_reduce([0.0 if batch is None else 1.0], op="max"))[0] == 0:
                break
            valid = torch.zeros(1, device=self.device) if batch is None \
                else torch.ones(batch.labels.shape[0], device=self.device)
            batch = self._dummy_batch() if batch is None else batch
            skipped += batch.skipped
            batch_sums = self.sums(batch, valid, preprocess)
            if batch_sums is not None:
                sums = batch_sums if sums is None else sums + batch_sums
        if sums is None:  # no validation data, or a pipeline stage that does not compute the loss
            sums = torch.zeros(self.objective.eval_sums_size, dtype=torch.float64, device=self.device)
        mine = torch.cat([sums.double().to(self.device), torch.full((1,), float(skipped), dtype=torch.float64,
                                                                    device=self.device)]) * self.counts
        totals = torch.tensor(comm.to_host(comm.all_reduce(mine)), dtype=torch.float64)
        result = {**self.objective.eval_metrics(totals[:-1]), "eval/skipped": float(totals[-1])}
        self.metrics.log(step, result)
        shown = "  ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in result.items()
                          if k not in ("eval/samples", "eval/skipped"))
        self.metrics.print(f"step {step}: eval {shown}  on {int(result['eval/samples'])} images")
        self.sums.end()
        self.engine.train()
        return result

    @torch.no_grad()
    def log_images(self, step: int) -> None:
        """Pictures of the objective on a fixed set of validation images (every rank runs the forward)."""
        if self.fixed_batch is None:
            first = next(iter(eval_loader(self.cfg, self.dataset, self.img_size, rank=0, world=1,
                                        patch_size=BACKBONES[self.cfg.model.arch].patch_size)), None)
            if first is None or first.labels.numel() == 0:
                return
            n = self.cfg.log.images
            self.fixed_batch = Batch(first.images[:n], first.labels[:n], 0,
                                     None if first.masks is None else first.masks[:n])
        self.engine.eval()
        x = self.inputs(self.fixed_batch, BatchPreprocess(self.cfg, training=False, device=self.device),
                        training=False)
        picture = self.objective.visualize(self.engine(*x.model), x.images, self.fixed_batch)
        self.engine.train()
        if picture is not None:
            self.metrics.image("eval/reconstruction", picture, step)
