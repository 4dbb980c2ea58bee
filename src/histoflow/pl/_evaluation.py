"""Plots of stored evaluation results: gene–gene correlation (GSC), Moran's I (SSC), metric bars."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from histoflow._constants import Key
from histoflow._docs import doc_params
from histoflow._utils import get_table, is_spatialdata
from histoflow._validate import check_choice
from histoflow.get._get import metrics_entry, metrics_part
from histoflow.pl._utils import DIVERGING, PALETTE, PLOT_DOCS, check_sequence, finish, new_axes, new_grid, style

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

__all__ = ["gsc", "ssc", "morans_i", "metrics"]

_SUMMARY_COLUMNS = ("metric", "aggregation", "group", "gene_set", "value")


def summary_value(
    summary: pd.DataFrame | None, metric: str, aggregation: str = "pooled", group: str = "all", gene_set: str = "all"
) -> float | None:
    """One value of the tidy frame of :func:`histoflow.tl.evaluate`, or None when it has no such row."""
    if summary is None or not set(_SUMMARY_COLUMNS) <= set(summary.columns):
        return None
    sel = summary[
        (summary["metric"] == metric)
        & (summary["aggregation"] == aggregation)
        & (summary["group"] == group)
        & (summary["gene_set"] == gene_set)
    ]
    return float(sel["value"].iloc[0]) if len(sel) else None


def _cluster_order(C: np.ndarray) -> np.ndarray:
    """Leaf order of average-linkage clustering on ``1 - C`` (C a correlation matrix without NaN)."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    if C.shape[0] < 3:
        return np.arange(C.shape[0])
    D = np.clip(1.0 - C, 0.0, 2.0)
    np.fill_diagonal(D, 0.0)
    D = (D + D.T) / 2
    return leaves_list(linkage(squareform(D, checks=False), method="average", optimal_ordering=True))


def _select_genes(frame: pd.DataFrame, genes: Sequence[str] | None, arg: str = "genes") -> list[str]:
    have = [str(g) for g in frame.index]
    if genes is None:
        return have
    genes = check_sequence(genes, arg)
    missing = [g for g in genes if g not in set(have)]
    if missing:
        raise KeyError(
            f"`{arg}` contains {missing[:5]}, which were not evaluated (evaluated genes: {have[:10]}"
            f"{' ...' if len(have) > 10 else ''})."
        )
    return genes


