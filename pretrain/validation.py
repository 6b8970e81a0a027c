"""Validation of a config's values and combinations, before any process group starts.

Every check raises a ConfigError whose one-line message names the key and what is allowed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from launch.env import gpus_per_node, local_world_size
from pretrain.config import Config, ConfigError

def launch_world_size() -> int:
    """World size announced by the launcher (deepspeed, torchrun, Slurm), 1 for plain python."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):  # deepspeed/torchrun, then srun
        if os.environ.get(var):
            return int(os.environ[var])
    return 1


def dataset_info(root: str) -> dict[str, Any]:
    """Read `dataset.json` of a shard directory, with a config error if it is missing or broken."""
    path = Path(root) / "dataset.json"
    if not root:
        raise ConfigError("data.root is empty: set it to a directory written by pretrain.data.write_shards")
    if not path.is_file():
        raise ConfigError(f"data.root={root}: no dataset.json there (write shards with pretrain.data.write_shards)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"data.root={root}: dataset.json is not valid JSON ({e.msg}, line {e.lineno})") from None


def validate(cfg: Config, world_size: int | None = None, check_data: bool = True) -> None:
    """Check value ranges and combinations; raise ConfigError naming the offending key.

    `check_data=False` skips what needs the shards (dataset.json, shard counts), for planning
    a run on a machine that does not hold the data.
    """
    from pretrain.models.backbones import BACKBONES, build_backbone, resolve_geometry

    world = launch_world_size() if world_size is None else world_size
    z = cfg.parallel
    model_parallel = max(1, z.pipeline_stages) * max(1, z.tensor_parallel)
    dp = max(1, world // model_parallel)  # data-parallel size; the layout itself is checked below

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(bool(cfg.run.name) and "/" not in cfg.run.name, f"run.name={cfg.run.name!r} must be a non-empty name without '/'")
    need(cfg.model.arch in BACKBONES, f"model.arch={cfg.model.arch!r} is unknown (allowed: {', '.join(BACKBONES)})")
    need(cfg.model.img_size >= 0, f"model.img_size={cfg.model.img_size} must be >= 0")
    need(cfg.model.window_size >= 0, f"model.window_size={cfg.model.window_size} must be >= 0")
    need(0.0 <= cfg.model.drop_path < 1.0, f"model.drop_path={cfg.model.drop_path} must be in [0, 1)")
    resolve_geometry(BACKBONES[cfg.model.arch], cfg.model.img_size, cfg.model.window_size)
    validate_layout(cfg, world)

    o = cfg.objective
    need(o.num_classes >= 0, f"objective.num_classes={o.num_classes} must be >= 0")
    need(0.0 <= o.label_smoothing < 1.0, f"objective.label_smoothing={o.label_smoothing} must be in [0, 1)")
    need(o.mixup >= 0 and o.cutmix >= 0, "objective.mixup and objective.cutmix must be >= 0")
    need(0.0 <= o.mixup_prob <= 1.0, f"objective.mixup_prob={o.mixup_prob} must be in [0, 1]")
    need(0.0 <= o.mixup_switch_prob <= 1.0, f"objective.mixup_switch_prob={o.mixup_switch_prob} must be in [0, 1]")

    if o.kind == "simmim":
        img, _ = resolve_geometry(BACKBONES[cfg.model.arch], cfg.model.img_size, cfg.model.window_size)
        patch = BACKBONES[cfg.model.arch].patch_size
        need(0.0 < o.mask_ratio < 1.0, f"objective.mask_ratio={o.mask_ratio} must be in (0, 1)")
        need(o.mask_patch_size > 0 and img % o.mask_patch_size == 0 and o.mask_patch_size % patch == 0,
             f"objective.mask_patch_size={o.mask_patch_size} must divide model.img_size={img} and be a multiple "
             f"of the model patch size {patch}")
        need(o.mixup == 0 and o.cutmix == 0, "objective.mixup / objective.cutmix must be 0 with objective.kind=simmim")
    need(cfg.run.max_bad_steps >= 1, f"run.max_bad_steps={cfg.run.max_bad_steps} must be >= 1")
    need(cfg.log.peak_tflops >= 0, f"log.peak_tflops={cfg.log.peak_tflops} must be >= 0")
    need(cfg.log.images_every_steps >= 0, f"log.images_every_steps={cfg.log.images_every_steps} must be >= 0")
    need(cfg.log.images >= 1, f"log.images={cfg.log.images} must be >= 1")
    if cfg.run.init_from:
        need(Path(cfg.run.init_from, "model.safetensors").is_file(),
             f"run.init_from={cfg.run.init_from}: no model.safetensors there (expected a pretrain.export directory)")

    a = cfg.augment
    need(len(a.crop_scale) == 2 and 0 < a.crop_scale[0] <= a.crop_scale[1] <= 1,
         f"augment.crop_scale={a.crop_scale} must be [min, max] with 0 < min <= max <= 1")
    need(0.0 <= a.hflip <= 1.0, f"augment.hflip={a.hflip} must be in [0, 1]")
    need(0.0 <= a.random_erasing <= 1.0, f"augment.random_erasing={a.random_erasing} must be in [0, 1]")
    need(0.0 < a.eval_crop_pct <= 1.0, f"augment.eval_crop_pct={a.eval_crop_pct} must be in (0, 1]")

    need(cfg.data.workers >= 0, f"data.workers={cfg.data.workers} must be >= 0")
    need(z.timeout_minutes > 0, f"parallel.timeout_minutes={z.timeout_minutes:g} must be > 0")
    # A stall must end in our one-line error (exit 5), before the process group's watchdog aborts.
    need(0 < cfg.data.stall_timeout_s < 60 * z.timeout_minutes,
         f"data.stall_timeout_s={cfg.data.stall_timeout_s:g} must be > 0 and below parallel.timeout_minutes x 60 "
         f"= {60 * z.timeout_minutes:g} s")
    need(cfg.data.shuffle_buffer >= 1, f"data.shuffle_buffer={cfg.data.shuffle_buffer} must be >= 1")
    d = cfg.data
    need(not d.train_weights or len(d.train_weights) == len(d.train_urls),
         f"data.train_weights has {len(d.train_weights)} entries but data.train_urls has {len(d.train_urls)}")
    need(all(w > 0 for w in d.train_weights), f"data.train_weights={d.train_weights} must all be > 0")
    if check_data:
        info = dataset_info(cfg.data.root)
        if not d.resampled:
            from pretrain.data.shards import train_sources

            n_shards = sum(len(s) for s in train_sources(cfg, info))
            need(n_shards >= dp * max(1, d.workers),
                 f"data.resampled=false needs at least data-parallel ranks x data.workers = {dp} x {max(1, d.workers)} "
                 f"training shards, found {n_shards}; use data.resampled=true or fewer workers")
        n_classes = len(info.get("classes", []))
        need(o.num_classes in (0, n_classes), f"objective.num_classes={o.num_classes} disagrees with the "
                                              f"{n_classes} classes in {cfg.data.root}/dataset.json")

    b = cfg.batch
    need(b.micro_batch >= 1, f"batch.micro_batch={b.micro_batch} must be >= 1")
    per_step = b.micro_batch * dp
    need(b.global_batch >= per_step and b.global_batch % per_step == 0,
         f"batch.global_batch={b.global_batch} must be a multiple of batch.micro_batch x data-parallel ranks "
         f"= {b.micro_batch} x {dp} = {per_step}")

    p = cfg.optim
    need(p.base_lr > 0, f"optim.base_lr={p.base_lr} must be > 0")
    need(0 <= p.min_lr <= p.base_lr, f"optim.min_lr={p.min_lr} must be in [0, optim.base_lr={p.base_lr}]")
    need(0 <= p.warmup_lr <= p.base_lr, f"optim.warmup_lr={p.warmup_lr} must be in [0, optim.base_lr={p.base_lr}]")
    need(p.weight_decay >= 0, f"optim.weight_decay={p.weight_decay} must be >= 0")
    need(len(p.betas) == 2 and all(0 <= x < 1 for x in p.betas), f"optim.betas={p.betas} must be two numbers in [0, 1)")
    need(p.eps > 0, f"optim.eps={p.eps} must be > 0")
    need(p.clip_grad >= 0, f"optim.clip_grad={p.clip_grad} must be >= 0 (0 disables clipping)")
    if p.frozen:
        from pretrain.train.optim import freeze, matches

        with torch.device("meta"):  # names only: no memory, any size
            backbone = build_backbone(cfg.model.arch, 1, cfg.model.img_size, cfg.model.window_size)
        names = [n for n, _ in backbone.named_parameters()]
        for prefix in p.frozen:
            need(any(matches(n, [prefix]) for n in names),
                 f"optim.frozen: {prefix!r} names no parameter of {cfg.model.arch} (top-level names: "
                 f"{', '.join(dict.fromkeys(n.split('.')[0] for n in names))})")
        freeze(backbone, p.frozen)
        need(any(q.requires_grad for q in backbone.parameters()) or cfg.objective.kind == "simmim",
             f"optim.frozen={p.frozen} leaves nothing to train")

    s = cfg.schedule
    need(s.total_steps >= 1, f"schedule.total_steps={s.total_steps} must be >= 1")
    need(0 <= s.warmup_steps < s.total_steps,
         f"schedule.warmup_steps={s.warmup_steps} must be in [0, schedule.total_steps={s.total_steps})")

    need(z.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage={z.zero_stage} must be 0, 1, 2 or 3")
    need(not (z.offload_optimizer and z.zero_stage == 0),
         "parallel.offload_optimizer=true needs parallel.zero_stage 1, 2 or 3 (got 0)")
    need(z.checkpoint_every_k >= 1, f"parallel.checkpoint_every_k={z.checkpoint_every_k} must be >= 1")
    need(z.bucket_size >= 1_000_000, f"parallel.bucket_size={z.bucket_size} must be >= 1000000")
    need(z.attention_chunk_windows >= 1,
         f"parallel.attention_chunk_windows={z.attention_chunk_windows} must be >= 1")
    stages = len(BACKBONES[cfg.model.arch].depths)
    bad = [s for s in z.sequential_attention if not 0 <= s < stages]
    need(not bad, f"parallel.sequential_attention={z.sequential_attention}: {cfg.model.arch} has stages "
                  f"0..{stages - 1} (got {bad})")
    need(not (cfg.precision == "bf16" and z.grad_accum_dtype == "fp32" and z.zero_stage == 0 and model_parallel > 1),
         "parallel.grad_accum_dtype=fp32 with bf16 under pipeline/tensor parallelism needs parallel.zero_stage=1 "
         "(DeepSpeed accumulates in fp32 only in its ZeRO optimizers); or set parallel.grad_accum_dtype=bf16")
    on_cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    need(cfg.precision != "fp16" or on_cuda, "precision=fp16 needs a CUDA device; use precision=bf16 (or fp32) on CPU")
    if on_cuda:
        validate_devices(cfg, world, DeviceFacts.here())

    need(cfg.checkpoint.every_steps >= 1, f"checkpoint.every_steps={cfg.checkpoint.every_steps} must be >= 1")
    need(cfg.checkpoint.keep_last >= 1, f"checkpoint.keep_last={cfg.checkpoint.keep_last} must be >= 1")
    need(cfg.log.every_steps >= 1, f"log.every_steps={cfg.log.every_steps} must be >= 1")
    need(cfg.eval.every_steps >= 0, f"eval.every_steps={cfg.eval.every_steps} must be >= 0")
    need(cfg.eval.micro_batch >= 1, f"eval.micro_batch={cfg.eval.micro_batch} must be >= 1")


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


def validate_devices(cfg: Config, world: int, facts: DeviceFacts) -> None:
    """Checks against the GPUs of this node, before any process group starts."""
    if cfg.precision == "bf16" and not facts.bf16:
        raise ConfigError(f"precision=bf16: {facts.name} does not compute in bf16; use precision=fp16 or fp32")
    tensor = cfg.parallel.tensor_parallel
    if tensor > facts.gpus_on_node:
        raise ConfigError(f"parallel.tensor_parallel={tensor} is larger than the {facts.gpus_on_node} GPUs of one "
                          f"node: a tensor-parallel group must stay on a node's fast links")
    if facts.ranks_on_node and facts.ranks_on_node > facts.gpus_on_node:
        raise ConfigError(f"{facts.ranks_on_node} ranks on this node but {facts.gpus_on_node} GPUs: start at most "
                          f"one rank per GPU (deepspeed --num_gpus, torchrun --nproc_per_node, srun --ntasks-per-node)")


def validate_layout(cfg: Config, world: int) -> None:
    """world = data x pipeline x tensor, and what each model-parallel degree allows."""
    from pretrain.models.backbones import BACKBONES

    z = cfg.parallel
    spec = BACKBONES[cfg.model.arch]
    if z.pipeline_stages < 1 or z.tensor_parallel < 1:
        raise ConfigError(f"parallel.pipeline_stages={z.pipeline_stages} and parallel.tensor_parallel="
                          f"{z.tensor_parallel} must be >= 1")
    model_parallel = z.pipeline_stages * z.tensor_parallel
    if world % model_parallel:
        raise ConfigError(f"parallel.pipeline_stages x parallel.tensor_parallel = {z.pipeline_stages} x "
                          f"{z.tensor_parallel} = {model_parallel} must divide the {world} ranks")
    if model_parallel > 1 and z.zero_stage > 1:
        raise ConfigError(f"parallel.zero_stage={z.zero_stage} cannot be combined with pipeline or tensor "
                          f"parallelism (allowed: 0 or 1)")
    if (z.partition_activations or z.cpu_checkpointing) and z.activation_checkpointing == "none":
        raise ConfigError("parallel.partition_activations / parallel.cpu_checkpointing keep checkpointed block "
                          "inputs: set parallel.activation_checkpointing to blocks or every_k")
    if z.partition_activations and z.tensor_parallel == 1:
        raise ConfigError("parallel.partition_activations=true splits activations over tensor-parallel ranks: "
                          "set parallel.tensor_parallel > 1")
    uneven = [h for h in spec.num_heads if h % z.tensor_parallel]
    if uneven:
        raise ConfigError(f"parallel.tensor_parallel={z.tensor_parallel} must divide the attention heads of every "
                          f"stage of {cfg.model.arch} ({', '.join(map(str, spec.num_heads))})")
    layers = 2 + sum(spec.depths) + len(spec.depths) - 1  # embed, blocks, patch mergings, head
    if z.pipeline_stages > layers:
        raise ConfigError(f"parallel.pipeline_stages={z.pipeline_stages} exceeds the {layers} pipeline layers of "
                          f"{cfg.model.arch}")
