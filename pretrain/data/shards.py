"""The WebDataset streams that feed training and evaluation.

Training: an endless stream. Every DataLoader worker of every rank draws shards with
replacement from its own RNG, seeded by (run seed, step the run starts at, rank,
worker), reads them, shuffles samples in a buffer and yields fixed-size batches. The
stream never ends, so every rank runs exactly the steps the schedule asks for and no
collective waits on a rank that ran out of data. A resumed run starts from a new seed
(the step differs), so it does not replay the order of the first run.

Evaluation: every validation sample exactly once over all ranks. Shards are dealt to
ranks round-robin, then to workers; the trainer keeps ranks in step when their batch
counts differ (see `Trainer.evaluate`).

Unreadable samples and broken tars are skipped and counted; the count rides along
with each batch so the trainer can report it.
"""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.config import Config
from pretrain.data.transforms import IMAGE_KEYS, build_transform, decode_sample

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, int]  # images, labels, samples skipped since the last batch


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def wanted_member(name: str) -> bool:
    """Read only image and label members out of the tar; everything else stays unread."""
    return name.rsplit(".", 1)[-1].lower() in IMAGE_KEYS + ("cls",)


class SkipCounter:
    """Counts what a worker skipped; also a WebDataset error handler for broken tars."""

    def __init__(self) -> None:
        self.skipped = 0

    def __call__(self, exn: Exception) -> bool:
        self.skipped += 1
        log.warning("skipping unreadable shard data: %s", exn)
        return True

    def take(self) -> int:
        n, self.skipped = self.skipped, 0
        return n


class ResampledShards(IterableDataset):
    """Endless shard URLs drawn with replacement; the RNG depends on (seed, rank, worker)."""

    def __init__(self, urls: list[str], seed: str):
        self.urls = urls
        self.seed = seed

    def __iter__(self) -> Iterator[dict[str, str]]:
        worker, _ = _worker()
        rng = random.Random(f"{self.seed}-worker{worker}")
        while True:
            yield {"url": rng.choice(self.urls)}


class ShardSlice(IterableDataset):
    """Each URL once; rank `rank` of `world` takes every world-th shard, its workers split those."""

    def __init__(self, urls: list[str], rank: int, world: int):
        self.urls = urls[rank::world]

    def __iter__(self) -> Iterator[dict[str, str]]:
        worker, workers = _worker()
        for url in self.urls[worker::workers]:
            yield {"url": url}


class ShuffleBuffer:
    """Sample shuffle buffer whose RNG is made inside the worker (one stream per worker)."""

    def __init__(self, size: int, seed: str):
        self.size = size
        self.seed = seed

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        worker, _ = _worker()
        rng = random.Random(f"{self.seed}-shuffle{worker}")
        buf: list[dict] = []
        for sample in samples:
            if len(buf) < self.size:
                buf.append(sample)
                continue
            i = rng.randrange(len(buf))
            buf[i], sample = sample, buf[i]
            yield sample
        rng.shuffle(buf)
        yield from buf


class DecodeAndBatch:
    """Decode, transform and collate samples into batches, skipping (and counting) bad ones."""

    def __init__(self, transform: Callable, batch_size: int, counter: SkipCounter, partial: bool):
        self.transform = transform
        self.batch_size = batch_size
        self.counter = counter
        self.partial = partial

    def __call__(self, samples: Iterator[dict]) -> Iterator[Batch]:
        images: list[torch.Tensor] = []
        labels: list[int] = []
        for sample in samples:
            try:
                image, label = decode_sample(sample)
                images.append(self.transform(image))
                labels.append(label)
            except Exception as e:  # a bad image must not stop a multi-day run
                self.counter(ValueError(f"{sample.get('__key__')} in {sample.get('__url__')}: {e}"))
                continue
            if len(images) == self.batch_size:
                yield torch.stack(images), torch.tensor(labels), self.counter.take()
                images, labels = [], []
        if images and self.partial:
            yield torch.stack(images), torch.tensor(labels), self.counter.take()


def shard_urls(root: str, info: dict[str, Any], split: str) -> list[str]:
    return [str(Path(root) / s["name"]) for s in info["splits"][split]["shards"]]


def _loader(stages: list, workers: int, seed: str) -> DataLoader:
    pipeline = wds.DataPipeline(*stages)
    generator = torch.Generator().manual_seed(int(hashlib.sha256(seed.encode()).hexdigest()[:15], 16))
    return DataLoader(pipeline, batch_size=None, num_workers=workers, generator=generator,
                      persistent_workers=False, prefetch_factor=4 if workers else None)


def train_loader(cfg: Config, info: dict[str, Any], img_size: int, rank: int, start_step: int) -> DataLoader:
    """Endless loader of training micro-batches for `rank`, seeded by where the run starts."""
    urls = shard_urls(cfg.data.root, info, "train")
    seed = f"{cfg.run.seed}-step{start_step}-rank{rank}"
    counter = SkipCounter()
    stages = [
        ResampledShards(urls, seed),
        wds.tarfile_to_samples(handler=counter, select_files=wanted_member),
        ShuffleBuffer(cfg.data.shuffle_buffer, seed),
        DecodeAndBatch(build_transform(cfg, img_size, training=True), cfg.batch.micro_batch, counter, partial=False),
    ]
    return _loader(stages, cfg.data.workers, seed)


def eval_loader(cfg: Config, info: dict[str, Any], img_size: int, rank: int, world: int) -> DataLoader:
    """Loader over this rank's share of the validation shards, each sample once."""
    urls = shard_urls(cfg.data.root, info, "val")
    counter = SkipCounter()
    workers = min(cfg.data.workers, max(1, len(urls[rank::world])))
    stages = [
        ShardSlice(urls, rank, world),
        wds.tarfile_to_samples(handler=counter, select_files=wanted_member),
        DecodeAndBatch(build_transform(cfg, img_size, training=False), cfg.eval.micro_batch, counter, partial=True),
    ]
    return _loader(stages, workers, f"{cfg.run.seed}-eval-rank{rank}")
