"""Spatial smoothing of predictions: each spot's prediction averaged with its neighbours' on the spatial graph."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from histoflow._constants import Key
from histoflow._docs import doc_params
from histoflow._logging import logger
from histoflow._utils import copy_data, get_table, log_write
from histoflow._validate import check_obs_key, check_obsm_key, check_positive
from histoflow.tl._evaluate import _dense_rows, _truth
from histoflow.tl._metrics import (
    _check_connectivity,
    _group_index,
    _StructureScorer,
    morans_i,
    pcc,
    spatial_connectivity,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["smooth_predictions", "select_smoothing", "neighbour_mean", "within_rings", "scored_spots"]


def _check_weight(
    weight: Any,
    arg: str = "self_weight",
    meaning: str = " (1 keeps the predictions, 0 replaces each spot's by its neighbours' mean)",
) -> float:
    """A weight between 0 and 1 as a float; errors name ``arg`` and say what the ends mean."""
    if isinstance(weight, bool) or not isinstance(weight, int | float | np.integer | np.floating):
        raise TypeError(f"`{arg}` must be a number between 0 and 1, got {weight!r}.")
    w = float(weight)
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"`{arg}` must be between 0 and 1{meaning}, got {weight!r}.")
    return w


def _per_gene_weights(self_weight: Mapping[str, float] | pd.Series, genes: list[str]) -> np.ndarray:
    """Per-gene ``self_weight`` (a Series or mapping indexed by gene) as an array in ``genes``' order, checked."""
    weights = self_weight.copy() if isinstance(self_weight, pd.Series) else pd.Series(dict(self_weight))
    weights.index = weights.index.astype(str)  # on the copy: the caller's weights stay as they are
    if weights.index.duplicated().any():
        raise ValueError("`self_weight` names a gene twice; give one weight per gene.")
    missing = [g for g in genes if g not in weights.index]
    if missing:
        raise ValueError(
            f"`self_weight` has no weight for {len(missing)} predicted gene(s) ({missing[:5]}); give one per gene of "
            "the predictions, or one number for every gene."
        )
    try:
        out = weights.loc[genes].to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"`self_weight` must hold numbers between 0 and 1 (one per gene): {err}") from None
    if not np.isfinite(out).all() or (out < 0).any() or (out > 1).any():
        raise ValueError(
            "`self_weight` must hold numbers between 0 and 1 (1 keeps a gene's predictions, 0 replaces them by the "
            "neighbours' mean); found one outside."
        )
    return out


def within_rings(connectivity: sp.spmatrix, n_rings: int) -> sp.csr_matrix:
    """Binary graph joining every spot to the spots at most ``n_rings`` steps away on ``connectivity`` (not itself).

    One ring is the graph's own neighbours; two add the neighbours' neighbours (12 spots on a square ST grid, 18 on
    a hexagonal Visium one), as squidpy's ``n_rings``. No step leaves a slide when no edge does.
    """
    A = sp.csr_matrix(connectivity, dtype=np.float64, copy=True)  # never the caller's graph
    A.eliminate_zeros()
    A.data[:] = 1.0
    step = (A + sp.identity(A.shape[0], format="csr")).tocsr()
    reach = step
    for _ in range(n_rings - 1):
        reach = (reach @ step).tocsr()
    reach.setdiag(0)
    reach.eliminate_zeros()
    reach.data[:] = 1.0
    return reach


def neighbour_mean(values: np.ndarray, connectivity: sp.spmatrix) -> tuple[np.ndarray, np.ndarray]:
    """Mean of each spot's neighbours' rows of ``values`` over the neighbours that have a value (a finite row).

    Returns the means (spots × columns, float64; rows without such a neighbour are 0) and the summed edge weights of
    those neighbours (their number for the binary graph of :func:`~histoflow.tl.metrics.spatial_connectivity`); with
    other weights the mean is the weighted one.
    """
    A = sp.csr_matrix(connectivity, dtype=np.float64)
    has = np.isfinite(values).all(axis=1)
    V = np.where(has[:, None], values, 0.0).astype(np.float64)
    count = np.asarray(A @ has.astype(np.float64)).ravel()
    total = np.asarray(A @ V)
    return np.divide(total, count[:, None], out=np.zeros_like(total), where=count[:, None] > 0), count


