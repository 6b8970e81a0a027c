"""The model card: README.md beside every export, as timm and transformers model directories carry.

It says what the model is (architecture, parameters), what it learned from (classes, label
map version, steps, samples), how well (the run's last evaluation), how it was made (the
export command, the run's config) and how to load each format that was written.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pretrain.export.exported import Exported
from pretrain.models.backbones import count_parameters

CARD = "README.md"


def _rows(pairs: list[tuple[str, object]]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in pairs if value not in (None, ""))]


def _number(value: object) -> object:
    """Counts as integers, rates to four places."""
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) >= 1 else f"{value:.4f}"
    return value


def _evaluation(exported: Exported) -> list[str]:
    evaluation = exported.facts.get("evaluation") or {}
    if not evaluation:
        return ["The run recorded no evaluation."]
    step = evaluation.get("step")
    pairs = [(key.removeprefix("eval/"), _number(value)) for key, value in evaluation.items() if key != "step"]
    note = []
    if exported.facts.get("head_subset"):
        note = ["", "These are the run's numbers over all its classes; the head subset's accuracy "
                "needs `python -m pretrain.evaluate` on shards of those classes."]
    return [f"The run's last evaluation (step {step}, on its held-out split, in the training precision "
            f"{exported.facts.get('precision')}):", "", *_rows(pairs), *note]


def model_card(exported: Exported, usages: dict[str, Callable[[Exported, str], str]], dirs: dict[str, Path],
               out_dir: Path) -> str:
    """The card's Markdown; `dirs` says where each format's files are, relative to `out_dir`."""
    spec, facts = exported.spec, exported.facts
    family = "Swin Transformer V2" if spec.is_v2 else "Swin Transformer"
    head = (f"{exported.num_classes}-class classifier" if exported.num_classes
            else "none (backbone features)" if exported.simmim is None
            else "SimMIM decoder (mask token and pixel reconstruction)")
    classes = (f"{facts.get('dataset_classes')} (run), {exported.num_classes} kept by --head-subset "
               f"{facts['head_subset']}" if facts.get("head_subset") else facts.get("dataset_classes"))
    lines = [
        "---", f"library_name: {'transformers' if 'hf' in dirs and len(dirs) == 1 else 'timm'}",
        "tags: [image-classification, vision, swin]", "---", "",
        f"# {exported.arch}: {family}, {exported.objective} pretraining ({facts.get('run_name')})", "",
        "## Model", "",
        *_rows([("architecture", f"{family} (`{exported.arch}`, timm `{type(exported.model).__name__}`)"),
                ("parameters", f"{count_parameters(exported.model):,} in the backbone and head"),
                ("embedding dim / depths / heads", f"{spec.embed_dim} / {list(spec.depths)} / {list(spec.num_heads)}"),
                ("image size / patch / window", f"{exported.img_size} / {spec.patch_size} / {exported.window_size}"),
                ("head", head)]),
        "", "## Data and training", "",
        *_rows([("classes", classes), ("label map version", facts.get("label_map_version")),
                ("run's label map version", facts.get("run_label_map_version") if facts.get("head_subset") else None),
                ("optimizer steps", facts.get("step")), ("samples seen", facts.get("samples_seen")),
                ("training precision", f"{facts.get('precision')} (exported weights: fp32 master copies)"),
                ("checkpoint", facts.get("tag")), ("run config", f"`{facts.get('config')}`")]),
        "", "## Evaluation", "", *_evaluation(exported),
        "", "## Preprocessing", "",
        f"Resize the shorter side to {exported.img_size} / {exported.crop_pct} ({exported.interpolation}), "
        f"center-crop {exported.img_size} x {exported.img_size}, scale to [0, 1], normalize with mean "
        f"{list(exported.mean)} and std {list(exported.std)}.",
        "", "## How it was made", "", "```", facts.get("command", ""), "```",
        "", "## Loading", "",
    ]
    for fmt, directory in dirs.items():
        where = directory.relative_to(out_dir).as_posix() if directory != out_dir else "."
        path = str(out_dir / where) if where != "." else str(out_dir)
        lines += [f"### {fmt} (`{where}`)", "", "```python", usages[fmt](exported, path).rstrip(), "```", ""]
    lines += ["Every format was checked when it was written: loaded by its own library, its outputs "
              "matched the trained model's on a random batch to within 1e-4.", ""]
    return "\n".join(lines)
