"""The run configuration's schema: one dataclass per section, each field with a default and a
one-line doc (`field(doc=...)`), each section with the check of its own values.

Checks that need facts from outside the config (the model table, dataset.json, the world
size, the GPUs) live in `checks.py` and take those facts as arguments, so this package
imports nothing else of the project.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch


# Config spellings of the precisions -> torch dtypes.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ConfigError(ValueError):
    """A configuration problem, phrased for the user (one line, names the key)."""


def need(ok: bool, message: str) -> None:
    """Raise a ConfigError with `message` unless `ok`."""
    if not ok:
        raise ConfigError(message)


def field(default: Any, doc: str) -> Any:
    """A schema field with its default and a one-line doc shown in the reference."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclass
class RunConfig:
    name: str = field("demo", "Run name; the run directory is output_dir/name.")
    output_dir: str = field("runs", "Parent directory of run directories.")
    seed: int = field(0, "Seed for model init, data order and augmentation.")
    auto_resume: bool = field(True, "Resume from the run directory's latest checkpoint if there is one.")
    max_bad_steps: int = field(20, "Stop after this many consecutive steps with a non-finite loss.")
    init_from: str = field("", "Export directory (pretrain.export) whose backbone weights start this run; "
                               "ignored when resuming from a checkpoint.")

    def check(self) -> None:
        need(bool(self.name) and "/" not in self.name, f"run.name={self.name!r} must be a non-empty name without '/'")
        need(self.max_bad_steps >= 1, f"run.max_bad_steps={self.max_bad_steps} must be >= 1")
        if self.init_from:
            need(Path(self.init_from, "model.safetensors").is_file(),
                 f"run.init_from={self.init_from}: no model.safetensors there (expected a pretrain.export directory)")



@dataclass
class ModelConfig:
    arch: str = field("swin_debug", "Backbone name from the table in pretrain/models/backbones.py.")
    img_size: int = field(0, "Input resolution in pixels; 0 = the backbone's default.")
    window_size: int = field(0, "Attention window in tokens; 0 = the backbone's default.")
    drop_path: float = field(0.1, "Stochastic depth rate at the last block (linear over depth).")

    def check(self) -> None:
        need(self.img_size >= 0, f"model.img_size={self.img_size} must be >= 0")
        need(self.window_size >= 0, f"model.window_size={self.window_size} must be >= 0")
        need(0.0 <= self.drop_path < 1.0, f"model.drop_path={self.drop_path} must be in [0, 1)")



@dataclass
class ObjectiveConfig:
    kind: Literal["supervised", "simmim"] = field("supervised", "Training objective: classification or SimMIM.")
    num_classes: int = field(0, "Classifier outputs (supervised); 0 = number of classes in dataset.json.")
    label_smoothing: float = field(0.1, "Label smoothing of the soft-target cross-entropy.")
    mixup: float = field(0.0, "Mixup alpha; 0 disables Mixup.")
    cutmix: float = field(0.0, "CutMix alpha; 0 disables CutMix.")
    mixup_prob: float = field(1.0, "Probability of applying Mixup or CutMix to a batch.")
    mixup_switch_prob: float = field(0.5, "Probability of CutMix instead of Mixup when both are on.")
    mask_ratio: float = field(0.6, "SimMIM: fraction of mask patches replaced by the mask token.")
    mask_patch_size: int = field(32, "SimMIM: side of a square mask patch in pixels.")
    norm_target: bool = field(False, "SimMIM: reconstruct pixels normalized within each mask patch.")

    def check(self) -> None:
        need(self.num_classes >= 0, f"objective.num_classes={self.num_classes} must be >= 0")
        need(0.0 <= self.label_smoothing < 1.0, f"objective.label_smoothing={self.label_smoothing} must be in [0, 1)")
        need(self.mixup >= 0 and self.cutmix >= 0, "objective.mixup and objective.cutmix must be >= 0")
        need(0.0 <= self.mixup_prob <= 1.0, f"objective.mixup_prob={self.mixup_prob} must be in [0, 1]")
        need(0.0 <= self.mixup_switch_prob <= 1.0,
             f"objective.mixup_switch_prob={self.mixup_switch_prob} must be in [0, 1]")
        if self.kind == "simmim":
            need(0.0 < self.mask_ratio < 1.0, f"objective.mask_ratio={self.mask_ratio} must be in (0, 1)")
            need(self.mixup == 0 and self.cutmix == 0,
                 "objective.mixup / objective.cutmix must be 0 with objective.kind=simmim")



