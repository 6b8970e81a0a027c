"""Export a trained run as a timm model: `model.safetensors` + `config.json`.

    python -m pretrain.export --run RUN_DIR --out OUT_DIR [--headless] [--tag stepNNNNNNNN]

The latest (or the given) DeepSpeed checkpoint of the run is consolidated into one fp32
state dict, whatever its layout (ZeRO stage, pipeline stages, tensor-parallel shards),
loaded with `strict=True` into the timm model the run trained, and written with timm's
own exporter. Load it with stock timm:

    model = timm.create_model("local-dir:OUT_DIR", pretrained=True)

Before returning, the export is reloaded that way and its logits are compared with the
consolidated model's on a random batch (max difference must be below 1e-5).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from pretrain.config import Config, ConfigError, load_config
from pretrain.models.backbones import BACKBONES, build_backbone, resolve_geometry
from pretrain.models.objectives import OBJECTIVES
from pretrain.parallel.tensor import merge, split_rule
from pretrain.train.checkpoint import LAYOUT, checkpoint_dir, latest_tag

LOGIT_TOLERANCE = 1e-5


class ExportError(RuntimeError):
    pass


def _load_model_states(path: Path) -> dict[str, Any]:
    """DeepSpeed's model-states file: tensors only if possible, else the trusted file this run wrote."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        # DeepSpeed stores Python objects (loss scaler, client state) next to the tensors.
        # The file was written by our own training run, so unpickling it is trusted here.
        return torch.load(path, map_location="cpu", weights_only=False)


def consolidated_state_dict(cfg: Config, ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of checkpoint `tag`, as one state dict in the module's own key layout."""
    layout_file = ckpt_dir / tag / LAYOUT
    layout = json.loads(layout_file.read_text()) if layout_file.is_file() else {}
    if layout.get("pipeline_stages", 1) * layout.get("tensor_parallel", 1) > 1:
        return _model_parallel_state_dict(cfg, ckpt_dir / tag, layout["pipeline_stages"], layout["tensor_parallel"])
    if cfg.parallel.zero_stage > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    states = _load_model_states(ckpt_dir / tag / "mp_rank_00_model_states.pt")
    module = {k: v.float() for k, v in states["module"].items()}
    if cfg.precision == "fp32":
        return module
    # bf16/fp16 without ZeRO: the fp32 master weights live in the optimizer state, in the
    # order of the parameter groups, whose names the trainer saved with the checkpoint.
    masters = states["optimizer"]["fp32_groups"]
    for names, tensors in zip(states["param_group_names"], masters):
        for name, tensor in zip(names, tensors):
            module[name] = tensor.float().view_as(module[name])
    return module


def _model_parallel_state_dict(cfg: Config, tag_dir: Path, stages: int, tensor: int) -> dict[str, torch.Tensor]:
    """The whole model from pipeline-layer files and tensor-parallel shards.

    These are the module's weights as trained, in the training precision (bf16 runs keep
    their fp32 master copy only in DeepSpeed's partitioned optimizer state).
    """
    from pretrain.parallel.pipeline import full_names, pipeline_layers

    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tensor)]
    if stages == 1:
        for rank in range(tensor):
            shards[rank] = _load_model_states(tag_dir / f"mp_rank_{rank:02d}_model_states.pt")["module"]
    else:
        with torch.device("meta"):  # only the names: which layer file holds which tensor
            model = OBJECTIVES[cfg.objective.kind](cfg, _num_classes(tag_dir)).build_model()
        for index, names in enumerate(full_names(model, pipeline_layers(model))):
            for rank in range(tensor):
                layer = torch.load(tag_dir / f"layer_{index:02d}-model_{rank:02d}-model_states.pt",
                                   map_location="cpu", weights_only=True)
                shards[rank].update({names[key]: value for key, value in layer.items() if key in names})
    merged = {}
    for name, value in shards[0].items():
        rule = split_rule(name)
        merged[name] = (value if rule is None else merge([s[name] for s in shards], rule)).float()
    return merged


def _num_classes(tag_dir: Path) -> int:
    states = _load_model_states(tag_dir / "mp_rank_00_model_states.pt")
    return int(states.get("num_classes", 0))


def export_run(run_dir: Path, out_dir: Path, headless: bool = False, tag: str | None = None) -> dict[str, Any]:
    """Write OUT_DIR/model.safetensors and OUT_DIR/config.json; return the config written."""
    import timm
    from timm.models import save_for_hf

    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ExportError(f"--run {run_dir}: no config.yaml there (is it a run directory of pretrain/main.py?)")
    cfg = load_config(cfg_path, check=False)
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
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        config = export_run(args.run, args.out, args.headless, args.tag)
    except (ExportError, ConfigError) as e:
        print(f"export error: {e}", file=sys.stderr)
        return 2
    print(f"exported {config['pretrain']['arch']} ({config['num_classes']} classes, step "
          f"{config['pretrain']['step']}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
