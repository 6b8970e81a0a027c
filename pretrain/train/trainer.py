"""The training loop: optimizer steps with accumulation, logging, evaluation, checkpoints.

Counts optimizer steps and samples seen; "epoch" is only shown to humans. Every rank
runs the same number of forward/backward calls (the training stream is endless and
evaluation keeps ranks in step), so no collective ever waits for a rank that stopped.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Iterator

import torch
import torch.distributed as dist

from pretrain.config import DTYPES, Config
from pretrain.data.info import DatasetInfo
from pretrain.data.shards import Batch, train_loader
from pretrain.data.transforms import BatchPreprocess
from pretrain.models.backbones import BACKBONES
from pretrain.parallel import comm
from pretrain.parallel.pipeline import NO_DATA, pack
from pretrain.parallel.topology import Topology
from pretrain.train import checkpoint
from pretrain.train.engine import Training
from pretrain.train.evaluation import Evaluation
from pretrain.train.faults import NO_FAULTS, FaultInjection
from pretrain.train.flops import peak_flops_and_source, train_flops_per_image
from pretrain.train.inputs import InputPath, Inputs
from pretrain.train.metrics import Metrics
from pretrain.train.optim import set_lr, skip_update_if
from pretrain.train.preemption import StopSignal
from pretrain.train.progress import BAD, STOP, TrainState, Window, format_duration, host_number, memory_gb


class Preempted(Exception):
    """Training stopped on a signal after saving a checkpoint; the job should be re-run."""


class Diverged(Exception):
    """Too many consecutive non-finite losses; the last checkpoint is left as it was."""


class Trainer:
    def __init__(self, cfg: Config, topo: Topology, training: Training, dataset: DatasetInfo, metrics: Metrics,
                 run_state: checkpoint.RunState, faults: FaultInjection = NO_FAULTS):
        self.cfg = cfg
        self.topo = topo
        self.engine = engine = training.engine
        self.objective = training.objective
        self.schedule = training.schedule
        self.skip_target = training.skip_target  # told to skip a step with a non-finite loss (train/optim.py)
        self.compile_summary = training.compile_summary
        self.dataset = dataset
        self.img_size = training.img_size
        self.metrics = metrics
        self.faults = faults
        self.run_state = run_state  # the run's constant facts, saved with every checkpoint
        self.dtype = DTYPES[cfg.precision]
        self.device = engine.device
        self.state = TrainState()
        self.skipped_here = 0  # samples this rank skipped since this process started
        self.norm_not_recorded = cfg.parallel.zero_stage == 0 and cfg.precision == "fp32"
        # With a pipeline only the first stage reads data: the targets travel with the activations.
        self.reads_data = topo.stage == 0
        # Ranks of one tensor-parallel group see the same samples: count them on one of them.
        self.counts = 1 if topo.tp_rank == 0 else 0
        self._take_step = self._pipeline_step if topo.pipeline > 1 else self._train_step  # chosen once
        self.inputs = InputPath(self.objective, self.device, self.dtype)
        self.evaluation = Evaluation(cfg, topo, training, dataset, metrics, self.inputs, self.pin_memory)
        self.stop = StopSignal()
        self.stop_agreed = False
        self.bad_in_a_row = 0
        # Each step's reduced flags, copied to the host in the background and read a step later.
        self.pending: deque[tuple[int, comm.HostCopy]] = deque()
        self.flops_per_image = train_flops_per_image(cfg.model.arch, cfg.model.img_size, cfg.model.window_size,
                                                     training.num_classes)
        self.peak_flops, peak_source = peak_flops_and_source(cfg.log.peak_tflops)
        metrics.print(f"MFU peak: {peak_source}")

    # -- checkpoints -------------------------------------------------------------------

    def resume(self, point: checkpoint.ResumePoint) -> None:
        saved = checkpoint.resume(self.engine, point)
        self.state = TrainState(saved.step, saved.samples_seen, saved.skipped_samples, saved.skipped_steps)
        self.metrics.print(f"resumed from step {self.state.step} ({self.state.samples_seen} samples seen)")

    def skipped_counts(self) -> tuple[int, int]:
        """(samples skipped over all ranks in the whole run, most skipped by one rank in this process). Collective."""
        here = self.skipped_here * self.counts
        total, most = comm.to_host(comm.all_reduce([here])) + comm.to_host(comm.all_reduce([here], op="max"))
        return self.state.skipped_samples + int(total), int(most)

    def save(self) -> None:
        state = self.run_state.at(self.state.step, self.state.samples_seen, self.skipped_counts()[0],
                                  self.state.skipped_steps)
        tag = checkpoint.save(self.engine, self.cfg.run_dir, state, self.cfg.checkpoint.keep_last,
                              checkpoint.layout(self.topo, self.cfg.parallel.zero_stage, self.cfg.precision))
        self.metrics.print(f"step {self.state.step}: saved checkpoint {tag}")

    # -- training ----------------------------------------------------------------------

    def _local_grad_norm(self) -> torch.Tensor:
        """Global gradient norm from the module's gradients (already averaged over data-parallel
        ranks at the boundary); DeepSpeed records it itself except for plain fp32 data parallelism.

        Each pipeline stage and tensor-parallel shard adds its own part; a tensor replicated
        over a tensor-parallel group is counted on the group's first rank only. A device
        scalar: read at log steps.
        """
        grads = [p.grad for p in self.engine.module.parameters()
                 if p.grad is not None and (self.topo.tp_rank == 0 or getattr(p, "model_parallel", False))]
        square = torch.stack([g.double().square().sum() for g in grads]).sum() if grads \
            else torch.zeros((), dtype=torch.float64, device=comm.device())
        return (comm.all_reduce(square) / self.topo.dp_size).sqrt()

    def fit(self) -> dict[str, float]:
        """Train to `schedule.total_steps`; raises Preempted (after a checkpoint) or Diverged."""
        cfg = self.cfg
        total = cfg.schedule.total_steps
        batches = iter(train_loader(cfg, self.dataset, self.img_size, self.topo.dp_rank, self.topo.dp_size,
                                    self.state.step, pin_memory=self.pin_memory,
                                    patch_size=BACKBONES[cfg.model.arch].patch_size)) if self.reads_data else iter(())
        preprocess = BatchPreprocess(cfg, training=True, device=self.device)
        self.engine.train()
        window = Window()
        last_eval: dict[str, float] = {}
        self.start_step = self.state.step
        while self.state.step < total:
            step = self.state.step + 1
            log_now = step % cfg.log.every_steps == 0 or step == total
            started = time.time()
            flags = self._take_step(batches, preprocess, window, log_now)
            if self.compile_summary is not None and step == self.start_step + 1:
                self._report_compile(started)
            self.state.step = step
            self.state.samples_seen += cfg.batch.global_batch
            self.pending.append((step, comm.HostCopy(flags)))
            self._settle(step - 1)  # the previous step's flags: copied by now, read without a stall
            saving = step % cfg.checkpoint.every_steps == 0 or step == total
            if log_now or saving:
                self._settle(step)
            if log_now:
                self._log_train(step, window)
                window = Window()
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step != total:
                last_eval = self.evaluation.evaluate(step)
            if self.evaluation.draws_pictures and cfg.log.images_every_steps \
                    and step % cfg.log.images_every_steps == 0:
                self.evaluation.log_images(step)
            if saving:
                self.save()
            if self.stop_agreed:
                if not saving:
                    self._settle(step)
                    self.save()
                # The marker tells the batch script to requeue even if srun reports another exit
                # code (it may kill slower ranks once the first one has exited).
                if self.topo.is_main:
                    (cfg.run_dir / checkpoint.STOPPED_MARKER).write_text(f"{step}\n")
                dist.barrier()
                raise Preempted(f"stopped at step {step} on {self.stop.received or 'a signal to another rank'}; "
                                f"checkpoint saved, re-run (or requeue) to continue")
        if self.state.step == total:
            last_eval = self.evaluation.evaluate(self.state.step)
            if self.evaluation.draws_pictures:
                self.evaluation.log_images(self.state.step)
        skipped, _ = self.skipped_counts()
        self.metrics.print(f"finished: {self.state.step} steps, {self.state.samples_seen} samples seen, "
                           f"{skipped} undecodable samples skipped, {self.state.skipped_steps} steps skipped")
        return last_eval

    def _report_compile(self, started: float) -> None:
        """Once, after the first (compiling) step: every block compiled, into how many graphs, in how long."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # one wait, once, so the time is the whole first step's
        self.metrics.print(self.compile_summary.describe(time.time() - started))

    @property
    def pin_memory(self) -> bool:
        return self.cfg.parallel.pin_memory and self.device.type == "cuda"

    def _settle(self, through: int) -> None:
        """Act on the reduced flags of every step up to `through`: skipped steps, divergence, stop."""
        cfg = self.cfg
        while self.pending and self.pending[0][0] <= through:
            step, copy = self.pending.popleft()
            flags = copy.values()
            if flags[STOP] > 0:
                self.stop_agreed = True
            if flags[BAD] == 0:
                self.bad_in_a_row = 0
                continue
            self.bad_in_a_row += 1
            self.state.skipped_steps += 1
            self.metrics.print(f"step {step}: non-finite loss, update skipped ({self.bad_in_a_row} in a row)")
            if self.bad_in_a_row >= cfg.run.max_bad_steps:
                raise Diverged(f"stopping: {self.bad_in_a_row} consecutive steps had a non-finite loss "
                               f"(run.max_bad_steps); the last checkpoint "
                               f"{checkpoint.latest_tag(checkpoint.checkpoint_dir(cfg.run_dir))} is intact")

    def _step_flags(self, bad: torch.Tensor, loss_sum: torch.Tensor) -> torch.Tensor:
        """[bad, stop, loss sum] of this rank, summed over all ranks: the step's one collective."""
        stop = torch.ones_like(bad) if self.stop.received else torch.zeros_like(bad)
        return comm.all_reduce(torch.stack([bad, stop, loss_sum]))

    def _next_inputs(self, batches: Iterator[Batch], preprocess: BatchPreprocess, window: Window) -> Inputs:
        """The next training batch as model inputs (`InputPath`); the wait for it is data wait."""
        waited = time.time()
        batch = next(batches)
        window.wait += time.time() - waited
        self.skipped_here += batch.skipped
        return self.inputs(batch, preprocess, training=True)

    def _train_step(self, batches: Iterator[Batch], preprocess: BatchPreprocess, window: Window,
                    log_now: bool) -> torch.Tensor:
        """One optimizer step over `accum` micro-batches; returns the step's reduced flags.

        Nothing is read on the host: the losses and the "not finite" flag stay on the device
        and travel in one small all-reduce at the accumulation boundary, before the update.
        A non-finite loss on any rank makes every rank's update a no-op: our optimizers skip
        it on the device (`skip_update_if`), DeepSpeed's ZeRO optimizers skip a step whose
        gradient norm is not finite themselves.
        """
        lr = self.schedule.lr(self.state.step)
        set_lr(self.engine.optimizer, lr)
        accum = self.engine.gradient_accumulation_steps()
        bad = torch.zeros((), device=self.device)
        loss_sum = torch.zeros((), device=self.device)
        grad_norm = None
        for micro in range(accum):
            x = self._next_inputs(batches, preprocess, window)
            loss = self.faults.loss(self.state.step + 1, self.objective.loss(self.engine(*x.model), x.targets))
            bad = torch.maximum(bad, (~torch.isfinite(loss.detach())).float())
            loss_sum = loss_sum + loss.detach().float() / accum
            self.engine.backward(loss)
            if micro == accum - 1:
                flags = self._step_flags(bad, loss_sum)
                if self.skip_target is not None:
                    skip_update_if(self.skip_target, flags[BAD:BAD + 1])
                if log_now and self.norm_not_recorded:
                    grad_norm = self._local_grad_norm()
            self.engine.step()
        if log_now and grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        window.add(lr, flags, grad_norm)
        return flags

    def _pipeline_step(self, batches: Iterator[Batch], preprocess: BatchPreprocess, window: Window,
                       log_now: bool) -> torch.Tensor:
        """One optimizer step through DeepSpeed's pipeline schedule; returns the step's reduced flags.

        The update cannot be withdrawn afterwards here: bf16/fp16 runs rely on DeepSpeed's
        overflow check to skip it, and `run.max_bad_steps` stops a run that keeps failing.
        """
        lr = self.schedule.lr(self.state.step)
        set_lr(self.engine.optimizer, lr)

        def micro_batches() -> Iterator[tuple]:
            while True:
                if not self.reads_data:  # the last stage's "labels": unused, the targets are carried
                    yield NO_DATA
                    continue
                x = self._next_inputs(batches, preprocess, window)
                yield pack(x.model, x.targets), NO_DATA[1]

        # DeepSpeed broadcasts the last stage's loss to every stage.
        loss = self.engine.train_batch(data_iter=micro_batches()).detach().float().to(self.device)
        flags = self._step_flags((~torch.isfinite(loss)).float(), loss)
        window.add(lr, flags, self.engine.get_global_grad_norm() if log_now else None)
        return flags

    def _log_train(self, step: int, window: Window) -> None:
        cfg = self.cfg
        loss = window.mean_loss(self.topo.world_size)
        allocated, reserved = memory_gb()
        wait_sum, = comm.to_host(comm.all_reduce([window.wait]))
        most_allocated, most_reserved = comm.to_host(comm.all_reduce([allocated, reserved], op="max"))
        wait = wait_sum / self.topo.world_size
        grad_norm = host_number(window.grad_norm)
        skipped_total, skipped_max = self.skipped_counts()
        elapsed = max(1e-9, time.time() - window.start)
        images_per_s = window.steps * cfg.batch.global_batch / elapsed
        scalars = {
            "train/loss": loss,
            "train/lr": window.lr,
            "train/grad_norm": grad_norm,
            "train/images_per_s": images_per_s,
            "train/images_per_s_per_gpu": images_per_s / self.topo.world_size,
            "train/data_wait_pct": 100.0 * wait / elapsed,
            "train/samples_seen": self.state.samples_seen,
            "train/epoch": self.state.samples_seen / max(1, self.dataset.split("train").samples),
            "train/skipped_steps": self.state.skipped_steps,
            "train/memory_allocated_gb": most_allocated,
            "train/memory_reserved_gb": most_reserved,
            "data/skipped_samples": skipped_total,
            "data/skipped_samples_max_rank": skipped_max,
        }
        loss_scale = getattr(self.engine.optimizer, "cur_scale", None)
        if cfg.precision == "fp16" and loss_scale is not None:
            scalars["train/loss_scale"] = float(loss_scale)
        if self.peak_flops:
            scalars["train/mfu"] = self.flops_per_image * images_per_s / (self.peak_flops * self.topo.world_size)
        self.metrics.log(step, scalars)
        eta = (cfg.schedule.total_steps - step) * elapsed / window.steps
        self.metrics.print(
            f"step {step}/{cfg.schedule.total_steps}  loss {loss:.4f}  lr {window.lr:.3g}  "
            f"grad {grad_norm:.3f}  {images_per_s:.1f} img/s  "
            f"data wait {scalars['train/data_wait_pct']:.0f}%  mem {most_allocated:.1f}/{most_reserved:.1f} GB  "
            f"epoch {scalars['train/epoch']:.2f}"
            + (f"  mfu {100 * scalars['train/mfu']:.1f}%" if "train/mfu" in scalars else "")
            + (f"  skipped {int(skipped_total)}" if skipped_total else "")
            + f"  eta {format_duration(eta)}"
        )
