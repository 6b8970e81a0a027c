"""The trainer's parts: the objective protocol, fault injection, logging set up by the entry point."""

from __future__ import annotations

import logging
import math
import warnings

import torch

from pretrain.config import Config
from pretrain.models.objectives import OBJECTIVES, Objective, build_objective
from pretrain.train.faults import NO_FAULTS, FaultInjection
from pretrain.train.metrics import Metrics, setup_logging


def test_every_objective_satisfies_the_protocol():
    for kind, objective_class in OBJECTIVES.items():
        cfg = Config()
        cfg.objective.kind = kind
        objective = build_objective(cfg, 3)
        assert isinstance(objective, objective_class) and isinstance(objective, Objective), kind
        assert "eval/samples" in objective.eval_metrics(torch.zeros(objective.eval_sums_size)), kind


def test_fault_injection_is_read_once_for_rank_0_only():
    env = {"PRETRAIN_FAULT_NAN_STEPS": "3,5"}
    faults = FaultInjection.from_env(0, env)
    assert faults.nan_steps == {3, 5} and FaultInjection.from_env(1, env) == NO_FAULTS
    assert FaultInjection.from_env(0, {}) == NO_FAULTS
    loss = torch.tensor(2.0)
    assert math.isnan(faults.loss(3, loss)) and faults.loss(4, loss) is loss and NO_FAULTS.loss(3, loss) is loss


def test_metrics_leave_logging_alone_and_setup_logging_opens_the_rank_file(tmp_path):
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        Metrics(tmp_path / "quiet", rank=1).close()
        assert root.handlers == handlers and not (tmp_path / "quiet" / "logs").exists()
        setup_logging(tmp_path, rank=1)
        metrics = Metrics(tmp_path, rank=1)
        metrics.print("a console line")
        warnings.warn("a warning for the log file")
        for h in root.handlers:
            h.flush()
        text = (tmp_path / "logs" / "rank1.log").read_text()
        assert "a console line" in text and "a warning for the log file" in text
    finally:
        logging.captureWarnings(False)
        for h in root.handlers[len(handlers):]:
            root.removeHandler(h)
            h.close()
        root.setLevel(level)
