"""Shard writer and the training/eval streams."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from pretrain.config import Config
from pretrain.data.shards import eval_loader, train_loader
from pretrain.data.write_shards import write_shards


def make_tree(root: Path, per_class: dict[str, int], size: int = 24) -> Path:
    for c, (name, n) in enumerate(sorted(per_class.items())):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (size, size), (20 * c, 5 * i % 255, 100)).save(root / name / f"{i}.png")
    return root


def members(tar_path: Path) -> list[str]:
    with tarfile.open(tar_path) as tar:
        return tar.getnames()


def cfg_for(shards: Path, **batch) -> Config:
    cfg = Config()
    cfg.data.root = str(shards)
    cfg.data.workers = 0
    cfg.data.shuffle_buffer = 50
    cfg.batch.micro_batch = batch.get("micro", 8)
    cfg.eval.micro_batch = batch.get("eval_micro", 7)
    return cfg


def test_writer_splits_per_class_and_mixes_classes(tmp_path):
    src = make_tree(tmp_path / "src", {"b_cat": 20, "a_dog": 30, "c_owl": 10})
    (src / "a_dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    info = write_shards(src, tmp_path / "out", val_fraction=0.1, shard_samples=16)
    assert info["classes"] == ["a_dog", "b_cat", "c_owl"]
    assert info["splits"]["val"]["samples"] == 3 + 2 + 1
    assert info["splits"]["train"]["samples"] == 27 + 18 + 9
    assert info["skipped"] == 1 and "broken.jpg" in (tmp_path / "out" / "skipped.txt").read_text()
    shards = info["splits"]["train"]["shards"]
    assert [s["name"] for s in shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar", "train-000003.tar"]
    assert [s["samples"] for s in shards] == [16, 16, 16, 6]
    assert json.loads((tmp_path / "out" / "dataset.json").read_text()) == info
    assert not list((tmp_path / "out").glob("*.tmp"))
    first = tarfile.open(tmp_path / "out" / "train-000000.tar")
    labels = {int(first.extractfile(m).read()) for m in first.getmembers() if m.name.endswith(".cls")}
    assert len(labels) >= 2, "training shards must mix classes"


def test_label_map_version_follows_class_order(tmp_path):
    a = write_shards(make_tree(tmp_path / "a", {"x": 3, "y": 3}), tmp_path / "oa")
    b = write_shards(make_tree(tmp_path / "b", {"x": 3, "y": 3}), tmp_path / "ob")
    c = write_shards(make_tree(tmp_path / "c", {"x": 3, "z": 3}), tmp_path / "oc")
    assert a["label_map_version"] == b["label_map_version"] != c["label_map_version"]


def test_train_stream_is_endless_and_reseeded_on_resume(shards):
    cfg = cfg_for(shards)
    info = json.loads((shards / "dataset.json").read_text())
    batches = iter(train_loader(cfg, info, 32, rank=0, start_step=0))
    n_train = info["splits"]["train"]["samples"]
    first = [next(batches) for _ in range(n_train // 8 + 20)]  # more than one pass over the data
    assert all(images.shape == (8, 3, 32, 32) and labels.shape == (8,) for images, labels, _ in first)
    assert all(0 <= int(l) < 10 for _, labels, _ in first for l in labels)
    again = next(iter(train_loader(cfg, info, 32, rank=0, start_step=0)))
    assert torch.equal(again[1], first[0][1]), "same seed and step must give the same stream"
    resumed = next(iter(train_loader(cfg, info, 32, rank=0, start_step=100)))
    other_rank = next(iter(train_loader(cfg, info, 32, rank=1, start_step=0)))
    assert not torch.equal(resumed[1], first[0][1])
    assert not torch.equal(other_rank[1], first[0][1])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_stream_covers_the_val_split_exactly_once(shards, world):
    cfg = cfg_for(shards)
    info = json.loads((shards / "dataset.json").read_text())
    seen = Counter()
    for rank in range(world):
        for images, labels, skipped in eval_loader(cfg, info, 32, rank, world):
            assert skipped == 0
            seen.update([tuple(images[i, 0, 10:12, 10:12].flatten().tolist()) + (int(labels[i]),)
                         for i in range(len(labels))])
    assert sum(seen.values()) == info["splits"]["val"]["samples"]


def _tar_with(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, sample in enumerate(samples):
            for ext, data in sample.items():
                ti = tarfile.TarInfo(f"s{i:04d}.{ext}")
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))


class Exploit:
    def __reduce__(self):
        return (open, ("/tmp/pretrain-pickle-was-executed", "w"))


def test_corrupt_images_are_skipped_and_pickles_never_loaded(tmp_path):
    marker = Path("/tmp/pretrain-pickle-was-executed")
    marker.unlink(missing_ok=True)
    png = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(png, format="PNG")
    good = {"png": png.getvalue(), "cls": b"1"}
    samples = [good, {"png": b"garbage", "cls": b"0"}, {**good, "pyd": pickle.dumps(Exploit())},
               {**good, "pth": pickle.dumps(Exploit())}, good]
    _tar_with(tmp_path / "val-000000.tar", samples)
    info = {"classes": ["a", "b"], "splits": {"val": {"samples": 5, "shards": [{"name": "val-000000.tar", "samples": 5}]}}}
    cfg = cfg_for(tmp_path, eval_micro=10)
    batches = list(eval_loader(cfg, info, 32, 0, 1))
    assert len(batches) == 1
    images, labels, skipped = batches[0]
    assert labels.tolist() == [1, 1, 1, 1] and skipped == 1
    assert not marker.exists(), "a pickle member of a shard was unpickled"


def test_truncated_tar_is_skipped(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (32, 32)).save(png, format="PNG")
    _tar_with(tmp_path / "val-000000.tar", [{"png": png.getvalue(), "cls": b"0"}] * 20)
    data = (tmp_path / "val-000000.tar").read_bytes()
    (tmp_path / "val-000000.tar").write_bytes(data[: len(data) // 2])
    info = {"classes": ["a"], "splits": {"val": {"samples": 20, "shards": [{"name": "val-000000.tar", "samples": 20}]}}}
    batches = list(eval_loader(cfg_for(tmp_path, eval_micro=100), info, 32, 0, 1))
    assert 0 < sum(len(b[1]) for b in batches) < 20
    assert sum(b[2] for b in batches) >= 1
