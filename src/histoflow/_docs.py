"""Shared parameter documentation.

Docstrings hold placeholders such as ``{doc_sdata}``; :func:`doc_params` replaces them (plain text replacement, so
other braces in a docstring are left alone). Entries are indented for a function docstring's Parameters section.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

__all__ = ["doc_params", "DOCS"]

F = TypeVar("F", bound=Callable)

DOCS: dict[str, str] = {
    "doc_sdata": """\
sdata
        A SpatialData object or an AnnData table.
    table_key
        Name of the table in ``sdata.tables``; ignored for AnnData input.""",
    "doc_sdata_only": """\
sdata
        A SpatialData object or an AnnData table.""",
    "doc_table_key": """\
table_key
        Name of the table in ``sdata.tables``; ignored for AnnData input.""",
    "doc_scored_split": """\
split
        Which ``obs[split_key]`` spots to score (validation slides by default).
    split_key
        ``obs`` column with the split.
    true_layer
        Layer of the measured expression, in the predictions' space (``None``: ``X``).""",
    "doc_copy": """\
copy
        Return a modified copy instead of writing into ``sdata``.""",
    "doc_library_key": """\
library_key
        ``obs`` column naming the slide of each spot.""",
    "doc_metric_arrays": """\
y_true
        Measured expression, spots × genes.
    y_pred
        Predicted expression, same shape.""",
    "doc_metric_groups": """\
y_true
        Measured expression, spots × genes.
    y_pred
        Predicted expression, same shape.
    groups
        Slide label of each spot; ``None``: one slide.""",
    "doc_device": """\
device
        Torch device for inference: ``"auto"`` (default: CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``,
        ... The prior noise is drawn on the CPU, so devices differ only by floating-point rounding.""",
    "doc_patch_params": """\
image_key
        Image element to use (or a mapping library → image element); by default the finest image sharing a
        coordinate system with each slide's spots.
    spatial_key
        ``obsm`` key of the spot centres in full-resolution pixels (AnnData input only).
    pixel_size_key
        ``obs`` column with micrometres per full-resolution pixel (inferred from the spot radius and the
        technology's spot diameter when missing).
    patch_size_um
        Side of the patch in micrometres.
    patch_px
        Side of the patch in pixels after resizing.""",
}


def doc_params(**extra: str) -> Callable[[F], F]:
    """Decorator filling the ``{doc_*}`` placeholders of a docstring from :data:`DOCS` (and ``extra``)."""
    docs = {**DOCS, **extra}

    def decorate(func: F) -> F:
        doc = func.__doc__ or ""
        for key, text in docs.items():
            doc = doc.replace("{" + key + "}", text)
        if "{doc_" in doc:
            raise KeyError(f"Unknown shared-doc placeholder in {func.__qualname__}: {doc[doc.index('{doc_') :][:30]}")
        func.__doc__ = doc
        return func

    return decorate
