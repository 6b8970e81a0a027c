"""Training entry point.

    deepspeed [--num_gpus N] pretrain/main.py --config configs/X.yaml [--set section.key=value ...]
    torchrun --nproc_per_node N pretrain/main.py --config ...
    python pretrain/main.py --config ...            # one process

Reads and validates the config (errors: one line, exit code 2), builds the backbone, the
objective and the DeepSpeed engine, resumes from the run's latest checkpoint if any,
and trains for `schedule.total_steps` optimizer steps. Exit codes: 0 done, 2 config
error, 3 stopped by SIGUSR1/SIGTERM after a checkpoint (re-run to continue), 4 diverged,
5 data stalled, 6 out of GPU memory, 7 a checkpoint could not be written (disk full; the
previous checkpoint stays the one resumed).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

if __package__ in (None, ""):
    # Run as a script: import the package from the repository, not this directory's modules.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from launch.env import LaunchError, default_accelerator, launch_world_size

default_accelerator()  # before DeepSpeed is first imported (below): it picks its accelerator then

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from pretrain.config import ConfigError, dump_config, load_config  # noqa: E402
from pretrain.data.shards import DataStalled, start_worker_server  # noqa: E402
from pretrain.parallel.topology import discover, init_distributed  # noqa: E402
from pretrain.preflight import check_run  # noqa: E402
from pretrain.train import checkpoint  # noqa: E402
from pretrain.train.engine import build_training  # noqa: E402
from pretrain.train.faults import FaultInjection  # noqa: E402
from pretrain.train.metrics import Metrics, setup_logging  # noqa: E402
from pretrain.train.trainer import Diverged, Preempted, Trainer  # noqa: E402


EXIT_PREEMPTED = 3  # stopped on a signal after a checkpoint: requeue / re-run to continue
EXIT_DIVERGED = 4  # too many non-finite losses in a row
EXIT_DATA_STALLED = 5  # no batch from the data workers within data.stall_timeout_s
EXIT_OUT_OF_MEMORY = 6  # the layout does not fit the GPU: the message names the planner command
EXIT_SAVE_FAILED = 7  # a checkpoint could not be written (disk full): the previous one stays `latest`


def out_of_memory_message(cfg: Any, topo: Any, args: argparse.Namespace, step: int) -> str:
    """One line: what ran out of memory, with what layout, and the planner command that finds one that fits."""
    p = cfg.parallel
    gpu_gb = torch.cuda.get_device_properties(topo.device).total_memory / 2**30 if topo.device.type == "cuda" else 0
    plan = " ".join(["python -m pretrain.plan --config", args.config, *(f"--set {o}" for o in args.overrides),
                     f"--gpus {topo.world_size}", f"--gpu-mem-gb {gpu_gb:.0f}" if gpu_gb else "--gpu-mem-gb GB"])
    return (f"out of GPU memory on rank {topo.rank} at step {step + 1}: layout data {topo.dp_size} x pipeline "
            f"{topo.pipeline} x tensor {topo.tensor}, ZeRO-{p.zero_stage}, batch.micro_batch={cfg.batch.micro_batch}, "
            f"precision={cfg.precision}, activation_checkpointing={p.activation_checkpointing}; "
            f"`{plan}` suggests a layout that fits")


def exit_this_rank(metrics: Any, message: str, code: int) -> NoReturn:
    """Exit at once after a failure of this rank, which whichever rank has it reports."""
    metrics.print(message, error=True, this_rank=True)
    metrics.close()
    # The other ranks may be waiting in a collective for this one: leave without the closing barrier
    # (and without process-group teardown, which could wait on them too); the launcher stops them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="pretrain/main.py", description="Pretrain a Swin backbone.")
    ap.add_argument("--config", required=True, help="YAML config (see configs/)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override one config value; repeatable")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        dataset = check_run(cfg, launch_world_size())
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"config error: {e}", file=sys.stderr)
        return 2
    if cfg.data.workers:
        start_worker_server()  # its imports overlap the model's construction

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed's ZeRO still calls this collective under its deprecated name; not actionable for users.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated")
    try:
        topo = discover(cfg.parallel.pipeline_stages, cfg.parallel.tensor_parallel)
        init_distributed(topo, cfg.parallel.timeout_minutes)
    except LaunchError as e:
        print(f"launch error: {e}", file=sys.stderr)
        return 2

    num_classes = cfg.objective.num_classes or dataset.num_classes

    if topo.is_main:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, cfg.run_dir / "config.yaml")
        # The class list travels with the run, so export works without the shards.
        dataset.write(cfg.run_dir)
    dist.barrier()
    setup_logging(cfg.run_dir, topo.rank)
    metrics = Metrics(cfg.run_dir, rank=topo.rank)

    # Which checkpoint to continue from decides how DeepSpeed loads it (universal when the
    # layout changed), so it is found, and converted if need be, before the engine exists.
    try:
        resume_point = checkpoint.find_resume(cfg.run_dir, topo, cfg.parallel.zero_stage, cfg.precision) \
            if cfg.run.auto_resume else None
    except ConfigError as e:
        metrics.print(f"config error: {e}", error=True)
        metrics.close()
        dist.destroy_process_group()
        return 2
    if resume_point is not None:
        checkpoint.prepare(resume_point)
    training = build_training(cfg, topo, num_classes, load_universal=bool(resume_point and resume_point.universal))
    if training.init_message:
        metrics.print(training.init_message)
    run_state = checkpoint.RunState(arch=cfg.model.arch, num_classes=num_classes,
                                    label_map_version=dataset.label_map_version,
                                    param_group_names=training.param_group_names)
    trainer = Trainer(cfg, topo, training, dataset, metrics, run_state, FaultInjection.from_env(topo.rank))
    status = 0
    try:
        if resume_point is not None:
            trainer.resume(resume_point)
        trainer.fit()
    except Preempted as e:
        metrics.print(str(e))
        status = EXIT_PREEMPTED
    except Diverged as e:
        metrics.print(str(e), error=True)
        status = EXIT_DIVERGED
    except checkpoint.SaveFailed as e:
        if not e.agreed:  # the ranks fell out of step inside DeepSpeed's save
            exit_this_rank(metrics, str(e), EXIT_SAVE_FAILED)
        metrics.print(str(e), error=True)  # every rank has it: a clean stop
        status = EXIT_SAVE_FAILED
    except (DataStalled, torch.OutOfMemoryError) as e:
        stalled = isinstance(e, DataStalled)
        exit_this_rank(metrics, str(e) if stalled else out_of_memory_message(cfg, topo, args, trainer.state.step),
                    EXIT_DATA_STALLED if stalled else EXIT_OUT_OF_MEMORY)
    metrics.close()
    dist.barrier()
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
