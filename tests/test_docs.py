"""The documentation builds (nitpicky, warnings are errors) and documents every public name.

CI runs only the README's pytest command, so this is where the docs are checked. The build runs offline
(``HISTOFLOW_DOCS_OFFLINE=1``: no intersphinx downloads, see docs/contributing.md) on a copy of ``docs/``, so it
never touches the checkout.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import types
from html import unescape
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Namespaces whose autosummary block in docs/api.md is written. Add "pl" and "get" here when their block replaces
# the marked comment in docs/api.md; from then on every name in their __all__ needs a page.
DOCUMENTED = ("io", "datasets", "pp", "tl", "pl", "get", "models")


def _public(namespace: str) -> list[str]:
    """Documented names of a namespace, relative to ``histoflow``: ``<namespace>.<name>`` for every name in its
    ``__all__``; a public submodule (``tl.metrics``) adds ``<namespace>.<module>.<member>`` for its own ``__all__``."""
    ns = importlib.import_module(f"histoflow.{namespace}")
    names = []
    for name in ns.__all__:
        names.append(f"{namespace}.{name}")
        value = getattr(ns, name)
        if isinstance(value, types.ModuleType):
            names += [f"{namespace}.{name}.{member}" for member in value.__all__]
    return names


def _text(file: Path, sep: str = " ") -> str:
    """Visible text of an HTML page, whitespace collapsed (``sep=""`` keeps highlighted code in one piece)."""
    html = re.sub(r"<(script|style)\b.*?</\1>|<!--.*?-->", " ", file.read_text(), flags=re.S)
    return " ".join(unescape(re.sub(r"<[^>]+>", sep, html)).split())


def _quick_start_commands() -> list[str]:
    section = (REPO / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def _require_sphinx() -> None:
    """Skip when the docs tools are missing (fail under CI=true: they are part of the test extra)."""
    for module in ("sphinx", "myst_nb", "sphinx_book_theme", "sphinx_autodoc_typehints", "sphinxcontrib.bibtex"):
        try:
            importlib.import_module(module)
        except ImportError:
            msg = f"{module} is not installed: pip install -e '.[test]' (the docs tools are part of the test extra)"
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(msg)
            pytest.skip(msg)


def _sphinx_build(src: Path, out: Path) -> subprocess.CompletedProcess:
    """``sphinx-build -W -n`` offline (no intersphinx downloads), as CI and ``nox -s docs`` without network do."""
    env = {**os.environ, "HISTOFLOW_DOCS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "sphinx", "-W", "-n", "--keep-going", "-b", "html", "-q", str(src), str(out)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _check_api_pages(html: Path) -> None:
    """Every public name of a documented namespace has a page linked from api.md, and no other name has one."""
    api = (html / "api.html").read_text()
    for namespace in DOCUMENTED:
        for name in _public(namespace):
            page = f"generated/histoflow.{name}.html"
            assert (html / page).is_file(), f"histoflow.{name} has no API page: add it to docs/api.md"
            assert f'href="{page}' in api, f"docs/api.md does not link histoflow.{name}"
    pages = {p.name.removesuffix(".html") for p in (html / "generated").glob("histoflow.*.html")}
    pages = {p for p in pages if p.split(".")[1] in DOCUMENTED}
    assert pages == {f"histoflow.{name}" for ns in DOCUMENTED for name in _public(ns)}


def _check_module_page(html: Path) -> None:
    """A public submodule's page shows its docstring and links the page of every name in its ``__all__``."""
    module = importlib.import_module("histoflow.tl.metrics")
    page = (html / "generated" / "histoflow.tl.metrics.html").read_text()
    assert "Metrics comparing predicted with measured expression" in _text(
        html / "generated" / "histoflow.tl.metrics.html"
    )
    for member in module.__all__:
        assert f'href="histoflow.tl.metrics.{member}.html' in page, f"tl.metrics page does not link {member}"
    # a re-exported constant is documented by the #: comment where it is defined, not by tuple's docstring
    text = _text(html / "generated" / "histoflow.tl.metrics.AGGREGATIONS.html")
    assert "The two published aggregations." in text and "immutable sequence" not in text


