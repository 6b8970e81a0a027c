"""Export a trained run as a timm model: `model.safetensors` + `config.json`.

    python -m pretrain.export --run RUN_DIR --out OUT_DIR [--headless] [--tag stepNNNNNNNN]
                              [--head-subset imagenet1k|FILE]

The latest (or the given) DeepSpeed checkpoint of the run is consolidated into one fp32
state dict, whatever its layout (ZeRO stage, pipeline stages, tensor-parallel shards),
by pretrain/train/consolidate.py; this module loads it with `strict=True` into the timm
model the run trained, writes it with timm's own exporter and verifies the export. Load
it with stock timm:

    model = timm.create_model("local-dir:OUT_DIR", pretrained=True)

Before returning, the export is reloaded that way and its logits are compared with the
consolidated model's on a random batch (max difference must be below 1e-5).

`--head-subset` keeps only some classes of the classifier: `imagenet1k` (the 1,000
ImageNet-1K synsets, in timm's order) or a file with one class name per line. The rows of
those classes are kept in that order, so the exported model's logits are the run's logits
at those rows; config.json's label names and num_classes follow the subset.

Export files get the permissions of any file the user creates (0o666 minus the umask;
directories 0o777 minus it), so a team sharing a filesystem can read them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from launch.env import default_accelerator

default_accelerator()  # before DeepSpeed is first imported (consolidate): it picks its accelerator then

import timm  # noqa: E402
import torch  # noqa: E402
from timm.data import ImageNetInfo  # noqa: E402
from timm.models import save_for_hf  # noqa: E402

from pretrain.config import ConfigError, load_config  # noqa: E402
from pretrain.data.labels import label_map_version  # noqa: E402
from pretrain.models.backbones import BACKBONES, build_backbone, resolve_geometry  # noqa: E402
from pretrain.models.objectives import OBJECTIVES  # noqa: E402
from pretrain.train.checkpoint import CheckpointError, checkpoint_dir, latest_tag  # noqa: E402
from pretrain.train.consolidate import consolidated_state_dict  # noqa: E402

LOGIT_TOLERANCE = 1e-5
IMAGENET1K = "imagenet1k"  # --head-subset: timm's list of the ImageNet-1K synsets
EXPORT_FILES = ("model.safetensors", "config.json")


class ExportError(RuntimeError):
    pass


def head_subset_classes(spec: str) -> list[str]:
    """The class names `--head-subset spec` keeps, in order: timm's ImageNet-1K synsets or a file's lines."""
    if spec == IMAGENET1K:
        return list(ImageNetInfo(IMAGENET1K).label_names())
    path = Path(spec)
    if not path.is_file():
        raise ExportError(f"--head-subset {spec}: neither {IMAGENET1K!r} nor a file (one class name per line)")
    classes = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not classes:
        raise ExportError(f"--head-subset {spec}: the file names no class")
    if len(set(classes)) < len(classes):
        twice = next(c for c in classes if classes.count(c) > 1)
        raise ExportError(f"--head-subset {spec}: class {twice!r} is listed more than once")
    return classes


def head_rows(run_classes: list[str], subset: list[str], spec: str) -> list[int]:
    """The classifier rows of `subset` in the run's class list, in the subset's order."""
    index = {name: row for row, name in enumerate(run_classes)}
    missing = [name for name in subset if name not in index]
    if missing:
        raise ExportError(f"--head-subset {spec}: {len(missing)} of its {len(subset)} classes are not among the "
                          f"run's {len(run_classes)} classes, first {missing[0]!r}")
    return [index[name] for name in subset]


def _user_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share_as_umask_allows(out_dir: Path, names: tuple[str, ...] = EXPORT_FILES) -> None:
    """Give the export's files 0o666 & ~umask, as for any file the user creates.

    safetensors writes model.safetensors to a private temporary file (mode 0600) and renames it,
    so without this the weights are unreadable to everyone but their owner. (Directories need
    nothing: `mkdir` already gives new ones 0o777 & ~umask, and an existing one keeps its mode.)
    """
    mask = _user_umask()
    for name in names:
        (out_dir / name).chmod(0o666 & ~mask)


def export_run(run_dir: Path, out_dir: Path, headless: bool = False, tag: str | None = None,
               head_subset: str | None = None) -> dict[str, Any]:
    """Write OUT_DIR/model.safetensors and OUT_DIR/config.json; return the config written."""
    if head_subset and headless:
        raise ExportError("--head-subset and --headless: a headless export has no classifier rows to keep")
    subset = head_subset_classes(head_subset) if head_subset else None
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
    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)  # what the export must reproduce
    label_names = dataset["classes"]
    rows = None
    if subset is not None:
        if not num_classes:
            raise ExportError(f"--head-subset {head_subset}: run {run_dir} has no classifier head "
                              f"(objective {cfg.objective.kind})")
        rows = head_rows(dataset["classes"], subset, head_subset)
        expected = expected[:, rows]  # the whole run's logits at the kept rows
        model.reset_classifier(len(rows))
        model.head.fc.load_state_dict({"weight": state["head.fc.weight"][rows], "bias": state["head.fc.bias"][rows]})
        model.eval()
        num_classes, label_names = len(rows), subset

    extra = {
        "pretrain": {
            "arch": cfg.model.arch,
            "objective": cfg.objective.kind,
            "step": int(tag.removeprefix("step")) if tag.startswith("step") else None,
            "label_map_version": dataset.get("label_map_version") if rows is None else label_map_version(subset),
            "timm_class": f"{type(model).__module__}.{type(model).__name__}",
        }
    }
    if rows is not None:  # the label map above is the subset's; the run's is kept beside it
        extra["pretrain"]["head_subset"] = head_subset
        extra["pretrain"]["run_label_map_version"] = dataset.get("label_map_version")
    if num_classes:
        extra["label_names"] = label_names
    extra["pretrained_cfg"] = {"tag": cfg.run.name}
    out_dir.mkdir(parents=True, exist_ok=True)  # new directories: 0o777 & ~umask
    save_for_hf(model, str(out_dir), model_config=extra, safe_serialization=True,
                data_config={"input_size": (3, img_size, img_size), "crop_pct": cfg.augment.eval_crop_pct,
                             "interpolation": "bicubic"})
    share_as_umask_allows(out_dir)

    # Prove the export: stock timm builds it from config.json alone and reproduces the logits
    # of the checkpoint's model (with a head subset: at the kept rows).
    reloaded = timm.create_model(f"local-dir:{out_dir.resolve()}", pretrained=True).eval()
    with torch.no_grad():
        diff = (reloaded(x) - expected).abs().max().item()
    if diff > LOGIT_TOLERANCE:
        raise ExportError(f"exported model differs from the checkpoint by {diff:.3g} (> {LOGIT_TOLERANCE})")
    return json.loads((out_dir / "config.json").read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="run directory (output_dir/name)")
    ap.add_argument("--out", type=Path, required=True, help="directory for model.safetensors and config.json")
    ap.add_argument("--headless", action="store_true", help="drop the classifier head (backbone features only)")
    ap.add_argument("--tag", default=None, help="checkpoint tag to export (default: latest)")
    ap.add_argument("--head-subset", default=None, metavar="imagenet1k|FILE",
                    help="keep only these classes' classifier rows, in this order: timm's 1,000 ImageNet-1K "
                         "synsets, or a file of class names, one per line")
    args = ap.parse_args(argv)
    try:
        config = export_run(args.run, args.out, args.headless, args.tag, args.head_subset)
    except (ExportError, ConfigError, CheckpointError) as e:
        print(f"export error: {e}", file=sys.stderr)
        return 2
    print(f"exported {config['pretrain']['arch']} ({config['num_classes']} classes, step "
          f"{config['pretrain']['step']}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
