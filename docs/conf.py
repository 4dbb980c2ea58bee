"""Sphinx configuration of the histoflow documentation.

Build: ``nox -s docs`` or ``python -m sphinx -W -n -b html docs docs/_build/html``.

Cross-references to other projects (anndata, scanpy, squidpy, spatialdata, torch, numpy, pandas, scipy, Python)
go through intersphinx, which downloads each project's ``objects.inv``. When the inventories cannot be reached
(no internet, or ``HISTOFLOW_DOCS_OFFLINE=1``), the build runs in *offline mode*: intersphinx is given no
inventories and nitpicky forgives references whose top-level module is one of those projects or the standard
library, and nothing else (builtin names such as ``int`` never need an inventory). References into histoflow are
checked in both modes. See ``contributing.md``.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
import urllib.request
from datetime import date
from importlib.metadata import version as _version

# -- Project ----------------------------------------------------------------------------------------------------------

project = "histoflow"
author = "histoflow developers"
copyright = f"{date.today().year}, {author}"
release = _version("histoflow")
version = ".".join(release.split(".")[:2])

# -- General ----------------------------------------------------------------------------------------------------------

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # before sphinx_autodoc_typehints, which then sees the converted docstrings
    "sphinx_autodoc_typehints",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinxcontrib.bibtex",
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "jupyter_execute"]
templates_path = ["_templates"]
# ".rst" first: autosummary writes its generated pages (reStructuredText) with the first suffix.
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"
default_role = "literal"
nitpicky = True
# ``typehints_fixup_module_name`` below is a function, which Sphinx cannot pickle into its environment cache.
suppress_warnings = ["config.cache"]
bibtex_bibfiles = ["references.bib"]
bibtex_reference_style = "author_year"
bibtex_default_style = "plain"

# MyST / myst-nb: tutorials are committed with their outputs and executed by their own nox session, never here.
nb_execution_mode = "off"
nb_merge_streams = True
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath", "amsmath"]
myst_heading_anchors = 3

# -- autodoc / autosummary / napoleon / typehints ---------------------------------------------------------------------

autosummary_generate = True
autosummary_imported_members = True
# A module page (docs/_templates/autosummary/module.rst, e.g. tl.metrics) lists exactly the module's __all__.
autosummary_ignore_module_all = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"  # sphinx_autodoc_typehints moves annotations into the parameter list
autoclass_content = "class"

napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_rtype = True
napoleon_use_param = True
napoleon_use_ivar = True  # "Attributes" as a field list: no duplicate object entries for dataclass fields

typehints_defaults = "braces"
typehints_document_rtype = True
always_document_param_types = True
always_use_bars_union = True
simplify_optional_unions = True

# Where a class is defined is not where it is documented (``pandas.core.frame.DataFrame`` is ``pandas.DataFrame``,
# ``histoflow.pp._encoders.Encoder`` is ``histoflow.pp.Encoder``). Module names are cut at their first private part;
# the table covers public-looking internal modules.
_PUBLIC_MODULE = {
    "pandas.core": "pandas",
    "torch.nn.modules": "torch.nn",
    "anndata._core": "anndata",
    "spatialdata._core": "spatialdata",
    # Lightning's classes live in submodules of lightning.pytorch and are documented under lightning.pytorch.
    "lightning.pytorch.trainer": "lightning.pytorch",
    "lightning.pytorch.core": "lightning.pytorch",
    "lightning.pytorch.callbacks": "lightning.pytorch",
    # histoflow.tl._metrics is documented as the public module histoflow.tl.metrics, not as histoflow.tl.
    "histoflow.tl._metrics": "histoflow.tl.metrics",
}


def _fixup_module_name(module: str) -> str:
    """Public module under which the objects of ``module`` are documented."""
    for internal, public in _PUBLIC_MODULE.items():
        if module == internal or module.startswith(internal + "."):
            return public
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and i > 0:
            return ".".join(parts[:i])
    return module


typehints_fixup_module_name = _fixup_module_name

# -- intersphinx (online) or offline mode -----------------------------------------------------------------------------

intersphinx_mapping = {
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
    "scvi": ("https://docs.scvi-tools.org/en/stable/", None),
    "squidpy": ("https://squidpy.readthedocs.io/en/stable/", None),
    "spatialdata": ("https://spatialdata.scverse.org/en/stable/", None),
    "torch": ("https://docs.pytorch.org/docs/stable/", None),
    "numpy": ("https://numpy.org/doc/stable/", None),
    "pandas": ("https://pandas.pydata.org/pandas-docs/stable/", None),
    "scipy": ("https://docs.scipy.org/doc/scipy/", None),
    "matplotlib": ("https://matplotlib.org/stable/", None),
    "python": ("https://docs.python.org/3", None),
}
intersphinx_timeout = 10

# Third-party names that no intersphinx inventory covers. Keep this list short, and say why for each entry.
nitpick_ignore: list[tuple[str, str]] = [
    # timm documents its API with Hugging Face's doc-builder, which publishes no objects.inv.
    ("py:func", "timm.create_model"),
    # gseapy and pooch are mentioned once each (select_genes, datasets.her2st): not worth two more inventory
    # downloads, so they have no intersphinx entry.
    ("py:func", "gseapy.read_gmt"),
    ("py:func", "gseapy.get_library"),
    ("py:mod", "pooch"),
    # the `...` of `tuple[int, ...]` annotations (MoLFConfig.vae_decoder_hidden): a builtin constant, rendered as a
    # bare name that the offline mode's standard-library rule (by module prefix) cannot recognise.
    ("py:data", "Ellipsis"),
]
nitpick_ignore_regex: list[tuple[str, str]] = [
    # Lightning (the Trainer, LightningModule and Callback of histoflow.models' signatures and bases) publishes no
    # intersphinx inventory that we can rely on; its names are forgiven in both modes.
    (r"py:.*", r"lightning(\..+)?"),
]


def _online() -> bool:
    """Whether intersphinx inventories can be fetched (``HISTOFLOW_DOCS_OFFLINE=1``/``0`` forces the answer)."""
    forced = os.environ.get("HISTOFLOW_DOCS_OFFLINE", "").strip().lower()
    if forced in {"1", "true", "yes"}:
        return False
    if forced in {"0", "false", "no"}:
        return True
    request = urllib.request.Request(intersphinx_mapping["python"][0] + "/objects.inv", method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


OFFLINE = not _online()
if OFFLINE:
    # "io" is also histoflow.io: a short reference such as ``io.read_hest`` must not be forgiven.
    _external = sorted({*intersphinx_mapping, *sys.stdlib_module_names} - {"io"})
    intersphinx_mapping = {}
    nitpick_ignore_regex += [(r"py:.*", rf"({'|'.join(map(re.escape, _external))})(\..+)?")]

# -- HTML -------------------------------------------------------------------------------------------------------------

html_theme = "sphinx_book_theme"
html_title = "histoflow"
html_static_path = ["_static"]
html_css_files = ["css/custom.css"]
html_show_sphinx = False
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    # pydata-sphinx-theme 0.20 fills the persistent navbar with a second search field above the book layout;
    # the book theme's sidebar already has one.
    "navbar_persistent": [],
}
html_context = {"default_mode": "light"}
pygments_style = "default"


# -- histoflow's docstring conventions -------------------------------------------------------------------------------

_SECTION_RULE = re.compile(r"^(-{3,}|={3,})$")


def _returns_as_paragraph(app, what, name, obj, options, lines: list[str]) -> None:
    """Render a type-less numpydoc ``Returns`` section (histoflow's convention: prose) as one ``:returns:`` paragraph.

    histoflow's docstrings carry no types (they come from the annotations), so a ``Returns`` section is a paragraph
    ("``None``, or the modified copy when ``copy=True``. Writes ..."). Napoleon would read its first line as the
    return *type* (a one-line section becomes a broken ``:rtype:`` reference and hides the annotation) and each
    further line as another returned value (a bullet list). Runs before napoleon and indents the paragraph under an
    empty ``:`` entry (no name, no type), which napoleon turns into ``:returns: <paragraph>``; the return type then
    comes from the annotation. A section in the named form (``name``, then an indented description) is left as is.
    """
    for i in range(len(lines) - 1):
        if lines[i] == "Returns" and _SECTION_RULE.match(lines[i + 1]):
            break
    else:
        return
    start = end = i + 2
    while end < len(lines) and not (
        end + 1 < len(lines) and lines[end][:1].strip() and _SECTION_RULE.match(lines[end + 1])
    ):
        end += 1
    body = lines[start:end]
    while body and not body[0].strip():
        body.pop(0)
    while body and not body[-1].strip():
        body.pop()
    if not body or body[0][:1].isspace() or (len(body) > 1 and body[1][:1].isspace() and body[1].strip()):
        return
    lines[start:end] = [":", *(f"    {line}" if line.strip() else "" for line in body), ""]


def _reexported_data_comment(app, what, name, obj, options, lines: list[str]) -> None:
    """Document a re-exported constant (``tl.metrics.AGGREGATIONS``) with the ``#:`` comment where it is defined.

    autodoc looks for the comment in the public module only, finds none and shows the docstring of the value's type
    (``tuple``'s). Look in every loaded histoflow module that holds the same object instead; no comment: no text.
    """
    if what != "data" or not name.startswith("histoflow.") or obj is None:
        return
    type_doc = inspect.getdoc(type(obj))
    if type_doc is None or "\n".join(lines).strip() != type_doc.strip():
        return
    from sphinx.pycode import ModuleAnalyzer

    attr = name.rpartition(".")[2]
    comment: list[str] = []
    for modname, module in sorted(sys.modules.items()):
        if modname.split(".")[0] != "histoflow" or getattr(module, attr, None) is not obj:
            continue
        try:
            comment = ModuleAnalyzer.for_module(modname).find_attr_docs().get(("", attr), [])
        except Exception:  # noqa: BLE001 - no source: keep looking
            continue
        if comment:
            break
    lines[:] = [*comment, ""] if comment else []


def _skip_foreign_member(app, what, name, obj, skip, options) -> bool | None:
    """Leave out what a histoflow class inherits from another project (Lightning hooks, torch methods).

    Also left out: histoflow methods without a docstring of their own (Lightning hooks a callback overrides), which
    autodoc would otherwise show with the docstring of the overridden method.
    """
    if inspect.isclass(obj) or inspect.ismodule(obj):
        return None
    target = getattr(obj, "fget", obj)
    target = getattr(target, "__func__", target)
    module = getattr(target, "__module__", None)
    if not isinstance(module, str):
        return None
    if module.split(".")[0] != "histoflow":
        return True
    if inspect.isroutine(target) and not target.__doc__:
        return True
    return None


def _public_bases(app, name, obj, options, bases: list) -> None:
    """Show public base classes: a private base (``_BaselineModel``) is replaced by its own bases."""

    def expand(base: type) -> list[type]:
        if base.__name__.startswith("_"):
            return [b for parent in base.__bases__ for b in expand(parent)]
        return [base]

    bases[:] = list(dict.fromkeys(b for base in bases for b in expand(base)))


def setup(app) -> None:
    """Say when the build runs offline; apply histoflow's docstring conventions."""
    from sphinx.util import logging

    # Before napoleon (priority 500), which converts the numpydoc sections.
    app.connect("autodoc-process-docstring", _returns_as_paragraph, priority=400)
    app.connect("autodoc-process-docstring", _reexported_data_comment)
    app.connect("autodoc-skip-member", _skip_foreign_member)
    app.connect("autodoc-process-bases", _public_bases)
    if OFFLINE:
        logging.getLogger(__name__).info(
            "histoflow docs: offline mode (no intersphinx inventories; references to other projects are not checked)"
        )
