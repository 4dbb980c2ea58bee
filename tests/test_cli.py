from __future__ import annotations

import subprocess
import sys

import pytest

from histoflow.cli import main


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip()
    assert main([]) == 2
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0
    assert "--dataset" in capsys.readouterr().out


def test_bad_arguments_give_clear_messages(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--dataset", "nope"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["demo", "--n-slides", "0", "--quiet"]) == 1
    assert "n_slides" in capsys.readouterr().err


def test_demo_runs_end_to_end(tmp_path, capsys):
    rc = main(["demo", "--n-slides", "6", "--grid", "4", "--patch-px", "64", "--quiet", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "obsm['X_efficientnet_lite0']: 96 × 1280" in out
    for word in ("train", "val", "test", "panel"):
        assert word in out
    summary = (tmp_path / "summary.txt").read_text()
    assert "spots: 96" in summary


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "histoflow", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip()
