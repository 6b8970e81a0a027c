"""Where the images of a dataset come from, before sharding.

Two layouts are understood:

- a class-per-folder tree: `SRC/<class>/<image>` (ImageNet's `n01440764/xxx.JPEG`);
- one tar per class: `SRC/<class>.tar` (the official ImageNet-22K distribution,
  `n01440764.tar`), read in place: the tar headers are indexed once and every image is
  later read with one seek, never extracted to disk.

Either way the result is a list of `ImageRef`s, in a deterministic order, labelled by
the class's position in the sorted class list.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

# The image formats read everywhere: source files by suffix, shard members by key (the first
# of these a sample has is its image).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")


@dataclass(frozen=True)
class ImageRef:
    """One source image: a file, or a byte range inside a per-class tar."""

    path: str
    label: int
    size: int
    offset: int = -1  # byte offset inside `path` when it is a tar, -1 for a plain file
    name: str = ""  # member name inside the tar, for reports

    def read(self) -> bytes:
        if self.offset < 0:
            return Path(self.path).read_bytes()
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)

    @property
    def extension(self) -> str:
        name = self.name or self.path
        ext = Path(name).suffix.lower().lstrip(".")
        return "jpg" if ext == "jpeg" else ext

    def __str__(self) -> str:
        return f"{self.path}:{self.name}" if self.offset >= 0 else self.path


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower().lstrip(".") in IMAGE_EXTENSIONS


def _tar_members(path: Path, label: int) -> list[ImageRef]:
    with tarfile.open(path) as tar:
        return [ImageRef(str(path), label, m.size, m.offset_data, m.name)
                for m in tar if m.isfile() and _is_image(m.name)]


def list_images(src: Path) -> tuple[list[str], list[ImageRef]]:
    """Sorted class names and every image of `src` (folder tree or per-class tars)."""
    if not src.is_dir():
        raise SystemExit(f"error: --src {src} is not a directory")
    folders = sorted(d.name for d in src.iterdir() if d.is_dir())
    tars = sorted(p.name for p in src.iterdir() if p.is_file() and p.suffix == ".tar")
    if folders and tars:
        raise SystemExit(f"error: --src {src} mixes class folders and class tars; use one layout")
    if folders:
        classes = folders
        images = [ImageRef(str(p), label, p.stat().st_size)
                  for label, name in enumerate(classes)
                  for p in sorted((src / name).rglob("*")) if p.is_file() and _is_image(p.name)]
    elif tars:
        classes = [Path(t).stem for t in tars]
        images = [ref for label, t in enumerate(tars) for ref in _tar_members(src / t, label)]
    else:
        raise SystemExit(f"error: --src {src} has no class folders (<class>/<image>) and no class tars (<class>.tar)")
    return classes, images