@dataclass
class AugmentConfig:
    crop_scale: list[float] = field([0.08, 1.0], "Area range [min, max] of the random resized crop.")
    hflip: float = field(0.5, "Horizontal flip probability.")
    auto_augment: str = field("rand-m9-mstd0.5-inc1", "timm auto-augment policy string; empty disables it.")
    color_jitter: float = field(0.4, "Color jitter strength (timm ignores it when auto_augment is set).")
    random_erasing: float = field(0.25, "Random erasing probability (one rectangle of per-pixel noise, on the batch).")
    interpolation: Literal["bicubic", "bilinear", "random"] = field("bicubic", "Resize interpolation.")
    eval_crop_pct: float = field(0.875, "Center-crop fraction used for evaluation.")

    def check(self) -> None:
        need(len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
             f"augment.crop_scale={self.crop_scale} must be [min, max] with 0 < min <= max <= 1")
        need(0.0 <= self.hflip <= 1.0, f"augment.hflip={self.hflip} must be in [0, 1]")
        need(0.0 <= self.random_erasing <= 1.0, f"augment.random_erasing={self.random_erasing} must be in [0, 1]")
        need(0.0 < self.eval_crop_pct <= 1.0, f"augment.eval_crop_pct={self.eval_crop_pct} must be in (0, 1]")



@dataclass
class DataConfig:
    root: str = field("", "Directory with dataset.json (and, unless the URLs below say otherwise, the shards).")
    train_urls: list[str] = field([], "Training shards: paths, brace patterns or pipe: commands, one entry per "
                                      "source; empty = the train shards of dataset.json.")
    train_weights: list[float] = field([], "Sampling weight of each train_urls source; empty = equal weights.")
    val_urls: list[str] = field([], "Validation shards (as train_urls); empty = the val shards of dataset.json.")
    resampled: bool = field(True, "Draw training shards with replacement (else: passes over the shard list).")
    workers: int = field(2, "DataLoader worker processes per rank.")
    shuffle_buffer: int = field(2000, "Samples held in the training shuffle buffer per worker.")
    stall_timeout_s: float = field(600.0, "Seconds to wait for a batch from the data workers before stopping the "
                                          "run with an error (a stalled source or a stuck worker); below "
                                          "parallel.timeout_minutes.")

    def check(self) -> None:
        need(self.workers >= 0, f"data.workers={self.workers} must be >= 0")
        need(self.shuffle_buffer >= 1, f"data.shuffle_buffer={self.shuffle_buffer} must be >= 1")
        need(not self.train_weights or len(self.train_weights) == len(self.train_urls),
             f"data.train_weights has {len(self.train_weights)} entries but data.train_urls has {len(self.train_urls)}")
        need(all(w > 0 for w in self.train_weights), f"data.train_weights={self.train_weights} must all be > 0")



@dataclass
class BatchConfig:
    micro_batch: int = field(32, "Images per rank per forward/backward.")
    global_batch: int = field(64, "Images per optimizer step over all ranks; accumulation is derived.")

    def check(self) -> None:
        need(self.micro_batch >= 1, f"batch.micro_batch={self.micro_batch} must be >= 1")



