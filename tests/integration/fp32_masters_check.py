"""Run pretrain/main.py in this process and, right after the final checkpoint, have every rank save
the fp32 master weights its live optimizer holds: the truth an export of that checkpoint must equal.
Launched like pretrain/main.py, with its arguments:

    deepspeed --num_gpus N tests/integration/fp32_masters_check.py --config ... --set ...

Each rank writes RUN_DIR/masters/rank{R}.pt: its place in the grid (stage, tensor and data rank,
tensor degree), and, by the whole model's parameter names, the full fp32 master of each of its
parameters (its tensor-parallel shard: DeepSpeed's `safe_get_full_fp32_param` gathers the
data-parallel pieces) and the module's own (bf16) weight.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pretrain import main as entry  # noqa: E402  (picks DeepSpeed's accelerator before DeepSpeed is imported)
from pretrain.train import engine as engine_module  # noqa: E402
from pretrain.train.mixed_precision import MixedPrecisionAdamW  # noqa: E402
from pretrain.train.trainer import Trainer  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402

models: list[torch.nn.Module] = []  # the model each rank built, after tensor parallelism: its parameters' names


def live_master(optimizer: Any, param: torch.nn.Parameter) -> torch.Tensor | None:
    """The fp32 master of `param`: partitioned optimizers (BF16_Optimizer, ZeRO) through DeepSpeed's
    accessor (a collective over the data-parallel group); unpartitioned ones (DeepSpeed's unfused
    one, our MixedPrecisionAdamW) by their pairing of module weights and masters."""
    master = safe_get_full_fp32_param(param)
    if master is None:
        pairs = [pair for low, high in zip(getattr(optimizer, "fp16_groups", []), getattr(optimizer, "fp32_groups", []))
                 for pair in zip(low, high)]
        if isinstance(optimizer, MixedPrecisionAdamW):
            pairs = optimizer._pairs()
        master = next((high for low, high in pairs if low is param), None)
    return None if master is None else master.detach().float().cpu().clone()


def save_masters(trainer: Trainer) -> None:
    names = {id(p): name for name, p in models[-1].named_parameters()}
    masters, weights = {}, {}
    for param in trainer.engine.module.parameters():  # the same order on every rank of a data-parallel group
        name = names[id(param)]
        master = live_master(trainer.engine.optimizer, param)
        if master is not None:
            masters[name] = master
        weights[name] = param.detach().cpu().clone()
    topo = trainer.topo
    out = trainer.cfg.run_dir / "masters"
    out.mkdir(exist_ok=True)
    torch.save({"stage": topo.stage, "tp_rank": topo.tp_rank, "dp_rank": topo.dp_rank, "tensor": topo.tensor,
                "masters": masters, "weights": weights}, out / f"rank{topo.rank}.pt")


def install() -> None:
    prepare = engine_module.prepare_model

    def recording_prepare(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        models.append(model)
        return prepare(model, *args, **kwargs)

    engine_module.prepare_model = recording_prepare
    save = Trainer.save

    def saving_masters_too(self: Trainer) -> None:
        save(self)
        if self.state.step == self.cfg.schedule.total_steps:
            save_masters(self)

    Trainer.save = saving_masters_too


if __name__ == "__main__":  # data workers start through a forkserver, which imports this file again
    install()
    sys.exit(entry.main(sys.argv[1:]))
