"""``tl.evaluate``: every metric of :mod:`histoflow.tl.metrics` on stored predictions, as one tidy frame."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from histoflow._constants import Key
from histoflow._docs import doc_params
from histoflow._logging import logger
from histoflow._utils import get_table, log_write
from histoflow._validate import check_choice, check_finite, check_layer, check_obs_key, check_obsm_key
from histoflow.tl._metrics import (
    AGGREGATIONS,
    DOMAIN_METHODS,
    ROW_KEYS,
    GeneStats,
    MoranParts,
    _cosine_rows,
    _group_index,
    _gsc_from_scatter,
    _masked_row_pearson,
    _moran_from,
    _nanmean,
    _pooled_moran,
    _row_normalize,
    _scatter,
    _topk_mean,
    _w1_sorted,
    domain_agreement,
    spatial_connectivity,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["evaluate", "METRIC_FAMILIES"]

#: Metric families ``evaluate(metrics=...)`` accepts.
METRIC_FAMILIES: tuple[str, ...] = ("pcc", "mse", "mae", "rvd", "gsc", "ssc", "wasserstein", "cosine", "domains")
#: Columns of the tidy frame returned by :func:`evaluate`.
COLUMNS: tuple[str, ...] = (*ROW_KEYS, "value", "n_genes", "n_excluded", "n_slides", "n_spots")
ALL = "all"
_GENE_METRICS = ("pcc", "mse", "mae", "rvd", "gsc", "ssc", "wasserstein_gene")
_STORE_CORR_MAX_GENES = 500


@doc_params()
def evaluate(
    sdata: SpatialData | AnnData,
    *,
    pred_key: str | None = None,
    pred_layer: str | None = None,
    table_key: str = Key.table,
    true_layer: str | None = Key.log1p,
    genes: Sequence[str] | None = None,
    library_key: str | None = Key.library,
    groupby: str | None = Key.cancer_type,
    mask_obs: str | np.ndarray | Sequence[bool] | pd.Series | None = None,
    split: str | None = None,
    split_key: str = Key.split,
    metrics: Sequence[str] | None = None,
    k: int | Sequence[int] | None = (10, 50),
    gene_sets: Mapping[str, Sequence[str]] | None = None,
    panel_key: str | None = Key.panel,
    spatial_key: str = Key.spatial,
    coord_type: Literal["grid", "generic"] | None = None,
    n_neighs: int | None = None,
    technology_key: str = Key.technology,
    n_domains: int = 5,
    domain_method: Literal["kmeans", "leiden"] = "kmeans",
    domain_labels_key: str | None = None,
    n_pcs: int = 30,
    seed: int = 0,
    store_gene_correlation: bool | None = None,
    key_added: str | None = None,
    inplace: bool = True,
) -> pd.DataFrame:
    """Score predictions against measured expression with every histoflow metric.

    Predictions come from ``obsm[pred_key]`` (a DataFrame whose columns are genes and whose index is ``obs_names``;
    an array when ``genes=`` names its columns) or from ``layers[pred_layer]``; the truth is ``layers[true_layer]``
    (``log1p`` of raw counts) restricted to the prediction's genes, compared gene by gene by name.

    Metrics (exact definitions in :mod:`histoflow.tl.metrics`):

    - ``pcc``: Pearson correlation per gene across spots; ``pcc@k``: the mean of the ``k`` best genes (rows only for
      gene sets with at least ``k`` genes);
    - ``mse``, ``mae``: mean squared / absolute error over spots and genes; ``rvd``: relative variance difference
      ``mean_g (var_pred - var_true)^2 / var_true^2`` (Stem);
    - ``gsc``: Pearson correlation of the upper triangles of the true and predicted gene–gene correlation matrices;
    - ``ssc``: Pearson correlation across genes of true and predicted Moran's I (row-normalised weights of the
      spatial graph from :func:`histoflow.tl.metrics.spatial_connectivity`: squidpy's grid graph for Visium (6
      neighbours) and ST (4), kNN with 6 neighbours otherwise, no edge between slides; built on the evaluated
      spots only);
    - ``wasserstein_gene``: 1-Wasserstein distance between the true and predicted distributions of each gene over
      spots, mean over genes; ``wasserstein_spot``: the same within each spot over genes, mean over spots (MoLF's
      ``D_W1``); ``cosine``: cosine distance between true and predicted spot profiles, mean over spots (``D_cos``);
    - ``domain_ari``, ``domain_nmi``: spatial domains (genes z-scored, PCA, k-means or Leiden into ``n_domains``
      clusters, per slide) from prediction vs from truth; with ``domain_labels_key``, ``label_ari_pred``,
      ``label_nmi_pred`` (predicted domains vs the labels) and ``label_ari_true``, ``label_nmi_true`` (true
      domains vs the labels, the ceiling).

    Aggregations: ``"per_slide"`` computes the metric on each slide's spots, then averages the slides of the group
    (MoLF: PCC nanmean over genes per slide, mean over slides, per cancer type); ``"pooled"`` computes it once on all
    spots of the group (HEST-benchmark/STFlow: PCC per gene over all test spots, mean over genes; combine folds with
    :func:`histoflow.tl.metrics.summarize_folds`). Groups: ``"all"`` (every evaluated slide) and each value of
    ``groupby``. Spatial domains are per slide only. Undefined values (a gene constant over the spots in truth or
    prediction, a slide with one spot) are left out of every mean and counted in ``n_excluded``, never set to zero.

    Gene sets: ``"all"`` (every prediction gene), each entry of ``gene_sets``, and, when ``uns[panel_key]`` was
    written by :func:`histoflow.pp.select_genes`, ``"hvg"`` (genes of ``var[f"{panel_key}_hvg"]``),
    ``"tier:low"``/``"tier:mid"``/``"tier:high"`` (Hallmark variance tiers) and every Hallmark pathway (by its set
    name), each restricted to the prediction's genes. Per-spot metrics and domains use ``"all"`` only.

    Parameters
    ----------
    {doc_sdata}
    pred_key
        ``obsm`` key of the predictions (DataFrame, or array with ``genes=``).
    pred_layer
        Layer holding the predictions (genes = ``var_names``), instead of ``pred_key``.
    true_layer
        Layer with the measured expression in the prediction's space; ``None`` reads ``X``.
    genes
        Genes to evaluate (a subset of a DataFrame's columns or of ``var_names``); required for an array in ``obsm``,
        where it names the columns in order.
    {doc_library_key} ``None``: one slide.
    groupby
        ``obs`` column grouping slides (the cancer type; constant within a slide); ``None``: only ``"all"``.
    mask_obs
        Boolean array (one value per spot) or boolean ``obs`` column: evaluate these spots only.
    split
        Evaluate the spots whose ``obs[split_key]`` equals this (e.g. ``"test"``); combined with ``mask_obs`` by AND.
    split_key
        ``obs`` column with the split (:func:`histoflow.pp.split_slides`).
    metrics
        Metric families to compute, among ``"pcc"`` (with ``pcc@k``), ``"mse"``, ``"mae"``, ``"rvd"``, ``"gsc"``,
        ``"ssc"``, ``"wasserstein"``, ``"cosine"``, ``"domains"``; ``None``: all.
    k
        The ``k`` of ``pcc@k`` (one or several); ``None``: no ``pcc@k``.
    gene_sets
        Extra gene sets ``{name: genes}``; genes not predicted are dropped (logged).
    panel_key
        ``uns`` entry written by :func:`histoflow.pp.select_genes` (HVG panel, tiers, pathways); ``None``: ignore.
    spatial_key
        ``obsm`` key of the spot centres (for ``ssc``).
    coord_type
        Spatial graph for ``ssc``: ``"grid"`` or ``"generic"`` (kNN); ``None`` chooses per slide from
        ``obs[technology_key]``.
    n_neighs
        Neighbours per spot of the spatial graph; ``None``: 6 (Visium, kNN) or 4 (ST).
    technology_key
        ``obs`` column with the technology.
    n_domains
        Number of spatial domains per slide.
    domain_method
        ``"kmeans"`` or ``"leiden"`` (needs ``igraph``).
    domain_labels_key
        ``obs`` column with reference labels (e.g. pathologist annotations) for the ``label_*`` metrics.
    n_pcs
        Principal components for the domains.
    seed
        Seed of the domain clustering.
    store_gene_correlation
        Store the pooled gene–gene correlation matrices of truth and prediction; ``None``: when at most 500 genes.
    key_added
        ``uns`` key written; ``None``: ``f"{pred_key}_metrics"`` (or ``f"{pred_layer}_metrics"``).
    inplace
        Write ``uns[key_added]``; ``False`` only returns the frame.

    Returns
    -------
    The tidy frame, one row per (``metric``, ``aggregation``, ``group``, ``gene_set``) with ``value``, ``n_genes``
    (genes of the set), ``n_excluded`` (undefined units left out: genes for pooled values, slide–gene pairs summed
    over slides for per-slide values, spots for per-spot metrics, slides without domains for the domain metrics),
    ``n_slides`` (slides contributing) and ``n_spots`` (their spots). With ``inplace=True`` also writes
    ``uns[key_added]`` of the table, a dict with:

    - ``"summary"``: the frame;
    - ``"per_gene"``: pooled per-gene values over all spots (pcc, mean of per-slide pcc, mse, mae, variances, rvd,
      Moran's I of truth and prediction, wasserstein);
    - ``"per_slide"``: per-slide values on all genes;
    - ``"pcc_by_slide"``, ``"morans_i_true_by_slide"``, ``"morans_i_pred_by_slide"``: slides × genes;
    - ``"gene_corr_true"``, ``"gene_corr_pred"``: genes × genes (see ``store_gene_correlation``);
    - ``"params"``: the settings of the call and the numbers of spots, genes and slides scored.
    """
    start = time.perf_counter()
    adata = get_table(sdata, table_key)
    families = _families(metrics)
    ks = _as_ks(k)
    if "domains" in families:
        check_choice(domain_method, DOMAIN_METHODS, "domain_method")
        if isinstance(n_domains, bool) or not isinstance(n_domains, int | np.integer) or n_domains < 2:
            raise ValueError(f"`n_domains` must be an integer >= 2, got {n_domains!r}.")
        if domain_labels_key is not None:
            check_obs_key(adata, domain_labels_key, "domain_labels_key")
        if isinstance(n_pcs, bool) or not isinstance(n_pcs, int | np.integer) or n_pcs < 1:
            raise ValueError(f"`n_pcs` must be a positive integer, got {n_pcs!r}.")

    P_all, gene_names, pred_desc = _prediction(adata, pred_key, pred_layer, genes)
    T_all = _truth(adata, true_layer, gene_names)
    mask, mask_desc = _mask(adata, mask_obs, split, split_key)
    rows = np.flatnonzero(mask)
    if rows.size < 2:
        raise ValueError(f"{mask_desc} selects {rows.size} spot(s); at least 2 are needed to evaluate.")
    view = adata[rows]
    slide_names, slide_index = _slides(view, library_key)
    slide_group, group_names = _slide_groups(view, groupby, slide_names, slide_index)

    T = _dense_rows(T_all, rows)
    P = _dense_rows(P_all, rows)
    check_finite(P, pred_desc)
    check_finite(T, f"layers[{true_layer!r}]" if true_layer is not None else "adata.X")
    n, g = T.shape
    sets = _gene_sets(adata, gene_names, gene_sets, panel_key)
    W = None
    if "ssc" in families:
        W = _row_normalize(
            spatial_connectivity(
                view,
                library_key=library_key,
                spatial_key=spatial_key,
                coord_type=coord_type,
                n_neighs=n_neighs,
                technology_key=technology_key,
            )
        )
    labels = view.obs[domain_labels_key].to_numpy() if domain_labels_key is not None else None
    logger.info("Evaluating %d spots × %d genes on %d slide(s), %d gene set(s).", n, g, len(slide_names), len(sets))

    # ---- per slide, then pooled units (groups and "all")
    blocks = group_names or [ALL]
    by_block = {b: [j for j, sg in enumerate(slide_group) if (sg if group_names else ALL) == b] for b in blocks}
    n_sets = len(sets)
    set_cols = list(sets.values())
    S = len(slide_names)
    slide = _UnitTable(S, g, n_sets)
    stats: list[GeneStats | None] = [None] * S
    parts_t: list[MoranParts | None] = [None] * S
    parts_p: list[MoranParts | None] = [None] * S
    pooled_names = ([ALL] + list(group_names)) if group_names else [ALL]
    pooled = _UnitTable(len(pooled_names), g, n_sets)
    pooled_slides = {ALL: list(range(S)), **{b: by_block[b] for b in group_names}}
    want_corr = "gsc" in families
    store_corr = (g <= _STORE_CORR_MAX_GENES) if store_gene_correlation is None else bool(store_gene_correlation)
    corr_store: dict[str, np.ndarray] = {}
    all_acc: tuple[np.ndarray, np.ndarray] | None = None
    block_stats: list[GeneStats] = []

    w1_spot = _w1_sorted(np.sort(T, axis=1), np.sort(P, axis=1), axis=1) if "wasserstein" in families else None
    cos_spot = _cosine_rows(T, P) if "cosine" in families else None
    domains: dict[str, np.ndarray] = {}

    for b in blocks:
        acc_t = acc_p = None
        for j in by_block[b]:
            idx = slide_index[j]
            t = np.asarray(T[idx], dtype=np.float64)
            p = np.asarray(P[idx], dtype=np.float64)
            s = GeneStats.of(t, p)
            stats[j] = s
            slide.fill_stats(j, s)
            if W is not None:
                Ws = W[idx][:, idx]
                parts_t[j] = MoranParts.of(t - s.mean_t, Ws)
                parts_p[j] = MoranParts.of(p - s.mean_p, Ws)
                slide.moran_t[j] = _moran_from(s.n, parts_t[j].A, s.ss_t, parts_t[j].D, s.constant_t)
                slide.moran_p[j] = _moran_from(s.n, parts_p[j].A, s.ss_p, parts_p[j].D, s.constant_p)
            if want_corr:
                St, Sp = _scatter(t, s.mean_t), _scatter(p, s.mean_p)
                for c, cols in enumerate(set_cols):
                    slide.gsc[j, c], slide.gsc_excl[j, c] = _gsc_from_scatter(St, Sp, s.valid, cols)
                if acc_t is None:
                    acc_t, acc_p = St, Sp
                else:
                    acc_t += St
                    acc_p += Sp
                del St, Sp
            if "wasserstein" in families:
                slide.w1g[j] = _w1_sorted(np.sort(T[idx], axis=0), np.sort(P[idx], axis=0), axis=0)
            if "domains" in families:
                _domains_of_slide(
                    domains, j, slide_names[j], S, t, p, n_domains, domain_method, labels, idx, n_pcs, seed
                )
            del t, p
        bstats = [stats[j] for j in by_block[b]]
        block_stats.append(GeneStats.combine(bstats))
        if want_corr:
            bt = acc_t + _between(bstats, "t")
            bp = acc_p + _between(bstats, "p")
            if group_names:
                u = pooled_names.index(b)
                _fill_gsc(pooled, u, bt, bp, block_stats[-1], set_cols)
            if all_acc is None:
                all_acc = (bt, bp)
            else:
                all_acc = (all_acc[0] + bt, all_acc[1] + bp)
            del acc_t, acc_p
    if want_corr:
        at = all_acc[0] + _between(block_stats, "t")
        ap = all_acc[1] + _between(block_stats, "p")
        all_stats = GeneStats.combine(block_stats)
        _fill_gsc(pooled, 0, at, ap, all_stats, set_cols)
        if store_corr:
            corr_store = _correlations(at, ap, all_stats)
        del at, ap, all_acc

    for u, name in enumerate(pooled_names):
        members = pooled_slides[name]
        sts = [stats[j] for j in members]
        ps = GeneStats.combine(sts)
        pooled.fill_stats(u, ps)
        if W is not None:
            pooled.moran_t[u] = _pooled_moran(sts, [parts_t[j] for j in members], "t")[0]
            pooled.moran_p[u] = _pooled_moran(sts, [parts_p[j] for j in members], "p")[0]
        if "wasserstein" in families:
            if len(members) == 1:
                pooled.w1g[u] = slide.w1g[members[0]]
            elif name != ALL and len(group_names) == 1:
                pooled.w1g[u] = pooled.w1g[0]
            else:
                r = np.concatenate([slide_index[j] for j in members])
                pooled.w1g[u] = _w1_sorted(np.sort(T[r], axis=0), np.sort(P[r], axis=0), axis=0)
    logger.info("Metrics computed in %.1f s; assembling the tables.", time.perf_counter() - start)

    # ---- tidy frame
    slide_n = np.array([len(i) for i in slide_index])
    records: list[tuple] = []
    for c, (set_name, cols) in enumerate(sets.items()):
        names = _metric_names(families, ks, len(cols))
        for metric in names:
            sv, se = _unit_metric(slide, metric, cols, c, slide_n)
            pv, pe = _unit_metric(pooled, metric, cols, c, pooled.n)
            for u, grp in enumerate(pooled_names):
                members = pooled_slides[grp]
                vals = sv[members]
                ok = np.isfinite(vals)
                value = float(vals[ok].mean()) if ok.any() else np.nan
                records.append(
                    (metric, "per_slide", grp, set_name, value, len(cols), int(se[members].sum()), int(ok.sum()),
                     int(slide_n[members][ok].sum()))
                )  # fmt: skip
                records.append(
                    (metric, "pooled", grp, set_name, float(pv[u]), len(cols), int(pe[u]), len(members),
                     int(pooled.n[u]))
                )  # fmt: skip
        if set_name != ALL:
            continue
        spot_metrics = {"wasserstein_spot": w1_spot, "cosine": cos_spot}
        for metric, values in spot_metrics.items():
            if values is None:
                continue
            per_slide_vals = np.array([_nanmean(values[i]) for i in slide_index], dtype=np.float64)
            per_slide_excl = np.array([int(np.isnan(values[i]).sum()) for i in slide_index])
            slide.extra[metric] = per_slide_vals
            for grp in pooled_names:
                members = pooled_slides[grp]
                vals = per_slide_vals[members]
                ok = np.isfinite(vals)
                records.append(
                    (metric, "per_slide", grp, ALL, float(vals[ok].mean()) if ok.any() else np.nan, g,
                     int(per_slide_excl[members].sum()), int(ok.sum()), int(slide_n[members][ok].sum()))
                )  # fmt: skip
                r = np.concatenate([slide_index[j] for j in members])
                records.append(
                    (metric, "pooled", grp, ALL, float(_nanmean(values[r])), g, int(np.isnan(values[r]).sum()),
                     len(members), int(r.size))
                )  # fmt: skip
        for metric, per_slide_vals in domains.items():
            slide.extra[metric] = per_slide_vals
            for grp in pooled_names:
                members = pooled_slides[grp]
                vals = per_slide_vals[members]
                ok = np.isfinite(vals)
                records.append(
                    (metric, "per_slide", grp, ALL, float(vals[ok].mean()) if ok.any() else np.nan, g,
                     int((~ok).sum()), int(ok.sum()), int(slide_n[members][ok].sum()))
                )  # fmt: skip
    frame = pd.DataFrame.from_records(records, columns=list(COLUMNS))
    frame = _order(frame, list(sets), pooled_names)

    if not inplace:
        logger.info("Evaluated in %.1f s.", time.perf_counter() - start)
        return frame

    # ---- stored tables (everything computed before writing)
    result: dict[str, Any] = {"summary": frame}
    result["per_gene"] = _per_gene_table(pooled, slide, gene_names, families)
    result["per_slide"] = _per_slide_table(slide, slide_names, slide_group, slide_n, families, ks, g)
    if "pcc" in families:
        result["pcc_by_slide"] = pd.DataFrame(slide.pcc, index=slide_names, columns=gene_names)
    if "ssc" in families:
        result["morans_i_true_by_slide"] = pd.DataFrame(slide.moran_t, index=slide_names, columns=gene_names)
        result["morans_i_pred_by_slide"] = pd.DataFrame(slide.moran_p, index=slide_names, columns=gene_names)
    if corr_store:
        result["gene_corr_true"] = pd.DataFrame(corr_store["t"], index=gene_names, columns=gene_names)
        result["gene_corr_pred"] = pd.DataFrame(corr_store["p"], index=gene_names, columns=gene_names)
    result["params"] = {
        "pred_key": pred_key,
        "pred_layer": pred_layer,
        "true_layer": true_layer,
        "library_key": library_key,
        "groupby": groupby,
        "mask": mask_desc,
        "n_spots": int(n),
        "n_genes": int(g),
        "n_slides": int(S),
        "metrics": list(families),
        "k": list(ks),
        "gene_sets": list(sets),
        "coord_type": coord_type,
        "n_neighs": n_neighs,
        "n_domains": int(n_domains),
        "domain_method": domain_method,
        "domain_labels_key": domain_labels_key,
        "n_pcs": int(n_pcs),
        "seed": int(seed),
        "aggregations": list(AGGREGATIONS),
    }
    key = key_added if key_added is not None else f"{pred_key if pred_key is not None else pred_layer}_metrics"
    adata.uns[key] = result
    log_write("uns", key)
    logger.info("Evaluated in %.1f s.", time.perf_counter() - start)
    return frame


# --------------------------------------------------------------------------------------------------------------------
# helpers


class _UnitTable:
    """Per-gene values of a list of units (slides, or pooled groups) as units × genes matrices."""

    def __init__(self, n_units: int, n_genes: int, n_sets: int) -> None:
        def nan() -> np.ndarray:
            return np.full((n_units, n_genes), np.nan)

        self.n = np.zeros(n_units, dtype=np.int64)
        self.pcc, self.sse, self.sae, self.rvd, self.w1g = nan(), nan(), nan(), nan(), nan()
        self.var_t, self.var_p, self.moran_t, self.moran_p = nan(), nan(), nan(), nan()
        self.gsc = np.full((n_units, n_sets), np.nan)
        self.gsc_excl = np.zeros((n_units, n_sets), dtype=np.int64)
        self.extra: dict[str, np.ndarray] = {}

    def fill_stats(self, u: int, s: GeneStats) -> None:
        self.n[u] = s.n
        self.pcc[u] = s.pcc()
        self.sse[u] = s.sse
        self.sae[u] = s.sae
        self.rvd[u] = s.rvd()
        self.var_t[u] = s.ss_t / s.n
        self.var_p[u] = s.ss_p / s.n


def _families(metrics: Sequence[str] | None) -> list[str]:
    if metrics is None:
        return list(METRIC_FAMILIES)
    items = [metrics] if isinstance(metrics, str) else list(metrics)
    if not items:
        raise ValueError(f"`metrics` is empty; choose among {list(METRIC_FAMILIES)} (or None for all).")
    for m in items:
        check_choice(m, METRIC_FAMILIES, "metrics")
    return [m for m in METRIC_FAMILIES if m in items]


def _as_ks(k: int | Sequence[int] | None) -> list[int]:
    if k is None:
        return []
    items = [k] if isinstance(k, int | np.integer) else list(k)
    for v in items:
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
            raise ValueError(f"`k` must be a positive integer or a sequence of them (e.g. (10, 50)), got {k!r}.")
    return sorted({int(v) for v in items})


def _prediction(
    adata: AnnData, pred_key: str | None, pred_layer: str | None, genes: Sequence[str] | None
) -> tuple[Any, list[str], str]:
    """The prediction matrix (spots × genes, all spots), its gene names and a description for error messages."""
    if (pred_key is None) == (pred_layer is None):
        raise ValueError(
            "Pass exactly one of `pred_key=` (an `obsm` entry holding the predictions) and `pred_layer=` (a layer); "
            f"got pred_key={pred_key!r}, pred_layer={pred_layer!r}."
        )
    gene_list = None if genes is None else [str(x) for x in ([genes] if isinstance(genes, str) else genes)]
    if gene_list is not None:
        if not gene_list:
            raise ValueError("`genes` is empty; pass the genes to evaluate (or None for all).")
        dup = pd.Index(gene_list)[pd.Index(gene_list).duplicated()].unique().tolist()
        if dup:
            raise ValueError(f"`genes` has duplicates: {dup[:5]}.")
    if pred_layer is not None:
        check_layer(adata, pred_layer, "pred_layer")
        var = pd.Index(adata.var_names.astype(str))
        if gene_list is None:
            return adata.layers[pred_layer], var.tolist(), f"layers[{pred_layer!r}]"
        missing = [x for x in gene_list if x not in var]
        if missing:
            raise KeyError(f"`genes` not in `var_names`: {missing[:10]} ({len(missing)} in all).")
        cols = var.get_indexer(gene_list)
        X = adata.layers[pred_layer]
        return (X[:, cols] if sp.issparse(X) else np.asarray(X)[:, cols]), gene_list, f"layers[{pred_layer!r}]"
    check_obsm_key(adata, pred_key, "pred_key", hint="Pass the key the predictions were written to.")
    obj = adata.obsm[pred_key]
    desc = f"obsm[{pred_key!r}]"
    if isinstance(obj, pd.DataFrame):
        df = obj  # anndata guarantees that the index is obs_names
        columns = pd.Index(df.columns.astype(str))
        if not columns.is_unique:
            raise ValueError(f"{desc} has duplicated gene columns: {columns[columns.duplicated()][:5].tolist()}.")
        non_numeric = [c for c, dt in zip(columns, df.dtypes) if not pd.api.types.is_numeric_dtype(dt)]
        if non_numeric:
            raise TypeError(f"{desc} has non-numeric column(s) {non_numeric[:5]}; predictions must be numbers.")
        if gene_list is None:
            return df.to_numpy(), columns.tolist(), desc
        missing = [x for x in gene_list if x not in columns]
        if missing:
            raise KeyError(f"`genes` not among the columns of {desc}: {missing[:10]} ({len(missing)} in all).")
        return df.iloc[:, columns.get_indexer(gene_list)].to_numpy(), gene_list, desc
    X = obj
    shape = getattr(X, "shape", None)
    if shape is None or len(shape) != 2:
        raise TypeError(f"{desc} must be a DataFrame or a 2-D array, got {type(obj).__name__}.")
    if gene_list is None:
        raise ValueError(
            f"{desc} is an array without gene names; pass `genes=` with the name of each of its {shape[1]} columns "
            "(or store the predictions as a DataFrame)."
        )
    if len(gene_list) != shape[1]:
        raise ValueError(f"`genes` names {len(gene_list)} genes but {desc} has {shape[1]} columns.")
    return X, gene_list, desc


def _truth(adata: AnnData, true_layer: str | None, genes: list[str]) -> Any:
    check_layer(adata, true_layer, "true_layer")
    X = adata.X if true_layer is None else adata.layers[true_layer]
    if X is None:
        raise ValueError("`adata.X` is empty; pass `true_layer=` with the layer holding the measured expression.")
    var = pd.Index(adata.var_names.astype(str))
    if not var.is_unique:
        raise ValueError("`var_names` are not unique; call `adata.var_names_make_unique()` first.")
    missing = [x for x in genes if x not in var]
    if missing:
        raise KeyError(
            f"{len(missing)} predicted gene(s) are not in `var_names`, so there is no truth for them: {missing[:10]}. "
            "Pass `genes=` with the genes to evaluate."
        )
    cols = var.get_indexer(genes)
    if np.array_equal(cols, np.arange(len(var))):
        return X
    return X[:, cols] if sp.issparse(X) else np.asarray(X)[:, cols]


def _dense_rows(X: Any, rows: np.ndarray) -> np.ndarray:
    sub = X[rows]
    if sp.issparse(sub):
        sub = sub.toarray()
    a = np.asarray(sub)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"Expression values must be numbers, got dtype {a.dtype}.")
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float64)


def _mask(adata: AnnData, mask_obs: Any, split: str | None, split_key: str) -> tuple[np.ndarray, str]:
    mask = np.ones(adata.n_obs, dtype=bool)
    desc = []
    if mask_obs is not None:
        if isinstance(mask_obs, str):
            check_obs_key(adata, mask_obs, "mask_obs")
            col = adata.obs[mask_obs]
            if not pd.api.types.is_bool_dtype(col):
                raise TypeError(f"`mask_obs={mask_obs!r}` must be a boolean column, got dtype {col.dtype}.")
            mask &= col.to_numpy(dtype=bool)
            desc.append(f"mask_obs={mask_obs!r}")
        else:
            if isinstance(mask_obs, pd.Series) and not mask_obs.index.equals(adata.obs_names):
                if len(mask_obs) == adata.n_obs and set(mask_obs.index) == set(adata.obs_names):
                    mask_obs = mask_obs.reindex(adata.obs_names)
            arr = np.asarray(mask_obs)
            if arr.dtype != bool or arr.shape != (adata.n_obs,):
                raise ValueError(
                    f"`mask_obs` must be a boolean array with one value per spot ({adata.n_obs}), got dtype "
                    f"{arr.dtype} and shape {arr.shape}."
                )
            mask &= arr
            desc.append("mask_obs (array)")
    if split is not None:
        check_obs_key(adata, split_key, "split_key", hint="Run `histoflow.pp.split_slides` first, or pass `mask_obs=`.")
        col = adata.obs[split_key].astype(str)
        if not (col == split).any():
            raise ValueError(
                f"`split={split!r}` matches no spot; `obs[{split_key!r}]` holds {sorted(col.unique().tolist())}."
            )
        mask &= (col == split).to_numpy()
        desc.append(f"{split_key} == {split!r}")
    return mask, " and ".join(desc) if desc else "all spots"


def _slides(view: AnnData, library_key: str | None) -> tuple[list[str], list[np.ndarray]]:
    if library_key is None:
        return ["slide"], [np.arange(view.n_obs)]
    check_obs_key(view, library_key, "library_key", hint="Pass `library_key=None` to treat all spots as one slide.")
    col = view.obs[library_key]
    if col.isna().any():
        raise ValueError(f"`library_key={library_key!r}` has missing values among the evaluated spots.")
    return _group_index(col.astype(str).to_numpy(), view.n_obs, "library_key")


def _slide_groups(
    view: AnnData, groupby: str | None, slide_names: list[str], slide_index: list[np.ndarray]
) -> tuple[list[str], list[str]]:
    if groupby is None:
        return [ALL] * len(slide_names), []
    check_obs_key(view, groupby, "groupby", hint="Pass `groupby=None` to report only the group 'all'.")
    col = view.obs[groupby]
    if col.isna().any():
        raise ValueError(f"`groupby={groupby!r}` has {int(col.isna().sum())} missing value(s) among the spots.")
    values = col.astype(str).to_numpy()
    out = []
    for name, idx in zip(slide_names, slide_index):
        u = np.unique(values[idx])
        if u.size != 1:
            raise ValueError(
                f"`groupby={groupby!r}` is not constant within slide {name!r} ({u[:5].tolist()}); it must group "
                "whole slides (e.g. the cancer type)."
            )
        out.append(str(u[0]))
    groups = sorted(set(out))
    if ALL in groups:
        raise ValueError(f"`groupby={groupby!r}` has a group named {ALL!r}, which is reserved for all slides.")
    return out, groups


def _gene_sets(
    adata: AnnData, genes: list[str], gene_sets: Mapping[str, Sequence[str]] | None, panel_key: str | None
) -> dict[str, np.ndarray]:
    pos = {x: i for i, x in enumerate(genes)}
    sets: dict[str, np.ndarray] = {ALL: np.arange(len(genes))}

    def add(name: str, members: Sequence[str], source: str) -> None:
        members = [str(m) for m in ([members] if isinstance(members, str) else members)]
        cols = np.array(sorted({pos[m] for m in members if m in pos}), dtype=np.int64)
        if cols.size < len(set(members)):
            logger.info("Gene set %r (%s): %d of %d genes are predicted.", name, source, cols.size, len(set(members)))
        if cols.size == 0:
            logger.warning("Gene set %r (%s) has no predicted gene; skipped.", name, source)
            return
        sets[name] = cols

    if panel_key is not None and isinstance(adata.uns.get(panel_key), Mapping):
        info = adata.uns[panel_key]
        hvg_col = f"{panel_key}_hvg"
        if hvg_col in adata.var.columns:
            add("hvg", adata.var_names[adata.var[hvg_col].to_numpy(dtype=bool)].astype(str).tolist(), hvg_col)
        tiers = info.get("hallmark_tiers") or {}
        for tier in ("low", "mid", "high"):
            members = [gene for gene, t in tiers.items() if t == tier]
            if members:
                add(f"tier:{tier}", members, f"uns[{panel_key!r}]['hallmark_tiers']")
        for name, members in (info.get("hallmark_sets") or {}).items():
            add(str(name), list(members), f"uns[{panel_key!r}]['hallmark_sets']")
    if gene_sets is not None:
        if not isinstance(gene_sets, Mapping):
            raise TypeError(f"`gene_sets` must be a dict {{name: genes}}, got {type(gene_sets).__name__}.")
        for name, members in gene_sets.items():
            if str(name) == ALL:
                raise ValueError(f"`gene_sets` may not use the name {ALL!r} (reserved for every predicted gene).")
            add(str(name), members, "gene_sets")
    return sets


def _between(stats: Sequence[GeneStats], which: str) -> np.ndarray:
    """Between-unit scatter ``sum_s n_s (m_s - m)(m_s - m)^T`` (genes × genes)."""
    w = np.array([s.n for s in stats], dtype=np.float64)
    M = np.stack([s.mean_t if which == "t" else s.mean_p for s in stats])
    D = M - (w @ M) / w.sum()
    return (D * w[:, None]).T @ D


def _fill_gsc(table: _UnitTable, u: int, St: np.ndarray, Sp: np.ndarray, s: GeneStats, set_cols: list) -> None:
    for c, cols in enumerate(set_cols):
        table.gsc[u, c], table.gsc_excl[u, c] = _gsc_from_scatter(St, Sp, s.valid, cols)


def _correlations(St: np.ndarray, Sp: np.ndarray, s: GeneStats) -> dict[str, np.ndarray]:
    out = {}
    for key, S, const in (("t", St, s.constant_t), ("p", Sp, s.constant_p)):
        with np.errstate(invalid="ignore", divide="ignore"):
            d = np.sqrt(np.diag(S))
            C = np.clip(S / np.outer(d, d), -1.0, 1.0)
        C[const, :] = np.nan
        C[:, const] = np.nan
        out[key] = C
    return out


def _domains_of_slide(
    out: dict[str, np.ndarray],
    j: int,
    name: str,
    n_slides: int,
    t: np.ndarray,
    p: np.ndarray,
    n_domains: int,
    method: str,
    labels: np.ndarray | None,
    idx: np.ndarray,
    n_pcs: int,
    seed: int,
) -> None:
    names = ["domain_ari", "domain_nmi"]
    if labels is not None:
        names += ["label_ari_pred", "label_nmi_pred", "label_ari_true", "label_nmi_true"]
    for metric in names:
        out.setdefault(metric, np.full(n_slides, np.nan))
    if t.shape[0] <= n_domains:
        logger.warning(
            "Slide %r has %d spots, not more than `n_domains=%d`; no domains for it.", name, t.shape[0], n_domains
        )
        return
    lab = None
    if labels is not None:
        lab = labels[idx]
        if (~pd.isna(lab)).sum() < 2:
            lab = None
    res = domain_agreement(t, p, n_domains=int(n_domains), method=method, labels=lab, n_pcs=n_pcs, seed=seed)
    out["domain_ari"][j] = res["ari"]
    out["domain_nmi"][j] = res["nmi"]
    for key in ("label_ari_pred", "label_nmi_pred", "label_ari_true", "label_nmi_true"):
        if key in res:
            out[key][j] = res[key]


def _metric_names(families: list[str], ks: list[int], n_genes: int) -> list[str]:
    names = []
    for f in families:
        if f == "pcc":
            names.append("pcc")
            names.extend(f"pcc@{k}" for k in ks if n_genes >= k)
        elif f == "wasserstein":
            names.append("wasserstein_gene")
        elif f in ("mse", "mae", "rvd", "gsc", "ssc"):
            names.append(f)
    return names


def _unit_metric(
    table: _UnitTable, metric: str, cols: np.ndarray, c: int, n: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Value and number of excluded genes of ``metric`` on gene columns ``cols`` for every unit of ``table``."""
    if metric == "pcc" or metric.startswith("pcc@"):
        V = table.pcc[:, cols]
        k = None if metric == "pcc" else int(metric.split("@")[1])
        return _topk_mean(V, k), np.isnan(V).sum(axis=1)
    if metric in ("mse", "mae"):
        E = (table.sse if metric == "mse" else table.sae)[:, cols]
        with np.errstate(invalid="ignore", divide="ignore"):
            return E.sum(axis=1) / (n * cols.size), np.zeros(len(n), dtype=np.int64)
    if metric == "rvd":
        R = table.rvd[:, cols]
        return _topk_mean(R, None), np.isnan(R).sum(axis=1)
    if metric == "wasserstein_gene":
        return table.w1g[:, cols].mean(axis=1), np.zeros(len(n), dtype=np.int64)
    if metric == "ssc":
        return _masked_row_pearson(table.moran_t[:, cols], table.moran_p[:, cols])
    if metric == "gsc":
        return table.gsc[:, c], table.gsc_excl[:, c]
    raise AssertionError(metric)


def _order(frame: pd.DataFrame, set_names: list[str], groups: list[str]) -> pd.DataFrame:
    frame = frame.copy()
    frame["_s"] = frame["gene_set"].map({s: i for i, s in enumerate(set_names)})
    frame["_g"] = frame["group"].map({s: i for i, s in enumerate(groups)})
    frame["_a"] = frame["aggregation"].map({a: i for i, a in enumerate(AGGREGATIONS)})
    metric_order = {m: i for i, m in enumerate(dict.fromkeys(frame["metric"]))}
    frame["_m"] = frame["metric"].map(metric_order)
    frame = frame.sort_values(["_s", "_m", "_a", "_g"], kind="stable").drop(columns=["_s", "_g", "_a", "_m"])
    frame = frame.reset_index(drop=True)
    return frame.astype(
        {"value": np.float64, "n_genes": np.int64, "n_excluded": np.int64, "n_slides": np.int64, "n_spots": np.int64}
    )


def _per_gene_table(pooled: _UnitTable, slide: _UnitTable, genes: list[str], families: list[str]) -> pd.DataFrame:
    n = pooled.n[0]
    cols: dict[str, np.ndarray] = {}
    if "pcc" in families:
        cols["pcc"] = pooled.pcc[0]
        cols["pcc_mean_over_slides"] = _nanmean(slide.pcc, axis=0)
        cols["n_slides_pcc_defined"] = np.isfinite(slide.pcc).sum(axis=0)
    if "mse" in families:
        cols["mse"] = pooled.sse[0] / n
    if "mae" in families:
        cols["mae"] = pooled.sae[0] / n
    cols["var_true"] = pooled.var_t[0]
    cols["var_pred"] = pooled.var_p[0]
    if "rvd" in families:
        cols["rvd"] = pooled.rvd[0]
    if "ssc" in families:
        cols["morans_i_true"] = pooled.moran_t[0]
        cols["morans_i_pred"] = pooled.moran_p[0]
    if "wasserstein" in families:
        cols["wasserstein"] = pooled.w1g[0]
    return pd.DataFrame(cols, index=pd.Index(genes, name="gene"))


def _per_slide_table(
    slide: _UnitTable,
    names: list[str],
    groups: list[str],
    n_spots: np.ndarray,
    families: list[str],
    ks: list[int],
    n_genes: int,
) -> pd.DataFrame:
    cols: dict[str, Any] = {"group": groups, "n_spots": n_spots}
    all_cols = np.arange(n_genes)
    for metric in _metric_names(families, ks, n_genes):
        cols[metric] = _unit_metric(slide, metric, all_cols, 0, slide.n)[0]
    for metric, values in slide.extra.items():
        cols[metric] = values
    return pd.DataFrame(cols, index=pd.Index(names, name="slide"))