@dataclass
class OptimConfig:
    base_lr: float = field(1.25e-4, "Peak learning rate at global batch 512 (scaled linearly with batch).")
    min_lr: float = field(1.25e-6, "Final learning rate of the cosine decay at batch 512 (scaled likewise).")
    warmup_lr: float = field(1.25e-7, "Learning rate at step 0 at batch 512 (scaled likewise).")
    weight_decay: float = field(0.05, "AdamW weight decay (not applied to norms, biases, position tables).")
    betas: list[float] = field([0.9, 0.999], "AdamW betas.")
    eps: float = field(1e-8, "AdamW epsilon.")
    clip_grad: float = field(5.0, "Clip the global gradient norm to this value; 0 disables clipping.")
    frozen: list[str] = field([], "Backbone parameter-name prefixes kept fixed: [patch_embed] freezes the stem, "
                                   "[patch_embed, layers, norm] trains only the head (linear probe).")

    def check(self) -> None:
        need(self.base_lr > 0, f"optim.base_lr={self.base_lr} must be > 0")
        need(0 <= self.min_lr <= self.base_lr, f"optim.min_lr={self.min_lr} must be in [0, optim.base_lr={self.base_lr}]")
        need(0 <= self.warmup_lr <= self.base_lr,
             f"optim.warmup_lr={self.warmup_lr} must be in [0, optim.base_lr={self.base_lr}]")
        need(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must be >= 0")
        need(len(self.betas) == 2 and all(0 <= x < 1 for x in self.betas),
             f"optim.betas={self.betas} must be two numbers in [0, 1)")
        need(self.eps > 0, f"optim.eps={self.eps} must be > 0")
        need(self.clip_grad >= 0, f"optim.clip_grad={self.clip_grad} must be >= 0 (0 disables clipping)")



@dataclass
class ScheduleConfig:
    total_steps: int = field(1000, "Optimizer steps of the whole run.")
    warmup_steps: int = field(100, "Linear warmup steps from warmup_lr to the peak learning rate.")

    def check(self) -> None:
        need(self.total_steps >= 1, f"schedule.total_steps={self.total_steps} must be >= 1")
        need(0 <= self.warmup_steps < self.total_steps,
             f"schedule.warmup_steps={self.warmup_steps} must be in [0, schedule.total_steps={self.total_steps})")



@dataclass
class ParallelConfig:
    zero_stage: int = field(2, "DeepSpeed ZeRO stage: 0 (plain data parallel), 1, 2 or 3.")
    offload_optimizer: bool = field(False, "Keep optimizer state in CPU memory (ZeRO 1-3).")
    bucket_size: int = field(50_000_000, "Elements per ZeRO gradient-reduction and all-gather bucket; larger "
                                          "overlaps communication better and holds 2 bytes per element (bf16).")
    activation_checkpointing: Literal["none", "blocks", "every_k"] = field(
        "none", "Recompute activations in the backward pass: none, every Swin block, or every k-th block.")
    checkpoint_every_k: int = field(2, "With activation_checkpointing=every_k: recompute blocks 0, k, 2k, ...")
    partition_activations: bool = field(False, "With checkpointing and tensor_parallel > 1: each kept block input is "
                                                "split over the tensor-parallel ranks (DeepSpeed).")
    cpu_checkpointing: bool = field(False, "With checkpointing: kept block inputs wait in CPU memory (DeepSpeed).")
    sequential_attention: list[int] = field([], "Stages (0-based) whose window attention runs a chunk of windows "
                                                "at a time, each chunk recomputed in backward; caps peak memory "
                                                "at high resolution with identical results.")
    attention_chunk_windows: int = field(64, "Windows per chunk of sequential_attention.")
    pipeline_stages: int = field(1, "Pipeline-parallel degree: the model is cut into this many consecutive stages "
                                    "(DeepSpeed PipelineModule); needs zero_stage 0 or 1.")
    pipeline_partition: Literal["flops", "parameters", "uniform"] = field(
        "flops", "How layers are balanced over pipeline stages: by forward FLOPs (compute), parameter count "
                 "(memory) or layer count.")
    tensor_parallel: int = field(1, "Tensor-parallel degree: each block's attention heads and MLP hidden units are "
                                    "split over this many ranks (fairscale layers); needs zero_stage 0 or 1.")
    timeout_minutes: float = field(30.0, "Process-group timeout: the longest a rank waits in a collective for the "
                                         "others (a checkpoint conversion, a slow save, a first compile).")
    overlap_comm: bool = field(True, "ZeRO 1-3: reduce gradient buckets while the backward pass still runs.")
    pin_memory: bool = field(True, "CUDA: page-locked host memory for input batches and ZeRO-Offload buffers, "
                                   "so host-to-GPU copies run asynchronously.")
    grad_accum_dtype: Literal["fp32", "bf16"] = field(
        "fp32", "bf16 runs: dtype gradients are accumulated in over micro-batches (README, Precision).")
    comm_dtype: Literal["fp32", "bf16"] = field(
        "fp32", "bf16 runs: dtype gradients are averaged over data-parallel ranks in (README, Precision).")

    @property
    def model_parallel(self) -> int:
        """Ranks holding one copy of the model: pipeline stages x tensor-parallel shards."""
        return max(1, self.pipeline_stages) * max(1, self.tensor_parallel)

    def check(self) -> None:
        need(self.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        need(self.pipeline_stages >= 1 and self.tensor_parallel >= 1,
             f"parallel.pipeline_stages={self.pipeline_stages} and parallel.tensor_parallel="
             f"{self.tensor_parallel} must be >= 1")
        need(self.model_parallel == 1 or self.zero_stage <= 1,
             f"parallel.zero_stage={self.zero_stage} cannot be combined with pipeline or tensor "
             f"parallelism (allowed: 0 or 1)")
        need(not ((self.partition_activations or self.cpu_checkpointing) and self.activation_checkpointing == "none"),
             "parallel.partition_activations / parallel.cpu_checkpointing keep checkpointed block "
             "inputs: set parallel.activation_checkpointing to blocks or every_k")
        need(not (self.partition_activations and self.tensor_parallel == 1),
             "parallel.partition_activations=true splits activations over tensor-parallel ranks: "
             "set parallel.tensor_parallel > 1")
        need(not (self.offload_optimizer and self.zero_stage == 0),
             "parallel.offload_optimizer=true needs parallel.zero_stage 1, 2 or 3 (got 0)")
        need(self.checkpoint_every_k >= 1, f"parallel.checkpoint_every_k={self.checkpoint_every_k} must be >= 1")
        need(self.bucket_size >= 1_000_000, f"parallel.bucket_size={self.bucket_size} must be >= 1000000")
        need(self.attention_chunk_windows >= 1,
             f"parallel.attention_chunk_windows={self.attention_chunk_windows} must be >= 1")
        need(self.timeout_minutes > 0, f"parallel.timeout_minutes={self.timeout_minutes:g} must be > 0")



@dataclass
class SpeedConfig:
    sdpa_attention: bool = field(False, "Window attention through scaled_dot_product_attention with the bias as "
                                        "mask (timm's fused path).")
    compile: bool = field(False, "torch.compile every Swin block (pays off on GPUs; slower on CPU).")
    tf32: bool = field(True, "CUDA, precision=fp32: matrix multiplications on TF32 tensor cores (10-bit "
                             "mantissa inputs, fp32 accumulation).")

    def check(self) -> None:
        pass  # switches only: every combination is valid



@dataclass
class CheckpointConfig:
    every_steps: int = field(500, "Save a checkpoint every N optimizer steps (and always at the end).")
    keep_last: int = field(3, "Number of most recent checkpoints kept on disk.")

    def check(self) -> None:
        need(self.every_steps >= 1, f"checkpoint.every_steps={self.every_steps} must be >= 1")
        need(self.keep_last >= 1, f"checkpoint.keep_last={self.keep_last} must be >= 1")



@dataclass
class LogConfig:
    every_steps: int = field(10, "Console line and TensorBoard scalars every N optimizer steps.")
    images_every_steps: int = field(1000, "SimMIM: input / masked / reconstruction images every N steps "
                                          "(and at the end).")
    images: int = field(8, "SimMIM: number of validation images shown.")
    peak_tflops: float = field(0.0, "Dense bf16 peak of one device in TFLOP/s, for MFU; 0 = known GPUs only.")

    def check(self) -> None:
        need(self.every_steps >= 1, f"log.every_steps={self.every_steps} must be >= 1")
        need(self.peak_tflops >= 0, f"log.peak_tflops={self.peak_tflops} must be >= 0")
        need(self.images_every_steps >= 0, f"log.images_every_steps={self.images_every_steps} must be >= 0")
        need(self.images >= 1, f"log.images={self.images} must be >= 1")



@dataclass
class EvalConfig:
    every_steps: int = field(0, "Evaluate on the validation split every N steps; 0 = only at the end.")
    micro_batch: int = field(64, "Images per rank per evaluation forward.")

    def check(self) -> None:
        need(self.every_steps >= 0, f"eval.every_steps={self.every_steps} must be >= 0")
        need(self.micro_batch >= 1, f"eval.micro_batch={self.micro_batch} must be >= 1")



@dataclass
class Config:
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    batch: BatchConfig = dataclasses.field(default_factory=BatchConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    precision: Literal["bf16", "fp16", "fp32"] = field("bf16", "Training precision (bf16/fp16 keep fp32 master weights).")
    speed: SpeedConfig = dataclasses.field(default_factory=SpeedConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Every section's own check, then what two sections decide together (no outside facts)."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                section.check()
        z = self.parallel
        # A stall must end in our one-line error (exit 5), before the process group's watchdog aborts.
        need(0 < self.data.stall_timeout_s < 60 * z.timeout_minutes,
             f"data.stall_timeout_s={self.data.stall_timeout_s:g} must be > 0 and below parallel.timeout_minutes x 60 "
             f"= {60 * z.timeout_minutes:g} s")
        need(not (self.precision == "bf16" and z.grad_accum_dtype == "fp32" and z.zero_stage == 0
                  and z.model_parallel > 1),
             "parallel.grad_accum_dtype=fp32 with bf16 under pipeline/tensor parallelism needs parallel.zero_stage=1 "
             "(DeepSpeed accumulates in fp32 only in its ZeRO optimizers); or set parallel.grad_accum_dtype=bf16")
