"""Maps of true, predicted and uncertain expression over the H&E image."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from histoflow._constants import Key
from histoflow._docs import doc_params
from histoflow._logging import logger
from histoflow._utils import get_table
from histoflow._validate import check_obs_key
from histoflow.get._get import prediction_frame
from histoflow.io._resolve import Slide, resolve_slides
from histoflow.pl._utils import PLOT_DOCS, check_sequence, finish, new_grid, style

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

__all__ = ["spatial"]


def _dense_column(table: AnnData, layer: str | None, gene: str) -> np.ndarray:
    import scipy.sparse as sp

    j = table.var_names.get_loc(gene)
    X = table.X if layer is None else table.layers[layer]
    col = X[:, j]
    col = col.toarray() if sp.issparse(col) else np.asarray(col)
    return np.asarray(col, dtype=np.float64).ravel()


def _slides(
    sdata: Any, table: AnnData, library_key: str, image_key: str | Mapping[str, str] | None, img: bool
) -> tuple[list[Slide], bool]:
    """Slides with spot centres in image pixels and the pyramid; spots only (table coordinates) without an image."""
    if img:
        try:
            return resolve_slides(sdata, table, library_key=library_key, image_key=image_key), True
        except (KeyError, ValueError) as e:
            if image_key is not None:
                raise
            logger.info("No H&E image to draw (%s); drawing the spots only.", e)
    try:
        return resolve_slides(sdata, table, library_key=library_key, need_image=False), False
    except KeyError:  # no pixel size: draw in the table's coordinates with a spot size from the spacing
        if Key.spatial not in table.obsm:
            raise
        coords = np.asarray(table.obsm[Key.spatial], dtype=np.float64)[:, :2]
        libs = table.obs[library_key].astype(str) if library_key in table.obs else pd.Series("slide", table.obs_names)
        out = []
        for lib in pd.unique(libs):
            rows = np.flatnonzero(libs.to_numpy() == lib)
            out.append(Slide(str(lib), rows, coords[rows], float("nan")))
        return out, False


def _level_for(slide: Slide, max_px: int) -> tuple[np.ndarray | None, float]:
    """The finest pyramid level whose long side is at most ``max_px`` (else the coarsest), as (y, x, 3) uint8."""
    if not slide.levels:
        return None, 1.0
    pick = slide.levels[-1]
    for level in slide.levels:
        if max(level.shape_yx) <= max_px:
            pick = level
            break
    data = pick.data[:3]
    if hasattr(data, "compute"):
        data = data.compute()
    arr = np.moveaxis(np.asarray(data), 0, -1)
    step = max(1, int(np.ceil(max(arr.shape[:2]) / max_px)))
    if step > 1:  # a single-level image larger than wanted: subsample
        arr = arr[::step, ::step]
    return np.ascontiguousarray(arr), pick.downsample * step


def _spot_diameter_px(table: AnnData, slide: Slide, spot_diameter_key: str) -> float:
    """Spot diameter in the units of ``slide.centers``: physical diameter / pixel size, else 80 % of the spacing."""
    if np.isfinite(slide.pixel_size_um) and spot_diameter_key in table.obs:
        d = pd.to_numeric(table.obs[spot_diameter_key].iloc[slide.rows], errors="coerce").to_numpy(dtype=float)
        d = d[np.isfinite(d)]
        if d.size and d[0] > 0:
            return float(d[0] / slide.pixel_size_um)
    c = slide.centers
    if len(c) < 2:
        return 1.0
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(c).query(c, k=2)
    return float(0.8 * np.median(dist[:, 1]))


def _draw(
    ax: Axes,
    slide: Slide,
    image: np.ndarray | None,
    downsample: float,
    values: np.ndarray,
    diameter: float,
    cmap: str,
    vmin: float,
    vmax: float,
    alpha: float,
) -> Any:
    import matplotlib as mpl
    from matplotlib.collections import EllipseCollection

    c = slide.centers
    pad = diameter
    x0, x1 = c[:, 0].min() - pad, c[:, 0].max() + pad
    y0, y1 = c[:, 1].min() - pad, c[:, 1].max() + pad
    if image is not None:
        h, w = image.shape[:2]
        ax.imshow(image, extent=(0, w * downsample, h * downsample, 0), interpolation="bilinear")
    colormap = mpl.colormaps[cmap].with_extremes(bad=(0.83, 0.83, 0.83, 0.6))
    coll = EllipseCollection(
        widths=diameter,
        heights=diameter,
        angles=0.0,
        units="xy",
        offsets=c,
        offset_transform=ax.transData,
        cmap=colormap,
        norm=mpl.colors.Normalize(vmin=vmin, vmax=vmax),
        alpha=alpha,
        linewidths=0,
    )
    coll.set_array(np.ma.masked_invalid(values))
    ax.add_collection(coll)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    return coll


@doc_params(**PLOT_DOCS)
def spatial(
    sdata: SpatialData | AnnData,
    genes: str | Sequence[str],
    key: str = "molf",
    *,
    library_id: str | Sequence[str] | None = None,
    table_key: str = Key.table,
    library_key: str = Key.library,
    true_layer: str | None = Key.log1p,
    show_std: bool | None = None,
    img: bool = True,
    image_key: str | Mapping[str, str] | None = None,
    max_image_px: int = 1000,
    spot_diameter_key: str = Key.spot_diameter,
    cmap: str = "magma",
    std_cmap: str = "cividis",
    alpha: float = 0.85,
    figsize: tuple[float, float] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | np.ndarray | None:
    """True, predicted and (when sampled) standard-deviation maps of genes over the H&E image.

    One row per slide and gene; columns: measured expression (``layers[true_layer]``, when the table has the gene),
    prediction (``obsm[key]``) and the spread of the sampled predictions (``obsm[f"{key}_std"]``). True and predicted
    maps of a gene share one colour scale (1st–99th percentile over the slide's spots). The image is a low pyramid
    level of the slide's image element placed in full-resolution pixel coordinates; spots are circles of the physical
    spot diameter (``obs[spot_diameter_key]`` / pixel size). An AnnData without an image draws the spots only.
    Spots without a prediction are grey.

    Parameters
    ----------
    {doc_sdata_only}
    genes
        Gene(s) of the prediction to show.
    key
        Key of the predictions.
    library_id
        Slide(s) to show (default: every slide with predictions, at most 4, with a note).
    {doc_table_key}
    {doc_library_key}
    true_layer
        Layer with the measured log1p expression (``None``: ``X``); genes missing from ``var_names`` get no truth map.
    show_std
        Draw the standard deviation column; default when ``obsm[f"{key}_std"]`` exists.
    img
        Draw the H&E image under the spots.
    image_key
        Image element to draw (or a mapping library → image element); default the finest image of each slide.
    max_image_px
        Longest side, in pixels, of the pyramid level drawn (the finest level not larger is used).
    spot_diameter_key
        ``obs`` column with the spot diameter in micrometres.
    cmap
        Colour map of expression.
    std_cmap
        Colour map of the standard deviation.
    alpha
        Opacity of the spots.
    {doc_plot}

    Returns
    -------
    A 2-D array of axes (rows: slide × gene; columns: true, predicted, std), or the figure with
    ``return_fig=True``, when not shown; nothing is written.
    """
    table = get_table(sdata, table_key)
    gene_list = check_sequence(genes, "genes")
    pred = prediction_frame(table, key)
    columns = [str(c) for c in pred.columns]
    missing = [g for g in gene_list if g not in columns]
    if missing:
        raise KeyError(
            f"`genes` contains {missing[:5]}, which are not predicted under `obsm[{key!r}]` (predicted genes: "
            f"{columns[:10]}{' ...' if len(columns) > 10 else ''})."
        )
    std = prediction_frame(table, key, suffix="_std") if f"{key}_std" in table.obsm else None
    if show_std is None:
        show_std = std is not None
    elif show_std and std is None:
        raise KeyError(
            f"`show_std=True` but `adata.obsm[{key + '_std'!r}]` is missing; predict with `n_samples > 1` "
            "(`histoflow.tl.fit_molf` / `histoflow.tl.predict`) to get it."
        )
    if true_layer is not None and true_layer not in table.layers:
        raise KeyError(
            f"`true_layer={true_layer!r}` is not in `adata.layers` (layers: {sorted(table.layers)}); run "
            "`histoflow.pp.normalize` or pass `true_layer=None` to read `X`."
        )
    check_obs_key(table, library_key, "library_key")
    libs = table.obs[library_key].astype(str).to_numpy()
    has_pred = np.isfinite(pred.to_numpy(dtype=np.float64)).any(axis=1)
    if library_id is None:
        chosen = [str(x) for x in pd.unique(libs[has_pred])]
        if len(chosen) > 4:
            logger.info("Showing the first 4 of %d slides; pass `library_id=` to choose.", len(chosen))
            chosen = chosen[:4]
    else:
        chosen = check_sequence(library_id, "library_id")
        unknown = [x for x in chosen if x not in set(libs)]
        if unknown:
            raise KeyError(
                f"`library_id` contains {unknown}, which are not slides of `obs[{library_key!r}]` "
                f"({sorted(set(libs))[:10]})."
            )
    slides, with_image = _slides(sdata, table, library_key, image_key, img)
    by_lib = {s.library_id: s for s in slides}

    truth = {g: _dense_column(table, true_layer, g) for g in gene_list if g in table.var_names}
    g_true = bool(truth)
    n_cols = int(g_true) + 1 + int(bool(show_std))
    n_rows = len(chosen) * len(gene_list)
    with style():
        fig, axes = new_grid(n_rows, n_cols, figsize, (2.6, 2.5))
        for i, (lib, gene) in enumerate((lib, gene) for lib in chosen for gene in gene_list):
            slide = by_lib[lib]
            rows = slide.rows
            image, ds = _level_for(slide, max_image_px) if with_image else (None, 1.0)
            diameter = _spot_diameter_px(table, slide, spot_diameter_key)
            p = pred[gene].to_numpy(dtype=np.float64)[rows]
            t = truth[gene][rows] if gene in truth else None
            both = np.concatenate([v[np.isfinite(v)] for v in (p, t) if v is not None])
            vmin, vmax = np.percentile(both, [1, 99]) if both.size else (0.0, 1.0)
            vmax = vmax if vmax > vmin else vmin + 1e-6
            panels: list[tuple[str, np.ndarray | None, str, float, float]] = []
            if g_true:
                panels.append(("true", t, cmap, vmin, vmax))
            panels.append(("predicted", p, cmap, vmin, vmax))
            if show_std:
                s = std[gene].to_numpy(dtype=np.float64)[rows]  # type: ignore[index]
                fin = s[np.isfinite(s)]
                panels.append(("std", s, std_cmap, 0.0, float(np.percentile(fin, 99)) if fin.size else 1.0))
            for j, (what, values, cm, lo, hi) in enumerate(panels):
                ax = axes[i, j]
                if values is None:
                    ax.set_axis_off()
                    ax.set_title(f"{gene} not measured", fontsize=8)
                    continue
                coll = _draw(ax, slide, image, ds, values, diameter, cm, lo, hi, alpha)
                fig.colorbar(coll, ax=ax, shrink=0.7, pad=0.02)
                ax.set_title(f"{gene} {what}" if len(chosen) == 1 else f"{lib}: {gene} {what}", fontsize=9)
        return finish(fig, axes, show=show, save=save, return_fig=return_fig)