def _check_rings(n_rings: Any) -> int:
    if isinstance(n_rings, bool) or not isinstance(n_rings, int | np.integer) or n_rings < 1:
        raise ValueError(f"`n_rings` must be a positive integer (1: the graph's neighbours), got {n_rings!r}.")
    return int(n_rings)


def _is_sequence(value: Any) -> bool:
    return isinstance(value, Sequence | np.ndarray) and not isinstance(value, str)


def _check_spread(spread: Any, arg: str = "spread") -> float:
    """A gene-wise spread: a finite number of at least 0 (0: the same weight for every gene)."""
    if isinstance(spread, bool) or not isinstance(spread, int | float | np.integer | np.floating):
        raise TypeError(f"`{arg}` must be a number of at least 0 (0: the same weight for every gene), got {spread!r}.")
    if not np.isfinite(spread) or spread < 0:
        raise ValueError(
            f"`{arg}` must be a finite number of at least 0 (0: the same weight for every gene), got {spread!r}."
        )
    return float(spread)


def _check_spreads(spreads: Any) -> list[float]:
    """``spreads`` as sorted distinct floats, each finite and at least 0."""
    if not _is_sequence(spreads) or len(spreads) == 0:
        raise ValueError(f"`spreads` must be a non-empty sequence of numbers of at least 0, got {spreads!r}.")
    out = set()
    for v in spreads:
        if isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating):
            raise TypeError(f"`spreads` must hold numbers (0: one weight for every gene), got {v!r}.")
        if not np.isfinite(v) or v < 0:
            raise ValueError(
                f"`spreads` must hold finite numbers of at least 0 (0: one weight for every gene), got {v!r}."
            )
        out.add(float(v))
    return sorted(out)


def _spread_weights(weight: float, spread: float, rank: np.ndarray) -> np.ndarray:
    """Gene-wise weights ``clip(weight + spread × (rank − 1/2), 0, 1)``."""
    return np.clip(weight + spread * (rank - 0.5), 0.0, 1.0)


def _structure_rank(
    adata: AnnData,
    genes: list[str],
    split: Any,
    split_key: str,
    true_layer: str | None,
    library_key: str | None,
    *,
    graph: dict[str, Any] | None = None,
    connectivity: sp.spmatrix | None = None,
) -> pd.DataFrame:
    """Each gene's Moran's I on the ``split`` spots (each slide's graph, mean over slides) and its rank in [0, 1].

    The graph: ``connectivity`` (the whole table's) restricted to those spots, or else
    :func:`~histoflow.tl.metrics.spatial_connectivity` of those spots with ``graph``'s arguments. The rank is the
    gene's quantile among the genes with a Moran's I (ties share the mean rank): 0 for the least spatially
    structured, 1 for the most; genes without one (constant on every slide) get 0.5.
    """
    if not isinstance(split, str) or not split:
        raise TypeError(f"`structure_split` must be a non-empty string (a value of `obs[split_key]`), got {split!r}.")
    check_obs_key(adata, split_key, "split_key", hint="Mark the splits with `histoflow.pp.split_slides`.")
    on = adata.obs[split_key].astype(str).to_numpy() == split
    if on.sum() < 3:
        raise ValueError(
            f"{int(on.sum())} spot(s) have `obs[{split_key!r}] == {split!r}`; gene-wise weights (a spread above 0) "
            "rank the genes by their spatial structure there and need at least 3. Choose another `structure_split=` "
            "(e.g. the slides the models trained on), or use a spread of 0."
        )
    rows, truth, groups = scored_spots(adata, genes, on, split, split_key, true_layer, library_key)
    if connectivity is not None:
        W = sp.csr_matrix(connectivity)[rows][:, rows]
    else:
        W = spatial_connectivity(adata[rows], library_key=library_key, **(graph or {}))
    _, index = _group_index(groups, rows.size)
    per_slide = np.array([morans_i(truth[i], W[i][:, i]) for i in index])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a gene constant on every slide: NaN
        mi = np.nanmean(per_slide, axis=0)
    rank = np.full(len(genes), 0.5)
    ok = np.isfinite(mi)
    if ok.sum() >= 2:
        rank[ok] = (pd.Series(mi[ok]).rank(method="average").to_numpy() - 1.0) / (ok.sum() - 1.0)
    return pd.DataFrame({"morans_i": mi, "rank": rank}, index=pd.Index(genes, name="gene"))


