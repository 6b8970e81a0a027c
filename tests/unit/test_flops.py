"""Analytic FLOPs against the published figures; MFU peaks: exact device names, the configured peak first,
no MFU for unknown devices."""

from __future__ import annotations

import pytest
import torch

from pretrain.train.flops import (GPU_BF16_PEAK_TFLOPS, device_peak_flops, forward_macs, peak_flops_and_source, peak_for,
                            table_peak_flops, train_flops_per_image)


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H200", 989), ("NVIDIA GH200 144G HBM3e", 989),
    ("NVIDIA H800", 989), ("NVIDIA H800 PCIe", 756), ("NVIDIA H20", 148), ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA A800-SXM4-80GB", 312), ("NVIDIA B200", 2250), ("NVIDIA L40S", 362), ("NVIDIA L4", 121),
])
def test_exact_names_give_their_dense_bf16_peak(name, tflops):
    assert table_peak_flops(name) == tflops * 1e12
    peak, source = peak_for(0.0, name)
    assert peak == tflops * 1e12
    assert repr(name) in source and f"{tflops:g} TFLOP/s" in source and "device table" in source


def test_pcie_and_nvl_parts_do_not_get_the_sxm_peak():
    sxm = table_peak_flops("NVIDIA H100 80GB HBM3")
    assert table_peak_flops("NVIDIA H100 PCIe") == 756e12 < sxm
    assert table_peak_flops("NVIDIA H100 NVL") == 835e12 < sxm
    assert table_peak_flops("NVIDIA H200 NVL") == 835e12 < table_peak_flops("NVIDIA H200")
    assert table_peak_flops("NVIDIA L40") == 181e12 < table_peak_flops("NVIDIA L40S")
    assert table_peak_flops("NVIDIA A10G") == 70e12 < table_peak_flops("NVIDIA A10")


@pytest.mark.parametrize("name", ["NVIDIA H100", "H100", "NVIDIA H100 80GB HBM3 MIG 1g.10gb", "NVIDIA GeForce RTX 4090",
                                  "nvidia h200", ""])
def test_unknown_or_partial_names_report_no_mfu(name):
    assert table_peak_flops(name) is None
    peak, source = peak_for(0.0, name)
    assert peak is None
    assert source.startswith(f"unknown device {name!r}") and "MFU not reported" in source
    assert "\n" not in source


def test_the_configured_peak_wins_over_the_table_and_over_no_device():
    assert peak_for(500.0, "NVIDIA H100 80GB HBM3") == (500e12, "MFU peak 500 TFLOP/s from log.peak_tflops")
    assert peak_for(0.41, None)[0] == pytest.approx(0.41e12)
    assert peak_for(0.41, "NVIDIA Unknown")[0] == pytest.approx(0.41e12)


def test_no_device_and_no_configured_peak_reports_no_mfu():
    peak, source = peak_for(0.0, None)
    assert peak is None and source.startswith("no CUDA device") and "log.peak_tflops" in source


def test_a_negative_configured_peak_is_refused_in_one_line():
    with pytest.raises(ValueError, match="log.peak_tflops must be >= 0"):
        peak_for(-1.0, "NVIDIA H200")


def test_this_process_uses_its_own_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_flops_and_source(0.0)[0] == 756e12
    assert device_peak_flops() == 756e12
    assert device_peak_flops(100.0) == 100e12
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_peak_flops() is None
    assert peak_flops_and_source(0.0)[1].startswith("no CUDA device")


def test_every_table_entry_is_a_plausible_dense_peak():
    # Dense bf16 peaks of data-centre parts lie between the A10G's and Blackwell's; names are exact, as reported.
    for name, tflops in GPU_BF16_PEAK_TFLOPS.items():
        assert name.startswith("NVIDIA ") and name == name.strip(), name
        assert 50 <= tflops <= 2500, name


def test_swin_b_forward_is_the_published_multiply_adds():
    assert forward_macs("swin_b", num_classes=1000) == pytest.approx(15.4e9, rel=0.02)


@pytest.mark.parametrize("arch, gmacs", [("swin_t", 4.5), ("swin_s", 8.7), ("swin_b", 15.4), ("swin_l", 34.5)])
def test_flops_match_published_figures(arch, gmacs):
    assert round(forward_macs(arch, num_classes=1000) / 1e9, 1) == gmacs


def test_training_flops_are_three_forwards_of_two_flops_per_mac():
    assert train_flops_per_image("swin_b", num_classes=1000) == pytest.approx(92.6e9, rel=0.01)
    assert forward_macs("swin_b", 384, 12, 1000) / forward_macs("swin_b", 224, 7, 1000) == pytest.approx(3.05, abs=0.05)
