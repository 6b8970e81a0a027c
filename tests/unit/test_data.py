"""Shard writer and the training/eval streams."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.config import Config, ConfigError
from pretrain.data.info import DatasetInfo
from pretrain.data.shards import eval_loader, train_loader
from pretrain.data.write_shards import write_shards
from pretrain.preflight import check_run
from tests.helpers import photo


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
    info = write_shards(src, tmp_path / "out", val_fraction=0.1, shard_samples=16).to_dict()
    assert info["classes"] == ["a_dog", "b_cat", "c_owl"]
    assert info["splits"]["val"]["samples"] == 3 + 2 + 1
    assert info["splits"]["train"]["samples"] == 27 + 18 + 9
    assert info["skipped"] == 1 and "broken.jpg" in (tmp_path / "out" / "skipped.txt").read_text()
    shards = info["splits"]["train"]["shards"]
    assert [s["name"] for s in shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar", "train-000003.tar"]
    # Shards are planned before images are checked: the broken file leaves one shard short.
    assert sum(s["samples"] for s in shards) == 54 and all(s["samples"] <= 16 for s in shards)
    assert json.loads((tmp_path / "out" / "dataset.json").read_text()) == info
    assert not list((tmp_path / "out").glob("*.tmp"))
    first = tarfile.open(tmp_path / "out" / "train-000000.tar")
    labels = {int(first.extractfile(m).read()) for m in first.getmembers() if m.name.endswith(".cls")}
    assert len(labels) >= 2, "training shards must mix classes"


def test_label_map_version_follows_class_order(tmp_path):
    a = write_shards(make_tree(tmp_path / "a", {"x": 3, "y": 3}), tmp_path / "oa").to_dict()
    b = write_shards(make_tree(tmp_path / "b", {"x": 3, "y": 3}), tmp_path / "ob").to_dict()
    c = write_shards(make_tree(tmp_path / "c", {"x": 3, "z": 3}), tmp_path / "oc").to_dict()
    assert a["label_map_version"] == b["label_map_version"] != c["label_map_version"]


def test_train_stream_is_endless_and_reseeded_on_resume(shards):
    cfg = cfg_for(shards)
    info = DatasetInfo.read(shards)
    batches = iter(train_loader(cfg, info, 32, rank=0, world=2, start_step=0))
    n_train = info.split("train").samples
    first = [next(batches) for _ in range(n_train // 8 + 20)]  # more than one pass over the data
    assert all(images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8 and labels.shape == (8,)
               for images, labels, _, _ in first)
    assert all(0 <= int(l) < 10 for b in first for l in b.labels)
    again = next(iter(train_loader(cfg, info, 32, rank=0, world=2, start_step=0)))
    assert torch.equal(again[1], first[0][1]), "same seed and step must give the same stream"
    resumed = next(iter(train_loader(cfg, info, 32, rank=0, world=2, start_step=100)))
    other_rank = next(iter(train_loader(cfg, info, 32, rank=1, world=2, start_step=0)))
    assert not torch.equal(resumed[1], first[0][1])
    assert not torch.equal(other_rank[1], first[0][1])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_stream_covers_the_val_split_exactly_once(shards, world):
    cfg = cfg_for(shards)
    info = DatasetInfo.read(shards)
    seen = Counter()
    for rank in range(world):
        for images, labels, skipped, _ in eval_loader(cfg, info, 32, rank, world):
            assert skipped == 0
            seen.update([tuple(images[i, 0, 10:12, 10:12].flatten().tolist()) + (int(labels[i]),)
                         for i in range(len(labels))])
    assert sum(seen.values()) == info.split("val").samples


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
    info = DatasetInfo.from_dict({"classes": ["a", "b"], "splits": {"val": {"samples": 5, "shards": [
        {"name": "val-000000.tar", "samples": 5}]}}})
    cfg = cfg_for(tmp_path, eval_micro=10)
    batches = list(eval_loader(cfg, info, 32, 0, 1))
    assert len(batches) == 1
    images, labels, skipped, _ = batches[0]
    assert labels.tolist() == [1, 1, 1, 1] and skipped == 1
    assert not marker.exists(), "a pickle member of a shard was unpickled"


def test_truncated_tar_is_skipped(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (32, 32)).save(png, format="PNG")
    _tar_with(tmp_path / "val-000000.tar", [{"png": png.getvalue(), "cls": b"0"}] * 20)
    data = (tmp_path / "val-000000.tar").read_bytes()
    (tmp_path / "val-000000.tar").write_bytes(data[: len(data) // 2])
    info = DatasetInfo.from_dict({"classes": ["a"], "splits": {"val": {"samples": 20, "shards": [
        {"name": "val-000000.tar", "samples": 20}]}}})
    batches = list(eval_loader(cfg_for(tmp_path, eval_micro=100), info, 32, 0, 1))
    assert 0 < sum(len(b[1]) for b in batches) < 20
    assert sum(b[2] for b in batches) >= 1


def make_class_tars(root: Path, per_class: dict[str, int]) -> Path:
    """The IN-22K distribution layout: one tar of JPEGs per synset."""
    root.mkdir(parents=True)
    for c, (synset, n) in enumerate(sorted(per_class.items())):
        with tarfile.open(root / f"{synset}.tar", "w") as tar:
            for i in range(n):
                buf = io.BytesIO()
                Image.new("RGB", (40, 30), (30 * c, 7 * i % 255, 50)).save(buf, format="JPEG")
                ti = tarfile.TarInfo(f"{synset}_{i}.JPEG")
                ti.size = len(buf.getvalue())
                tar.addfile(ti, io.BytesIO(buf.getvalue()))
    return root


def shard_labels(out: Path, info: dict, split: str) -> list[int]:
    labels = []
    for s in info["splits"][split]["shards"]:
        with tarfile.open(out / s["name"]) as tar:
            labels += [int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls")]
    return labels


def test_writer_reads_per_synset_tars_in_place(tmp_path):
    src = make_class_tars(tmp_path / "tars", {"n02000000": 12, "n01000000": 8, "n03000000": 10})
    info = write_shards(src, tmp_path / "out", val_fraction=0.25, shard_samples=7).to_dict()
    assert info["classes"] == ["n01000000", "n02000000", "n03000000"]
    assert info["splits"]["val"]["samples"] == 2 + 3 + 2
    train = shard_labels(tmp_path / "out", info, "train")
    assert Counter(train) == {0: 6, 1: 9, 2: 8}
    assert not list(src.glob("*/")), "nothing extracted next to the tars"
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        assert all(m.name.endswith((".jpg", ".cls")) for m in tar.getmembers())


def test_writer_parallel_equals_serial_and_cuts_by_megabytes(tmp_path):
    src = make_tree(tmp_path / "src", {"a": 30, "b": 30})
    serial = write_shards(src, tmp_path / "s", shard_samples=1000, shard_mb=0.002, workers=1).to_dict()
    parallel = write_shards(src, tmp_path / "p", shard_samples=1000, shard_mb=0.002, workers=2).to_dict()
    assert [s["samples"] for s in serial["splits"]["train"]["shards"]] == \
           [s["samples"] for s in parallel["splits"]["train"]["shards"]]
    for s in serial["splits"]["train"]["shards"]:
        assert (tmp_path / "s" / s["name"]).read_bytes() == (tmp_path / "p" / s["name"]).read_bytes()
    assert len(serial["splits"]["train"]["shards"]) > 2  # cut by size, not by the 1000-sample cap


def test_interrupted_write_resumes_and_keeps_complete_shards(tmp_path):
    src = make_tree(tmp_path / "src", {"a": 25, "b": 25})
    out = tmp_path / "out"
    first = write_shards(src, out, shard_samples=10).to_dict()
    # Simulate a crash: one shard never finished (temp file left), its record missing.
    (out / "train-000002.tar").rename(out / "train-000002.tar.tmp")
    (out / ".progress" / "train-000002.tar.json").unlink()
    (out / "dataset.json").unlink()
    kept = (out / "train-000000.tar").stat().st_mtime_ns
    second = write_shards(src, out, shard_samples=10).to_dict()
    assert second == first
    assert (out / "train-000000.tar").stat().st_mtime_ns == kept, "complete shards are not rewritten"
    assert (out / "train-000002.tar").is_file()
    with pytest.raises(SystemExit, match="partial write made with other arguments"):
        write_shards(src, out, shard_samples=12)


def test_max_size_reencodes_large_images(tmp_path):
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    Image.new("RGB", (800, 600), (10, 200, 30)).save(src / "big.png")
    Image.new("RGB", (100, 80), (10, 200, 30)).save(src / "small.png")
    (src / "photo.jpg").write_bytes(photo(1600, 1200, 1))  # decoded at 1/4 DCT scale, then resized
    info = write_shards(tmp_path / "src", tmp_path / "out", val_fraction=0.0, max_size=300).to_dict()
    with tarfile.open(tmp_path / "out" / info["splits"]["train"]["shards"][0]["name"]) as tar:
        images = {m.name.rsplit(".", 1)[1]: [] for m in tar.getmembers()}
        for m in tar.getmembers():
            images[m.name.rsplit(".", 1)[1]].append(tar.extractfile(m).read())
    assert sorted(images) == ["cls", "jpg", "png"] and len(images["jpg"]) == 2 and len(images["cls"]) == 3
    assert [Image.open(io.BytesIO(b)).size for b in images["png"]] == [(100, 80)]  # small enough: kept as is
    # The 800x600 single colour first, then the photo (the one whose pixels vary).
    flat, shrunk = sorted((np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), float) for b in images["jpg"]),
                          key=lambda pixels: pixels.std(axis=(0, 1)).sum())
    assert flat.shape == shrunk.shape == (300, 400, 3)
    reference = Image.open(io.BytesIO(photo(1600, 1200, 1))).convert("RGB").resize((400, 300), Image.BICUBIC)
    assert np.abs(shrunk - np.asarray(reference, float)).mean() < 4.0  # out of 255, JPEG re-encoding included


def test_url_patterns_pipes_and_weighted_sources(shards):
    from pretrain.data.shards import train_sources

    info = DatasetInfo.read(shards)
    cfg = cfg_for(shards)
    cfg.data.train_urls = ["train-{000000..000003}.tar", f"pipe:cat {shards}/train-000010.tar"]
    cfg.data.train_weights = [1.0, 1000.0]
    sources = train_sources(cfg, info)
    assert sources[0] == [str(shards / f"train-00000{i}.tar") for i in range(4)]
    assert sources[1] == [f"pipe:cat {shards}/train-000010.tar"]
    with tarfile.open(shards / "train-000010.tar") as tar:
        pipe_labels = Counter(int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls"))
    batches = iter(train_loader(cfg, info, 32, rank=0, world=1, start_step=0))
    labels = Counter(int(l) for _ in range(20) for l in next(batches)[1])
    # Nearly everything comes from the heavily weighted pipe source: its label mix, not the others'.
    assert set(labels) <= set(pipe_labels) | set(range(10))
    assert sum(abs(labels[k] / 160 - pipe_labels[k] / 100) for k in range(10)) < 0.2


def test_passes_without_resampling_cover_every_shard(shards):
    info = DatasetInfo.read(shards)
    cfg = cfg_for(shards, micro=2)
    cfg.data.resampled = False
    cfg.data.shuffle_buffer = 1
    n = info.split("train").samples
    seen = Counter()
    for rank in range(2):
        batches = iter(train_loader(cfg, info, 32, rank=rank, world=2, start_step=0))
        for _ in range(n // 4):
            images, labels, _, _ = next(batches)
            seen.update(labels.tolist())
    assert sum(seen.values()) == 2 * 2 * (n // 4)


def test_too_few_shards_for_passes_is_a_config_error(shards):
    cfg = cfg_for(shards)
    cfg.data.resampled, cfg.data.workers = False, 4
    cfg.batch.micro_batch, cfg.batch.global_batch = 8, 64
    with pytest.raises(ConfigError, match=r"data.resampled=false needs at least data-parallel ranks x data.workers = 8 x 4"):
        check_run(cfg, 8)
    cfg.data.resampled = True
    check_run(cfg, 8)


def test_duplicate_keys_are_counted(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (32, 32)).save(png, format="PNG")
    with tarfile.open(tmp_path / "val-000000.tar", "w") as tar:
        for name, data in [("a.png", png.getvalue()), ("a.cls", b"0"), ("a.png", png.getvalue()),
                           ("b.png", png.getvalue()), ("b.cls", b"1")]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    info = DatasetInfo.from_dict({"classes": ["x", "y"], "splits": {"val": {"samples": 2, "shards": [
        {"name": "val-000000.tar"}]}}})
    batches = list(eval_loader(cfg_for(tmp_path, eval_micro=10), info, 32, 0, 1))
    assert sum(b[2] for b in batches) >= 1
    assert 1 in [int(l) for b in batches for l in b[1]]
