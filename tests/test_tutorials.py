"""The tutorial notebooks are listed in the docs, committed executed (no errors) and small.

Nothing is executed here: ``nox -s tutorials`` (``docs/tutorials/run.py``) runs them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

TUTORIALS = REPO / "docs" / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
MAX_BYTES = 1_500_000
EXPECTED = ("01_quickstart", "02_her2st", "03_he_only", "04_experts", "05_hest_at_scale")


def _toctree_entries() -> list[str]:
    text = (TUTORIALS / "index.md").read_text()
    blocks = re.findall(r"```\{toctree\}\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/tutorials/index.md has no toctree"
    entries = []
    for block in blocks:
        for line in block.splitlines():
            line = line.strip()
            if line and not line.startswith(":"):
                entries.append(line.removesuffix(".ipynb"))
    return entries


def _code_cells(path: Path) -> list[dict]:
    nb = json.loads(path.read_text())
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def test_every_expected_tutorial_exists():
    assert [p.stem for p in NOTEBOOKS] == list(EXPECTED)


def test_toctree_lists_every_notebook_once():
    entries = _toctree_entries()
    assert sorted(entries) == sorted(p.stem for p in NOTEBOOKS)
    assert len(entries) == len(set(entries))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_committed_executed_without_errors(path: Path):
    cells = _code_cells(path)
    assert cells, f"{path.name} has no code cell"
    counts = [c["execution_count"] for c in cells if "".join(c["source"]).strip()]
    assert None not in counts, f"{path.name}: a code cell was not executed"
    assert counts == sorted(counts) and counts[0] == 1, f"{path.name}: not executed top to bottom in one run"
    for i, cell in enumerate(cells):
        if not "".join(cell["source"]).strip():
            continue
        assert cell["outputs"], f"{path.name}: code cell {i} has no output (show what it did)"
        errors = [o for o in cell["outputs"] if o["output_type"] == "error"]
        assert not errors, f"{path.name}: code cell {i} raised {errors[0].get('ename')}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_small_enough(path: Path):
    assert path.stat().st_size < MAX_BYTES, f"{path.name} is {path.stat().st_size / 1e6:.2f} MB"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_starts_with_title(path: Path):
    first = json.loads(path.read_text())["cells"][0]
    assert first["cell_type"] == "markdown"
    assert "".join(first["source"]).startswith("# "), f"{path.name}: the first cell must be the page title"


def test_runner_executes_every_tutorial_and_the_gallery():
    from _scripts import load_script

    run = load_script(str((TUTORIALS / "run.py").relative_to(REPO)), "tutorials_run")
    assert run.default_notebooks() == [*NOTEBOOKS, REPO / "docs" / "gallery.ipynb"]
    assert run.MAX_BYTES == MAX_BYTES


def test_nox_has_a_tutorials_session_running_the_runner():
    text = (REPO / "noxfile.py").read_text()
    session = text.split("def tutorials(", 1)[1]
    assert ".[test,tutorials]" in session
    assert "docs/tutorials/run.py" in session
