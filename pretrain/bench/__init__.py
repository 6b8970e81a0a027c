"""Benchmarks that print ratios against a baseline measured in the same run.

    python -m pretrain.bench data --images DIR [--img-size 224] [--samples 400] [--repeats 3]
    python -m pretrain.bench data --photos 500x375 [--count 200]    # make ImageNet-like JPEGs first
    python -m pretrain.bench step --arch swin_b --micro-batch 8 [--steps 12] [--compile] [--sdpa] [--json]
    python -m pretrain.bench scaling --arch swin_b --sizes 224 384 512 [--micro-batch 4]
    python -m pretrain.bench memory --arch swin_b --micro-batch 8 [--img-size 224]
    python -m pretrain.bench plan --config configs/swin_b_22k.yaml --gpu-mem-gb 80 [--set section.key=value]

`step`: the full training step (forward, backward, optimizer) of our engine path (the
DeepSpeed engine this pipeline builds: bf16 weights, fp32 master weights, fused AdamW)
against the plain reference (stock timm model + torch AdamW with its defaults + bf16
autocast, the way timm's train script runs), same model, batch and process. The two paths
take turns step by step (reference-ours, then ours-reference, ...) after warm-up, and each
pair starts with one timed dense bf16 matmul (the fastest of 4096 and 8192 on CUDA, 4096 and
6144 on CPU, chosen once), so noise from other jobs lands on both sides and on the peak.
Reported: min / median / max over the pairs of the ratio ours / reference and of each side's
MFU (analytic FLOPs, pretrain/train/flops.py, over that pair's matmul sample), and on CUDA MFU
against the datasheet peak and each side's own peak allocated and reserved memory.
`--compile` compiles our engine's blocks (the reference stays eager).

`scaling`: our step time per image at several resolutions, against the pixel count.

`memory`: peak activation memory and step time of forward + backward without activation
checkpointing, with every 2nd block and with every block recomputed (pretrain/bench/memory.py).

`plan`: the memory planner's per-rank figure for one GPU (`pretrain/plan.py`) against one
real training step of the config's engine in this process: allocated memory, and on CUDA
what the caching allocator reserved, which is what must fit.

`data`: decode + augment throughput of one data worker (one process, one thread), our
shard loader against torchvision's `ImageFolder` with timm's `create_transform`, both with
the same augmentation (random resized crop 0.08-1, flip, RandAugment m9-mstd0.5, color
jitter 0.4, random erasing 0.25, bicubic) and both ending in a normalized float batch.
Runs alternate between the two and the median of the repeats is reported.
"""
