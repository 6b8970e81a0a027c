"""The training loop: optimizer steps with accumulation, logging, evaluation, checkpoints.

Counts optimizer steps and samples seen; "epoch" is only shown to humans. Every rank
runs the same number of forward/backward calls (the training stream is endless and
evaluation keeps ranks in step), so no collective ever waits for a rank that stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pretrain.config import Config
from pretrain.data.shards import eval_loader, train_loader
from pretrain.data.transforms import BatchPreprocess
from pretrain.parallel.topology import Topology
from pretrain.train import checkpoint
from pretrain.train.metrics import Metrics
from pretrain.train.optim import WarmupCosine, set_lr

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class TrainState:
    step: int = 0
    samples_seen: int = 0
    skipped_samples: int = 0  # over all ranks, up to the checkpoint this run resumed from


class Trainer:
    def __init__(self, cfg: Config, topo: Topology, engine: Any, objective: Any, schedule: WarmupCosine,
                 dataset: dict[str, Any], img_size: int, metrics: Metrics, client_state: dict[str, Any]):
        self.cfg = cfg
        self.topo = topo
        self.engine = engine
        self.objective = objective
        self.schedule = schedule
        self.dataset = dataset
        self.img_size = img_size
        self.metrics = metrics
        self.client_state = client_state  # constant facts saved with every checkpoint
        self.dtype = DTYPES[cfg.precision]
        self.device = engine.device
        self.state = TrainState()
        self.skipped_here = 0  # samples this rank skipped since this process started
        self.norm_not_recorded = cfg.parallel.zero_stage == 0 and cfg.precision == "fp32"

    # -- checkpoints -------------------------------------------------------------------

    def resume(self) -> None:
        if not self.cfg.run.auto_resume:
            return
        saved = checkpoint.resume(self.engine, self.cfg.run_dir)
        if saved is None:
            return
        self.state = TrainState(saved["step"], saved["samples_seen"], saved.get("skipped_samples", 0))
        self.metrics.print(f"resumed from step {self.state.step} ({self.state.samples_seen} samples seen)")

    def skipped_counts(self) -> tuple[int, int]:
        """(samples skipped over all ranks in the whole run, most skipped by one rank in this process). Collective."""
        total = torch.tensor([self.skipped_here], dtype=torch.int64)
        most = total.clone()
        dist.all_reduce(total)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        return self.state.skipped_samples + int(total), int(most)

    def save(self) -> None:
        state = {**self.client_state, "step": self.state.step, "samples_seen": self.state.samples_seen,
                 "skipped_samples": self.skipped_counts()[0]}
        tag = checkpoint.save(self.engine, self.cfg.run_dir, self.state.step, state, self.cfg.checkpoint.keep_last)
        self.metrics.print(f"step {self.state.step}: saved checkpoint {tag}")

    # -- training ----------------------------------------------------------------------

    def _local_grad_norm(self) -> float:
        """Gradient norm from the module's gradients (already averaged over ranks at the boundary).

        DeepSpeed records the global norm itself except for plain fp32 data parallelism.
        """
        grads = [p.grad.float() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    def _mean_over_ranks(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return (t / self.topo.world_size).tolist()

    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        total = cfg.schedule.total_steps
        accum = self.engine.gradient_accumulation_steps()
        epoch_size = max(1, self.dataset["splits"]["train"]["samples"])
        batches = iter(train_loader(cfg, self.dataset, self.img_size, self.topo.dp_rank, self.topo.dp_size,
                                    self.state.step))
        preprocess = BatchPreprocess(cfg, training=True, device=self.device)
        self.engine.train()
        window = {"loss": 0.0, "micro": 0, "wait": 0.0, "grad_norm": 0.0, "start": time.time(), "steps": 0}
        last_eval: dict[str, float] = {}
        while self.state.step < total:
            lr = self.schedule.lr(self.state.step)
            set_lr(self.engine.optimizer, lr)
            grad_norm = None
            for _ in range(accum):
                t_wait = time.time()
                images, labels, skipped = next(batches)
                window["wait"] += time.time() - t_wait
                self.skipped_here += skipped
                images = preprocess(images.to(self.device, non_blocking=True))
                inputs, targets = self.objective.prepare(images, labels.to(self.device))
                loss = self.objective.loss(self.engine(inputs.to(self.dtype)), targets)
                self.engine.backward(loss)
                if self.engine.is_gradient_accumulation_boundary() and self.norm_not_recorded:
                    grad_norm = self._local_grad_norm()
                self.engine.step()
                window["loss"] += loss.item()
                window["micro"] += 1
            self.state.step += 1
            self.state.samples_seen += cfg.batch.global_batch
            window["steps"] += 1
            window["grad_norm"] = grad_norm if grad_norm is not None else float(self.engine.get_global_grad_norm())

            step = self.state.step
            if step % cfg.log.every_steps == 0 or step == total:
                self._log_train(step, lr, window, epoch_size)
                window.update(loss=0.0, micro=0, wait=0.0, start=time.time(), steps=0)
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step != total:
                last_eval = self.evaluate()
            if step % cfg.checkpoint.every_steps == 0 or step == total:
                self.save()
        if self.state.step == total:
            last_eval = self.evaluate()
        skipped, _ = self.skipped_counts()
        self.metrics.print(f"finished: {self.state.step} steps, {self.state.samples_seen} samples seen, "
                           f"{skipped} undecodable samples skipped"
                           + (f", eval top-1 {last_eval['eval/top1']:.4f}" if last_eval else ""))
        return last_eval

    def _log_train(self, step: int, lr: float, window: dict[str, float], epoch_size: int) -> None:
        loss, wait = self._mean_over_ranks([window["loss"] / max(1, window["micro"]), window["wait"]])
        skipped_total, skipped_max = self.skipped_counts()
        elapsed = max(1e-9, time.time() - window["start"])
        images_per_s = window["steps"] * self.cfg.batch.global_batch / elapsed
        scalars = {
            "train/loss": loss,
            "train/lr": lr,
            "train/grad_norm": window["grad_norm"],
            "train/images_per_s": images_per_s,
            "train/data_wait_pct": 100.0 * wait / elapsed,
            "train/samples_seen": self.state.samples_seen,
            "train/epoch": self.state.samples_seen / epoch_size,
            "data/skipped_samples": skipped_total,
            "data/skipped_samples_max_rank": skipped_max,
        }
        self.metrics.log(step, scalars)
        self.metrics.print(
            f"step {step}/{self.cfg.schedule.total_steps}  loss {loss:.4f}  lr {lr:.3g}  "
            f"grad {window['grad_norm']:.3f}  {images_per_s:.1f} img/s  "
            f"data wait {scalars['train/data_wait_pct']:.0f}%  epoch {scalars['train/epoch']:.2f}"
            + (f"  skipped {int(skipped_total)}" if skipped_total else "")
        )

    # -- evaluation --------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Top-1/top-5 over the whole validation split, each sample counted exactly once."""
        self.engine.eval()
        sums = torch.zeros(4, dtype=torch.float64)
        skipped = 0
        batches = iter(eval_loader(self.cfg, self.dataset, self.img_size, self.topo.dp_rank, self.topo.dp_size))
        preprocess = BatchPreprocess(self.cfg, training=False, device=self.device)
        while True:
            batch = next(batches, None)
            if batch is not None and batch[1].numel() == 0:  # only skipped samples at the end of a shard
                skipped += batch[2]
                continue
            # Ranks may hold different numbers of batches; with ZeRO-3 every forward is a
            # collective, so a rank that ran out runs an empty-weight dummy batch until all are done.
            more = torch.tensor([0.0 if batch is None else 1.0])
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
            if more.item() == 0:
                break
            if batch is None:
                images = torch.zeros(1, 3, self.img_size, self.img_size, dtype=torch.uint8)
                labels, valid = torch.zeros(1, dtype=torch.long), torch.zeros(1)
            else:
                images, labels, n_skipped = batch
                skipped += n_skipped
                valid = torch.ones(labels.shape[0])
            logits = self.engine(preprocess(images.to(self.device)).to(self.dtype))
            sums += self.objective.eval_counts(logits.cpu(), labels, valid).double()
        totals = torch.cat([sums, torch.tensor([float(skipped)], dtype=torch.float64)])
        dist.all_reduce(totals)
        n, top1, top5, loss, skipped_total = totals.tolist()
        result = {
            "eval/top1": top1 / max(1.0, n),
            "eval/top5": top5 / max(1.0, n),
            "eval/loss": loss / max(1.0, n),
            "eval/samples": n,
            "eval/skipped": skipped_total,
        }
        self.metrics.log(self.state.step, result)
        self.metrics.print(f"step {self.state.step}: eval top-1 {result['eval/top1']:.4f}  "
                           f"top-5 {result['eval/top5']:.4f}  loss {result['eval/loss']:.4f}  on {int(n)} images")
        self.engine.train()
        return result
