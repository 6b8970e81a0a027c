"""Evaluate an exported model with stock timm on a split of a shard directory.

    python -m pretrain.evaluate --model EXPORT_DIR --data SHARD_DIR [--split val]

The model is built by `timm.create_model("local-dir:EXPORT_DIR", pretrained=True)` and
its preprocessing comes from the export's config.json, so this measures exactly what a
downstream user of the export gets.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import timm
import torch
import webdataset as wds
from timm.data import create_transform, resolve_data_config

from pretrain.config import ConfigError
from pretrain.data.info import DatasetInfo
from pretrain.data.shards import wanted_member
from pretrain.data.transforms import decode_sample
from pretrain.models.objectives import topk_hits


def _batches(samples, transform, batch_size: int):
    images, labels = [], []
    for sample in samples:
        image, label = decode_sample(sample)
        images.append(transform(image))
        labels.append(label)
        if len(images) == batch_size:
            yield torch.stack(images), torch.tensor(labels)
            images, labels = [], []
    if images:
        yield torch.stack(images), torch.tensor(labels)


def evaluate_export(model_dir: Path, data_dir: Path, split: str = "val", batch_size: int = 100) -> dict[str, float]:
    info = DatasetInfo.read(data_dir, source="--data")
    config = json.loads((model_dir / "config.json").read_text())
    trained_on = config.get("pretrain", {}).get("label_map_version")
    if trained_on and trained_on != info.label_map_version:
        raise SystemExit(f"error: {model_dir} was trained with label map {trained_on}, "
                         f"{data_dir} has {info.label_map_version}")
    model = timm.create_model(f"local-dir:{model_dir.resolve()}", pretrained=True).eval()
    transform = create_transform(**resolve_data_config(model=model), is_training=False)

    n = top1 = top5 = 0
    urls = info.shard_paths(split, data_dir)
    samples = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(select_files=wanted_member))
    for batch in _batches(samples, transform, batch_size):
        images, labels = batch
        with torch.no_grad():
            hit1, hit5 = topk_hits(model(images), labels)
        top1 += int(hit1.sum())
        top5 += int(hit5.sum())
        n += len(labels)
    return {"top1": top1 / max(1, n), "top5": top5 / max(1, n), "samples": n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="directory written by pretrain.export")
    ap.add_argument("--data", type=Path, required=True, help="shard directory with dataset.json")
    ap.add_argument("--split", default="val", choices=["train", "val"])
    args = ap.parse_args(argv)
    try:
        r = evaluate_export(args.model, args.data, args.split)
    except ConfigError as e:
        print(f"evaluate error: {e}", file=sys.stderr)
        return 2
    print(f"held-out top-1 {r['top1']:.4f}  top-5 {r['top5']:.4f}  on {r['samples']} {args.split} images "
          f"(stock timm, {args.model})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
