"""nox sessions: tests, lint, bench, her2st, docs, tutorials."""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.default_venv_backend = "venv"


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-n", "2", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "src", "tests", "benchmarks", "docs", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "benchmarks", "docs", "noxfile.py")


BENCHMARKS = sorted(p.stem for p in Path(__file__).parent.joinpath("benchmarks").glob("*.py"))


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Run one benchmark script: ``nox -s bench -- NAME [ARGS]`` runs ``benchmarks/NAME.py ARGS``.

    The scripts print tables (see docs/benchmarks.md for the command behind each published one).
    """
    if not session.posargs or session.posargs[0] not in BENCHMARKS:
        session.error(f"name the benchmark to run: nox -s bench -- NAME [ARGS], NAME one of {', '.join(BENCHMARKS)}")
    name, *args = session.posargs
    session.install("-e", ".")
    session.run("python", f"benchmarks/{name}.py", *args)


@nox.session(python="3.11")
def her2st(session: nox.Session) -> None:
    """The real-data harness (``benchmarks/her2st.py``): HER2ST leave one section out, or a HEST-Bench folder.

    Arguments go to the script, e.g. ``nox -s her2st -- --panels hvg50 --methods molf dense mlp ridge`` or
    ``nox -s her2st -- --hest-bench DIR --task IDC --features DIR``.
    """
    session.install("-e", ".[scvi]")  # --methods scvi
    session.run("python", "benchmarks/her2st.py", *session.posargs)


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    """Build the documentation: nitpicky, warnings are errors (``HISTOFLOW_DOCS_OFFLINE=1`` skips intersphinx)."""
    session.install("-e", ".[docs]")
    session.run("sphinx-build", "-W", "-n", "--keep-going", "-b", "html", "docs", "docs/_build/html", *session.posargs)


@nox.session(python="3.11")
def tutorials(session: nox.Session) -> None:
    """Execute every notebook of docs/tutorials and docs/gallery.ipynb; fails on any cell error.

    The notebooks are executed into a temporary copy (the checkout is not rewritten); ``nox -s tutorials --
    --inplace`` saves the new outputs into them instead. Other arguments go to ``docs/tutorials/run.py`` (notebook
    paths, ``--timeout``).
    """
    session.install("-e", ".[test,tutorials]")
    session.run("python", "docs/tutorials/run.py", "--timeout", "1200", *session.posargs)
