"""Export a trained run as a timm model: `model.safetensors` + `config.json`.

    python -m pretrain.export --run RUN_DIR --out OUT_DIR [--headless] [--tag stepNNNNNNNN]

The latest (or the given) DeepSpeed checkpoint of the run is consolidated into one fp32
state dict, whatever its layout (ZeRO stage, pipeline stages, tensor-parallel shards),
by pretrain/train/consolidate.py; this module loads it with `strict=True` into the timm
model the run trained, writes it with timm's own exporter and verifies the export. Load
it with stock timm:

    model = timm.create_model("local-dir:OUT_DIR", pretrained=True)

Before returning, the export is reloaded that way and its logits are compared with the
consolidated model's on a random batch (max difference must be below 1e-5).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from launch.env import default_accelerator

default_accelerator()  # before DeepSpeed is first imported (consolidate): it picks its accelerator then

import timm  # noqa: E402
import torch  # noqa: E402
from timm.models import save_for_hf  # noqa: E402

from pretrain.config import ConfigError, load_config  # noqa: E402
from pretrain.models.backbones import BACKBONES, build_backbone, resolve_geometry  # noqa: E402
from pretrain.models.objectives import OBJECTIVES  # noqa: E402
from pretrain.train.checkpoint import CheckpointError, checkpoint_dir, latest_tag  # noqa: E402
from pretrain.train.consolidate import consolidated_state_dict  # noqa: E402

LOGIT_TOLERANCE = 1e-5


class ExportError(RuntimeError):
    pass


def export_run(run_dir: Path, out_dir: Path, headless: bool = False, tag: str | None = None) -> dict[str, Any]:
    """Write OUT_DIR/model.safetensors and OUT_DIR/config.json; return the config written."""
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ExportError(f"--run {run_dir}: no config.yaml there (is it a run directory of pretrain/main.py?)")
    cfg = load_config(cfg_path)  # not checked again: the saved config of a run reads anywhere
    ckpt_dir = checkpoint_dir(run_dir)
    tag = tag or latest_tag(ckpt_dir)
    if tag is None or not (ckpt_dir / tag).is_dir():
        raise ExportError(f"--run {run_dir}: no complete checkpoint{f' {tag}' if tag else ''} in {ckpt_dir}")
    if not (run_dir / "dataset.json").is_file():
        raise ExportError(f"--run {run_dir}: no dataset.json there (the class list of the run)")
    dataset = json.loads((run_dir / "dataset.json").read_text())

    state = OBJECTIVES[cfg.objective.kind].backbone_state(consolidated_state_dict(cfg, ckpt_dir, tag))
    num_classes = state["head.fc.weight"].shape[0] if "head.fc.weight" in state else 0
    model = build_backbone(cfg.model.arch, num_classes, cfg.model.img_size, cfg.model.window_size)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(f"checkpoint {ckpt_dir / tag} does not match {cfg.model.arch}: "
                          f"missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    if headless and num_classes:
        model.reset_classifier(0)
        num_classes = 0
    model.eval()

    img_size, _ = resolve_geometry(BACKBONES[cfg.model.arch], cfg.model.img_size, cfg.model.window_size)
    extra = {
        "pretrain": {
            "arch": cfg.model.arch,
            "objective": cfg.objective.kind,
            "step": int(tag.removeprefix("step")) if tag.startswith("step") else None,
            "label_map_version": dataset.get("label_map_version"),
            "timm_class": f"{type(model).__module__}.{type(model).__name__}",
        }
    }
    if num_classes:
        extra["label_names"] = dataset["classes"]
    extra["pretrained_cfg"] = {"tag": cfg.run.name}
    save_for_hf(model, str(out_dir), model_config=extra, safe_serialization=True,
                data_config={"input_size": (3, img_size, img_size), "crop_pct": cfg.augment.eval_crop_pct,
                             "interpolation": "bicubic"})

    # Prove the export: stock timm builds it from config.json alone and reproduces the logits.
    reloaded = timm.create_model(f"local-dir:{out_dir.resolve()}", pretrained=True).eval()
    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (reloaded(x) - model(x)).abs().max().item()
    if diff > LOGIT_TOLERANCE:
        raise ExportError(f"exported model differs from the checkpoint by {diff:.3g} (> {LOGIT_TOLERANCE})")
    return json.loads((out_dir / "config.json").read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="run directory (output_dir/name)")
    ap.add_argument("--out", type=Path, required=True, help="directory for model.safetensors and config.json")
    ap.add_argument("--headless", action="store_true", help="drop the classifier head (backbone features only)")
    ap.add_argument("--tag", default=None, help="checkpoint tag to export (default: latest)")
    args = ap.parse_args(argv)
    try:
        config = export_run(args.run, args.out, args.headless, args.tag)
    except (ExportError, ConfigError, CheckpointError) as e:
        print(f"export error: {e}", file=sys.stderr)
        return 2
    print(f"exported {config['pretrain']['arch']} ({config['num_classes']} classes, step "
          f"{config['pretrain']['step']}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
