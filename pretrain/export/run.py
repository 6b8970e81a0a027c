"""One export: consolidate the checkpoint once, build the trained model, write and verify each format.

The latest (or the given) DeepSpeed checkpoint of the run becomes one fp32 state dict,
whatever its layout (pretrain/train/consolidate.py); it is loaded with every key accounted
for into the timm model the run trained (and, for SimMIM, the whole SimMIM model). Each
format in `FORMATS` then writes its files and proves them: its own ecosystem loads them and
reproduces the trained model's outputs on a random batch. A model card (README.md) is
written beside each format's files.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from launch.env import default_accelerator

default_accelerator()  # before DeepSpeed is first imported (consolidate): it picks its accelerator then

import torch  # noqa: E402
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402

from pretrain.config import Config, load_config  # noqa: E402
from pretrain.data.info import DatasetInfo  # noqa: E402
from pretrain.data.labels import label_map_version  # noqa: E402
from pretrain.export import card, hf_format, official_format, timm_format  # noqa: E402
from pretrain.export.exported import Exported, ExportError, share_as_umask_allows  # noqa: E402
from pretrain.export.heads import head_rows, head_subset_classes  # noqa: E402
from pretrain.models.backbones import BACKBONES, build_backbone, resolve_geometry  # noqa: E402
from pretrain.models.objectives import OBJECTIVES  # noqa: E402
from pretrain.train.checkpoint import checkpoint_dir, latest_tag  # noqa: E402
from pretrain.train.consolidate import consolidated_state_dict, saved_run_state  # noqa: E402

# Each format: write(exported, out_dir) -> files, verify(exported, out_dir) -> max difference,
# usage(out_dir) -> how to load it (for the model card).
FORMATS: dict[str, ModuleType] = {"timm": timm_format, "hf": hf_format, "official": official_format}


@dataclass(frozen=True)
class Written:
    """One format's output: its directory, files and the largest difference its check found."""

    fmt: str
    out_dir: Path
    files: list[str]
    max_diff: float


def _load(model: torch.nn.Module, state: dict[str, torch.Tensor], where: Path, arch: str) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(f"checkpoint {where} does not match {arch}: missing {result.missing_keys[:3]}, "
                          f"unexpected {result.unexpected_keys[:3]}")
    model.eval()


