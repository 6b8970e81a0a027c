"""Checks of a run before any process group starts: the config against the backbone table,
the shards, the world size and this node's GPUs.

The rules live in the config package (each section's `check`, and `config/checks.py`); this
module gathers the facts they need. Every problem is a ConfigError whose one-line message
names the key and what is allowed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from launch.env import gpus_per_node, local_world_size
from pretrain.config import Config
from pretrain.config import checks
from pretrain.data.info import DatasetInfo
from pretrain.data.shards import train_sources
from pretrain.models.backbones import BACKBONES, build_backbone, resolve_geometry
from pretrain.train.optim import freeze, matches


@dataclass(frozen=True)
class DeviceFacts:
    """What the GPU checks need to know about this node."""

    name: str  # of this process's first visible GPU
    bf16: bool  # whether it computes in bf16
    gpus_on_node: int  # GPUs the job may use on this node
    ranks_on_node: int | None  # as the launcher states it (None: not stated)

    @classmethod
    def here(cls) -> "DeviceFacts":
        return cls(torch.cuda.get_device_name(0), torch.cuda.is_bf16_supported(including_emulation=False),
                   gpus_per_node(torch.cuda.device_count()), local_world_size())


def on_cuda() -> bool:
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


def check_run(cfg: Config, world: int, check_data: bool = True) -> DatasetInfo | None:
    """Every check of `cfg` for a run of `world` ranks; raise ConfigError naming the offending key.

    Returns the dataset.json of data.root it checked against. `check_data=False` skips what
    needs the shards (and returns None), for planning a run on a machine that does not hold them.
    """
    cfg.check()
    checks.check_arch(cfg, list(BACKBONES))
    spec = BACKBONES[cfg.model.arch]
    img_size, _ = resolve_geometry(spec, cfg.model.img_size, cfg.model.window_size)
    checks.check_layout(cfg, world, spec)
    checks.check_model(cfg, spec, img_size)
    checks.check_batch(cfg, world)
    if cfg.optim.frozen:
        check_frozen(cfg)
    data = None
    if check_data:
        data = DatasetInfo.read(cfg.data.root)
        n_shards = sum(len(s) for s in train_sources(cfg, data)) if not cfg.data.resampled else 0
        checks.check_data(cfg, world, data.num_classes, n_shards)
    checks.check_precision(cfg, on_cuda())
    if on_cuda():
        checks.check_devices(cfg, DeviceFacts.here())
    return data


def check_frozen(cfg: Config) -> None:
    """optim.frozen against the backbone's parameter names, on the meta device (no memory, any size)."""
    with torch.device("meta"):
        backbone = build_backbone(cfg.model.arch, 1, cfg.model.img_size, cfg.model.window_size)
    names = [n for n, _ in backbone.named_parameters()]
    freeze(backbone, cfg.optim.frozen)
    checks.check_frozen(cfg, names, matches, trainable_left=any(q.requires_grad for q in backbone.parameters()))
