"""`--head-subset`: the classifier rows an export keeps, and in which order."""

from __future__ import annotations

from pathlib import Path

from timm.data import ImageNetInfo

from pretrain.export.exported import ExportError

IMAGENET1K = "imagenet1k"  # timm's list of the 1,000 ImageNet-1K synsets


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


# Human-readable names of ImageNet synsets (1K and 22K alike), for the label maps of exports.
_SYNSET_NAMES = ImageNetInfo("imagenet22k")


def readable_label(name: str) -> str:
    """`n01440764` -> "tench, Tinca tinca"-like names where timm knows the synset; any other name as is."""
    try:
        return _SYNSET_NAMES.label_name_to_description(name)
    except (KeyError, ValueError, IndexError):
        return name
