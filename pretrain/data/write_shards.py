"""Turn an image collection into WebDataset shards plus `dataset.json`.

    python -m pretrain.data.write_shards --src SRC --out SHARD_DIR [--workers N] [--max-size 512]

SRC is a class-per-folder tree or a folder of per-class tars (see sources.py). A fraction
of every class is held out as `val-*.tar`; both splits are shuffled across classes with a
fixed seed and cut into `train-*.tar` shards of a target size (samples or MB). Every image is
decoded once here; files that do not decode are listed in `skipped.txt` and left out.
`--max-size` re-encodes images whose shorter side is larger, as JPEG, to shrink the set.

Shards are written in parallel, each to a temporary name renamed when complete, with a
record of its sample count under `.progress/`. An interrupted write, re-run with the same
arguments, keeps the shards already complete and writes the rest.
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
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from pretrain.data.info import DatasetInfo, Shard, Split
from pretrain.data.labels import label_map_version
from pretrain.data.sources import ImageRef, list_images
from pretrain.data.transforms import BadSample, decode_rgb, image_size, resize

PROGRESS = ".progress"


@dataclass(frozen=True)
class ShardJob:
    split: str
    index: int
    first_key: int  # global index of the first sample: keys stay unique and stable
    images: tuple[ImageRef, ...]
    max_size: int

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}.tar"


def split_per_class(images: list[ImageRef], val_fraction: float, rng: random.Random):
    """Hold out `val_fraction` of each class (at least one image when the class has two)."""
    by_class: dict[int, list[ImageRef]] = {}
    for ref in images:
        by_class.setdefault(ref.label, []).append(ref)
    train, val = [], []
    for label in sorted(by_class):
        refs = by_class[label][:]
        rng.shuffle(refs)
        n_val = round(len(refs) * val_fraction)
        if val_fraction > 0 and n_val == 0 and len(refs) > 1:
            n_val = 1
        val += refs[:n_val]
        train += refs[n_val:]
    return train, val


def cut_into_shards(split: str, images: list[ImageRef], shard_samples: int, shard_bytes: int,
                    max_size: int) -> list[ShardJob]:
    """Consecutive runs of at most `shard_samples` images and (if > 0) about `shard_bytes` source bytes."""
    jobs: list[ShardJob] = []
    start, size = 0, 0
    for i, ref in enumerate(images):
        full = i - start == shard_samples or (shard_bytes and size + ref.size > shard_bytes and i > start)
        if full:
            jobs.append(ShardJob(split, len(jobs), start, tuple(images[start:i]), max_size))
            start, size = i, 0
        size += ref.size
    if start < len(images):
        jobs.append(ShardJob(split, len(jobs), start, tuple(images[start:]), max_size))
    return jobs


def prepare_image(data: bytes, max_size: int) -> tuple[bytes, str]:
    """(bytes to store, extension override or "") after a full decode by the training loader's own decoder;
    BadSample if it does not decode. With `max_size`, a larger image is decoded at a reduced DCT scale where
    possible, resized to `max_size` on its shorter side and re-encoded as JPEG."""
    width, height = image_size(data)
    if not max_size or min(width, height) <= max_size:
        decode_rgb(data)
        return data, ""
    pixels = decode_rgb(data, (0, 0, width, height), max_size)
    scale = max_size / min(width, height)
    small = resize(pixels, round(height * scale), round(width * scale), "bicubic")
    small = Image.fromarray(small.permute(1, 2, 0).numpy())
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=90)
    return out.getvalue(), "jpg"


def write_shard(job: ShardJob, out: Path) -> dict:
    """Write one shard (temp name, then rename) and its progress record; return the record."""
    tmp = out / f"{job.name}.tmp"
    skipped: list[str] = []
    count = 0
    with tarfile.open(tmp, "w") as tar:
        for offset, ref in enumerate(job.images):
            try:
                data, ext = prepare_image(ref.read(), job.max_size)
            except BadSample as e:
                skipped.append(f"{ref}: {e}")
                continue
            except (OSError, EOFError, tarfile.TarError) as e:  # a file that cannot be read
                skipped.append(f"{ref}: {type(e).__name__}: {e}")
                continue
            key = f"{job.split}{job.first_key + offset:09d}"
            for member, payload in ((f"{key}.{ext or ref.extension}", data), (f"{key}.cls", str(ref.label).encode())):
                info = tarfile.TarInfo(member)
                info.size, info.mtime = len(payload), 0
                tar.addfile(info, io.BytesIO(payload))
            count += 1
    record = {"name": job.name, "samples": count, "bytes": tmp.stat().st_size, "skipped": skipped}
    progress = out / PROGRESS / f"{job.name}.json"
    os.replace(tmp, out / job.name)
    progress.write_text(json.dumps(record))
    return record


def _done(job: ShardJob, out: Path) -> dict | None:
    progress = out / PROGRESS / f"{job.name}.json"
    if progress.is_file() and (out / job.name).is_file():
        return json.loads(progress.read_text())
    return None


def _write_job(args: tuple[ShardJob, Path]) -> dict:
    return write_shard(*args)


def write_shards(src: Path, out: Path, val_fraction: float = 0.1, shard_samples: int = 1000,
                 shard_mb: float = 0.0, max_size: int = 0, seed: int = 0, workers: int = 1,
                 progress: bool = False) -> DatasetInfo:
    """Shard `src` into `out`; return the dataset description also saved as dataset.json."""
    if not 0 <= val_fraction < 1:
        raise SystemExit(f"error: --val-fraction {val_fraction} must be in [0, 1)")
    if shard_samples < 1:
        raise SystemExit(f"error: --shard-samples {shard_samples} must be >= 1")
    classes, images = list_images(src)
    rng = random.Random(seed)
    train, val = split_per_class(images, val_fraction, rng)
    rng.shuffle(train)  # mix classes within every shard
    rng.shuffle(val)
    shard_bytes = int(shard_mb * 2**20)
    jobs = (cut_into_shards("train", train, shard_samples, shard_bytes, max_size)
            + cut_into_shards("val", val, shard_samples, shard_bytes, max_size))

    (out / PROGRESS).mkdir(parents=True, exist_ok=True)
    plan = {"src": str(src.resolve()), "val_fraction": val_fraction, "shard_samples": shard_samples,
            "shard_mb": shard_mb, "max_size": max_size, "seed": seed, "images": len(images)}
    plan_file = out / PROGRESS / "plan.json"
    if plan_file.is_file() and json.loads(plan_file.read_text()) != plan:
        raise SystemExit(f"error: --out {out} holds a partial write made with other arguments; "
                         f"re-run with the same arguments or use an empty --out")
    plan_file.write_text(json.dumps(plan))

    records = {job.name: _done(job, out) for job in jobs}
    todo = [job for job in jobs if records[job.name] is None]
    bar = tqdm(total=len(images), initial=sum(len(j.images) for j in jobs if records[j.name]),
               unit="img", disable=not progress, desc="sharding", smoothing=0.05)
    with Pool(workers) if workers > 1 else _Serial() as pool:
        for record in pool.imap_unordered(_write_job, [(job, out) for job in todo]):
            records[record["name"]] = record
            bar.update(record["samples"] + len(record["skipped"]))
    bar.close()

    splits = {}
    for split in ("train", "val"):
        shards = [Shard(j.name, records[j.name]["samples"], records[j.name]["bytes"]) for j in jobs if j.split == split]
        splits[split] = Split(sum(s.samples for s in shards), shards)
    skipped = [line for job in jobs for line in records[job.name]["skipped"]]
    info = DatasetInfo(classes, splits, label_map_version(classes), len(skipped), plan)
    info.write(out)
    if skipped:
        (out / "skipped.txt").write_text("\n".join(skipped) + "\n")
    return info


class _Serial:
    """The Pool interface, in this process (for --workers 1 and for tests)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    @staticmethod
    def imap_unordered(fn, items):
        return map(fn, items)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pretrain.data.write_shards", description=__doc__.split("\n")[0])
    ap.add_argument("--src", type=Path, required=True, help="class-per-folder tree or folder of per-class tars")
    ap.add_argument("--out", type=Path, required=True, help="output directory for shards and dataset.json")
    ap.add_argument("--val-fraction", type=float, default=0.1, help="held-out fraction of every class")
    ap.add_argument("--shard-samples", type=int, default=1000, help="at most this many samples per shard")
    ap.add_argument("--shard-mb", type=float, default=0.0, help="also cut a shard at about this many MB (0: off)")
    ap.add_argument("--max-size", type=int, default=0, help="re-encode images with a larger shorter side (0: off)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the split and the shuffle")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel writer processes")
    args = ap.parse_args(argv)
    start = time.time()
    info = write_shards(args.src, args.out, args.val_fraction, args.shard_samples, args.shard_mb, args.max_size,
                        args.seed, args.workers, progress=sys.stderr.isatty())
    train, val = info.split("train"), info.split("val")
    print(f"wrote {train.samples} train samples in {len(train.shards)} shards and "
          f"{val.samples} val samples in {len(val.shards)} shards, {info.num_classes} classes, "
          f"to {args.out} in {time.time() - start:.1f}s")
    if info.skipped:
        print(f"skipped {info.skipped} unreadable images, listed in {args.out / 'skipped.txt'}", file=sys.stderr)


if __name__ == "__main__":
    main()