@doc_params(**PLOT_DOCS)
def gsc(
    sdata: SpatialData | AnnData,
    key: str = "molf",
    *,
    table_key: str = Key.table,
    genes: Sequence[str] | None = None,
    metrics_key: str | None = None,
    show_labels: bool | None = None,
    cmap: str = DIVERGING,
    figsize: tuple[float, float] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | np.ndarray | None:
    """Gene–gene correlation of truth and prediction side by side, and the scatter of their entries (GSC).

    Both matrices are drawn in one gene order, from average-linkage clustering of the true correlations. The scatter
    shows every gene pair (upper triangle), true against predicted correlation, with the GSC of
    :func:`histoflow.tl.evaluate` (pooled over all evaluated spots and genes). Genes constant in truth or
    prediction (no correlation) are left out.

    Parameters
    ----------
    {doc_sdata_only}
    key
        Key of the evaluated predictions (``pred_key`` of :func:`histoflow.tl.evaluate`).
    {doc_table_key}
    genes
        Genes to show (default all evaluated genes).
    metrics_key
        ``uns`` key of the stored metrics; default ``f"{key}_metrics"``.
    show_labels
        Write gene names on the matrices; default when at most 40 genes.
    cmap
        Diverging colour map of the correlations.
    {doc_plot}

    Returns
    -------
    The three axes (or the figure with ``return_fig=True``) when not shown; nothing is written.
    """
    table = get_table(sdata, table_key)
    Ct = metrics_part(table, key, "gene_corr_true", metrics_key=metrics_key)
    Cp = metrics_part(table, key, "gene_corr_pred", metrics_key=metrics_key)
    summary = metrics_entry(table, key, metrics_key).get("summary")
    chosen = _select_genes(Ct, genes)
    t = Ct.loc[chosen, chosen].to_numpy(dtype=np.float64)
    p = Cp.loc[chosen, chosen].to_numpy(dtype=np.float64)
    ok = ~(np.isnan(np.diag(t)) | np.isnan(np.diag(p)) | np.isnan(t).all(0) | np.isnan(p).all(0))
    if ok.sum() < 2:
        raise ValueError("Fewer than 2 of the chosen genes have a defined correlation; choose other `genes=`.")
    names = [g for g, k in zip(chosen, ok) if k]
    t, p = t[np.ix_(ok, ok)], p[np.ix_(ok, ok)]
    order = _cluster_order(np.nan_to_num(t))
    t, p, names = t[np.ix_(order, order)], p[np.ix_(order, order)], [names[i] for i in order]
    iu = np.triu_indices(len(names), k=1)
    x, y = t[iu], p[iu]
    value = summary_value(summary, "gsc")
    labels = len(names) <= 40 if show_labels is None else show_labels
    with style():
        fig, axes = new_grid(1, 3, figsize, (3.2, 3.0))
        for ax, M, title in ((axes[0, 0], t, "true"), (axes[0, 1], p, "predicted")):
            im = ax.imshow(M, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
            ax.set_title(f"{title} gene–gene correlation")
            if labels:
                ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
                ax.set_yticks(range(len(names)), names, fontsize=6)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
            for side in ("top", "right", "bottom", "left"):
                ax.spines[side].set_visible(False)
        fig.colorbar(im, ax=axes[0, :2].tolist(), shrink=0.8, label="Pearson r")
        ax = axes[0, 2]
        ax.scatter(x, y, s=6, alpha=0.6, color=PALETTE[0], linewidths=0)
        ax.plot([-1, 1], [-1, 1], color="0.5", lw=0.8, ls="--")
        ax.set_xlim(-1.05, 1.05)
        ax.set_ylim(-1.05, 1.05)
        ax.set_aspect("equal")
        ax.set_xlabel("true correlation")
        ax.set_ylabel("predicted correlation")
        ax.set_title(f"GSC = {value:.3f}" if value is not None and np.isfinite(value) else "gene pairs")
        return finish(fig, axes.ravel(), show=show, save=save, return_fig=return_fig)


def _per_gene_morans(table: AnnData, key: str, metrics_key: str | None) -> pd.DataFrame:
    per_gene = metrics_part(table, key, "per_gene", metrics_key=metrics_key)
    if not {"morans_i_true", "morans_i_pred"} <= set(per_gene.columns):
        raise KeyError(
            "The stored per-gene metrics have no Moran's I (`morans_i_true`, `morans_i_pred`); run "
            f"`histoflow.tl.evaluate(sdata, pred_key={key!r})` with 'ssc' in `metrics=`."
        )
    return per_gene[["morans_i_true", "morans_i_pred"]].astype(np.float64)


@doc_params(**PLOT_DOCS)
def ssc(
    sdata: SpatialData | AnnData,
    key: str = "molf",
    *,
    table_key: str = Key.table,
    metrics_key: str | None = None,
    n_labels: int = 5,
    ax: Axes | None = None,
    figsize: tuple[float, float] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | Axes | None:
    """Per-gene Moran's I of the prediction against that of the truth, with the identity line and the SSC.

    Reads ``per_gene`` (pooled Moran's I over all evaluated spots) and the SSC of the stored metrics of
    :func:`histoflow.tl.evaluate`. Points on the identity line are genes whose spatial structure the prediction
    reproduces; points below it are smoothed away, points above it are over-smoothed or invented.

    Parameters
    ----------
    {doc_sdata_only}
    key
        Key of the evaluated predictions.
    {doc_table_key}
    metrics_key
        ``uns`` key of the stored metrics; default ``f"{key}_metrics"``.
    n_labels
        Label the genes with the largest true Moran's I (0: none).
    {doc_ax}
    {doc_plot}

    Returns
    -------
    The axes (or the figure with ``return_fig=True``) when not shown; nothing is written.
    """
    table = get_table(sdata, table_key)
    mi = _per_gene_morans(table, key, metrics_key).dropna()
    if mi.empty:
        raise ValueError("No gene has a defined Moran's I in both truth and prediction.")
    value = summary_value(metrics_entry(table, key, metrics_key).get("summary"), "ssc")
    with style():
        ax = new_axes(ax, figsize, (3.4, 3.2))
        x, y = mi["morans_i_true"].to_numpy(), mi["morans_i_pred"].to_numpy()
        ax.scatter(x, y, s=12, alpha=0.8, color=PALETTE[0], linewidths=0)
        lo = float(min(x.min(), y.min(), 0.0))
        hi = float(max(x.max(), y.max()))
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.5", lw=0.8, ls="--")
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_aspect("equal")
        for gene in mi["morans_i_true"].sort_values(ascending=False).index[: max(int(n_labels), 0)]:
            ax.annotate(str(gene), (mi.at[gene, "morans_i_true"], mi.at[gene, "morans_i_pred"]), fontsize=6,
                        xytext=(2, 2), textcoords="offset points")  # fmt: skip
        ax.set_xlabel("Moran's I, true")
        ax.set_ylabel("Moran's I, predicted")
        ax.set_title(f"SSC = {value:.3f}" if value is not None and np.isfinite(value) else "Moran's I per gene")
        return finish(ax.figure, ax, show=show, save=save, return_fig=return_fig)


@doc_params(**PLOT_DOCS)
def morans_i(
    sdata: SpatialData | AnnData,
    key: str = "molf",
    *,
    table_key: str = Key.table,
    metrics_key: str | None = None,
    n_genes: int = 20,
    sort_by: Literal["true", "pred"] = "true",
    ax: Axes | None = None,
    figsize: tuple[float, float] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | Axes | None:
    """The most spatially structured genes: Moran's I of truth and prediction as paired bars.

    Parameters
    ----------
    {doc_sdata_only}
    key
        Key of the evaluated predictions.
    {doc_table_key}
    metrics_key
        ``uns`` key of the stored metrics; default ``f"{key}_metrics"``.
    n_genes
        Number of genes shown.
    sort_by
        Rank genes by the Moran's I of the truth (``"true"``) or of the prediction (``"pred"``).
    {doc_ax}
    {doc_plot}

    Returns
    -------
    The axes (or the figure with ``return_fig=True``) when not shown; nothing is written.
    """
    check_choice(sort_by, ("true", "pred"), "sort_by")
    if isinstance(n_genes, bool) or not isinstance(n_genes, int | np.integer) or n_genes < 1:
        raise ValueError(f"`n_genes` must be a positive integer, got {n_genes!r}.")
    table = get_table(sdata, table_key)
    mi = _per_gene_morans(table, key, metrics_key)
    top = mi.sort_values(f"morans_i_{sort_by}", ascending=False, na_position="last").head(int(n_genes))
    with style():
        ax = new_axes(ax, figsize, (3.6, 0.8 + 0.18 * len(top)))
        pos = np.arange(len(top))
        h = 0.4
        ax.barh(pos - h / 2, top["morans_i_true"], height=h, color=PALETTE[0], label="true")
        ax.barh(pos + h / 2, top["morans_i_pred"], height=h, color=PALETTE[1], label="predicted")
        ax.set_yticks(pos, [str(g) for g in top.index])
        ax.invert_yaxis()
        ax.axvline(0, color="0.3", lw=0.6)
        ax.set_xlabel("Moran's I")
        ax.set_title(f"top {len(top)} genes by Moran's I ({sort_by})")
        ax.legend(loc="lower right")
        return finish(ax.figure, ax, show=show, save=save, return_fig=return_fig)


def _as_frames(
    data: Any, key: str, table_key: str, metrics_key: str | None
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The tidy frame and (when available) the per-slide table from a frame, a stored dict or a table."""
    from anndata import AnnData

    if isinstance(data, pd.DataFrame):
        return data, None
    if isinstance(data, Mapping) and "summary" in data:
        return data["summary"], data.get("per_slide")
    if isinstance(data, AnnData) or is_spatialdata(data):
        entry = metrics_entry(get_table(data, table_key), key, metrics_key)
        return entry["summary"], entry.get("per_slide")
    raise TypeError(
        "`data` must be the DataFrame of `histoflow.tl.evaluate`, its stored dict (`uns[f'{key}_metrics']`), or a "
        f"SpatialData/AnnData holding it; got {type(data).__name__}."
    )


@doc_params(**PLOT_DOCS)
def metrics(
    data: pd.DataFrame | Mapping[str, Any] | SpatialData | AnnData,
    metric: str | Sequence[str] = "pcc",
    *,
    by: Literal["group", "tier", "gene_set"] = "group",
    aggregation: Literal["per_slide", "pooled"] = "per_slide",
    group: str = "all",
    gene_set: str = "all",
    hue: str | None = None,
    key: str = "molf",
    table_key: str = Key.table,
    metrics_key: str | None = None,
    ax: Axes | None = None,
    figsize: tuple[float, float] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | Axes | None:
    """Bars of a metric per cancer type (or per Hallmark tier, or per gene set), with error bars.

    Error bars show the standard deviation across folds when the frame has a ``fold`` column (e.g. several
    evaluations concatenated with ``fold=i``), else, for ``by="group"`` with ``aggregation="per_slide"`` and
    ``gene_set="all"``, across the slides of each group (from the stored ``per_slide`` table); otherwise none.

    Parameters
    ----------
    data
        The tidy frame of :func:`histoflow.tl.evaluate` (columns ``metric``, ``aggregation``, ``group``,
        ``gene_set``, ``value``, ...; optional ``fold`` and ``method`` columns), its stored dict
        ``uns[f"{key}_metrics"]``, or a SpatialData/AnnData holding it.
    metric
        Metric(s) to show (``"pcc"``, ``"pcc@10"``, ``"gsc"``, ``"ssc"``, ``"mse"``, ...).
    by
        Bars per ``"group"`` (cancer types and ``"all"``), per Hallmark variance ``"tier"`` (gene sets
        ``tier:low``/``tier:mid``/``tier:high``), or per ``"gene_set"``.
    aggregation
        ``"per_slide"`` (mean over slides) or ``"pooled"`` (all spots of the group at once).
    group
        Group used when ``by`` is not ``"group"``.
    gene_set
        Gene set used when ``by="group"``.
    hue
        Column giving bars side by side within each position; default ``"method"`` when the frame has it, else
        ``"metric"`` when several metrics are asked for.
    key
        Key of the evaluated predictions, when ``data`` is a SpatialData/AnnData.
    {doc_table_key}
    metrics_key
        ``uns`` key of the stored metrics; default ``f"{key}_metrics"``.
    {doc_ax}
    {doc_plot}

    Returns
    -------
    The axes (or the figure with ``return_fig=True``) when not shown; nothing is written.
    """
    check_choice(by, ("group", "tier", "gene_set"), "by")
    check_choice(aggregation, ("per_slide", "pooled"), "aggregation")
    summary, per_slide = _as_frames(data, key, table_key, metrics_key)
    missing = [c for c in _SUMMARY_COLUMNS if c not in summary.columns]
    if missing:
        raise KeyError(f"`data` lacks the columns {missing} of the frame written by `histoflow.tl.evaluate`.")
    wanted = check_sequence(metric, "metric")
    unknown = [m for m in wanted if m not in set(summary["metric"])]
    if unknown:
        raise ValueError(f"`metric` contains {unknown}; the frame has {sorted(summary['metric'].unique())}.")
    sel = summary[summary["metric"].isin(wanted) & (summary["aggregation"] == aggregation)]
    if by == "group":
        sel = sel[sel["gene_set"] == gene_set]
        position = "group"
    else:
        sel = sel[sel["group"] == group]
        if by == "tier":
            sel = sel[sel["gene_set"].astype(str).str.startswith("tier:")]
        position = "gene_set"
    if sel.empty:
        where = f"gene_set {gene_set!r}" if by == "group" else f"group {group!r}"
        tier = " and a tier gene set (run `histoflow.pp.select_genes` with Hallmark tiers)" if by == "tier" else ""
        raise ValueError(f"No row of `data` has metric {wanted}, aggregation {aggregation!r}, {where}{tier}.")
    if hue is None:
        hue = "method" if "method" in sel.columns else ("metric" if len(wanted) > 1 else None)
    elif hue not in sel.columns:
        raise KeyError(f"`hue={hue!r}` is not a column of `data` (columns: {list(sel.columns)}).")
    if len(wanted) > 1 and hue != "metric":
        raise ValueError(
            f"`metric={wanted}` with bars coloured by {hue!r} would average different metrics into one bar; plot one "
            "metric per call (e.g. one `ax` each) or pass `hue='metric'`."
        )
    has_fold = "fold" in sel.columns
    keys = [position] + ([hue] if hue else [])
    if has_fold:
        stats = sel.groupby(keys, sort=False, observed=True)["value"].agg(["mean", "std"]).reset_index()
    else:
        stats = sel.groupby(keys, sort=False, observed=True)["value"].mean().rename("mean").reset_index()
        stats["std"] = np.nan
        if by == "group" and aggregation == "per_slide" and gene_set == "all" and per_slide is not None:
            for i, row in stats.iterrows():
                m = row[hue] if hue == "metric" else wanted[0]
                if m in per_slide.columns:
                    vals = (
                        per_slide[m] if row["group"] == "all" else per_slide.loc[per_slide["group"] == row["group"], m]
                    )
                    vals = vals.dropna()
                    stats.at[i, "std"] = float(vals.std(ddof=1)) if len(vals) > 1 else np.nan
    positions = list(dict.fromkeys(stats[position].astype(str)))
    if by == "tier":
        positions = sorted(positions, key=lambda s: ["tier:low", "tier:mid", "tier:high"].index(s) if s in
                           ("tier:low", "tier:mid", "tier:high") else 3)  # fmt: skip
    hues = list(dict.fromkeys(stats[hue].astype(str))) if hue else [None]
    with style():
        ax = new_axes(ax, figsize, (1.2 + 0.5 * len(positions) * max(1, len(hues)) ** 0.7, 2.8))
        width = 0.8 / len(hues)
        for j, h in enumerate(hues):
            part = stats if h is None else stats[stats[hue].astype(str) == h]
            part = part.set_index(part[position].astype(str)).reindex(positions)
            xs = np.arange(len(positions)) - 0.4 + width * (j + 0.5)
            err = part["std"].to_numpy(dtype=float)
            ax.bar(xs, part["mean"].to_numpy(dtype=float), width=width * 0.92, color=PALETTE[j % len(PALETTE)],
                   label=h, yerr=np.where(np.isfinite(err), err, 0.0) if np.isfinite(err).any() else None,
                   error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "0.2"})  # fmt: skip
        ax.set_xticks(np.arange(len(positions)), [p.removeprefix("tier:") for p in positions])
        ax.axhline(0, color="0.3", lw=0.6)
        ax.set_xlabel({"group": "group", "tier": "Hallmark variance tier", "gene_set": "gene set"}[by])
        ax.set_ylabel(wanted[0] if len(wanted) == 1 else "value")
        ax.set_title(f"{', '.join(wanted)} ({aggregation.replace('_', ' ')})")
        if hue:
            ax.legend(title=hue, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        return finish(ax.figure, ax, show=show, save=save, return_fig=return_fig)
