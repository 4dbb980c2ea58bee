"""The nox sessions that run benchmarks: ``bench`` (any script by name) and ``her2st`` (the real-data harness).

The session functions are called with a recording stand-in for :class:`nox.Session`, so what each would install and
run is checked without creating virtual environments.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _scripts import load_script

REPO = Path(__file__).resolve().parents[2]


class RecordingSession:
    def __init__(self, *posargs: str):
        self.posargs = list(posargs)
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    def install(self, *args: str) -> None:
        self.calls.append(("install", args))

    def run(self, *args: str) -> None:
        self.calls.append(("run", args))

    def error(self, message: str) -> None:
        raise RuntimeError(message)


@pytest.fixture(scope="module")
def noxfile():
    return load_script("noxfile.py", "histoflow_noxfile")


def test_bench_lists_every_benchmark_script(noxfile):
    assert noxfile.BENCHMARKS == sorted(p.stem for p in (REPO / "benchmarks").glob("*.py"))
    assert {"her2st", "metrics_speed", "eight_gaussians", "predict_speed"} <= set(noxfile.BENCHMARKS)


def test_bench_runs_the_named_script_with_its_arguments(noxfile):
    s = RecordingSession("metrics_speed", "--repeats", "1")
    noxfile.bench(s)
    assert s.calls == [("install", ("-e", ".")), ("run", ("python", "benchmarks/metrics_speed.py", "--repeats", "1"))]


@pytest.mark.parametrize("posargs", [(), ("nonexistent",), ("--quick",)])
def test_bench_without_a_known_name_says_which_exist(noxfile, posargs):
    s = RecordingSession(*posargs)
    with pytest.raises(RuntimeError, match=r"nox -s bench -- NAME.*eight_gaussians.*her2st"):
        noxfile.bench(s)
    assert s.calls == []


def test_her2st_session_runs_the_harness_with_scvi(noxfile):
    s = RecordingSession("--hest-bench", "DIR", "--task", "IDC")
    noxfile.her2st(s)
    assert s.calls == [
        ("install", ("-e", ".[scvi]")),
        ("run", ("python", "benchmarks/her2st.py", "--hest-bench", "DIR", "--task", "IDC")),
    ]
