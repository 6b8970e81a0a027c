"""Typed run configuration: schema with defaults and docs, YAML loading, overrides, validation.

Every knob of a run lives here as a dataclass field with a default and a one-line doc
(`field(doc=...)`). A run is configured by a YAML file whose sections mirror the
dataclasses below, plus any number of `--set section.key=value` overrides. Every
problem is reported as a `ConfigError` whose message names the key and what is allowed;
`main.py` turns it into one line on stderr and exit code 2 before any process starts
talking to another.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml


# Config spellings of the precisions -> torch dtypes.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ConfigError(ValueError):
    """A configuration problem, phrased for the user (one line, names the key)."""


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


@dataclass
class ModelConfig:
    arch: str = field("swin_debug", "Backbone name from the table in pretrain/models/backbones.py.")
    img_size: int = field(0, "Input resolution in pixels; 0 = the backbone's default.")
    window_size: int = field(0, "Attention window in tokens; 0 = the backbone's default.")
    drop_path: float = field(0.1, "Stochastic depth rate at the last block (linear over depth).")


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


@dataclass
class AugmentConfig:
    crop_scale: list[float] = field([0.08, 1.0], "Area range [min, max] of the random resized crop.")
    hflip: float = field(0.5, "Horizontal flip probability.")
    auto_augment: str = field("rand-m9-mstd0.5-inc1", "timm auto-augment policy string; empty disables it.")
    color_jitter: float = field(0.4, "Color jitter strength (timm ignores it when auto_augment is set).")
    random_erasing: float = field(0.25, "Random erasing probability (one rectangle of per-pixel noise, on the batch).")
    interpolation: Literal["bicubic", "bilinear", "random"] = field("bicubic", "Resize interpolation.")
    eval_crop_pct: float = field(0.875, "Center-crop fraction used for evaluation.")


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


@dataclass
class BatchConfig:
    micro_batch: int = field(32, "Images per rank per forward/backward.")
    global_batch: int = field(64, "Images per optimizer step over all ranks; accumulation is derived.")


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


@dataclass
class ScheduleConfig:
    total_steps: int = field(1000, "Optimizer steps of the whole run.")
    warmup_steps: int = field(100, "Linear warmup steps from warmup_lr to the peak learning rate.")


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


@dataclass
class SpeedConfig:
    sdpa_attention: bool = field(False, "Window attention through scaled_dot_product_attention with the bias as "
                                        "mask (timm's fused path).")
    compile: bool = field(False, "torch.compile every Swin block (pays off on GPUs; slower on CPU).")
    tf32: bool = field(True, "CUDA, precision=fp32: matrix multiplications on TF32 tensor cores (10-bit "
                             "mantissa inputs, fp32 accumulation).")


@dataclass
class CheckpointConfig:
    every_steps: int = field(500, "Save a checkpoint every N optimizer steps (and always at the end).")
    keep_last: int = field(3, "Number of most recent checkpoints kept on disk.")


@dataclass
class LogConfig:
    every_steps: int = field(10, "Console line and TensorBoard scalars every N optimizer steps.")
    images_every_steps: int = field(1000, "SimMIM: input / masked / reconstruction images every N steps "
                                          "(and at the end).")
    images: int = field(8, "SimMIM: number of validation images shown.")
    peak_tflops: float = field(0.0, "Dense bf16 peak of one device in TFLOP/s, for MFU; 0 = known GPUs only.")


@dataclass
class EvalConfig:
    every_steps: int = field(0, "Evaluate on the validation split every N steps; 0 = only at the end.")
    micro_batch: int = field(64, "Images per rank per evaluation forward.")


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


# ---------------------------------------------------------------------------------------
# Building a Config from nested dicts, with type checks that name the key.


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {typing.get_args(tp)[0].__name__}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin is list:
        if isinstance(value, str) and typing.get_args(tp)[0] is str:
            value = [value]  # `--set data.train_urls=train-{0..9}.tar` means a list of one pattern
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, typing.get_args(tp)[0], key) for v in value]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        # YAML 1.1 reads `1e-3` as a string; accept any spelling float() understands.
        if isinstance(value, bool):
            raise bad
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported schema type {tp} for {key}")


def _unknown(key: str, allowed: list[str]) -> ConfigError:
    last = key.rsplit(".", 1)[-1]
    prefix = key[: len(key) - len(last)]
    close = difflib.get_close_matches(last, allowed, n=1, cutoff=0.6)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (allowed: {', '.join(allowed)})"
    return ConfigError(f"unknown key {key}{hint}")


def _build(cls: type, values: Any, path: str) -> Any:
    """Instantiate dataclass `cls` from a dict, checking keys and types."""
    where = path or "the config root"
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise _unknown(full, list(fields))
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, full)
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split `section.key=value`; the value is read as YAML (`3`, `true`, `[1, 2]`, `abc`)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r} has no key before '='")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (),
                check: bool = True) -> Config:
    """Read a YAML config, apply `section.key=value` overrides, type-check it and (if `check`) validate it.

    `check=False` reads a run's saved config where its data may no longer exist (export).
    """
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {p}{where} is not valid YAML") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections")
    for text in overrides:
        key, value = parse_override(text)
        _set_path(tree, key, value)
    cfg = _build(Config, tree, "")
    if check:
        from pretrain.validation import validate

        validate(cfg)
    return cfg


def dump_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML (loadable again with load_config)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def reference_markdown() -> str:
    """The config reference table for the README, generated from the schema."""
    lines = ["| key | default | doc |", "|---|---|---|"]

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], key + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"| `{key}` | `{json.dumps(default)}` | {f.metadata['doc']} |")

    walk(Config, "")
    return "\n".join(lines)


def write_readme_reference(readme: Path) -> None:
    """Replace the text between the config-reference markers of the README with the reference."""
    begin, end = "<!-- config-reference -->", "<!-- /config-reference -->"
    text = readme.read_text()
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    readme.write_text(f"{head}{begin}\n{reference_markdown()}\n{end}{tail}")


if __name__ == "__main__":
    import sys

    import argparse

    ap = argparse.ArgumentParser(prog="python -m pretrain.config",
                                 description="Print the config reference, or facts of a config.")
    ap.add_argument("--readme", type=Path, help="rewrite the config reference section of this README")
    ap.add_argument("--run-dir", action="store_true", help="print the run directory of --config with --set")
    ap.add_argument("--config", help="YAML config (for --run-dir)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args()
    if args.readme:
        write_readme_reference(args.readme)
    elif args.run_dir:
        try:
            print(load_config(args.config, args.overrides, check=False).run_dir)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            sys.exit(2)
    else:
        print(reference_markdown())
