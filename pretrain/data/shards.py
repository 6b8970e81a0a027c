"""The WebDataset streams that feed training and evaluation.

Shard URLs are local paths, brace patterns (`train-{000000..001023}.tar`) or `pipe:`
commands (`pipe:aws s3 cp s3://bucket/train-000001.tar -`); by default they are the
shards listed in `dataset.json`. Several training sources can be mixed with weights.

Training is an endless stream, so every rank runs exactly the steps the schedule asks for
and no collective waits on a rank that ran out of data:
- resampled (default): every DataLoader worker of every rank draws shards with
  replacement (source by weight, then shard) from its own RNG seeded by (run seed, step
  the run starts at, rank, worker);
- not resampled: each pass shuffles the shard list with a seed shared by all ranks, deals
  it to ranks and then workers, and starts the next pass when done (needs at least
  ranks x workers shards, checked with the config).
Samples then go through a shuffle buffer and are decoded and augmented into batches. A
resumed run starts from new seeds (the step differs), so it does not replay the first
run's order.

Evaluation reads every validation sample exactly once over all ranks: shards are dealt
to ranks round-robin, then to workers; the trainer keeps ranks in step when their batch
counts differ (see `Trainer.evaluate`).

Unreadable samples, broken tars and duplicate keys are skipped and counted; the count
rides along with each batch so the trainer can report it per rank.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import multiprocessing
import multiprocessing.forkserver
import random
import signal
import sys
import threading
from itertools import count
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import torch
import webdataset as wds
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from launch.env import STOP_SIGNALS
from pretrain.config import Config
from pretrain.data.info import DatasetInfo
from pretrain.data.masking import MaskGenerator
from pretrain.data.sources import IMAGE_EXTENSIONS
from pretrain.data.transforms import BadSample, build_transform, sample_parts

log = logging.getLogger(__name__)



class Batch(NamedTuple):
    images: torch.Tensor  # uint8, (B, 3, H, W)
    labels: torch.Tensor  # int64, (B,)
    skipped: int  # samples this worker skipped since its previous batch
    masks: torch.Tensor | None = None  # uint8 SimMIM masks at token resolution, (B, h, w)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def wanted_member(name: str) -> bool:
    """Read only image and label members out of the tar; everything else stays unread."""
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS + ("cls",)


def expand_urls(patterns: list[str], root: str = "") -> list[str]:
    """Brace-expand each pattern; relative local paths are taken relative to `root`."""
    urls = []
    for pattern in patterns:
        for url in braceexpand(pattern):
            local = not url.startswith(("pipe:", "http://", "https://", "s3://", "gs://"))
            urls.append(str(Path(root) / url) if local and root and not Path(url).is_absolute() else url)
    return urls


def train_sources(cfg: Config, info: DatasetInfo) -> list[list[str]]:
    """The shard lists of the training sources (one per `data.train_urls` entry, or dataset.json's)."""
    if cfg.data.train_urls:
        return [expand_urls([p], cfg.data.root) for p in cfg.data.train_urls]
    return [info.shard_paths("train", cfg.data.root)]


def val_urls(cfg: Config, info: DatasetInfo) -> list[str]:
    if cfg.data.val_urls:
        return expand_urls(cfg.data.val_urls, cfg.data.root)
    return info.shard_paths("val", cfg.data.root)


class SkipCounter:
    """Counts what a worker skipped; also the WebDataset error handler for broken tars and duplicate keys."""

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
    """Endless shard URLs drawn with replacement: a source by weight, then a shard in it."""

    def __init__(self, sources: list[list[str]], weights: list[float], seed: str):
        self.sources = sources
        self.weights = weights or [1.0] * len(sources)
        self.seed = seed

    def __iter__(self) -> Iterator[dict[str, str]]:
        worker, _ = _worker()
        rng = random.Random(f"{self.seed}-worker{worker}")
        while True:
            source = rng.choices(self.sources, weights=self.weights)[0]
            yield {"url": rng.choice(source)}


class EpochShards(IterableDataset):
    """Every shard once per pass, passes repeated forever; pass order shared by all ranks."""

    def __init__(self, urls: list[str], rank: int, world: int, seed: str):
        self.urls, self.rank, self.world, self.seed = urls, rank, world, seed

    def __iter__(self) -> Iterator[dict[str, str]]:
        worker, workers = _worker()
        for epoch in count():
            urls = self.urls[:]
            random.Random(f"{self.seed}-pass{epoch}").shuffle(urls)
            for url in urls[self.rank::self.world][worker::workers]:
                yield {"url": url}


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
    """Decode, augment and collate samples into batches, skipping (and counting) undecodable ones."""

    def __init__(self, transform: Callable[[bytes], torch.Tensor], batch_size: int, counter: SkipCounter,
                 partial: bool, masks: Callable[[], torch.Tensor] | None):
        self.transform = transform
        self.batch_size = batch_size
        self.counter = counter
        self.partial = partial
        self.masks = masks

    def _batch(self, images: list[torch.Tensor], labels: list[int]) -> Batch:
        masks = torch.stack([self.masks() for _ in labels]) if self.masks and labels else None
        stacked = torch.stack(images) if images else torch.empty(0, 3, 0, 0, dtype=torch.uint8)
        return Batch(stacked, torch.tensor(labels, dtype=torch.long), self.counter.take(), masks)

    def __call__(self, samples: Iterator[dict]) -> Iterator[Batch]:
        images: list[torch.Tensor] = []
        labels: list[int] = []
        for sample in samples:
            try:
                data, label = sample_parts(sample)
                images.append(self.transform(data))
                labels.append(label)
            except BadSample as e:  # a bad image must not stop a multi-day run
                self.counter(BadSample(f"{sample.get('__key__')} in {sample.get('__url__')}: {e}"))
                continue
            if len(images) == self.batch_size:
                yield self._batch(images, labels)
                images, labels = [], []
        if self.partial and (images or self.counter.skipped):
            yield self._batch(images, labels)


def mask_generator(cfg: Config, img_size: int, patch_size: int) -> MaskGenerator | None:
    """SimMIM's mask generator (run in the data workers), or None for objectives without masks."""
    if cfg.objective.kind != "simmim":
        return None
    if patch_size < 1:
        raise ValueError("objective.kind=simmim: the loader needs the model's patch_size for its masks")
    o = cfg.objective
    return MaskGenerator(img_size, o.mask_patch_size, patch_size, o.mask_ratio)


class DataStalled(RuntimeError):
    """The data workers delivered no batch within `data.stall_timeout_s`."""


class WatchedLoader:
    """A DataLoader whose wait for each batch is bounded: DataStalled, in one line, instead of a silent hang."""

    def __init__(self, loader: DataLoader, what: str):
        self.loader, self.what = loader, what

    def __iter__(self) -> Iterator[Batch]:
        batches = iter(self.loader)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except RuntimeError as e:
                if not (self.loader.timeout and "timed out" in str(e)):
                    raise
                break
            yield batch
        del batches  # shuts the workers down now (a stuck one is terminated), before the error propagates
        raise DataStalled(f"{self.what}: no batch from the data workers in {self.loader.timeout:g} s "
                          "(a stalled source or a stuck worker; data.stall_timeout_s)")


# How DataLoader workers start. Not "fork": the trainer starts workers while other threads
# run (TensorBoard's writer, the loaders' queue feeders and pinning, library threads), and a
# lock one of them holds at that instant (the buffer lock of a log file, say) stays held
# forever in the forked child, which hangs the first time it needs it. A forkserver is one
# clean single-threaded process per rank that forks each worker; it imports the data
# modules once, and the package modules this process has loaded, so that a worker, which
# re-runs the entry script as multiprocessing does, finds its imports already done.
WORKER_START_METHOD = "forkserver"
_server_started = False  # this process started its forkserver (with the stop signals ignored)


def _worker_context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context(WORKER_START_METHOD)
    if WORKER_START_METHOD == "forkserver":  # (the list has no effect once this process's server runs)
        ours = __name__.split(".")[0] + "."
        context.set_forkserver_preload(["torch", "torch.utils.data", __name__,
                                        *sorted(m for m in sys.modules if m.startswith(ours))])
    return context


def start_worker_server() -> multiprocessing.context.BaseContext:
    """Start the workers' forkserver (once per process) and return the workers' context.

    Called early by the entry point, so that the server's imports overlap this process's own
    start-up. The stop signals reach every process of a Slurm step, the workers too: the
    server (and the resource tracker it starts) begin with them ignored, and the workers it
    forks inherit that (torch's workers still install their own SIGTERM handler, so the rank
    can terminate them), so a preemption signal stops the rank, which checkpoints and shuts
    its workers down, instead of killing the workers under it.
    """
    global _server_started
    context = _worker_context()
    if WORKER_START_METHOD != "forkserver" or _server_started:
        return context
    main_thread = threading.current_thread() is threading.main_thread()  # signal.signal works only there
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS} if main_thread else {}
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
    _server_started = True
    return context