def _last_evaluation(run_dir: Path) -> dict[str, float]:
    """The run's last evaluation metrics from metrics.jsonl (empty if it never evaluated)."""
    path = run_dir / "metrics.jsonl"
    last: dict[str, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a killed run
            if any(key.startswith("eval/") for key in record):
                last = {k: v for k, v in record.items() if k.startswith("eval/") or k == "step"}
    return last


def trained_model(run_dir: Path, headless: bool = False, tag: str | None = None,
                  head_subset: str | None = None) -> Exported:
    """The run's checkpoint `tag` (default: latest) as the model every format is written from."""
    if head_subset and headless:
        raise ExportError("--head-subset and --headless: a headless export has no classifier rows to keep")
    subset = head_subset_classes(head_subset) if head_subset else None
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ExportError(f"--run {run_dir}: no config.yaml there (is it a run directory of pretrain/main.py?)")
    cfg: Config = load_config(cfg_path)  # not checked again: the saved config of a run reads anywhere
    ckpt_dir = checkpoint_dir(run_dir)
    tag = tag or latest_tag(ckpt_dir)
    if tag is None or not (ckpt_dir / tag).is_dir():
        raise ExportError(f"--run {run_dir}: no complete checkpoint{f' {tag}' if tag else ''} in {ckpt_dir}")
    if not (run_dir / "dataset.json").is_file():
        raise ExportError(f"--run {run_dir}: no dataset.json there (the class list of the run)")
    dataset = DatasetInfo.read(run_dir, source="--run")
    run_state = saved_run_state(ckpt_dir / tag)

    full_state = consolidated_state_dict(cfg, ckpt_dir, tag)
    objective = OBJECTIVES[cfg.objective.kind]
    state = objective.backbone_state(full_state)
    num_classes = state["head.fc.weight"].shape[0] if "head.fc.weight" in state else 0
    m = cfg.model
    model = build_backbone(m.arch, num_classes, m.img_size, m.window_size)
    _load(model, state, ckpt_dir / tag, m.arch)
    simmim = None
    if cfg.objective.kind == "simmim" and not headless:
        simmim = objective(cfg, 0).build_model()
        _load(simmim, full_state, ckpt_dir / tag, m.arch)
    label_names = list(dataset.classes) if num_classes else []
    facts = {"run_name": cfg.run.name, "step": run_state.step, "samples_seen": run_state.samples_seen,
             "label_map_version": dataset.label_map_version, "dataset_classes": len(dataset.classes),
             "evaluation": _last_evaluation(run_dir), "tag": tag, "precision": cfg.precision,
             "config": str(cfg_path)}
    if headless and num_classes:
        model.reset_classifier(0)
        label_names = []
    if subset is not None:
        if not num_classes:
            raise ExportError(f"--head-subset {head_subset}: run {run_dir} has no classifier head "
                              f"(objective {cfg.objective.kind})")
        rows = head_rows(list(dataset.classes), subset, head_subset)
        weight, bias = state["head.fc.weight"][rows], state["head.fc.bias"][rows]
        model.reset_classifier(len(rows))
        model.head.fc.load_state_dict({"weight": weight, "bias": bias})
        model.eval()
        label_names = subset
        facts.update(head_subset=head_subset, run_label_map_version=dataset.label_map_version,
                     label_map_version=label_map_version(subset))
    img_size, window_size = resolve_geometry(BACKBONES[m.arch], m.img_size, m.window_size)
    interpolation = "bicubic" if cfg.augment.interpolation == "random" else cfg.augment.interpolation
    return Exported(arch=m.arch, spec=BACKBONES[m.arch], img_size=img_size, window_size=window_size,
                    objective=cfg.objective.kind, model=model, simmim=simmim, label_names=label_names,
                    mean=tuple(IMAGENET_DEFAULT_MEAN), std=tuple(IMAGENET_DEFAULT_STD),
                    crop_pct=cfg.augment.eval_crop_pct, interpolation=interpolation, facts=facts)


def format_dirs(out_dir: Path, formats: list[str]) -> dict[str, Path]:
    """One format: its files in OUT itself; several: each in OUT/<format>."""
    if len(formats) == 1:
        return {formats[0]: out_dir}
    return {fmt: out_dir / fmt for fmt in formats}


def export_run(run_dir: Path, out_dir: Path, headless: bool = False, tag: str | None = None,
               head_subset: str | None = None, formats: list[str] | None = None,
               command: list[str] | None = None) -> list[Written]:
    """Write every format asked for (default: timm) and prove each reproduces the trained model."""
    formats = list(dict.fromkeys(formats or ["timm"]))
    unknown = [fmt for fmt in formats if fmt not in FORMATS]
    if unknown:
        raise ExportError(f"--format {unknown[0]}: unknown (allowed: {', '.join(FORMATS)})")
    for fmt in formats:
        FORMATS[fmt].check_available()
    exported = trained_model(run_dir, headless, tag, head_subset)
    exported.facts["command"] = shlex.join(command or ["python", "-m", "pretrain.export", *sys.argv[1:]])
    dirs = format_dirs(out_dir, formats)
    written = []
    for fmt, directory in dirs.items():
        directory.mkdir(parents=True, exist_ok=True)  # new directories: 0o777 & ~umask
        files = FORMATS[fmt].write(exported, directory)
        share_as_umask_allows(directory, files)
        written.append(Written(fmt, directory, files, FORMATS[fmt].verify(exported, directory)))
    card_dirs = {w.out_dir for w in written} | {out_dir}
    text = card.model_card(exported, {fmt: FORMATS[fmt].usage for fmt in formats}, dirs, out_dir)
    for directory in sorted(card_dirs):
        (directory / card.CARD).write_text(text)
        share_as_umask_allows(directory, [card.CARD])
    return written
