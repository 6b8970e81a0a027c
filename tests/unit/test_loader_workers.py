"""Data workers must start cleanly however busy the other threads of the trainer are.

A worker forked while another thread holds a lock inherits the lock held, by a thread
that does not exist in the child: the worker hangs the first time it needs that lock.
Here a thread logs to the rank's log file without pause (as TensorBoard's writer,
DeepSpeed's or the loader's own threads keep running during training) while evaluation
workers, which log the samples they skip, are started again and again.
"""

from __future__ import annotations

import io
import logging
import tarfile
import multiprocessing.forkserver
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from PIL import Image

from pretrain.config import Config
from pretrain.data import shards
from pretrain.data.info import DatasetInfo
from pretrain.data.shards import DataStalled, eval_loader

PASSES = 12
GOOD, BAD = 6, 1  # samples per shard


def write_val_shards(root: Path, n: int) -> DatasetInfo:
    png = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(png, format="PNG")
    samples = [{"png": png.getvalue(), "cls": b"1"}] * GOOD + [{"png": b"not an image", "cls": b"0"}] * BAD
    for s in range(n):
        with tarfile.open(root / f"val-{s:06d}.tar", "w") as tar:
            for i, sample in enumerate(samples):
                for ext, data in sample.items():
                    member = tarfile.TarInfo(f"s{s}-{i:04d}.{ext}")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))
    return DatasetInfo.from_dict({"classes": ["a", "b"], "splits": {"val": {"samples": n * (GOOD + BAD), "shards": [
        {"name": f"val-{s:06d}.tar", "samples": GOOD + BAD} for s in range(n)]}}})


@contextmanager
def busy_log(path: Path) -> Iterator[None]:
    """The root logger writes to `path` (as `setup_logging` does) and a thread logs there nonstop."""
    handler = logging.FileHandler(path)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    chatty = logging.getLogger("pretrain.busy")
    chatty.propagate = False  # to the log file only (not to pytest's capture)
    chatty.addHandler(handler)
    stop = threading.Event()

    def chatter():
        while not stop.is_set():
            chatty.info("busy " * 20)

    thread = threading.Thread(target=chatter, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        chatty.removeHandler(handler)
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def test_eval_workers_start_while_another_thread_logs(tmp_path):
    info = write_val_shards(tmp_path, 4)
    cfg = Config()
    cfg.data.root = str(tmp_path)
    cfg.data.workers = 2
    cfg.data.stall_timeout_s = 5.0  # a hung worker shows up as DataStalled
    cfg.eval.micro_batch = 10
    list(eval_loader(cfg, info, 16, 0, 1))  # the forkserver's start (imports) is not what is timed
    with busy_log(tmp_path / "rank0.log"):
        for n in range(PASSES):
            try:
                batches = list(eval_loader(cfg, info, 16, 0, 1))
            except DataStalled as e:
                pytest.fail(f"pass {n + 1} of {PASSES} with {shards.WORKER_START_METHOD!r} workers: {e}")
            assert sum(len(b.labels) for b in batches) == 4 * GOOD
            assert sum(b.skipped for b in batches) == 4 * BAD
    # The workers' warnings about the samples they skipped reach the log file.
    assert (tmp_path / "rank0.log").read_text().count("skipping unreadable shard data") == PASSES * 4 * BAD


def children_of(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def test_stop_signals_to_every_process_leave_the_workers_running(tmp_path):
    """Slurm's preemption signal reaches every process of the step: the rank stops on it (after a
    checkpoint), and its forkserver and workers must not die of it under the rank meanwhile."""
    info = write_val_shards(tmp_path, 2)
    cfg = Config()
    cfg.data.root = str(tmp_path)
    cfg.data.workers = 2
    cfg.data.stall_timeout_s = 5.0
    cfg.eval.micro_batch = 2
    batches = iter(eval_loader(cfg, info, 16, 0, 1))
    first = next(batches)
    server = multiprocessing.forkserver._forkserver._forkserver_pid
    workers = children_of(server)
    assert server and len(workers) == 2, (server, workers)
    for pid in [server, *workers]:
        os.kill(pid, signal.SIGUSR1)
    rest = list(batches)
    assert sum(len(b.labels) for b in [first, *rest]) == 2 * GOOD
    assert Path(f"/proc/{server}").exists(), "the forkserver died of the signal"
    list(eval_loader(cfg, info, 16, 0, 1))  # and still starts workers
