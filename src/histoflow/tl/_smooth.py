"""Spatial smoothing of predictions: each spot's prediction averaged with its neighbours' on the spatial graph."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from histoflow._constants import Key
from histoflow._docs import doc_params
from histoflow._logging import logger
from histoflow._utils import copy_data, get_table, log_write
from histoflow._validate import check_obs_key, check_obsm_key
from histoflow.tl._evaluate import _dense_rows, _truth
from histoflow.tl._metrics import _check_connectivity, pcc, spatial_connectivity

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
    table.obsm[key] = frame
    log_write("obsm", key)
    if list(table.var_names) == [str(c) for c in frame.columns]:
        table.layers[key] = frame.to_numpy()
        log_write("layers", key)
    table.uns[key] = params
    log_write("uns", key)


def _blend(
    values: np.ndarray, neighbours: tuple[np.ndarray, np.ndarray], self_weight: float
) -> tuple[np.ndarray, np.ndarray]:
    """``values`` blended with :func:`neighbour_mean`'s output; and the rows changed (own and neighbour values)."""
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
    self_weight: float = 0.5,
    n_rings: int = 1,
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
    slightly lower GSC). :func:`~histoflow.tl.select_smoothing` chooses the weight and rings on validation slides.

    Parameters
    ----------
    {doc_sdata}
    pred_key
        ``obsm`` key of the predictions (a DataFrame, spots × genes, as every histoflow predictor writes it).
    self_weight
        Weight of the spot's own prediction, between 0 and 1 (1: unchanged; 0.5: the spot and its neighbours' mean
        count equally).
    n_rings
        Neighbours up to this many steps away on the graph count (1: the graph's neighbours; 2: also their
        neighbours), all with the same weight.
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
    are exactly the prediction's genes, and ``uns[key_added]`` (the source key, the weight and the graph); returns the
    copy when ``copy=True``. Nothing is written when an argument is wrong.
    """
    w = _check_weight(self_weight)
    rings = _check_rings(n_rings)
    key_added = f"{pred_key}_smoothed" if key_added is None else key_added
    if not isinstance(key_added, str) or not key_added:
        raise TypeError(f"`key_added` must be a non-empty string, got {key_added!r}.")
    adata = get_table(sdata, table_key)
    pred, values = _predictions(adata, pred_key)
    graph = {"library_key": library_key, "spatial_key": spatial_key, "coord_type": coord_type, "n_neighs": n_neighs}
    G = _graph(adata, connectivity_key, technology_key=technology_key, **graph)
    smoothed, use = _blend(values, neighbour_mean(values, G if rings == 1 else within_rings(G, rings)), w)
    dtype = np.float32 if (pred.dtypes == np.float32).all() else np.float64  # as the predictions were written
    frame = pd.DataFrame(smoothed.astype(dtype), index=pred.index.copy(), columns=pred.columns.copy())
    params = {
        "pred_key": pred_key,
        "self_weight": w,
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
    split: str = "val",
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
    """Choose the ``self_weight`` and ``n_rings`` of :func:`~histoflow.tl.smooth_predictions` on held-out slides.

    Every pair of ``self_weights`` × ``n_rings`` smooths ``obsm[pred_key]`` (over the whole table, slide by slide, as
    :func:`~histoflow.tl.smooth_predictions` does) and is scored on the ``split`` spots by PCC against
    ``layers[true_layer]`` (per gene over each slide's spots, mean over genes, then over slides:
    :func:`histoflow.tl.metrics.pcc`); the highest PCC is chosen (ties: the larger weight, then fewer rings). A weight
    of 1 (no smoothing) is a candidate whenever it is in ``self_weights``, so smoothing is chosen only when it helps
    there. Score on slides the model did not train on: with the validation slides of :func:`~histoflow.tl.fit_molf`
    (early stopping only), the choice does not look at the test slides. Not on slides a model trained on: there its
    predictions are fitted values, which averaging only blurs (the members of
    :func:`~histoflow.tl.fit_molf_ensemble` with ``rotate_validation=True`` train on each other's validation slides;
    on HER2ST the sweep then chose no smoothing, where the defaults added 0.006–0.009 to the ensemble's PCC). Use the
    chosen pair with :func:`~histoflow.tl.smooth_predictions`::

        sweep = hf.tl.select_smoothing(sdata, pred_key="molf")
        best = sweep[sweep["chosen"]].iloc[0]
        hf.tl.smooth_predictions(sdata, pred_key="molf", self_weight=best["self_weight"], n_rings=best["n_rings"])

    Parameters
    ----------
    {doc_sdata_only}
    pred_key
        ``obsm`` key of the predictions (a DataFrame whose columns are genes of the table).
    self_weights
        Weights of the spot's own prediction to try, each between 0 and 1.
    n_rings
        Neighbourhood sizes to try (see :func:`~histoflow.tl.smooth_predictions`).
    {doc_scored_split}
    {doc_table_key}
    library_key, spatial_key, coord_type, n_neighs, technology_key, connectivity_key
        The spatial graph, as in :func:`~histoflow.tl.smooth_predictions`.

    Returns
    -------
    The sweep (columns ``self_weight``, ``n_rings``, ``pcc``, ``chosen``; a weight of 1 appears once), also stored
    in ``uns[f"{pred_key}_smoothing"]`` with the chosen pair and the split.
    """
    weights = [_check_weight(w) for w in self_weights]
    rings = sorted({_check_rings(r) for r in n_rings})
    if not weights or not rings:
        raise ValueError("`self_weights` and `n_rings` need at least one value each.")
    adata = get_table(sdata, table_key)
    pred, values = _predictions(adata, pred_key)
    genes, predicted = [str(c) for c in pred.columns], np.isfinite(values).all(axis=1)
    rows, truth, groups = scored_spots(adata, genes, predicted, split, split_key, true_layer, library_key)
    graph = {"library_key": library_key, "spatial_key": spatial_key, "coord_type": coord_type, "n_neighs": n_neighs}
    G = _graph(adata, connectivity_key, technology_key=technology_key, **graph)
    records = []
    for r in rings:
        neighbours = neighbour_mean(values, G if r == 1 else within_rings(G, r))  # once per ring count
        for w in weights:
            if w == 1.0 and r != rings[0]:  # no smoothing: the same for every ring count
                continue
            smoothed, _ = _blend(values, neighbours, w)
            records.append({"self_weight": w, "n_rings": r, "pcc": pcc(truth, smoothed[rows], groups=groups)})
    sweep = pd.DataFrame(records)
    order = sweep.assign(neg_w=-sweep["self_weight"]).sort_values(
        ["pcc", "neg_w", "n_rings"], ascending=[False, True, True]
    )
    sweep["chosen"] = sweep.index == order.index[0]
    best = sweep.loc[order.index[0]]
    adata.uns[f"{pred_key}_smoothing"] = {
        "sweep": sweep,
        "self_weight": float(best["self_weight"]),
        "n_rings": int(best["n_rings"]),
        "split": split,
    }
    log_write("uns", f"{pred_key}_smoothing")
    logger.info("Smoothing chosen on %r: self_weight %.2f, n_rings %d.", split, best["self_weight"], best["n_rings"])
    return sweep
