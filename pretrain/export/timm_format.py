"""The timm format: `model.safetensors` + `config.json`, as timm's own hub exporter writes them.

    model = timm.create_model("local-dir:OUT_DIR", pretrained=True)
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.models import save_for_hf

from pretrain.export.exported import Exported, check_close

FILES = ["model.safetensors", "config.json"]


def check_available() -> None:
    """timm is a dependency: nothing to check."""


def write(exported: Exported, out_dir: Path) -> list[str]:
    facts = exported.facts
    extra = {
        "pretrain": {
            "arch": exported.arch,
            "objective": exported.objective,
            "step": facts.get("step"),
            "label_map_version": facts.get("label_map_version"),
            "timm_class": f"{type(exported.model).__module__}.{type(exported.model).__name__}",
        }
    }
    if facts.get("head_subset"):  # the label map above is the subset's; the run's is kept beside it
        extra["pretrain"]["head_subset"] = facts["head_subset"]
        extra["pretrain"]["run_label_map_version"] = facts.get("run_label_map_version")
    if exported.num_classes:
        extra["label_names"] = exported.label_names
    extra["pretrained_cfg"] = {"tag": facts.get("run_name", "")}
    save_for_hf(exported.model, str(out_dir), model_config=extra, safe_serialization=True,
                data_config={"input_size": (3, exported.img_size, exported.img_size), "crop_pct": exported.crop_pct,
                             "interpolation": exported.interpolation, "mean": exported.mean, "std": exported.std})
    return FILES


def verify(exported: Exported, out_dir: Path) -> float:
    """Stock timm builds the export from config.json alone and reproduces the model's outputs."""
    reloaded = timm.create_model(f"local-dir:{out_dir.resolve()}", pretrained=True).eval()
    x = exported.probe()
    with torch.no_grad():
        return check_close("the timm export's output", exported.model(x), reloaded(x), out_dir)


def usage(exported: Exported, out_dir: str) -> str:
    return (f'import timm\n\nmodel = timm.create_model("local-dir:{out_dir}", pretrained=True)\n'
            f"config = timm.data.resolve_data_config(model=model)  # the run's size, crop and normalization\n")
