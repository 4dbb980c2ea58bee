"""nox sessions: tests, lint, bench, docs, tutorials."""

from __future__ import annotations

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


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    session.install("-e", ".")
    session.run("python", "benchmarks/embed.py", *session.posargs)


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