def _check_class_pages(html: Path) -> None:
    """Class pages: members inherited from a private histoflow base are documented, a private base is not shown as
    a base, and what a class inherits from another project (Lightning's callback hooks) is left out."""
    text = _text(html / "generated" / "histoflow.models.RidgeProbe.html")
    for method in ("train(", "predict(", "save(", "load("):
        assert method in text, method
    assert "_BaselineModel" not in text and "Bases: object" in text
    text = _text(html / "generated" / "histoflow.models.HistoryCallback.html")
    assert "history" in text and "collect(" in text
    assert "on_fit_start" not in text and "on_train_start" not in text


def _check_function_page(html: Path) -> None:
    """Signature, parameters with the types of the annotations (docstrings carry none) and defaults, returns."""
    text = _text(html / "generated" / "histoflow.pp.normalize.html")
    assert text.count("pp.normalize") >= 2  # title and signature
    assert "Parameters" in text and "Returns" in text
    assert re.search(r"table_key \( str \(default: 'table' \)\) – Name of the table", text), text
    assert re.search(r"copy \( bool \(default: False \)\) – Return a modified copy", text), text
    assert "SpatialData | AnnData | None" in text
    # a type-less Returns paragraph stays one paragraph; the return type comes from the annotation
    returns = (html / "generated" / "histoflow.pp.normalize.html").read_text().split("Returns", 1)[1]
    assert "<ul" not in returns.split("</dd>", 1)[0]
    text = _text(html / "generated" / "histoflow.tl.metrics.mse.html")
    assert "Return type : float Returns : The MSE." in text, text


def _check_index(html: Path) -> None:
    """The home page shows README.md's two quick-start commands and Python example, rendered, with its links."""
    text = _text(html / "index.html")
    commands = _quick_start_commands()
    assert len(commands) == 2
    for command in commands:
        assert command in text
    assert "hf.pp.normalize(sdata)" in _text(html / "index.html", sep="")
    for raw in ("{include}", "{cite:p}", "```", ":start-after:", "{doc}"):
        assert raw not in text, f"unrendered MyST in index.html: {raw}"
    for page in ("api.html", "tutorials/index.html", "contributing.html"):
        assert f'href="{page}' in (html / "index.html").read_text()


def test_docs_build(tmp_path: Path):
    """One build (it takes ~10 s; one test, so `pytest -n 2` does not run it twice), then checks on its pages."""
    _require_sphinx()
    skip = shutil.ignore_patterns("_build", "generated", "jupyter_execute")
    shutil.copytree(REPO / "docs", tmp_path / "docs", ignore=skip)
    shutil.copy(REPO / "README.md", tmp_path / "README.md")  # index.md includes the quick start from it
    html = tmp_path / "html"
    proc = _sphinx_build(tmp_path / "docs", html)
    assert proc.returncode == 0, f"sphinx-build failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-10000:]}"
    for page in ("index", "api", "contributing", "changelog", "references", "tutorials/index"):
        assert (html / f"{page}.html").is_file(), page
    _check_api_pages(html)
    _check_module_page(html)
    _check_class_pages(html)
    _check_function_page(html)
    _check_index(html)


def test_offline_build_still_checks_references_into_histoflow(tmp_path: Path):
    """Offline mode forgives references to other projects only: a typo in a histoflow reference fails the build."""
    _require_sphinx()
    src = tmp_path / "src"
    shutil.copytree(REPO / "docs", src, ignore=shutil.ignore_patterns("*.md", "_build", "generated", "tutorials"))
    body = "# t\n\n{class}`anndata.AnnData`, {class}`numpy.ndarray`, {func}`histoflow.pp.normalise`\n"
    (src / "index.md").write_text(body)
    proc = _sphinx_build(src, tmp_path / "html")
    assert proc.returncode != 0
    assert "histoflow.pp.normalise" in proc.stderr
    assert "anndata.AnnData" not in proc.stderr and "numpy.ndarray" not in proc.stderr
