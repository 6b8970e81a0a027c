"""Shared fixtures (helpers shared by the test modules live in tests/helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.data.digits import write_digits
from pretrain.data.write_shards import write_shards


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """The digits demo as shards: 1,618 train and 179 val samples in 100-sample shards."""
    root = tmp_path_factory.mktemp("digits")
    write_digits(root / "images")
    write_shards(root / "images", root / "shards", val_fraction=0.1, shard_samples=100)
    return root / "shards"

