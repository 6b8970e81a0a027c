"""Turn a class-per-folder image tree into WebDataset shards plus `dataset.json`.

    python -m pretrain.data.write_shards --src IMAGE_TREE --out SHARD_DIR

`IMAGE_TREE/<class>/<image>` becomes `train-000000.tar, ...` and `val-000000.tar, ...`.
A fraction of every class is held out for validation. Training samples are shuffled
across classes with a fixed seed before sharding, so every shard mixes classes.
Every image is decoded once here; files PIL cannot read are reported and skipped.
Each sample holds the original image bytes (`<key>.jpg|png|...`) and its class
index as text (`<key>.cls`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tarfile
import time
from pathlib import Path

from PIL import Image

from pretrain.data.labels import label_map_version

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


def list_tree(src: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Classes in sorted order and (path, class index) for every image file under them."""
    classes = sorted(d.name for d in src.iterdir() if d.is_dir())
    if not classes:
        raise SystemExit(f"error: --src {src} has no class folders (expected {src}/<class>/<image>)")
    items = []
    for index, name in enumerate(classes):
        for path in sorted((src / name).rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                items.append((path, index))
    return classes, items


def check_image(data: bytes) -> str | None:
    """None if PIL decodes the bytes completely, otherwise the reason it cannot."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return None
    except Exception as e:  # PIL raises many exception types for bad files
        return f"{type(e).__name__}: {e}"


def split_per_class(items: list[tuple[Path, int]], val_fraction: float, rng: random.Random):
    """Hold out `val_fraction` of each class (at least one image when the class has two)."""
    by_class: dict[int, list[Path]] = {}
    for path, label in items:
        by_class.setdefault(label, []).append(path)
    train, val = [], []
    for label, paths in sorted(by_class.items()):
        paths = paths[:]
        rng.shuffle(paths)
        n_val = round(len(paths) * val_fraction)
        if val_fraction > 0 and n_val == 0 and len(paths) > 1:
            n_val = 1
        val += [(p, label) for p in paths[:n_val]]
        train += [(p, label) for p in paths[n_val:]]
    return train, val


def write_split(split: str, items: list[tuple[Path, int]], out: Path, shard_samples: int,
                bad: list[str]) -> list[dict]:
    """Write one split's shards; each shard is written to a temp name and renamed when complete."""
    shards: list[dict] = []
    tar: tarfile.TarFile | None = None
    tmp_path = final_path = None
    count = 0

    def close() -> None:
        nonlocal tar
        if tar is not None:
            tar.close()
            os.replace(tmp_path, final_path)
            shards.append({"name": final_path.name, "samples": count})
            tar = None

    index = 0
    for path, label in items:
        data = path.read_bytes()
        problem = check_image(data)
        if problem:
            bad.append(f"{path}: {problem}")
            continue
        if tar is None or count == shard_samples:
            close()
            final_path = out / f"{split}-{len(shards):06d}.tar"
            tmp_path = final_path.with_suffix(".tar.tmp")
            tar = tarfile.open(tmp_path, "w")
            count = 0
        key = f"{split}{index:09d}"
        ext = path.suffix.lower().lstrip(".").replace("jpeg", "jpg")
        for name, payload in ((f"{key}.{ext}", data), (f"{key}.cls", str(label).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(payload))
        count += 1
        index += 1
    close()
    return shards


def write_shards(src: Path, out: Path, val_fraction: float = 0.1, shard_samples: int = 1000, seed: int = 0) -> dict:
    """Shard the tree at `src` into `out`; return the dataset description also saved as dataset.json."""
    if not src.is_dir():
        raise SystemExit(f"error: --src {src} is not a directory")
    if not 0 <= val_fraction < 1:
        raise SystemExit(f"error: --val-fraction {val_fraction} must be in [0, 1)")
    if shard_samples < 1:
        raise SystemExit(f"error: --shard-samples {shard_samples} must be >= 1")
    out.mkdir(parents=True, exist_ok=True)
    classes, items = list_tree(src)
    rng = random.Random(seed)
    train, val = split_per_class(items, val_fraction, rng)
    rng.shuffle(train)  # mix classes within every training shard
    bad: list[str] = []
    splits = {}
    for split, split_items in (("train", train), ("val", val)):
        shards = write_split(split, split_items, out, shard_samples, bad)
        splits[split] = {"samples": sum(s["samples"] for s in shards), "shards": shards}
    info = {
        "classes": classes,
        "label_map_version": label_map_version(classes),
        "splits": splits,
        "skipped": len(bad),
    }
    (out / "dataset.json").write_text(json.dumps(info, indent=1))
    if bad:
        (out / "skipped.txt").write_text("\n".join(bad) + "\n")
    return info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pretrain.data.write_shards", description=__doc__.split("\n")[0])
    ap.add_argument("--src", type=Path, required=True, help="class-per-folder image tree")
    ap.add_argument("--out", type=Path, required=True, help="output directory for shards and dataset.json")
    ap.add_argument("--val-fraction", type=float, default=0.1, help="held-out fraction of every class")
    ap.add_argument("--shard-samples", type=int, default=1000, help="samples per shard")
    ap.add_argument("--seed", type=int, default=0, help="seed of the split and the shuffle")
    args = ap.parse_args(argv)
    start = time.time()
    info = write_shards(args.src, args.out, args.val_fraction, args.shard_samples, args.seed)
    s = info["splits"]
    print(f"wrote {s['train']['samples']} train samples in {len(s['train']['shards'])} shards and "
          f"{s['val']['samples']} val samples in {len(s['val']['shards'])} shards, {len(info['classes'])} classes, "
          f"to {args.out} in {time.time() - start:.1f}s")
    if info["skipped"]:
        print(f"skipped {info['skipped']} unreadable images, listed in {args.out / 'skipped.txt'}", file=sys.stderr)


if __name__ == "__main__":
    main()