def _predictions(adata: AnnData, pred_key: Any, arg: str = "pred_key") -> tuple[pd.DataFrame, np.ndarray]:
    """``obsm[pred_key]`` checked (a DataFrame of numbers, no infinities) and its values as float64.

    Errors name the argument ``arg``.
    """
    if not isinstance(pred_key, str):
        raise TypeError(f"`{arg}` must be an `obsm` key (a string), got {pred_key!r}.")
    check_obsm_key(adata, pred_key, arg, hint="Predict first (e.g. `histoflow.tl.predict`).")
    pred = adata.obsm[pred_key]
    if not isinstance(pred, pd.DataFrame):
        raise TypeError(
            f"`obsm[{pred_key!r}]` must be a DataFrame of predictions (columns = genes, index = obs_names), as "
            f"histoflow's predictors write it; got {type(pred).__name__}."
        )
    try:
        values = pred.to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"`obsm[{pred_key!r}]` must hold numbers (predicted expression): {err}") from None
    if np.isinf(values).any():
        raise ValueError(f"`obsm[{pred_key!r}]` holds infinite values; predictions must be finite (or NaN: none).")
    return pred, values


def scored_spots(
    adata: AnnData,
    genes: list[str],
    predicted: np.ndarray,
    split: str,
    split_key: str,
    true_layer: str | None,
    library_key: str | None,
    min_spots: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The spots a selection scores, their measured expression and their slides.

    The spots: ``obs[split_key] == split`` among the ``predicted`` ones (fewer than ``min_spots`` raise); their
    expression of ``genes`` dense, checked as :func:`~histoflow.tl.evaluate` checks it; their slides ``None``
    without ``library_key``.
    """
    X = _truth(adata, true_layer, genes)  # the same checks as tl.evaluate
    check_obs_key(adata, split_key, "split_key", hint="Mark the splits with `histoflow.pp.split_slides`.")
    rows = np.flatnonzero((adata.obs[split_key].astype(str).to_numpy() == split) & predicted)
    if rows.size < min_spots:
        raise ValueError(
            f"{rows.size} spot(s) with predictions have `obs[{split_key!r}] == {split!r}`; at least {min_spots} "
            "needed. Predict those spots, or choose another `split=`."
        )
    groups = None
    if library_key is not None:
        check_obs_key(adata, library_key, "library_key", hint="Pass `library_key=None` for a single slide.")
        groups = adata.obs[library_key].astype(str).to_numpy()[rows]
    return rows, _dense_rows(X, rows), groups


def _graph(adata: AnnData, connectivity_key: str | None, **graph: Any) -> sp.csr_matrix:
    """``obsp[connectivity_key]`` (checked), or the graph of :func:`~histoflow.tl.metrics.spatial_connectivity`."""
    if connectivity_key is None:
        return spatial_connectivity(adata, **graph)
    if connectivity_key not in adata.obsp:
        raise KeyError(
            f"`connectivity_key={connectivity_key!r}` is not in `adata.obsp` (keys: {list(adata.obsp)}); build "
            "the graph with `squidpy.gr.spatial_neighbors`, or pass `connectivity_key=None` to build one here."
        )
    return _check_connectivity(adata.obsp[connectivity_key], adata.n_obs, f"obsp[{connectivity_key!r}]")


def _write(table: AnnData, key: str, frame: pd.DataFrame, params: dict[str, Any]) -> None:
    """Write post-processed predictions into ``table``.

    ``obsm[key]``, ``layers[key]`` when the table's var names are the frame's genes, and ``uns[key] = params``
    (without None values: h5ad cannot store them).
    """
    frame.index = table.obs_names.view()  # the same names; a view keeps each `table.obsm` access fast (_write.py)
    table.obsm[key] = frame
    log_write("obsm", key)
    if list(table.var_names) == [str(c) for c in frame.columns]:
        table.layers[key] = frame.to_numpy()
        log_write("layers", key)
    table.uns[key] = params
    log_write("uns", key)


def _blend(
    values: np.ndarray, neighbours: tuple[np.ndarray, np.ndarray], self_weight: float | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``values`` blended with :func:`neighbour_mean`'s output; and the rows changed (own and neighbour values).

    ``self_weight``: one number, or one per column.
    """
    nb, count = neighbours
    use = (count > 0) & np.isfinite(values).all(axis=1)
    out = values.copy()
    out[use] = self_weight * values[use] + (1.0 - self_weight) * nb[use]
    return out, use


@doc_params()
def smooth_predictions(
    sdata: SpatialData | AnnData,
    *,
    pred_key: str = "molf",
    self_weight: float | Mapping[str, float] | pd.Series = 0.5,
    n_rings: int = 1,
    spread: float = 0.0,
    structure_split: str = "train",
    split_key: str = Key.split,
    true_layer: str | None = Key.log1p,
    table_key: str = Key.table,
    library_key: str | None = Key.library,
    spatial_key: str = Key.spatial,
    coord_type: Literal["grid", "generic"] | None = None,
    n_neighs: int | None = None,
    technology_key: str = Key.technology,
    connectivity_key: str | None = None,
    key_added: str | None = None,
    copy: bool = False,
) -> SpatialData | AnnData | None:
    """Average each spot's predicted expression with the mean of its spatial neighbours' predictions.

    ``smoothed = self_weight × prediction + (1 − self_weight) × mean of the neighbours' predictions``, on the spatial
    graph of :func:`histoflow.tl.metrics.spatial_connectivity` (squidpy's grid graph for Visium, 6 neighbours, and
    legacy ST, 4; kNN with 6 neighbours otherwise; no edge joins two slides). Neighbours without a prediction (rows of
    ``NaN``, e.g. spots left out of ``tl.predict``) are left out of the mean; a spot with no predicted neighbour keeps
    its prediction, and a spot without a prediction stays without one. Only predictions are averaged, never measured
    expression, so nothing of a held-out slide's truth enters.

    A prediction from the patch under a spot (and its window) makes errors that neighbouring spots do not share, while
    expression itself varies smoothly over a few spots: averaging with the neighbours removes part of the errors and
    little of the signal. On HER2ST (benchmarks page, *Averaging with the neighbours*) one MoLF model scored a PCC
    0.013–0.016 higher smoothed with the defaults; the predictions are smoother in space, so genes differ less in
    their spatial autocorrelation (a lower SSC) and their correlations lean toward the common spatial pattern (a
    slightly lower GSC). :func:`~histoflow.tl.select_smoothing` chooses the weight, rings and spread on validation
    slides.

    **Gene-wise weights** (``spread`` above 0): gene ``g`` keeps the weight
    ``w_g = clip(self_weight − spread × (r_g − 1/2), 0, 1)``, where ``r_g`` ranks the genes by their spatial
    structure in the measured expression of the ``structure_split`` spots (Moran's I on each slide's spatial graph,
    mean over slides; 0 for the least structured gene of the panel, 1 for the most). Genes that vary in broad
    spatial patterns are averaged more with their neighbours, genes that vary from spot to spot less, so each gene's
    prediction stays about as patterned as the gene tends to be, where one weight for every gene makes all of them
    alike (the measured expression only orders the genes; nothing is fitted to it). On HER2ST (benchmarks page,
    *Gene-wise smoothing*) one MoLF model smoothed with ``self_weight=0.7, spread=1`` scored PCC 0.315–0.323 and SSC
    0.76–0.77 over three seeds, against 0.318–0.327 and 0.44–0.50 with the default single weight. To smooth a slide
    without measured expression the same way, pass the weights a former call stored,
    ``self_weight=uns[key_added]["gene_weights"]["self_weight"]``: ``self_weight`` may also be a Series (or mapping)
    of one weight per predicted gene.

    Parameters
    ----------
    {doc_sdata}
    pred_key
        ``obsm`` key of the predictions (a DataFrame, spots × genes, as every histoflow predictor writes it).
    self_weight
        Weight of the spot's own prediction, between 0 and 1 (1: unchanged; 0.5: the spot and its neighbours' mean
        count equally); or one such weight per predicted gene (a Series or mapping indexed by gene, with
        ``spread=0``).
    n_rings
        Neighbours up to this many steps away on the graph count (1: the graph's neighbours; 2: also their
        neighbours), all with the same weight.
    spread
        Spread of the gene-wise weights (see above), at least 0; 0: ``self_weight`` for every gene.
    structure_split
        With a spread above 0: which ``obs[split_key]`` spots rank the genes by spatial structure (their measured
        expression in ``true_layer``; by default the training slides).
    split_key
        ``obs`` column with the split (used only with a spread above 0).
    true_layer
        Layer of the measured expression (used only with a spread above 0; ``None``: ``X``).
    library_key
        ``obs`` column naming the slide of each spot (no edge between slides); ``None``: one slide.
    spatial_key
        ``obsm`` key of the spot centres.
    coord_type
        ``"grid"`` or ``"generic"`` (kNN) for every slide; ``None`` chooses per slide from ``obs[technology_key]``.
    n_neighs
        Neighbours per spot (grid ring size or k); ``None``: the technology's.
    technology_key
        ``obs`` column with the technology.
    connectivity_key
        ``obsp`` key of a spatial graph to use instead, e.g. ``"spatial_connectivities"`` from
        :func:`squidpy.gr.spatial_neighbors` (then ``library_key``, ``spatial_key``, ``coord_type``, ``n_neighs`` and
        ``technology_key`` are not used). With ``n_rings=1`` edge weights weight the neighbours' mean. The graph
        should not join slides.
    key_added
        Key of the smoothed predictions; default ``f"{pred_key}_smoothed"``.
    {doc_copy}

    Returns
    -------
    Writes ``obsm[key_added]`` (a DataFrame like ``obsm[pred_key]``), ``layers[key_added]`` when the table's var names
    are exactly the prediction's genes, and ``uns[key_added]`` (the source key, the weight, the spread and the graph;
    for gene-wise weights also ``gene_weights``, a DataFrame of each gene's ``self_weight`` and, with a spread, its
    ``morans_i`` and ``rank``); returns the copy when ``copy=True``. Nothing is written when an argument is wrong.
    """
    w = None if isinstance(self_weight, Mapping | pd.Series) else _check_weight(self_weight)
    spread = _check_spread(spread)
    if w is None and spread > 0:
        raise ValueError(
            "`self_weight` gives one weight per gene and `spread` is above 0; gene-wise weights come from one or the "
            "other: pass `spread=0` with per-gene weights, or one number as `self_weight` with a spread."
        )
    rings = _check_rings(n_rings)
    key_added = f"{pred_key}_smoothed" if key_added is None else key_added
    if not isinstance(key_added, str) or not key_added:
        raise TypeError(f"`key_added` must be a non-empty string, got {key_added!r}.")
    adata = get_table(sdata, table_key)
    pred, values = _predictions(adata, pred_key)
    graph = {"library_key": library_key, "spatial_key": spatial_key, "coord_type": coord_type, "n_neighs": n_neighs}
    G = _graph(adata, connectivity_key, technology_key=technology_key, **graph)
    genes = [str(c) for c in pred.columns]
    gene_weights = None
    if w is None:  # one weight per gene, given
        gene_weights = pd.DataFrame({"self_weight": _per_gene_weights(self_weight, genes)}, index=pd.Index(genes))
    elif spread > 0:  # one weight per gene, from the genes' spatial structure on the structure_split spots
        gene_weights = _structure_rank(
            adata, genes, structure_split, split_key, true_layer, library_key, connectivity=G
        )
        gene_weights.insert(0, "self_weight", _spread_weights(w, -spread, gene_weights["rank"].to_numpy()))
    weight = w if gene_weights is None else gene_weights["self_weight"].to_numpy()
    smoothed, use = _blend(values, neighbour_mean(values, G if rings == 1 else within_rings(G, rings)), weight)
    dtype = np.float32 if (pred.dtypes == np.float32).all() else np.float64  # as the predictions were written
    frame = pd.DataFrame(smoothed.astype(dtype), index=pred.index, columns=pred.columns.copy())  # _write sets the index
    params = {
        "pred_key": pred_key,
        "self_weight": w,
        "spread": spread,
        "gene_weights": gene_weights,
        "structure_split": structure_split if w is not None and spread > 0 else None,
        "n_rings": rings,
        "coord_type": coord_type,
        "n_neighs": n_neighs,
        "library_key": library_key,
        "connectivity_key": connectivity_key,
        "n_smoothed": int(use.sum()),
    }
    target = copy_data(sdata, table_key) if copy else sdata
    _write(get_table(target, table_key), key_added, frame, {k: v for k, v in params.items() if v is not None})
    return target if copy else None


#: Weights and ring counts that :func:`~histoflow.tl.select_smoothing` sweeps by default (weight 1: no smoothing).
SELF_WEIGHTS = (1.0, 0.7, 0.6, 0.5, 0.4, 0.3)
RINGS = (1, 2, 3)


@doc_params()
def select_smoothing(
    sdata: SpatialData | AnnData,
    *,
    pred_key: str = "molf",
    self_weights: Sequence[float] = SELF_WEIGHTS,
    n_rings: Sequence[int] = RINGS,
    spreads: Sequence[float] = (0.0,),
    tolerance: float = 0.0,
    split: str = "val",
    structure_split: str = "train",
    split_key: str = Key.split,
    true_layer: str | None = Key.log1p,
    table_key: str = Key.table,
    library_key: str | None = Key.library,
    spatial_key: str = Key.spatial,
    coord_type: Literal["grid", "generic"] | None = None,
    n_neighs: int | None = None,
    technology_key: str = Key.technology,
    connectivity_key: str | None = None,
) -> pd.DataFrame:
    """Choose the weight, rings and spread of :func:`~histoflow.tl.smooth_predictions` on held-out slides.

    Every combination of ``self_weights`` × ``n_rings`` × ``spreads`` smooths ``obsm[pred_key]`` (over the whole
    table, slide by slide, as :func:`~histoflow.tl.smooth_predictions` does) and is scored on the ``split`` spots
    against ``layers[true_layer]`` with the metrics of :func:`~histoflow.tl.evaluate` on each slide, mean over slides:
    PCC (per gene over the slide's spots, mean over genes: :func:`histoflow.tl.metrics.pcc`), GSC and SSC (on the
    smoothing's spatial graph), and their mean, ``structure``. Filter and rank, as :func:`~histoflow.tl.select_blend`
    does: keep the combinations whose PCC is at most ``tolerance`` below the best, then choose the one with the most
    structure (ties: the larger weight, then fewer rings, then the smaller spread). With the defaults
    (``tolerance=0``, one weight for every gene) that is the highest PCC. A weight of 1 (no smoothing) is a candidate
    whenever it is in ``self_weights``, so smoothing is chosen only when it helps there. With ``spreads`` above 0
    (gene-wise weights: the genes ranked by their Moran's I on the ``structure_split`` slides) and a tolerance, the
    choice can give up a little PCC for spatial structure: smoothing makes every gene's prediction smooth in space,
    gene-wise weights keep the genes that vary from spot to spot less smooth (on HER2ST, ``spreads=(0, 0.5, 1, 1.5)``
    with ``tolerance=0.01`` gave one early-stopped MoLF model a test SSC of 0.80–0.81 instead of 0.42–0.51 for 0.004
    to 0.006 of its PCC; benchmarks page, *Gene-wise smoothing*). Score on slides the model did not
    train on: with the validation slides of :func:`~histoflow.tl.fit_molf` (early stopping only), the choice does not
    look at the test slides. Not on slides a model trained on: there its predictions are fitted values, which
    averaging only blurs (the members of
    :func:`~histoflow.tl.fit_molf_ensemble` with ``rotate_validation=True`` train on each other's validation slides;
    on HER2ST the sweep then chose no smoothing, where the defaults added 0.006–0.009 to the ensemble's PCC). Apply
    the choice with :func:`~histoflow.tl.smooth_predictions`::

        hf.tl.select_smoothing(sdata, pred_key="molf", spreads=(0, 0.5, 1, 1.5), tolerance=0.005)
        best = sdata["table"].uns["molf_smoothing"]
        hf.tl.smooth_predictions(
            sdata, pred_key="molf", self_weight=best["self_weight"], n_rings=best["n_rings"], spread=best["spread"]
        )

    Parameters
    ----------
    {doc_sdata_only}
    pred_key
        ``obsm`` key of the predictions (a DataFrame whose columns are genes of the table).
    self_weights
        Weights of the spot's own prediction to try, each between 0 and 1.
    n_rings
        Neighbourhood sizes to try (see :func:`~histoflow.tl.smooth_predictions`).
    spreads
        Spreads of the gene-wise weights to try, each at least 0; ``(0,)``: one weight for every gene. Try e.g.
        ``(0, 0.5, 1, 1.5)`` with a tolerance.
    tolerance
        How much validation PCC (an absolute difference, ≥ 0) the choice may give up for structure.
    {doc_scored_split}
    structure_split
        Which ``obs[split_key]`` spots rank the genes by spatial structure when a spread is above 0 (their measured
        expression in ``true_layer``; by default the training slides).
    {doc_table_key}
    library_key, spatial_key, coord_type, n_neighs, technology_key, connectivity_key
        The spatial graph, as in :func:`~histoflow.tl.smooth_predictions`.

    Returns
    -------
    The sweep (columns ``self_weight``, ``n_rings``, ``spread``, ``pcc``, ``gsc``, ``ssc``, ``structure``,
    ``chosen``; no smoothing, a weight of 1 with spread 0, appears once), also stored in
    ``uns[f"{pred_key}_smoothing"]`` with the chosen ``self_weight``, ``n_rings`` and ``spread``, the ``tolerance``
    and the split; with a spread above 0 also ``structure_split`` and ``gene_structure`` (each gene's Moran's I and
    rank). Nothing is written when an argument is wrong.
    """
    weights = [_check_weight(w) for w in self_weights]
    rings = sorted({_check_rings(r) for r in n_rings})
    if not weights or not rings:
        raise ValueError("`self_weights` and `n_rings` need at least one value each.")
    spread_list = _check_spreads(spreads)
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float | np.integer | np.floating):
        raise TypeError(f"`tolerance` must be a number of at least 0 (PCC the choice may give up), got {tolerance!r}.")
    check_positive(tolerance, "tolerance", allow_zero=True)
    adata = get_table(sdata, table_key)
    pred, values = _predictions(adata, pred_key)
    genes, predicted = [str(c) for c in pred.columns], np.isfinite(values).all(axis=1)
    rows, truth, groups = scored_spots(adata, genes, predicted, split, split_key, true_layer, library_key)
    graph = {"library_key": library_key, "spatial_key": spatial_key, "coord_type": coord_type, "n_neighs": n_neighs}
    G = _graph(adata, connectivity_key, technology_key=technology_key, **graph)
    score = _StructureScorer(truth, groups, G[rows][:, rows])  # GSC and SSC (on the smoothing's graph)
    ranks = None
    if any(spread > 0 for spread in spread_list):  # gene-wise weights: the genes' spatial structure
        ranks = _structure_rank(adata, genes, structure_split, split_key, true_layer, library_key, connectivity=G)
    records = []
    for r in rings:
        nb, count = neighbour_mean(values, G if r == 1 else within_rings(G, r))  # once per ring count
        scored = (values[rows], (nb[rows], count[rows]))  # _blend is row by row: only the scored spots
        for spread in spread_list:
            for w in weights:
                if w == 1.0 and spread == 0 and r != rings[0]:  # no smoothing: the same for every ring count
                    continue
                wg = w if spread == 0 else _spread_weights(w, -spread, ranks["rank"].to_numpy())
                smoothed = _blend(*scored, wg)[0]
                g, s_ = score(smoothed)
                records.append({
                    "self_weight": w, "n_rings": r, "spread": spread, "pcc": pcc(truth, smoothed, groups=groups),
                    "gsc": g, "ssc": s_,
                })  # fmt: skip
    sweep = pd.DataFrame(records)
    sweep["structure"] = sweep[["gsc", "ssc"]].mean(axis=1, skipna=False)
    if not np.isfinite(sweep["pcc"]).any():
        raise ValueError(f"PCC is undefined for every smoothing on the {split!r} spots (no gene varies there).")
    feasible = sweep[sweep["pcc"] >= sweep["pcc"].max() - float(tolerance)]
    order = feasible.assign(rank=feasible["structure"].fillna(-np.inf), neg_w=-feasible["self_weight"]).sort_values(
        ["rank", "neg_w", "n_rings", "spread"], ascending=[False, True, True, True]
    )
    sweep["chosen"] = sweep.index == order.index[0]
    best = sweep.loc[order.index[0]]
    record = {
        "sweep": sweep,
        "self_weight": float(best["self_weight"]),
        "n_rings": int(best["n_rings"]),
        "spread": float(best["spread"]),
        "tolerance": float(tolerance),
        "split": split,
    }
    if ranks is not None:
        record["structure_split"] = structure_split
        record["gene_structure"] = ranks
    adata.uns[f"{pred_key}_smoothing"] = record
    log_write("uns", f"{pred_key}_smoothing")
    logger.info(
        "Smoothing chosen on %r: self_weight %.2f, n_rings %d, spread %.2g.",
        split, best["self_weight"], best["n_rings"], best["spread"],
    )  # fmt: skip
    return sweep
