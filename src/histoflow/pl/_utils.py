"""Shared plotting helpers: one look, figure creation, show/save/return."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["style", "new_axes", "new_grid", "finish", "PALETTE", "DIVERGING", "SEQUENTIAL", "PLOT_DOCS"]

#: Colour-blind-safe categorical colours (seaborn's "colorblind" palette, as hex).
PALETTE = [
    "#0173b2",
    "#de8f05",
    "#029e73",
    "#d55e00",
    "#cc78bc",
    "#ca9161",
    "#fbafe4",
    "#949494",
    "#ece133",
    "#56b4e9",
]
DIVERGING = "RdBu_r"
SEQUENTIAL = "viridis"

_RC: dict[str, Any] = {
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 10,
    "axes.titleweight": "regular",
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "figure.titlesize": 11,
    "axes.prop_cycle": mpl.cycler(color=PALETTE),
    "image.cmap": SEQUENTIAL,
    "savefig.bbox": "tight",
}

#: Parameter docs shared by every plotting function (for :func:`histoflow._docs.doc_params`).
PLOT_DOCS = {
    "doc_plot": """\
figsize
        Figure size in inches (default: chosen from the number of panels).
    show
        Show the figure (``plt.show()``); default: unless ``return_fig=True``.
    save
        Write the figure to this path (format from the suffix).
    return_fig
        Return the :class:`~matplotlib.figure.Figure` instead of the axes.""",
    "doc_ax": """\
ax
        Axes to draw into (a new figure when None).""",
}


@contextlib.contextmanager
def style() -> Iterator[None]:
    """The histoflow look (white background, no top/right spines, small fonts, colour-blind-safe colours)."""
    with plt.rc_context(_RC):
        yield


def new_axes(ax: Axes | None, figsize: tuple[float, float] | None, default: tuple[float, float]) -> Axes:
    """``ax`` or a fresh single-panel figure."""
    if ax is not None:
        return ax
    fig = plt.figure(figsize=figsize or default, layout="constrained")
    return fig.add_subplot(1, 1, 1)


def new_grid(
    n_rows: int,
    n_cols: int,
    figsize: tuple[float, float] | None,
    panel: tuple[float, float],
    **kwargs: Any,
) -> tuple[Figure, np.ndarray]:
    """A figure with ``n_rows × n_cols`` panels of about ``panel`` inches each; axes as a 2-D array."""
    size = figsize or (panel[0] * n_cols, panel[1] * n_rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=size, squeeze=False, layout="constrained", **kwargs)
    return fig, axes


def finish(
    fig: Figure,
    axes: Axes | Sequence[Axes] | np.ndarray,
    *,
    show: bool | None,
    save: str | Path | None,
    return_fig: bool,
) -> Figure | Axes | np.ndarray | None:
    """Save, show and return as scanpy does: the figure with ``return_fig``, the axes when not shown, else None."""
    if save is not None:
        fig.savefig(save)
    if show is None:
        show = not return_fig
    if show:
        plt.show()
        return fig if return_fig else None
    return fig if return_fig else axes


def check_sequence(value: Any, arg: str) -> list[str]:
    """A string or a sequence of strings as a list (error naming ``arg`` otherwise)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value) and len(value) > 0:
        return list(value)
    raise TypeError(f"`{arg}` must be a string or a non-empty list of strings, got {value!r}.")