def _log_files() -> list[tuple[str, str | None, int]]:
    """(path, format, level) of the root logger's log files, for workers to write to as well."""
    return [(h.baseFilename, h.formatter._fmt if h.formatter else None, h.level)
            for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


def _init_worker_logging(files: list[tuple[str, str | None, int]], level: int, worker_id: int) -> None:
    """In a worker started afresh: its warnings (skipped samples) go to this rank's log files too."""
    root = logging.getLogger()
    have = {h.baseFilename for h in root.handlers if isinstance(h, logging.FileHandler)}
    for path, fmt, handler_level in files:
        if path not in have:  # a forked worker inherited the parent's handlers
            handler = logging.FileHandler(path)  # appends
            handler.setFormatter(logging.Formatter(fmt))
            handler.setLevel(handler_level)
            root.addHandler(handler)
    root.setLevel(level)
    if files:
        logging.captureWarnings(True)


def _loader(stages: list, workers: int, seed: str, stall_timeout_s: float, what: str, pin_memory: bool,
            ) -> WatchedLoader:
    pipeline = wds.DataPipeline(*stages)
    generator = torch.Generator().manual_seed(int(hashlib.sha256(seed.encode()).hexdigest()[:15], 16))
    started = {}
    if workers:  # without workers there is nothing to start or wait on
        started = dict(multiprocessing_context=start_worker_server(), timeout=stall_timeout_s,
                       worker_init_fn=functools.partial(_init_worker_logging, _log_files(),
                                                        logging.getLogger().level))
    # Page-locked batches let the trainer's `.to(device, non_blocking=True)` overlap the copy.
    loader = DataLoader(pipeline, batch_size=None, num_workers=workers, generator=generator,
                        persistent_workers=False, prefetch_factor=4 if workers else None, pin_memory=pin_memory,
                        **started)
    return WatchedLoader(loader, what)


def train_loader(cfg: Config, info: DatasetInfo, img_size: int, rank: int, world: int, start_step: int,
                 pin_memory: bool = False, patch_size: int = 0) -> WatchedLoader:
    """Endless loader of uint8 training micro-batches for data-parallel `rank`, seeded by where the run starts.

    `patch_size` is the model's (SimMIM's masks are drawn in its patches; unused otherwise).
    """
    seed = f"{cfg.run.seed}-step{start_step}"
    sources = train_sources(cfg, info)
    if cfg.data.resampled:
        shards = ResampledShards(sources, cfg.data.train_weights, f"{seed}-rank{rank}")
    else:
        shards = EpochShards([u for s in sources for u in s], rank, world, seed)
    counter = SkipCounter()
    stages = [
        shards,
        wds.tarfile_to_samples(handler=counter, select_files=wanted_member),
        ShuffleBuffer(cfg.data.shuffle_buffer, f"{seed}-rank{rank}"),
        DecodeAndBatch(build_transform(cfg, img_size, training=True), cfg.batch.micro_batch, counter, partial=False,
                       masks=mask_generator(cfg, img_size, patch_size)),
    ]
    return _loader(stages, cfg.data.workers, f"{seed}-rank{rank}", cfg.data.stall_timeout_s,
                   f"training data, rank {rank}", pin_memory)


def eval_loader(cfg: Config, info: DatasetInfo, img_size: int, rank: int, world: int,
                pin_memory: bool = False, patch_size: int = 0) -> WatchedLoader:
    """Loader over this rank's share of the validation shards, each sample once."""
    urls = val_urls(cfg, info)
    counter = SkipCounter()
    workers = min(cfg.data.workers, max(1, len(urls[rank::world])))
    stages = [
        ShardSlice(urls, rank, world),
        wds.tarfile_to_samples(handler=counter, select_files=wanted_member),
        DecodeAndBatch(build_transform(cfg, img_size, training=False), cfg.eval.micro_batch, counter, partial=True,
                       masks=mask_generator(cfg, img_size, patch_size)),
    ]
    return _loader(stages, workers, f"{cfg.run.seed}-eval-rank{rank}", cfg.data.stall_timeout_s,
                   f"validation data, rank {rank}", pin_memory)
