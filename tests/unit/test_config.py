"""Config schema: defaults, overrides, one-line errors with exit code 2, README reference in sync,
the per-section checks (memory options, frozen prefixes)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import ConfigError, dump_config, load_config, reference_markdown
from pretrain.config.checks import check_devices
from pretrain.preflight import DeviceFacts, check_run
from tests.helpers import REPO, cpu_env


def load(shards: Path, *overrides: str, path: str | None = "configs/demo.yaml", world: str = "1"):
    """Load and check a config as pretrain/main.py does, for a run of `world` ranks."""
    cfg = load_config(REPO / path if path else None, [f"data.root={shards}", *overrides])
    check_run(cfg, int(world))
    return cfg


def error_of(shards: Path, *overrides: str, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        load(shards, *overrides, **kw)
    return str(e.value)


def test_overrides_are_typed_and_applied(shards):
    cfg = load(shards, "optim.base_lr=1e-3", "batch.micro_batch=8", "augment.crop_scale=[0.5, 1]",
               "run.auto_resume=false", "precision=fp32")
    assert cfg.optim.base_lr == pytest.approx(1e-3)
    assert cfg.batch.micro_batch == 8
    assert cfg.augment.crop_scale == [0.5, 1.0]
    assert cfg.run.auto_resume is False
    assert cfg.precision == "fp32"


def test_defaults_without_a_file(shards):
    cfg = load(shards, "batch.global_batch=32", path=None)
    assert cfg.model.arch == "swin_debug" and cfg.parallel.zero_stage == 2


def test_unknown_key_suggests_the_close_one(shards):
    assert error_of(shards, "optim.base_lrr=1") == "unknown key optim.base_lrr (did you mean optim.base_lr?)"
    assert "unknown key optimm" in error_of(shards, "optimm.base_lr=1")
    assert "allowed:" in error_of(shards, "batch.zzz=1")


@pytest.mark.parametrize("override, expected", [
    ("batch.micro_batch=abc", "batch.micro_batch must be an integer, got 'abc'"),
    ("batch.micro_batch=1.5", "batch.micro_batch must be an integer, got 1.5"),
    ("optim.base_lr=fast", "optim.base_lr must be a number, got 'fast'"),
    ("run.auto_resume=3", "run.auto_resume must be true or false, got 3"),
    ("precision=fp8", "precision must be one of 'bf16', 'fp16', 'fp32', got 'fp8'"),
    ("augment.crop_scale=0.5", "augment.crop_scale must be a list of float, got 0.5"),
    ("optim=3", "optim must be a mapping of keys, got 3"),
])
def test_wrong_types(shards, override, expected):
    assert error_of(shards, override) == expected


@pytest.mark.parametrize("overrides, world, fragment", [
    (["batch.global_batch=48"], "2", "batch.global_batch=48 must be a multiple of batch.micro_batch x data-parallel ranks = 32 x 2 = 64"),
    (["parallel.offload_optimizer=true", "parallel.zero_stage=0"], "1", "parallel.offload_optimizer=true needs parallel.zero_stage"),
    (["schedule.warmup_steps=2000"], "1", "schedule.warmup_steps=2000 must be in [0, schedule.total_steps=1500)"),
    (["objective.num_classes=7"], "1", "objective.num_classes=7 disagrees with the 10 classes"),
    (["model.arch=swin_xl"], "1", "model.arch='swin_xl' is unknown (allowed: swin_debug"),
    (["model.img_size=36"], "1", "model.img_size=36 must be a multiple of 8"),
    (["model.window_size=3"], "1", "model.window_size=3 does not tile stage 0"),
    (["parallel.zero_stage=4"], "1", "parallel.zero_stage=4 must be 0, 1, 2 or 3"),
    (["optim.min_lr=1"], "1", "optim.min_lr=1.0 must be in [0, optim.base_lr"),
    (["precision=fp16"], "1", "precision=fp16 needs a CUDA device"),
    (["data.root=/nonexistent"], "1", "data.root=/nonexistent: no dataset.json there"),
    (["parallel.tensor_parallel=2", "parallel.zero_stage=1"], "3",
     "parallel.pipeline_stages x parallel.tensor_parallel = 1 x 2 = 2 must divide the 3 ranks"),
    (["parallel.pipeline_stages=2", "parallel.tensor_parallel=2", "parallel.zero_stage=1"], "2",
     "= 2 x 2 = 4 must divide the 2 ranks"),
    (["parallel.pipeline_stages=2", "parallel.zero_stage=2"], "2",
     "parallel.zero_stage=2 cannot be combined with pipeline or tensor parallelism (allowed: 0 or 1)"),
    (["parallel.tensor_parallel=3", "parallel.zero_stage=1"], "3",
     "parallel.tensor_parallel=3 must divide the attention heads of every stage of swin_debug (2, 4)"),
    (["parallel.pipeline_stages=8", "parallel.zero_stage=1"], "8",
     "parallel.pipeline_stages=8 exceeds the 7 pipeline layers of swin_debug"),
    (["parallel.tensor_parallel=0"], "1", "parallel.tensor_parallel=0 must be >= 1"),
    (["parallel.cpu_checkpointing=true"], "1", "set parallel.activation_checkpointing to blocks or every_k"),
    (["parallel.partition_activations=true", "parallel.activation_checkpointing=blocks"], "1",
     "parallel.partition_activations=true splits activations over tensor-parallel ranks"),
    (["parallel.tensor_parallel=2", "parallel.zero_stage=1", "batch.global_batch=48"], "2",
     "batch.global_batch=48 must be a multiple of batch.micro_batch x data-parallel ranks = 32 x 1 = 32"),
])
def test_impossible_combinations(shards, overrides, world, fragment):
    assert fragment in error_of(shards, *overrides, world=world)


def test_bad_yaml_file_names_the_file(tmp_path, shards):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  base_lr: [1,\n")
    assert error_of(shards, path=str(bad)).startswith(f"config file {bad} line")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  archh: swin_b\n")
    assert error_of(shards, path=str(unknown)) == "unknown key model.archh (did you mean model.arch?)"


def test_resolved_config_round_trips(tmp_path, shards):
    cfg = load(shards, "optim.base_lr=3e-4", "model.drop_path=0.2")
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("override", ["optim.lrr=1", "batch.micro_batch=abc", "schedule.warmup_steps=99999"])
def test_entry_point_prints_one_line_and_exits_2(shards, override):
    proc = subprocess.run(
        [sys.executable, "pretrain/main.py", "--config", "configs/demo.yaml", "--set", f"data.root={shards}",
         "--set", override],
        cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_readme_config_reference_is_in_sync():
    readme = (REPO / "README.md").read_text()
    assert reference_markdown() in readme, "regenerate with: python -m pretrain.config"


@pytest.mark.parametrize("path", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_are_valid(shards, path):
    cfg = load_config(REPO / "configs" / path, [f"data.root={shards}", "objective.num_classes=0"])
    # The laptop configs run on 2 processes, the 22K recipes on 2 nodes x 8 GPUs.
    check_run(cfg, 2 if path.startswith("demo") else 16)


def test_a_data_stall_must_end_before_the_process_group_timeout(shards):
    assert load(shards).parallel.timeout_minutes == 30
    assert "data.stall_timeout_s=1800 must be > 0 and below parallel.timeout_minutes x 60 = 1800 s" in \
        error_of(shards, "data.stall_timeout_s=1800")
    assert "data.stall_timeout_s=0 must be > 0" in error_of(shards, "data.stall_timeout_s=0")
    assert load(shards, "parallel.timeout_minutes=60", "data.stall_timeout_s=1800").data.stall_timeout_s == 1800
    assert "parallel.timeout_minutes=0 must be > 0" in error_of(shards, "parallel.timeout_minutes=0")


def test_fp32_gradient_accumulation_under_model_parallelism_needs_zero1(shards):
    message = error_of(shards, "parallel.tensor_parallel=2", "parallel.zero_stage=0", "batch.global_batch=32",
                       world="2")
    assert "parallel.grad_accum_dtype=fp32 with bf16 under pipeline/tensor parallelism needs " \
           "parallel.zero_stage=1" in message
    load(shards, "parallel.tensor_parallel=2", "parallel.zero_stage=0", "parallel.grad_accum_dtype=bf16",
         "batch.global_batch=32", world="2")


def test_gpu_facts_are_checked_before_start_up(shards):
    cfg = load(shards, "parallel.tensor_parallel=2", "parallel.zero_stage=1", "batch.global_batch=32", world="2")
    h100 = DeviceFacts("NVIDIA H100 80GB HBM3", bf16=True, gpus_on_node=8, ranks_on_node=8)
    check_devices(cfg, h100)
    with pytest.raises(ConfigError, match="precision=bf16: Tesla V100-SXM2-32GB does not compute in bf16"):
        check_devices(cfg, DeviceFacts("Tesla V100-SXM2-32GB", bf16=False, gpus_on_node=8, ranks_on_node=8))
    with pytest.raises(ConfigError, match="parallel.tensor_parallel=2 is larger than the 1 GPUs of one node"):
        check_devices(cfg, DeviceFacts("NVIDIA H200", bf16=True, gpus_on_node=1, ranks_on_node=1))
    with pytest.raises(ConfigError, match="8 ranks on this node but 4 GPUs: start at most one rank per GPU"):
        check_devices(cfg, DeviceFacts("NVIDIA H200", bf16=True, gpus_on_node=4, ranks_on_node=8))


@pytest.mark.parametrize("override,message", [
    ("parallel.sequential_attention=[4]", "parallel.sequential_attention=[4]: swin_debug has stages 0..1"),
    ("parallel.attention_chunk_windows=0", "parallel.attention_chunk_windows=0 must be >= 1"),
    ("parallel.checkpoint_every_k=0", "parallel.checkpoint_every_k=0 must be >= 1"),
    ("parallel.activation_checkpointing=some", "parallel.activation_checkpointing"),
])
def test_memory_options_are_validated(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_run(load_config("configs/demo.yaml", [override]), 1, check_data=False)


@pytest.mark.parametrize("frozen,message", [
    ("[patch_embd]", "optim.frozen: 'patch_embd' names no parameter of swin_debug (top-level names: patch_embed"),
    ("[patch_embed, layers, norm, head]", "leaves nothing to train"),
])
def test_frozen_prefixes_are_validated(frozen, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_run(load_config("configs/demo.yaml", [f"optim.frozen={frozen}"]), 1, check_data=False)
