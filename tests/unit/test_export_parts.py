"""The parts of export that need no training run: weights-only checkpoint loading, the
classifier-row subset and the permissions of export files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from pretrain.export.exported import ExportError, share_as_umask_allows
from pretrain.export.heads import head_rows, head_subset_classes
from pretrain.export.run import export_run
from pretrain.train.checkpoint import CheckpointError
from pretrain.train.consolidate import load_checkpoint_file, weights_only_loads
from tests.helpers import Payload

TIMM_INFO = Path(timm.__file__).parent / "data" / "_info"


def planted(path: Path, marker: Path) -> Path:
    torch.save({"module": {"w": torch.ones(2)}, "client": Payload(marker)}, path)
    return path


def test_a_planted_payload_is_refused_with_one_line_naming_the_file(tmp_path):
    marker = tmp_path / "ran"
    path = planted(tmp_path / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint_file(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message and "system" in message
    assert not marker.exists()


def test_deepspeeds_own_weights_only_false_reads_are_held_to_the_allowlist(tmp_path):
    marker = tmp_path / "ran"
    path = planted(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"  # a user's setting, put back afterwards
    try:
        with weights_only_loads(), pytest.raises(pickle.UnpicklingError):
            torch.load(path, map_location="cpu", weights_only=False)  # as zero_to_fp32 calls it
        assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"
        assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    finally:
        del os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"]
    assert not marker.exists()


def test_deepspeeds_checkpoint_types_load(tmp_path):
    saved = {"optimizer_state_dict": {"zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1.0),
                                      "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}]},
             "fp16_scaler": DynamicLossScaler(init_scale=2.0**16, scale_window=1000, min_scale=1, delayed_shift=1,
                                              consecutive_hysteresis=False, raise_error_at_min_scale=True,
                                              dtype=torch.float16),
             "tensors": [torch.arange(4.0)]}
    torch.save(saved, tmp_path / "optim_states.pt")
    loaded = load_checkpoint_file(tmp_path / "optim_states.pt")
    state = loaded["optimizer_state_dict"]
    assert state["zero_stage"] is ZeroStageEnum.gradients
    assert state["param_slice_mappings"][0]["w"] == fragment_address(numel=4, start=0)
    assert isinstance(state["loss_scaler"], LossScaler) and state["loss_scaler"].cur_scale == 1.0
    assert loaded["fp16_scaler"].cur_scale == 2.0**16
    assert torch.equal(loaded["tensors"][0], torch.arange(4.0))


def test_an_unreadable_checkpoint_file_is_one_line(tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    for path in (tmp_path / "broken.pt", tmp_path / "absent.pt"):
        with pytest.raises(CheckpointError) as e:
            load_checkpoint_file(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_imagenet1k_is_timms_list_of_the_1000_synsets_in_its_order():
    classes = head_subset_classes("imagenet1k")
    assert len(classes) == len(set(classes)) == 1000
    assert classes == (TIMM_INFO / "imagenet_synsets.txt").read_text().split()
    assert classes[0] == "n01440764" and classes[-1] == "n15075141"
    # A run on timm's 21,842-class ImageNet-22K list (Microsoft's) holds all of them; the fall 2011
    # release (21,841 classes) lacks one, which the export names.
    in22k_ms = sorted((TIMM_INFO / "imagenet22k_ms_synsets.txt").read_text().split())
    rows = head_rows(in22k_ms, classes, "imagenet1k")
    assert [in22k_ms[row] for row in rows] == classes
    fall11 = sorted((TIMM_INFO / "imagenet22k_synsets.txt").read_text().split())
    assert len(fall11) == 21841
    with pytest.raises(ExportError, match=r"1 of its 1000 classes are not among the run's 21841 classes, "
                                          r"first 'n04399382'"):
        head_rows(fall11, classes, "imagenet1k")


def test_a_subset_file_keeps_its_order_and_skips_blank_lines(tmp_path):
    (tmp_path / "subset.txt").write_text("7\n 3 \n\n0\n")
    classes = head_subset_classes(str(tmp_path / "subset.txt"))
    assert classes == ["7", "3", "0"]
    assert head_rows([str(d) for d in range(10)], classes, "subset.txt") == [7, 3, 0]


def test_subset_errors_are_one_line_and_name_what_is_wrong(tmp_path):
    (tmp_path / "twice.txt").write_text("1\n2\n1\n")
    (tmp_path / "empty.txt").write_text("\n\n")
    cases = {str(tmp_path / "twice.txt"): "'1' is listed more than once",
             str(tmp_path / "empty.txt"): "names no class",
             str(tmp_path / "nope.txt"): "neither 'imagenet1k' nor a file"}
    for spec, expected in cases.items():
        with pytest.raises(ExportError, match=expected) as e:
            head_subset_classes(spec)
        assert "\n" not in str(e.value)
    with pytest.raises(ExportError, match="--head-subset and --headless"):
        export_run(tmp_path, tmp_path / "out", headless=True, head_subset="imagenet1k")
    with pytest.raises(ExportError) as e:
        head_rows(["cat", "dog"], ["dog", "n01440764", "n01443537"], "imagenet1k")
    assert str(e.value) == ("--head-subset imagenet1k: 2 of its 3 classes are not among the run's 2 classes, "
                            "first 'n01440764'")


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_export_files_get_the_users_umask(tmp_path, umask):
    safetensors.torch.save_file({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "mine.txt").write_text("")
    (tmp_path / "mine.txt").chmod(0o600)
    old = os.umask(umask)
    try:
        share_as_umask_allows(tmp_path, ["model.safetensors", "config.json"])
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert (tmp_path / "mine.txt").stat().st_mode & 0o777 == 0o600  # not an export file: left alone
