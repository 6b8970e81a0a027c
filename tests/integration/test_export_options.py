"""`python -m pretrain.export` on a real demo run (one process, ZeRO-2, bf16: DeepSpeed's own ZeRO
consolidation reads its files): planted pickles refused, file modes from the umask, head subsets,
every format in one call, the timm and transformers exports scoring alike."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import timm
import torch
import webdataset as wds
from safetensors.torch import load_file
from timm.data import create_transform, resolve_data_config

from pretrain.data.digits import write_digits
from pretrain.data.info import DatasetInfo
from pretrain.data.transforms import decode_sample
from pretrain.data.write_shards import write_shards
from pretrain.evaluate import evaluate_export
from pretrain.train.consolidate import CHECKPOINT_GLOBALS
from tests.helpers import Payload, final_eval, run


@pytest.fixture(scope="module")
def demo(exported_run) -> Path:
    return exported_run("export_options", "schedule.total_steps=2", launcher="python", nproc=1)


def export(run_dir: Path, out: Path, *args: str, check: bool = True):
    return run(["python", "-m", "pretrain.export", "--run", str(run_dir), "--out", str(out), *args], check=check)


def one_line_error(proc) -> str:
    """The export's error: exit 2, one line, no traceback (progress bars of DeepSpeed may precede it)."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("export error: ")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_planted_pickle_in_a_checkpoint_is_refused_and_runs_nothing(demo, tmp_path, name):
    run_dir = tmp_path / "theirs"
    shutil.copytree(demo, run_dir, ignore=shutil.ignore_patterns("export"))
    tag_dir = next((run_dir / "checkpoints").glob("step*"))
    path = tag_dir / name
    assert path.is_file(), sorted(p.name for p in tag_dir.iterdir())
    with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
        states = torch.load(path, map_location="cpu", weights_only=True)
    marker = tmp_path / "ran"
    torch.save({**states, "extra": Payload(marker)}, path)  # the real file, plus a payload

    line = one_line_error(export(run_dir, tmp_path / "out", check=False))
    assert str(path) in line and "refused" in line and "posix.system" in line, line
    assert not marker.exists()
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_export_files_and_new_directories_follow_the_umask(demo, tmp_path, umask):
    old = os.umask(umask)  # inherited by the export process
    try:
        export(demo, tmp_path / "shared" / "export")
    finally:
        os.umask(old)
    out = tmp_path / "shared" / "export"
    for path in (tmp_path / "shared", out):
        assert path.stat().st_mode & 0o777 == 0o777 & ~umask, path
    for name in ("model.safetensors", "config.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_a_head_subset_keeps_those_rows_in_that_order(demo, tmp_path):
    (tmp_path / "subset.txt").write_text("7\n3\n\n0\n")
    export(demo, tmp_path / "sub", "--head-subset", str(tmp_path / "subset.txt"))
    full_dir, sub_dir = demo / "export", tmp_path / "sub"
    config = json.loads((sub_dir / "config.json").read_text())
    full_config = json.loads((full_dir / "config.json").read_text())
    assert config["num_classes"] == 3 and config["label_names"] == ["7", "3", "0"]
    assert config["pretrain"]["head_subset"] == str(tmp_path / "subset.txt")
    assert config["pretrain"]["run_label_map_version"] == full_config["pretrain"]["label_map_version"]
    assert config["pretrain"]["label_map_version"] != full_config["pretrain"]["label_map_version"]

    rows = [full_config["label_names"].index(name) for name in ("7", "3", "0")]
    full_weights, sub_weights = load_file(full_dir / "model.safetensors"), load_file(sub_dir / "model.safetensors")
    assert sub_weights.keys() == full_weights.keys()
    for name, value in sub_weights.items():
        expected = full_weights[name][rows] if name.startswith("head.fc.") else full_weights[name]
        assert torch.equal(value, expected), name

    full = timm.create_model(f"local-dir:{full_dir}", pretrained=True).eval()
    sub = timm.create_model(f"local-dir:{sub_dir}", pretrained=True).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = full.forward_head(full.forward_features(x), pre_logits=True)
        assert torch.equal(sub.forward_head(sub.forward_features(x), pre_logits=True), features)
        # the same dot products: exact when each row is computed alike, to rounding through a narrower matmul
        per_row = (features[:, None, :] * full.head.fc.weight[rows]).sum(-1) + full.head.fc.bias[rows]
        assert torch.equal((features[:, None, :] * sub.head.fc.weight).sum(-1) + sub.head.fc.bias, per_row)
        torch.testing.assert_close(sub(x), full(x)[:, rows], rtol=0, atol=1e-6)


def test_a_class_the_run_lacks_is_one_line_naming_it(demo, tmp_path):
    (tmp_path / "subset.txt").write_text("3\ncat\ndog\n")
    proc = export(demo, tmp_path / "sub", "--head-subset", str(tmp_path / "subset.txt"), check=False)
    line = one_line_error(proc)
    assert line == (f"export error: --head-subset {tmp_path / 'subset.txt'}: 2 of its 3 classes are not among "
                    f"the run's 10 classes, first 'cat'")
    proc = export(demo, tmp_path / "in1k", "--head-subset", "imagenet1k", check=False)
    assert "1000 of its 1000 classes are not among the run's 10 classes, first 'n01440764'" in one_line_error(proc)


@pytest.fixture(scope="module")
def every_format(demo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("formats") / "export"
    export(demo, out, "--format", "timm", "hf", "official")
    return out


def test_every_format_in_one_call_with_a_model_card_each(demo, every_format):
    for fmt, files in {"timm": ["model.safetensors", "config.json"],
                       "hf": ["model.safetensors", "config.json", "preprocessor_config.json"],
                       "official": ["model.pth"]}.items():
        for name in [*files, "README.md"]:
            assert (every_format / fmt / name).is_file(), (fmt, name)
    card = (every_format / "README.md").read_text()
    assert card == (every_format / "hf" / "README.md").read_text()
    evaluation = final_eval(demo)
    for expected in ("swin_debug", "| optimizer steps | 2 |", "| classes | 10 |", f"{evaluation['eval/top1']:.4f}",
                     "--format timm hf official", "### timm (`timm`)", "### hf (`hf`)", "### official (`official`)",
                     "AutoModelForImageClassification", 'timm.create_model("local-dir:'):
        assert expected in card, expected
    official = torch.load(every_format / "official" / "model.pth", map_location="cpu", weights_only=True)
    timm_weights = load_file(every_format / "timm" / "model.safetensors")
    assert torch.equal(official["model"]["head.weight"], timm_weights["head.fc.weight"])


def test_the_timm_and_the_hf_exports_score_the_same(every_format, shards):
    scores = {}
    for fmt in ("timm", "hf"):
        out = run(["python", "-m", "pretrain.evaluate", "--model", str(every_format / fmt), "--data", str(shards)])
        scores[fmt] = re.search(r"held-out top-1 ([\d.]+)  top-5 ([\d.]+)  on (\d+) val", out.stdout).groups()
    assert scores["timm"] == scores["hf"] and scores["hf"][2] == "179", scores
    assert "transformers" in out.stdout


def test_a_head_subset_export_evaluates_on_shards_of_those_classes(demo, tmp_path):
    """The way a 22K model is checked on ImageNet-1K: shards of the kept classes, in that order."""
    images = tmp_path / "images"
    write_digits(images)
    for folder in images.iterdir():
        if folder.name not in ("0", "3", "7"):
            shutil.rmtree(folder)
    write_shards(images, tmp_path / "shards", val_fraction=0.1, shard_samples=100)
    (tmp_path / "subset.txt").write_text("0\n3\n7\n")
    export(demo, tmp_path / "sub", "--head-subset", str(tmp_path / "subset.txt"))
    result = evaluate_export(tmp_path / "sub", tmp_path / "shards")

    # The same images through the whole 10-class model, its logits at the kept rows.
    full = timm.create_model(f"local-dir:{demo / 'export'}", pretrained=True).eval()
    transform = create_transform(**resolve_data_config(model=full), is_training=False)
    info = DatasetInfo.read(tmp_path / "shards")
    samples = wds.DataPipeline(wds.SimpleShardList(info.shard_paths("val", tmp_path / "shards")),
                               wds.tarfile_to_samples())
    hits = n = 0
    label_names = json.loads((demo / "export" / "config.json").read_text())["label_names"]
    rows = [label_names.index(c) for c in ("0", "3", "7")]
    for sample in samples:
        image, label = decode_sample(sample)
        with torch.no_grad():
            logits = full(transform(image)[None])[0, rows]
        hits += int(logits.argmax()) == label
        n += 1
    assert result["samples"] == n > 0
    assert result["top1"] == hits / n
