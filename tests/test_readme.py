from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_readme_has_exactly_two_quick_start_commands():
    commands = _quick_start_commands()
    assert len(commands) == 2
    assert all("\n" not in c for c in commands), "each quick-start command must be one line"
    main, tests = commands
    assert main.endswith("histoflow demo")
    assert "pip install" in main and "pip install" in tests
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command():
    tests_cmd = _quick_start_commands()[1]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    commands = [line.strip() for line in ci if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] == tests_cmd
    assert "set -euo pipefail" in commands
