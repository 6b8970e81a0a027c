"""Bad configs, read in process or through the entry point, give one-line errors and no tracebacks."""

from __future__ import annotations

import io
import random
import subprocess
import sys
from contextlib import redirect_stderr
from pathlib import Path

import yaml

from tests.helpers import REPO, cpu_env


# -- 200 mutated configs ----------------------------------------------------------------

BAD_VALUES = {
    "run.seed": ["x", 1.5, [1]], "run.auto_resume": [1, "yes", None], "run.max_bad_steps": [0, -3, "many"],
    "model.arch": ["swin_xxl", 3], "model.img_size": [-32, 36, "224"], "model.window_size": [-1, 5, 2.5],
    "model.drop_path": [1.0, -0.1, "high"], "objective.kind": ["mae", 1], "objective.num_classes": [-1, 3, "ten"],
    "objective.label_smoothing": [1.0, -0.5], "objective.mixup": [-1.0, "on"], "objective.mixup_prob": [1.5],
    "augment.crop_scale": [[0.5], [0.9, 0.1], [0.0, 1.0], 0.5], "augment.hflip": [2.0, -1],
    "augment.interpolation": ["nearest", 3], "augment.eval_crop_pct": [0.0, 1.5],
    "data.workers": [-1, "auto"], "data.shuffle_buffer": [0], "data.stall_timeout_s": [-1, "soon"], "data.train_weights": [[1.0, 2.0], [-1.0]],
    "batch.micro_batch": [0, -8, 4.5], "batch.global_batch": [48, 0, "big"], "optim.base_lr": [0, -1e-3, "fast"],
    "optim.min_lr": [1.0, -1.0], "optim.betas": [[0.9], [0.9, 1.5], "0.9"], "optim.clip_grad": [-1.0],
    "schedule.total_steps": [0, -10, 1.5], "schedule.warmup_steps": [99999, -1],
    "parallel.zero_stage": [4, -1, "2"], "parallel.offload_optimizer": ["true", 1],
    "parallel.activation_checkpointing": ["all", True], "precision": ["fp8", 16],
    "checkpoint.every_steps": [0], "checkpoint.keep_last": [0], "log.every_steps": [0],
    "eval.every_steps": [-5], "eval.micro_batch": [0],
}


def mutations(shards: Path, n: int, seed: int = 0) -> list[dict]:
    """n configs derived from demo.yaml, each with one unknown key, wrong type or bad value."""
    rng = random.Random(seed)
    base = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    base["data"]["root"] = str(shards)
    out = []
    for i in range(n):
        tree = yaml.safe_load(yaml.safe_dump(base))
        kind = i % 3
        if kind == 0:  # unknown key: a typo of a real one, or a made-up section
            section = rng.choice([k for k, v in tree.items() if isinstance(v, dict)])
            key = rng.choice(list(tree[section]))
            typo = rng.choice([key + rng.choice("sx_"), key[:-1], "_" + key, key.replace("_", "")])
            if typo in tree[section] or typo == key:
                typo = key + "zz"
            if rng.random() < 0.2:
                tree[section + "x"] = {key: tree[section][key]}
            else:
                tree[section][typo] = tree[section][key]
        else:  # wrong type or bad value
            dotted = rng.choice(sorted(BAD_VALUES))
            value = rng.choice(BAD_VALUES[dotted])
            if "." in dotted:
                section, key = dotted.split(".")
                tree.setdefault(section, {})[key] = value
                if dotted == "data.train_weights":
                    tree["data"]["train_urls"] = ["train-000000.tar"]
            else:
                tree[dotted] = value
        out.append(tree)
    return out


def test_200_mutated_configs_give_one_line_errors(tmp_path, shards):
    from pretrain.main import main

    for i, tree in enumerate(mutations(shards, 200)):
        path = tmp_path / f"mutant{i}.yaml"
        path.write_text(yaml.safe_dump(tree))
        err = io.StringIO()
        with redirect_stderr(err):
            status = main(["--config", str(path)])
        lines = err.getvalue().strip().splitlines()
        assert status == 2, f"mutant {i} was accepted:\n{path.read_text()}"
        assert len(lines) == 1 and lines[0].startswith("config error: "), (i, err.getvalue())


def test_mutated_configs_through_the_command_line(tmp_path, shards):
    for i, tree in enumerate(mutations(shards, 6, seed=1)):
        path = tmp_path / f"mutant{i}.yaml"
        path.write_text(yaml.safe_dump(tree))
        proc = subprocess.run([sys.executable, "pretrain/main.py", "--config", str(path)], cwd=REPO,
                              env=cpu_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
