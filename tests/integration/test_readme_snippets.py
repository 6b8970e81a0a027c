"""Every ```python block of the README runs as written, against a real export of the demo.

A block names the inputs a reader must supply as placeholders, one per line:
`NAME = "example value"  # placeholder: what it is`. The test binds each to a real one
(PLACEHOLDERS below) and runs the block; a placeholder it does not know fails the test, as
does any block that raises. Shell blocks are not run, nor ```py blocks (config files of other
frameworks, such as mmdetection's).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, run, train

README = REPO / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
PLACEHOLDER = re.compile(r"^(?P<name>\w+) = .*#\s*placeholder\b.*$", re.M)
# Each placeholder the README may use: a function of the demo export directory giving its value.
PLACEHOLDERS = {"EXPORT_DIR": lambda export: str(export / "timm"), "HF_DIR": lambda export: str(export / "hf"),
                "OFFICIAL_PTH": lambda export: str(export / "official" / "model.pth")}


def python_blocks() -> list[str]:
    return BLOCK.findall(README.read_text())


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory, shards) -> Path:
    """The demo trained for 2 steps by one plain `python pretrain/main.py` process, then exported
    in every format (OUT/timm, OUT/hf, OUT/official)."""
    run_dir = tmp_path_factory.mktemp("readme") / "run"
    train(run_dir, shards, "schedule.total_steps=2", launcher="python", nproc=1)
    out = run_dir.parent / "export"
    run([sys.executable, "-m", "pretrain.export", "--run", str(run_dir), "--out", str(out),
         "--format", "timm", "hf", "official"])
    return out


def test_the_readme_has_python_blocks():
    assert len(python_blocks()) >= 2, "README.md: the ```python blocks were not found (has the fence style changed?)"


@pytest.mark.parametrize("number", range(1, len(python_blocks()) + 1), ids=lambda n: f"block{n}")
def test_readme_python_block_runs(number, demo_export, tmp_path, monkeypatch):
    code = python_blocks()[number - 1]
    where = f"README.md python block {number} ({code.splitlines()[0]!r}...)"
    unknown = sorted(set(PLACEHOLDER.findall(code)) - PLACEHOLDERS.keys())
    assert not unknown, f"{where}: placeholders {unknown} are not bound by this test; add them to PLACEHOLDERS"
    bound = PLACEHOLDER.sub(lambda m: f"{m['name']} = {PLACEHOLDERS[m['name']](demo_export)!r}", code)
    monkeypatch.chdir(tmp_path)  # whatever a block writes lands here, not in the repository
    try:
        exec(compile(bound, where, "exec"), {"__name__": "__readme__"})
    except Exception as e:
        pytest.fail(f"{where} raised {type(e).__name__}: {e}\n(an input the reader supplies must be a "
                    f"`NAME = ...  # placeholder: ...` line that this test binds)")
