"""Integration tests: real runs through the entry points users run. Every test collected here is
`slow` (this hook is the only place that says so), and `exported_run` makes the trained-and-exported
demo runs they share."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import run, train

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def exported_run(tmp_path_factory, shards):
    """Train a demo run through a real launcher (tests.helpers.train), then export it with
    `python -m pretrain.export` into run_dir / "export"; returns run_dir.

    Called as exported_run(name, *overrides, **train_options). A run is made once per session:
    a second call with the same arguments returns the same directory, so tests that read one run
    share it. Callers only read these runs; a test that trains on into a run makes its own.
    """
    made: dict[tuple, Path] = {}

    def make(name: str, *overrides: str, **options) -> Path:
        key = (overrides, tuple(sorted(options.items())))
        if key not in made:
            run_dir = tmp_path_factory.mktemp(name) / name
            train(run_dir, shards, *overrides, **options)
            run(["python", "-m", "pretrain.export", "--run", str(run_dir), "--out", str(run_dir / "export")])
            made[key] = run_dir
        return made[key]

    return make
