"""Evaluate an exported model on a split of a shard directory, in the export's own library.

    python -m pretrain.evaluate --model EXPORT_DIR --data SHARD_DIR [--split val]

A timm export is built by `timm.create_model("local-dir:EXPORT_DIR", pretrained=True)` with
the preprocessing of its config.json; a transformers export (`--format hf`) by
`from_pretrained(EXPORT_DIR)` with the size, crop, interpolation and normalization of its
preprocessor_config.json. Either way this measures what a downstream user of the export
gets. The export's label map must be the shards' (a 22K run exported with
`--head-subset imagenet1k` evaluates on ImageNet-1K shards directly).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
import webdataset as wds
from timm.data import create_transform, resolve_data_config

from pretrain.config import ConfigError
from pretrain.data.info import DatasetInfo
from pretrain.data.shards import wanted_member
from pretrain.data.transforms import decode_sample
from pretrain.export import hf_format
from pretrain.export.exported import ExportError
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


def _timm_model(model_dir: Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], Any]:
    model = timm.create_model(f"local-dir:{model_dir.resolve()}", pretrained=True).eval()
    return model, create_transform(**resolve_data_config(model=model), is_training=False)


def _hf_model(model_dir: Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], Any]:
    model, _ = hf_format.load(model_dir)
    p = json.loads((model_dir / "preprocessor_config.json").read_text())
    size = p["size"]["shortest_edge"]
    interpolation = {code: name for name, code in hf_format.RESAMPLE.items()}[p["resample"]]
    transform = create_transform(input_size=(3, size, size), crop_pct=p["crop_pct"], mean=tuple(p["image_mean"]),
                                 std=tuple(p["image_std"]), interpolation=interpolation, is_training=False)
    return (lambda images: hf_format.outputs(model, images)), transform


def evaluate_export(model_dir: Path, data_dir: Path, split: str = "val", batch_size: int = 100) -> dict[str, float]:
    info = DatasetInfo.read(data_dir, source="--data")
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"--model {model_dir}: no config.json there (a directory written by pretrain.export?)")
    config = json.loads((model_dir / "config.json").read_text())
    trained_on = config.get("pretrain", {}).get("label_map_version")
    if trained_on and trained_on != info.label_map_version:
        raise ConfigError(f"--model {model_dir} was trained with label map {trained_on}, "
                          f"--data {data_dir} has {info.label_map_version}")
    model, transform = (_hf_model if "model_type" in config else _timm_model)(model_dir)

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
    except (ConfigError, ExportError) as e:
        print(f"evaluate error: {e}", file=sys.stderr)
        return 2
    library = "transformers" if (args.model / "preprocessor_config.json").is_file() else "stock timm"
    print(f"held-out top-1 {r['top1']:.4f}  top-5 {r['top5']:.4f}  on {r['samples']} {args.split} images "
          f"({library}, {args.model})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
