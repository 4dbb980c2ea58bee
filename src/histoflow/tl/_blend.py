"""Blending predictions: a weighted mean of several models' predicted expression, spot by spot and gene by gene."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from histoflow._constants import Key
from histoflow._docs import doc_params
from histoflow._logging import logger
from histoflow._utils import copy_data, get_table, log_write
from histoflow._validate import check_positive
from histoflow.tl._metrics import _StructureScorer, pcc, spatial_connectivity
from histoflow.tl._smooth import (
    _check_spreads,
    _check_weight,
    _is_sequence,
    _predictions,
    _spread_weights,
    _structure_rank,
    _write,
    scored_spots,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["blend_predictions", "select_blend"]

#: Weights of the first prediction tried by :func:`select_blend` (1: that prediction alone, 0: the other alone).
BLEND_WEIGHTS: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)
#: Spreads of the gene-wise weights tried by :func:`select_blend` (0: the same weight for every gene).
BLEND_SPREADS: tuple[float, ...] = (0.0,)


def _check_weights(weights: Any) -> dict[str, float] | pd.DataFrame:
    """``weights`` checked and normalised (non-negative, at least one positive per gene).

    A mapping of ``obsm`` keys to numbers (normalised to sum to 1), or a genes × keys DataFrame (each gene's row
    normalised to sum to 1).
    """
    if isinstance(weights, pd.DataFrame):
        return _check_gene_weights(weights)
    if not isinstance(weights, Mapping) or not weights:
        raise TypeError(
            "`weights` must be a non-empty mapping of `obsm` keys to weights, e.g. `{'molf': 0.5, 'ridge': 0.5}`, "
            f"or a genes × keys DataFrame of gene-wise weights; got {weights!r}."
        )
    out = {}
    for key, w in weights.items():
        if not isinstance(key, str):
            raise TypeError(f"`weights` keys must be `obsm` keys (strings), got {key!r}.")
        if isinstance(w, bool) or not isinstance(w, int | float | np.integer | np.floating):
            raise TypeError(f"`weights[{key!r}]` must be a number, got {w!r}.")
        if not np.isfinite(w) or w < 0:
            raise ValueError(f"`weights[{key!r}]` must be a finite number of at least 0, got {w!r}.")
        out[key] = float(w)
    total = sum(out.values())
    if total == 0:
        raise ValueError("`weights` are all 0; give at least one prediction a positive weight.")
    return {k: w / total for k, w in out.items()}


def _check_gene_weights(weights: pd.DataFrame) -> pd.DataFrame:
    """A genes × keys DataFrame of weights, checked, each row normalised to sum to 1."""
    if weights.shape[0] == 0 or weights.shape[1] == 0:
        raise ValueError(
            f"`weights` must have at least one gene (row) and one `obsm` key (column), got {weights.shape}."
        )
    bad = [c for c in weights.columns if not isinstance(c, str)]
    if bad:
        raise TypeError(f"`weights` columns must be `obsm` keys (strings), got {bad[:3]}.")
    if weights.columns.duplicated().any() or weights.index.astype(str).duplicated().any():
        raise ValueError("`weights` has a repeated column or gene; give each `obsm` key and each gene once.")
    try:
        values = weights.to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"`weights` must hold numbers; {err}") from None
    if not np.isfinite(values).all() or (values < 0).any():
        raise ValueError("`weights` must hold finite numbers of at least 0 (found NaN, inf or a negative weight).")
    total = values.sum(axis=1, keepdims=True)
    if (total == 0).any():
        zero = weights.index[total[:, 0] == 0].astype(str).tolist()
        raise ValueError(f"`weights` are all 0 for gene(s) {zero[:5]}; give each gene a positive weight somewhere.")
    return pd.DataFrame(values / total, index=weights.index.astype(str), columns=list(weights.columns))


def _gene_weights(w: dict[str, float] | pd.DataFrame, key: str, genes: list[str]) -> float | np.ndarray:
    """The weight of ``obsm[key]`` for each of ``genes`` (a number when the weights are the same for every gene)."""
    if isinstance(w, dict):
        return w[key]
    missing = [g for g in genes if g not in w.index]
    if missing:
        raise ValueError(
            f"`weights` has no row for {len(missing)} predicted gene(s) ({missing[:5]}); give a weight for every gene "
            "of the predictions."
        )
    return w.loc[genes, key].to_numpy()


def _warn_off_scale(adata: AnnData, key: str) -> None:
    """Warn when ``obsm[key]`` comes from the ridge probe without intercept (centred near 0, not on log1p's scale)."""
    info = adata.uns.get(key)
    if not isinstance(info, Mapping) or info.get("kind") != "ridge":
        return
    params = info.get("params")
    if isinstance(params, Mapping) and not params.get("fit_intercept", False):
        warnings.warn(
            f"`obsm[{key!r}]` comes from the ridge probe without intercept: its predictions are centred near 0, "
            "not on the other predictions' scale, so the blend's values are shifted (its correlations are not). "
            f"Refit it with `histoflow.tl.fit_baseline(..., kind='ridge', fit_intercept=True)`.",
            UserWarning,
            stacklevel=3,
        )


def _aligned(adata: AnnData, keys: Mapping[str, str]) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The predictions ``obsm[k]`` of the keys ``k`` of ``keys``, as float64 arrays in the first's gene order.

    All are checked first, errors naming the argument ``keys[k]``; the first is returned as a DataFrame too.
    """
    preds = {key: _predictions(adata, key, arg) for key, arg in keys.items()}  # every one checked before computing
    keys = list(keys)
    first = preds[keys[0]][0]
    genes = [str(c) for c in first.columns]
    out = {}
    for key, (pred, values) in preds.items():
        columns = [str(c) for c in pred.columns]
        if set(columns) != set(genes) or len(columns) != len(genes):
            missing, extra = sorted(set(genes) - set(columns)), sorted(set(columns) - set(genes))
            raise ValueError(
                f"`obsm[{key!r}]` predicts other genes than `obsm[{keys[0]!r}]` (missing: {missing[:5]}, "
                f"extra: {extra[:5]}); blend predictions of the same genes, e.g. by predicting the same panel."
            )
        out[key] = values[:, pd.Index(columns).get_indexer(genes)]
    return first, out


@doc_params()
def blend_predictions(
    sdata: SpatialData | AnnData,
    weights: Mapping[str, float],
    *,
    table_key: str = Key.table,
    key_added: str = "blend",
    copy: bool = False,
) -> SpatialData | AnnData | None:
    """Blend several predictions of the same genes: their weighted mean, spot by spot and gene by gene.

    ``blend = Σ_k w_k × obsm[k] / Σ_k w_k`` for the keys ``k`` of ``weights``, e.g. MoLF's predictions with the ridge
    probe's (:func:`~histoflow.tl.fit_baseline` with ``fit_intercept=True``, so both are on the log1p scale). Models
    that see the image differently make different errors, and their mean keeps what they share. On HER2ST (benchmarks
    page, *MoLF with the ridge probe*) one smoothed MoLF model blended half and half with the ridge probe kept its PCC
    (0.318–0.322 over three seeds) and raised the gene–gene (GSC) and spatial (SSC) structure of its predictions most
    of the way to the probe's (GSC 0.49–0.51 → 0.65–0.66, SSC 0.44–0.50 → 0.74; the probe alone 0.72 and 0.81), since
    MoLF decodes every gene from one latent and its predictions vary in few directions of gene space, while the probe
    fits each gene on its own; with MoLF's weight at 0.7 the blend's PCC rose above the model's alone (+0.004 to
    +0.007). :func:`~histoflow.tl.select_blend` chooses the weights of two predictions on validation slides. A spot
    gets a blend only where every prediction has a value; elsewhere it is ``NaN``.
    Blend before or after :func:`~histoflow.tl.smooth_predictions`, which is linear too.

    Parameters
    ----------
    {doc_sdata}
    weights
        ``obsm`` keys of the predictions (DataFrames, spots × genes, as every histoflow predictor writes them) and
        their weights, non-negative numbers normalised to sum to 1, e.g. ``{"molf": 0.5, "ridge": 0.5}``; or
        gene-wise weights, a DataFrame with one row per gene and one column per ``obsm`` key (each row normalised to
        sum to 1), such as the ``weights`` that :func:`~histoflow.tl.select_blend` stores with ``spreads``. Every
        prediction must hold the same genes (in any order; the blend keeps the first's order).
    key_added
        Key of the blend.
    {doc_copy}

    Returns
    -------
    Writes ``obsm[key_added]`` (a DataFrame like the first prediction), ``layers[key_added]`` when the table's var
    names are exactly those genes, and ``uns[key_added]`` (the normalised weights, a DataFrame in the blend's gene
    order for gene-wise weights, and the number of spots blended);
    returns the copy when ``copy=True``. Nothing is written when an argument is wrong. Warns when a prediction comes
    from the ridge probe without intercept, whose values are centred near 0.
    """
    w = _check_weights(weights)
    if not isinstance(key_added, str) or not key_added:
        raise TypeError(f"`key_added` must be a non-empty string, got {key_added!r}.")
    adata = get_table(sdata, table_key)
    first, aligned = _aligned(adata, dict.fromkeys(w, "pred_key"))
    genes = [str(c) for c in first.columns]
    total = sum(_gene_weights(w, key, genes) * values for key, values in aligned.items())  # NaN anywhere: NaN
    for key in w:
        _warn_off_scale(adata, key)
    dtype = np.float32 if (first.dtypes == np.float32).all() else np.float64
    frame = pd.DataFrame(total.astype(dtype), index=first.index, columns=first.columns.copy())  # _write sets the index
    if isinstance(w, pd.DataFrame):
        w = w.loc[genes]
    params = {"weights": w, "n_blended": int(np.isfinite(total).all(axis=1).sum())}
    target = copy_data(sdata, table_key) if copy else sdata
    _write(get_table(target, table_key), key_added, frame, params)
    return target if copy else None


@doc_params()
def select_blend(
    sdata: SpatialData | AnnData,
    *,
    pred_key: str = "molf",
    other_key: str = "ridge",
    weights: Sequence[float] = BLEND_WEIGHTS,
    spreads: Sequence[float] = BLEND_SPREADS,
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
    key_added: str = "blend",
) -> pd.DataFrame:
    """Choose the weights of :func:`~histoflow.tl.blend_predictions` for two predictions on held-out slides.

    Every weight ``w`` of ``weights`` blends ``w × obsm[pred_key] + (1 − w) × obsm[other_key]`` on the ``split``
    spots (those where both predictions have values) and scores it against ``layers[true_layer]`` with the metrics
    of :func:`~histoflow.tl.evaluate` on each slide, mean over slides: PCC, GSC (gene–gene structure) and SSC
    (spatial structure, Moran's I on the slide's spatial graph), and their mean, ``structure``. Filter and rank, as
    :func:`~histoflow.tl.select_guidance` does: keep the weights whose PCC is at most ``tolerance`` below the best,
    then choose the one with the most structure (ties: the larger ``w``). With ``tolerance=0`` that is the weight of
    the best PCC; a tolerance trades a little PCC for structure (on HER2ST, MoLF's predictions vary in fewer directions
    of gene space than the ridge probe's, so its GSC and SSC are lower at a higher PCC). On HER2ST (benchmarks page,
    *The blend's weight chosen on the validation section*) the best-PCC choice gave one smoothed MoLF model a weight
    of 0.7–0.9 and raised its test PCC by 0.003–0.005, GSC by about 0.06 and SSC by 0.09–0.13 over three seeds;
    ``tolerance=0.02`` gave PCC 0.290–0.300 with GSC 0.65–0.67 and SSC 0.73–0.77, against 0.309–0.318, 0.45–0.47
    and 0.42–0.51 for the model alone. Score on slides neither model trained on, e.g. the validation slides of
    :func:`~histoflow.tl.fit_molf` and :func:`~histoflow.tl.fit_baseline`, so the choice does not look at the test
    slides. Apply the choice with :func:`~histoflow.tl.blend_predictions`::

        hf.tl.select_blend(sdata, pred_key="molf", other_key="ridge", tolerance=0.005)
        hf.tl.blend_predictions(sdata, sdata["table"].uns["blend_selection"]["weights"])

    **Gene-wise weights** (``spreads`` above 0): gene ``g`` gets the weight
    ``w_g = clip(w + spread × (r_g − 1/2), 0, 1)``, where ``r_g`` ranks the genes by their spatial structure in the
    measured expression of the ``structure_split`` slides (Moran's I on each slide's spatial graph, mean over slides;
    0 for the least structured gene of the panel, 1 for the most). So ``pred_key`` carries the genes that vary in
    space in patterns, ``other_key`` the ones that vary from spot to spot; for MoLF (whose predictions are smooth in
    space) and the ridge probe (which fits each gene on its own) that keeps both metrics' structure: each gene's
    prediction is as patterned as the gene tends to be. Every pair of ``weights`` × ``spreads`` is scored and chosen
    as above (ties: the larger ``w``, then the smaller spread); the training slides' truth only orders the genes,
    nothing is fitted to it. On HER2ST (benchmarks page, *Gene-wise blend weights*) the gene-wise choice kept the
    test PCC of the single weight at each tolerance (within 0.003) and added up to 0.034 GSC and 0.062 SSC; with
    ``w = 0.5`` and spread 1 (fixed), one smoothed MoLF model scored PCC 0.311–0.318, GSC 0.70–0.71 and SSC
    0.79–0.80 over three seeds, against 0.318–0.322, 0.65–0.66 and 0.74 for the even blend.

    Parameters
    ----------
    {doc_sdata_only}
    pred_key
        ``obsm`` key of the first prediction (a DataFrame whose columns are genes of the table); ``w`` is its weight.
    other_key
        ``obsm`` key of the second prediction, of the same genes (e.g. the ridge probe's, fitted with
        ``fit_intercept=True`` so that both are on the log1p scale).
    weights
        Weights of ``pred_key`` to try, each between 0 and 1.
    spreads
        Spreads of the gene-wise weights to try, each at least 0; ``(0,)``: one weight for every gene. Try e.g.
        ``(0, 0.5, 1, 1.5, 2)``.
    tolerance
        How much validation PCC (an absolute difference, ≥ 0) the choice may give up for structure.
    {doc_scored_split}
    structure_split
        Which ``obs[split_key]`` spots rank the genes by spatial structure when a spread is above 0 (their measured
        expression in ``true_layer``; by default the training slides).
    {doc_table_key}
    library_key
        ``obs`` column with the slide of each spot (metrics per slide, no spatial edge between slides); ``None``: one
        slide.
    spatial_key, coord_type, n_neighs, technology_key
        The spatial graph of SSC and of the genes' Moran's I, as in :func:`~histoflow.tl.evaluate`.
    key_added
        The selection is stored in ``uns[f"{key_added}_selection"]``; the same ``key_added`` in
        :func:`~histoflow.tl.blend_predictions` names the blend.

    Returns
    -------
    The sweep (columns ``weight``, ``spread``, ``pcc``, ``gsc``, ``ssc``, ``structure``, ``chosen``), also stored in
    ``uns[f"{key_added}_selection"]`` with ``weight`` and ``spread`` (the chosen ones), ``weights`` (the argument of
    :func:`~histoflow.tl.blend_predictions`: ``{pred_key: w, other_key: 1 − w}`` for spread 0, otherwise a DataFrame
    of each gene's two weights), ``tolerance`` and ``split``; with a spread above 0 also ``structure_split`` and
    ``gene_structure`` (each gene's Moran's I and rank). Nothing is written when an argument is wrong.
    """
    meaning = f" (1: `{pred_key}` alone, 0: `{other_key}` alone)"
    ws = sorted({_check_weight(w, "weights", meaning) for w in weights}, reverse=True) if _is_sequence(weights) else []
    if not ws:
        raise ValueError(f"`weights` must be a non-empty sequence of numbers between 0 and 1, got {weights!r}.")
    ss = _check_spreads(spreads)
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float | np.integer | np.floating):
        raise TypeError(f"`tolerance` must be a number of at least 0 (PCC the choice may give up), got {tolerance!r}.")
    check_positive(tolerance, "tolerance", allow_zero=True)
    if not isinstance(key_added, str) or not key_added:
        raise TypeError(f"`key_added` must be a non-empty string, got {key_added!r}.")
    if pred_key == other_key:
        raise ValueError(f"`pred_key` and `other_key` are both {pred_key!r}; blend two different predictions.")
    if not isinstance(structure_split, str) or not structure_split:
        raise TypeError(
            f"`structure_split` must be a non-empty string (a value of `obs[split_key]`), got {structure_split!r}."
        )
    adata = get_table(sdata, table_key)
    first, aligned = _aligned(adata, {pred_key: "pred_key", other_key: "other_key"})
    A, B = aligned[pred_key], aligned[other_key]
    both = np.isfinite(A).all(axis=1) & np.isfinite(B).all(axis=1)
    genes = [str(c) for c in first.columns]
    rows, truth, groups = scored_spots(adata, genes, both, split, split_key, true_layer, library_key, min_spots=3)
    view = adata[rows]
    graph = {
        "spatial_key": spatial_key, "coord_type": coord_type, "n_neighs": n_neighs, "technology_key": technology_key
    }  # fmt: skip
    score = _StructureScorer(truth, groups, spatial_connectivity(view, library_key=library_key, **graph))  # GSC, SSC
    rank = None
    if any(spread > 0 for spread in ss):  # gene-wise weights: the genes' spatial structure on the training slides
        structure = _structure_rank(adata, genes, structure_split, split_key, true_layer, library_key, graph=graph)
        rank = structure["rank"].to_numpy()
    records = []
    for spread in ss:
        for w in ws:
            wg = w if spread == 0 else _spread_weights(w, spread, rank)
            blend = wg * A[rows] + (1.0 - wg) * B[rows]
            g, s_ = score(blend)
            records.append(
                {"weight": w, "spread": spread, "pcc": pcc(truth, blend, groups=groups), "gsc": g, "ssc": s_}
            )
    sweep = pd.DataFrame(records)
    sweep["structure"] = sweep[["gsc", "ssc"]].mean(axis=1, skipna=False)
    if not np.isfinite(sweep["pcc"]).any():
        raise ValueError(f"PCC is undefined for every weight on the {split!r} spots (no gene varies there).")
    feasible = sweep[sweep["pcc"] >= sweep["pcc"].max() - float(tolerance)]
    order = feasible.assign(rank=feasible["structure"].fillna(-np.inf)).sort_values(
        ["rank", "weight", "spread"], ascending=[False, False, True]
    )
    sweep["chosen"] = sweep.index == order.index[0]
    best, spread = float(sweep.loc[order.index[0], "weight"]), float(sweep.loc[order.index[0], "spread"])
    if spread == 0:
        chosen: dict[str, float] | pd.DataFrame = {pred_key: best, other_key: 1.0 - best}
    else:
        wg = _spread_weights(best, spread, rank)
        chosen = pd.DataFrame({pred_key: wg, other_key: 1.0 - wg}, index=pd.Index(genes, name="gene"))
    key = f"{key_added}_selection"
    record = {
        "sweep": sweep, "weight": best, "spread": spread, "weights": chosen, "tolerance": float(tolerance),
        "split": split,
    }  # fmt: skip
    if rank is not None:
        record["structure_split"] = structure_split
        record["gene_structure"] = structure
    adata.uns[key] = record
    log_write("uns", key)
    logger.info(
        "Blend chosen on %r: %.2f × %r + %.2f × %r, spread %.2g.", split, best, pred_key, 1.0 - best, other_key, spread
    )
    return sweep
