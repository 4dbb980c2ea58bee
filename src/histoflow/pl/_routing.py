"""Expert routing: usage per group, similarity between groups, patches that activate each expert."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from histoflow._constants import Key
from histoflow._docs import doc_params
from histoflow._utils import get_table
from histoflow._validate import check_choice, check_obs_key
from histoflow.get._get import prediction_frame
from histoflow.pl._utils import PLOT_DOCS, finish, new_axes, new_grid, style

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

__all__ = ["routing", "routing_similarity", "expert_patches", "routing_usage"]

_STATS = ("weight", "top1")


def routing_usage(
    table: AnnData, key: str, groupby: str | None, stat: Literal["weight", "top1"] = "weight"
) -> pd.DataFrame:
    """Expert usage per group in percent (groups × experts; rows sum to 100).

    ``stat="weight"``: mean gate weight of each expert over the group's spots; ``"top1"``: share of the spots whose
    largest gate weight is that expert. Spots without routing (NaN) are left out.
    """
    check_choice(stat, _STATS, "stat")
    weights = prediction_frame(table, key, suffix="_routing")
    W = weights.to_numpy(dtype=np.float64)
    keep = np.isfinite(W).all(axis=1)
    if not keep.any():
        raise ValueError(f"`adata.obsm[{key + '_routing'!r}]` holds no routing weights (every value is NaN).")
    if groupby is None:
        groups = pd.Series("all", index=table.obs_names)
    else:
        check_obs_key(table, groupby, "groupby", hint="Pass `groupby=None` for all spots together.")
        groups = table.obs[groupby]
        if groups[keep].isna().any():
            raise ValueError(f"`groupby={groupby!r}` has missing values among the routed spots.")
    W = W[keep]
    if stat == "top1":
        W = np.eye(W.shape[1])[W.argmax(axis=1)]
    frame = pd.DataFrame(W, columns=[str(c) for c in weights.columns])
    labels = groups[keep].astype(str).to_numpy()
    order = (
        [str(c) for c in groups.cat.categories if str(c) in set(labels)]
        if isinstance(groups.dtype, pd.CategoricalDtype)
        else sorted(set(labels))
    )
    usage = frame.groupby(labels, sort=False).mean().loc[order] * 100.0
    usage.index.name = groupby or "group"
    return usage


def _heatmap(
    ax: Axes, values: pd.DataFrame, *, cmap: str, vmin: float, vmax: float, fmt: str, label: str, annot: bool
) -> None:
    import seaborn as sns

    sns.heatmap(
        values,
        ax=ax,
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        annot=annot,
        fmt=fmt,
        annot_kws={"fontsize": 7},
        linewidths=0.5,
        linecolor="white",
        square=False,
        cbar_kws={"label": label, "shrink": 0.8},
    )
    ax.tick_params(length=0)
    ax.set_yticklabels(ax.get_yticklabels(), rotation=0)


@doc_params(**PLOT_DOCS)
def routing(
    sdata: SpatialData | AnnData,
    key: str = "molf",
    *,
    groupby: str | None = Key.cancer_type,
    table_key: str = Key.table,
    stat: Literal["weight", "top1"] = "weight",
    annot: bool = True,
    cmap: str = "Blues",
    ax: Axes | None = None,
    figsize: tuple[float, float] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | Axes | None:
    """Expert usage per group, in percent, as a heatmap (MoLF Table 4).

    Reads the gate weights ``obsm[f"{key}_routing"]`` written with the predictions.

    Parameters
    ----------
    {doc_sdata_only}
    key
        Key of the predictions.
    groupby
        ``obs`` column defining the groups (rows), e.g. the cancer type or the slide; ``None``: all spots.
    {doc_table_key}
    stat
        ``"weight"``: mean gate weight of each expert over the group's spots; ``"top1"``: share of the group's spots
        whose largest gate weight is that expert. Rows sum to 100 %.
    annot
        Write the percentages in the cells.
    cmap
        Colour map.
    {doc_ax}
    {doc_plot}

    Returns
    -------
    The axes (or figure with ``return_fig=True``) when not shown; nothing is written.
    """
    table = get_table(sdata, table_key)
    usage = routing_usage(table, key, groupby, stat)
    with style():
        ax = new_axes(ax, figsize, (2.0 + 0.6 * usage.shape[1], 1.3 + 0.45 * usage.shape[0]))
        _heatmap(ax, usage, cmap=cmap, vmin=0.0, vmax=100.0, fmt=".0f", label="usage (%)", annot=annot)
        ax.set_xlabel("expert")
        ax.set_ylabel(usage.index.name)
        ax.set_title("mean gate weight (%)" if stat == "weight" else "top-1 expert (% of spots)")
        return finish(ax.figure, ax, show=show, save=save, return_fig=return_fig)


def js_distances(usage: pd.DataFrame) -> pd.DataFrame:
    """Jensen–Shannon distances (base 2, in [0, 1]) between the rows of a groups × experts usage table."""
    from scipy.spatial.distance import jensenshannon

    P = usage.to_numpy(dtype=np.float64)
    P = P / P.sum(axis=1, keepdims=True)
    n = P.shape[0]
    D = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            D[i, j] = D[j, i] = float(jensenshannon(P[i], P[j], base=2))
    return pd.DataFrame(D, index=usage.index, columns=usage.index)


@doc_params(**PLOT_DOCS)
def routing_similarity(
    sdata: SpatialData | AnnData,
    key: str = "molf",
    *,
    groupby: str = Key.cancer_type,
    table_key: str = Key.table,
    annot: bool = True,
    cmap: str = "mako_r",
    ax: Axes | None = None,
    figsize: tuple[float, float] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | Axes | None:
    """Jensen–Shannon distances between the groups' routing distributions (MoLF Figure 7).

    Each group's distribution is its mean gate weight per expert (as in :func:`routing`); the distance (base 2) is
    0 for identical routing and 1 for groups that use disjoint experts.

    Parameters
    ----------
    {doc_sdata_only}
    key
        Key of the predictions (reads ``obsm[f"{key}_routing"]``).
    groupby
        ``obs`` column defining the groups, e.g. the cancer type.
    {doc_table_key}
    annot
        Write the distances in the cells.
    cmap
        Colour map.
    {doc_ax}
    {doc_plot}

    Returns
    -------
    The axes (or figure with ``return_fig=True``) when not shown; nothing is written.
    """
    table = get_table(sdata, table_key)
    usage = routing_usage(table, key, groupby, "weight")
    if usage.shape[0] < 2:
        raise ValueError(f"`groupby={groupby!r}` has a single group among the routed spots; nothing to compare.")
    D = js_distances(usage)
    with style():
        n = D.shape[0]
        ax = new_axes(ax, figsize, (1.6 + 0.5 * n, 1.0 + 0.45 * n))
        _heatmap(ax, D, cmap=cmap, vmin=0.0, vmax=1.0, fmt=".2f", label="Jensen–Shannon distance", annot=annot)
        ax.set_xlabel("")
        ax.set_ylabel("")
        ax.set_title("routing distance")
        return finish(ax.figure, ax, show=show, save=save, return_fig=return_fig)


@doc_params(**PLOT_DOCS)
def expert_patches(
    sdata: SpatialData | AnnData,
    key: str = "molf",
    *,
    n: int = 36,
    experts: Sequence[int | str] | None = None,
    table_key: str = Key.table,
    library_key: str = Key.library,
    image_key: str | Mapping[str, str] | None = None,
    patch_size_um: float = 112.0,
    patch_px: int = 48,
    figsize: tuple[float, float] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | np.ndarray | None:
    """For each expert, a montage of the H&E patches of the spots that activate it most (MoLF Figure 8).

    Spots are ranked by their gate weight for the expert (``obsm[f"{key}_routing"]``); the ``n`` highest are cut from
    the H&E image with :func:`histoflow.pp.crop_patches` (read once per slide) and tiled row by row.

    Parameters
    ----------
    {doc_sdata_only}
    key
        Key of the predictions.
    n
        Patches per expert (tiled in a square-ish grid).
    experts
        Experts to show, by index or column name (default all).
    {doc_table_key}
    {doc_library_key}
    image_key
        Image element to cut from (or a mapping library → image element); default as in
        :func:`histoflow.pp.crop_patches`.
    patch_size_um
        Side of each patch in micrometres.
    patch_px
        Side of each tile in pixels.
    {doc_plot}

    Returns
    -------
    The axes (one per expert) or the figure with ``return_fig=True``, when not shown; nothing is written.
    """
    from histoflow.pp import crop_patches

    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"`n` must be a positive integer, got {n!r}.")
    table = get_table(sdata, table_key)
    weights = prediction_frame(table, key, suffix="_routing")
    names = [str(c) for c in weights.columns]
    if experts is None:
        chosen = list(range(len(names)))
    else:
        chosen = []
        for e in experts:
            if isinstance(e, str) and e in names:
                chosen.append(names.index(e))
            elif isinstance(e, int | np.integer) and not isinstance(e, bool) and 0 <= int(e) < len(names):
                chosen.append(int(e))
            else:
                raise ValueError(f"`experts` contains {e!r}, which is not an expert; experts: {names}.")
    W = weights.to_numpy(dtype=np.float64)
    W = np.where(np.isfinite(W), W, -np.inf)
    tops: list[np.ndarray] = []
    for e in chosen:
        order = np.argsort(-W[:, e], kind="stable")
        order = order[np.isfinite(W[order, e])][:n]
        tops.append(order)
    wanted = np.unique(np.concatenate(tops))
    patches = crop_patches(
        sdata,
        table_key=table_key,
        library_key=library_key,
        image_key=image_key,
        patch_size_um=patch_size_um,
        patch_px=patch_px,
        obs_names=list(table.obs_names[wanted]),
    )
    where = {int(r): i for i, r in enumerate(wanted)}
    side = int(np.ceil(np.sqrt(n)))
    rows_per = int(np.ceil(n / side))
    n_panels = len(chosen)
    n_cols = min(n_panels, 4)
    n_rows = int(np.ceil(n_panels / n_cols))
    with style():
        fig, axes = new_grid(n_rows, n_cols, figsize, (2.4, 2.4 * rows_per / side + 0.3))
        for i, ax in enumerate(axes.ravel()):
            ax.set_axis_off()
            if i >= n_panels:
                continue
            e, top = chosen[i], tops[i]
            canvas = np.full((rows_per * patch_px, side * patch_px, 3), 255, dtype=np.uint8)
            for j, r in enumerate(top):
                y, x = divmod(j, side)
                canvas[y * patch_px : (y + 1) * patch_px, x * patch_px : (x + 1) * patch_px] = patches[where[int(r)]]
            ax.imshow(canvas, interpolation="nearest")
            w = W[top, e]
            ax.set_title(f"{names[e]}  (weight {w.min():.2f}–{w.max():.2f})", fontsize=8)
        return finish(fig, axes.ravel()[:n_panels], show=show, save=save, return_fig=return_fig)
