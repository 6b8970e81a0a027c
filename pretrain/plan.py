"""Memory planner: what one rank holds for a config on N GPUs, and whether it fits.

    python -m pretrain.plan --config configs/swinv2_g_simmim_22k.yaml --gpus 8 --gpu-mem-gb 80
    python -m pretrain.plan --config configs/swin_l_22k.yaml --gpus 16 --gpu-mem-gb 40 --set model.img_size=384

N GPUs = D data-parallel x S pipeline stages x T tensor-parallel ranks. A rank holds the
tensor-parallel shard (1/T of every block's attention and MLP) of one pipeline stage's
layers, cut as DeepSpeed cuts them; the plan is for the most loaded stage. Per rank, with
P the parameters it holds (DeepSpeed's mixed-precision layout):
- weights: 2P bytes in bf16/fp16 (4P in fp32); ZeRO-3 keeps P/D of them;
- gradients: with ZeRO, the fp32 gradients of the rank's optimizer partition, 4P/D, plus
  for ZeRO-1 the whole low-precision gradients, 2P (ZeRO-2/3 pass them through the bucket
  below); without ZeRO, 2P plus an fp32 copy 4P;
- optimizer: fp32 master weights and AdamW's two moments, 12P (ZeRO-1/2/3: /D; none on the
  device with `parallel.offload_optimizer`);
- buckets: ZeRO's gradient-reduction bucket, `parallel.bucket_size` elements (ZeRO 1-3);
- ZeRO-3 with fp32 gradient dtypes (bf16 runs, the defaults) adds an fp32 accumulation
  partition, 4P/D, and fp32 copies of a bucket's gradients, about 6 bytes per element
  (measured: the planner's terms for ZeRO-3 in bf16 gradient dtypes held, these did not);
- activations: not a formula. The rank's model (its shard, with its checkpointing and
  sequential attention) runs one forward pass through the pipeline layers on the meta
  device, which allocates nothing, while autograd's saved-tensor hook adds up what the
  backward pass will need; a checkpointed block also needs all of its activations again
  while it is recomputed, when the layers after it are already freed, and the gradients in
  flight add about one largest activation. A pipeline stage holds up to S - stage
  micro-batches in flight. The saved tensors are exact; the peak is checked against memory
  measured on CPU in the tests.
- reserve: 10% of the device for the CUDA context, allocator fragmentation and
  communication buffers.

When the configured layout does not fit, the cheapest one that does is suggested, trying
in order of cost: more ZeRO (1, 2, 3), then activation checkpointing (every 2nd block,
every block), then a smaller micro-batch (more accumulation), then tensor parallelism
(2, 4, 8 ranks of a node), then pipeline stages, and last optimizer offload.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from launch.env import default_accelerator

default_accelerator()  # before DeepSpeed is first imported (below): its partitioning helpers run on CPU too

from pretrain.config import DTYPES, Config, ConfigError, load_config  # noqa: E402
from pretrain.data.info import DATASET_JSON, DatasetInfo  # noqa: E402
from pretrain.models.backbones import BACKBONES  # noqa: E402
from pretrain.models.objectives import build_objective  # noqa: E402
from pretrain.parallel.pipeline import example_inputs, layer_flops, pipeline_layers, stage_bounds  # noqa: E402
from pretrain.parallel.prepare import prepare_model  # noqa: E402
from pretrain.preflight import check_run  # noqa: E402

GB = 1e9
RESERVE = 0.10
IN22K_CLASSES = 21841


@dataclass
class Estimate:
    """Bytes one rank holds during a training step."""

    weights: float
    gradients: float
    optimizer: float
    buckets: float
    activations: float
    parameters: int

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.buckets + self.activations


def _build(cfg: Config, num_classes: int, checkpointing: bool = True) -> torch.nn.Module:
    """One rank's training module on the meta device: its tensor-parallel shard (first rank),
    prepared as the engine prepares it."""
    with torch.device("meta"):
        model = build_objective(cfg, num_classes).build_model()
        prepare_model(model, cfg, topo=None, checkpointing=checkpointing)
    return model.to(DTYPES[cfg.precision]).train()


def _trace(model: torch.nn.Module, micro: int) -> tuple[list[int], int]:
    """One forward through the model's pipeline layers on the meta device, counting what
    autograd saves for the backward pass.

    Returns (bytes saved by each pipeline layer, largest single saved buffer).
    """
    x = example_inputs(model, micro, next(model.parameters()).dtype, device="meta")

    # Count storages, not tensors: views of one buffer saved by several ops cost it once, and
    # weights saved for the backward pass are the parameters themselves, counted elsewhere.
    weights = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}
    largest = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal largest
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
            largest = max(largest, storage.nbytes())
        return t

    per_layer = []
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for layer in pipeline_layers(model):
            before = sum(saved.values())
            x = layer(x)
            per_layer.append(sum(saved.values()) - before)
    return per_layer, largest


@dataclass
class Activations:
    """What each pipeline layer saves for backward, as configured (`kept`) and without checkpointing (`full`)."""

    kept: list[int]
    full: list[int]
    largest: int

    def peak(self, layers: range, in_flight: int = 1) -> float:
        """Peak activation bytes of a run of layers holding `in_flight` micro-batches.

        The backward pass frees the layers after the one it is in, so one micro-batch peaks at
        the larger of everything saved (when backward starts) and, for every layer, what the
        layers before it keep plus all of its own activations (rebuilt if it is checkpointed);
        the gradients in flight add about one largest activation. A pipeline stage holds the
        saved activations of up to (stages - stage) micro-batches (DeepSpeed's 1F1B schedule).
        """
        held = sum(self.kept[i] for i in layers)
        peak, prefix = held, 0
        for i in layers:
            peak = max(peak, prefix + self.full[i])
            prefix += self.kept[i]
        return (in_flight - 1) * held + peak + self.largest


def activations(cfg: Config, num_classes: int, micro: int, plain: torch.nn.Module | None = None) -> Activations:
    """Traced activations of `cfg`; `plain` is its model without checkpointing, if already built."""
    kept, _ = _trace(_build(cfg, num_classes), micro)
    # The largest buffer counts as it exists while a block runs, rebuilt or not.
    full, largest = _trace(plain or _build(cfg, num_classes, checkpointing=False), micro)
    return Activations(kept, full, largest)


def activation_bytes(cfg: Config, num_classes: int, micro: int) -> float:
    """Peak activation memory of one micro-batch through the whole model in a training step."""
    a = activations(cfg, num_classes, micro)
    return a.peak(range(len(a.kept)))


def stage_ranges(cfg: Config, model: torch.nn.Module) -> list[range]:
    """The pipeline layers of each stage of `model` (one rank's, on the meta device), cut as the run cuts them."""
    method = cfg.parallel.pipeline_partition
    bounds = stage_bounds(method, pipeline_layers(model), cfg.parallel.pipeline_stages,
                          layer_flops(model) if method == "flops" else None)
    return [range(start, stop) for start, stop in zip(bounds, bounds[1:])]


def estimate(cfg: Config, num_classes: int, gpus: int) -> Estimate:
    """Per-rank memory of `cfg` on `gpus` ranks: the rank of the most loaded pipeline stage."""
    p = cfg.parallel
    dp = gpus // (p.pipeline_stages * p.tensor_parallel)
    model = _build(cfg, num_classes, checkpointing=False)
    layer_params = [sum(q.numel() for q in layer.parameters()) for layer in pipeline_layers(model)]
    acts = activations(cfg, num_classes, cfg.batch.micro_batch, plain=model)
    accumulation = max(1, cfg.batch.global_batch // (cfg.batch.micro_batch * dp))
    worst = None
    for stage, layers in enumerate(stage_ranges(cfg, model)):
        in_flight = min(p.pipeline_stages - stage, accumulation)
        e = _state_bytes(cfg, sum(layer_params[i] for i in layers), dp, acts.peak(layers, in_flight))
        worst = e if worst is None or e.total > worst.total else worst
    return worst


def _state_bytes(cfg: Config, params: int, dp: int, activation: float) -> Estimate:
    """Weights, gradients, optimizer state and buckets of a rank holding `params` parameters."""
    stage = cfg.parallel.zero_stage
    low = 4 if cfg.precision == "fp32" else 2
    weights = low * params / (dp if stage == 3 else 1)
    if stage == 0:  # whole gradients, plus their fp32 copy under mixed precision
        gradients = low * params + (4 * params if cfg.precision != "fp32" else 0)
    else:  # ZeRO reduces gradients through the bucket into the fp32 gradients of the rank's partition
        gradients = 4 * params / dp
        if stage == 1:  # ZeRO-1 keeps whole low-precision gradients until the accumulation boundary
            gradients += low * params
    per_param = 8 if cfg.precision == "fp32" else 12  # AdamW moments (+ fp32 master weights)
    optimizer = 0.0 if cfg.parallel.offload_optimizer else per_param * params / (dp if stage >= 1 else 1)
    buckets = low * cfg.parallel.bucket_size if stage >= 1 else 0.0
    if stage == 3 and cfg.precision != "fp32":
        # ZeRO-3 in fp32 gradient dtypes, as measured against bf16 ones (Swin-T, CPU): an fp32
        # accumulation partition beside the low-precision one, and fp32 copies of the gradients
        # a reduction bucket holds (about 6 bytes per element reduced).
        p = cfg.parallel
        gradients += 4 * params / dp if p.grad_accum_dtype == "fp32" else 0.0
        buckets += 6 * min(p.bucket_size, params) if p.comm_dtype == "fp32" else 0.0
    return Estimate(weights, gradients, optimizer, buckets, activation, params)


def fits(e: Estimate, gpu_mem_gb: float) -> bool:
    return e.total <= (1 - RESERVE) * gpu_mem_gb * GB


# Model-parallel layouts (pipeline, tensor) in order of cost: none, then tensor parallelism
# within a node (its all-reduces need the node's fast links), then pipeline stages across nodes.
MODEL_PARALLEL = ((1, 1), (1, 2), (1, 4), (1, 8), (2, 8), (4, 8), (8, 8))


def candidates(cfg: Config, gpus: int):
    """Configs of other layouts in order of cost, all with the same global batch."""
    heads = BACKBONES[cfg.model.arch].num_heads
    micro = cfg.batch.micro_batch
    micros = [m for m in (micro, micro // 2, micro // 4, micro // 8, 1) if m >= 1]
    for offload in (False, True):
        for pipeline, tensor in MODEL_PARALLEL:
            if gpus % (pipeline * tensor) or any(h % tensor for h in heads):
                continue
            dp = gpus // (pipeline * tensor)
            for m in dict.fromkeys(micros):
                for ckpt in (("none", 1), ("every_k", 2), ("blocks", 1)):
                    for stage in (1, 2, 3) if pipeline * tensor == 1 else (1,):
                        c = copy.deepcopy(cfg)
                        c.parallel.zero_stage, c.parallel.offload_optimizer = stage, offload
                        c.parallel.pipeline_stages, c.parallel.tensor_parallel = pipeline, tensor
                        c.parallel.activation_checkpointing, c.parallel.checkpoint_every_k = ckpt
                        c.batch.micro_batch = m
                        if c.batch.global_batch % (m * dp):
                            continue
                        yield c


def describe(cfg: Config) -> str:
    p = cfg.parallel
    ckpt = {"none": "no checkpointing", "blocks": "checkpointing every block",
            "every_k": f"checkpointing one block in {p.checkpoint_every_k}"}[p.activation_checkpointing]
    model_parallel = "".join([f"{p.pipeline_stages} pipeline stages, " if p.pipeline_stages > 1 else "",
                              f"tensor parallel {p.tensor_parallel}, " if p.tensor_parallel > 1 else ""])
    return (f"{model_parallel}ZeRO-{p.zero_stage}{' + optimizer offload' if p.offload_optimizer else ''}, {ckpt}, "
            f"micro-batch {cfg.batch.micro_batch}")


def settings(cfg: Config) -> str:
    p = cfg.parallel
    sets = [f"parallel.zero_stage={p.zero_stage}", f"parallel.activation_checkpointing={p.activation_checkpointing}",
            f"batch.micro_batch={cfg.batch.micro_batch}"]
    if p.activation_checkpointing == "every_k":
        sets.append(f"parallel.checkpoint_every_k={p.checkpoint_every_k}")
    if p.offload_optimizer:
        sets.append("parallel.offload_optimizer=true")
    if p.pipeline_stages > 1:
        sets.append(f"parallel.pipeline_stages={p.pipeline_stages}")
    if p.tensor_parallel > 1:
        sets.append(f"parallel.tensor_parallel={p.tensor_parallel}")
    return " ".join(f"--set {s}" for s in sets)


def num_classes_of(cfg: Config) -> int:
    if cfg.objective.num_classes:
        return cfg.objective.num_classes
    if (Path(cfg.data.root) / DATASET_JSON).is_file():
        return DatasetInfo.read(cfg.data.root).num_classes
    return IN22K_CLASSES


def without_checkpointing(cfg: Config, num_classes: int, gpus: int) -> str:
    if cfg.parallel.activation_checkpointing == "none":
        return ""
    plain = copy.deepcopy(cfg)
    plain.parallel.activation_checkpointing = "none"
    return f" ({estimate(plain, num_classes, gpus).activations / GB:.2f} GB without checkpointing)"


def total_parameters(cfg: Config, num_classes: int) -> int:
    with torch.device("meta"):
        return sum(q.numel() for q in build_objective(cfg, num_classes).build_model().parameters())


def report(cfg: Config, gpus: int, gpu_mem_gb: float) -> tuple[str, bool]:
    """The printed plan and whether the configured layout fits."""
    classes = num_classes_of(cfg)
    e = estimate(cfg, classes, gpus)
    ok = fits(e, gpu_mem_gb)
    p = cfg.parallel
    dp = gpus // (p.pipeline_stages * p.tensor_parallel)
    lines = [
        f"{cfg.model.arch} ({total_parameters(cfg, classes) / 1e6:,.1f}M parameters), {cfg.objective.kind}, "
        f"{cfg.precision}, {gpus} GPU{'s' if gpus > 1 else ''} = {dp} data-parallel x {p.pipeline_stages} pipeline x "
        f"{p.tensor_parallel} tensor, {describe(cfg)}",
        f"per rank (the most loaded one, {e.parameters / 1e6:,.1f}M parameters):",
        f"  weights      {e.weights / GB:8.2f} GB",
        f"  gradients    {e.gradients / GB:8.2f} GB",
        f"  optimizer    {e.optimizer / GB:8.2f} GB",
        f"  buckets      {e.buckets / GB:8.2f} GB",
        f"  activations  {e.activations / GB:8.2f} GB{without_checkpointing(cfg, classes, gpus)}",
        f"  total        {e.total / GB:8.2f} GB of {gpu_mem_gb:g} GB ({100 * RESERVE:.0f}% kept free): "
        + ("fits" if ok else "does NOT fit"),
    ]
    if not ok:
        for c in candidates(cfg, gpus):
            alt = estimate(c, classes, gpus)
            if fits(alt, gpu_mem_gb):
                lines.append(f"cheapest layout that fits: {describe(c)} ({alt.total / GB:.2f} GB)")
                lines.append(f"  {settings(c)}")
                break
        else:
            lines.append("no layout fits: use more or larger GPUs, or a smaller model or image size")
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.plan", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--gpus", type=int, required=True, help="total number of GPUs (all ranks of the run)")
    ap.add_argument("--gpu-mem-gb", type=float, required=True, help="memory of one GPU in GB")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_run(cfg, args.gpus, check_data=False)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    text, ok = report(cfg, args.gpus, args.gpu_mem_gb)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
