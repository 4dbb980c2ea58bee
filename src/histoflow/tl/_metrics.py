"""Metrics comparing predicted with measured expression: the array API behind :func:`histoflow.tl.evaluate`.

Every metric takes ``y_true`` and ``y_pred`` as spots × genes arrays (numpy, pandas or scipy sparse; compared by
position) in the space the model predicts (histoflow: ``log1p`` of raw counts). Everything is vectorised: per-gene
statistics come from centred column sums and matrix products, never from Python loops over genes or spots; the only
loops run over slides (``groups``).

Two aggregations are published and both are offered, under explicit names:

- ``aggregation="per_slide"`` (MoLF, Stem, TRIPLEX): the metric is computed on the spots of each slide (each value of
  ``groups``) separately, then averaged over slides. For PCC the slide score is the mean over the genes whose PCC is
  defined on that slide (``nanmean``), then the mean over slides.
- ``aggregation="pooled"`` (HEST-benchmark, STFlow, FLAG): all spots are pooled (e.g. every test spot of a fold), the
  metric is computed once. For PCC: per gene over all spots, then the mean over genes; over folds, mean ± std
  (:func:`summarize_folds`).

A value that is undefined (a gene constant over the spots in truth or in the prediction, a slide with one spot) is
``NaN`` and left out of every mean, never counted as zero; :func:`histoflow.tl.evaluate` reports how many were left out.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from histoflow._constants import Key
from histoflow._docs import doc_params
from histoflow._logging import logger, quiet
from histoflow._utils import get_table
from histoflow._validate import check_choice, check_finite, check_obs_key, check_obsm_key

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = [
    "pcc_per_gene",
    "pcc",
    "mse",
    "mae",
    "rvd",
    "gene_correlation",
    "gsc",
    "morans_i",
    "ssc",
    "spatial_connectivity",
    "wasserstein_per_gene",
    "wasserstein_per_spot",
    "cosine_distance_per_spot",
    "cosine_distance",
    "domain_agreement",
    "summarize_folds",
    "AGGREGATIONS",
]

Aggregation = Literal["per_slide", "pooled"]
#: The two published aggregations.
AGGREGATIONS: tuple[str, ...] = ("per_slide", "pooled")
DOMAIN_METHODS: tuple[str, ...] = ("kmeans", "leiden")
COORD_TYPES: tuple[str, ...] = ("grid", "generic")

#: Technologies whose spots lie on a hexagonal grid (6 neighbours) or a square grid (4 neighbours), lower case.
HEX_GRID_TECHNOLOGIES: frozenset[str] = frozenset({"visium", "10x visium", "visium cytassist"})
SQUARE_GRID_TECHNOLOGIES: frozenset[str] = frozenset(
    {"spatial transcriptomics", "st", "legacy st", "visium hd", "visium_hd"}
)
#: Keys of the tidy metric frame that identify a row (see :func:`histoflow.tl.evaluate`).
ROW_KEYS: tuple[str, ...] = ("metric", "aggregation", "group", "gene_set")

_ALL = "all"


# --------------------------------------------------------------------------------------------------------------------
# input checks


def _as_matrix(x: Any, arg: str) -> np.ndarray:
    """A 2-D float array (spots × genes) from numpy, pandas or sparse input, after checking it is finite."""
    if sp.issparse(x):
        x = x.toarray()
    elif isinstance(x, pd.DataFrame):
        x = x.to_numpy()
    a = np.asarray(x)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"`{arg}` must hold numbers, got dtype {a.dtype}.")
    if a.ndim != 2:
        raise ValueError(
            f"`{arg}` must be a 2-D array (spots × genes), got shape {a.shape}; "
            "pass a single gene as `x.reshape(-1, 1)`."
        )
    check_finite(a, arg)
    if a.dtype.kind != "f":
        a = a.astype(np.float64)
    return a


def _pair(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t = _as_matrix(y_true, "y_true")
    p = _as_matrix(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(
            f"`y_true` and `y_pred` must have the same shape (spots × genes), got {t.shape} and {p.shape}."
        )
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"`y_true` and `y_pred` hold no values (shape {t.shape}); at least one spot and gene needed.")
    return t, p


def _group_index(groups: Any, n: int, arg: str = "groups") -> tuple[list[str], list[np.ndarray]]:
    """Names and row indices of each group (sorted by name); ``None`` is one group of all rows."""
    if groups is None:
        return [_ALL], [np.arange(n)]
    arr = groups.to_numpy() if isinstance(groups, pd.Series) else np.asarray(groups, dtype=object)
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"`{arg}` must hold one label per spot ({n}), got shape {arr.shape}.")
    g = pd.Series(arr)
    if g.isna().any():
        raise ValueError(f"`{arg}` has {int(g.isna().sum())} missing label(s); give every spot a slide label.")
    labels = g.astype(str).to_numpy()
    codes, names = pd.factorize(labels, sort=True)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(1, len(names)))
    return [str(x) for x in names], list(np.split(order, bounds))


def _check_k(k: int | None) -> int | None:
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"`k` must be a positive integer (the number of best genes averaged) or None, got {k!r}.")
    return int(k)


def _nanmean(x: np.ndarray, axis: int | None = None) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


def _mean_valid(values: np.ndarray) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two vectors; NaN when either is constant or shorter than 2."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    a = a - a.mean()
    b = b - b.mean()
    # elementwise sums, not BLAS dot: many short vectors, where BLAS thread start-up would dominate
    return float(np.clip(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)), -1.0, 1.0))


def _masked_row_pearson(A: np.ndarray, B: np.ndarray, min_n: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Pearson correlation of each row of ``A`` with the same row of ``B`` over the columns finite in both.

    Returns the correlations (NaN when fewer than ``min_n`` columns are finite or a row is constant) and the number
    of columns left out per row.
    """
    A = np.atleast_2d(np.asarray(A, dtype=np.float64))
    B = np.atleast_2d(np.asarray(B, dtype=np.float64))
    ok = np.isfinite(A) & np.isfinite(B)
    n = ok.sum(axis=1)
    a = np.where(ok, A, 0.0)
    b = np.where(ok, B, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ma = a.sum(axis=1) / n
        mb = b.sum(axis=1) / n
        a = np.where(ok, a - ma[:, None], 0.0)
        b = np.where(ok, b - mb[:, None], 0.0)
        saa = (a * a).sum(axis=1)
        sbb = (b * b).sum(axis=1)
        r = (a * b).sum(axis=1) / np.sqrt(saa * sbb)
    bad = (n < min_n) | (saa <= 0) | (sbb <= 0) | ~np.isfinite(r)
    r = np.where(bad, np.nan, np.clip(r, -1.0, 1.0))
    return r, A.shape[1] - n


def _topk_mean(V: np.ndarray, k: int | None) -> np.ndarray:
    """Per row: the mean of the ``k`` largest finite values (all finite values when ``k`` is None or larger)."""
    V = np.atleast_2d(np.asarray(V, dtype=np.float64))
    finite = np.isfinite(V)
    if k is None:
        cnt = finite.sum(axis=1)
        total = np.where(finite, V, 0.0).sum(axis=1)
    else:
        S = -np.sort(-np.where(finite, V, -np.inf), axis=1)[:, :k]
        ok = np.isfinite(S)
        cnt = ok.sum(axis=1)
        total = np.where(ok, S, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, total / np.maximum(cnt, 1), np.nan)


# --------------------------------------------------------------------------------------------------------------------
# per-gene sufficient statistics


@dataclass
class GeneStats:
    """Per-gene sufficient statistics of one set of spots (one slide, or several slides pooled).

    Made by :meth:`~histoflow.tl.metrics.GeneStats.of` from the spots × genes arrays of truth ``t`` and prediction
    ``p``. Pooling slides with :meth:`~histoflow.tl.metrics.GeneStats.combine` is exact (within plus between-slide
    terms), so pooled PCCs are those of the concatenated spots. Every array has one value per gene.

    Parameters
    ----------
    n
        Number of spots.
    mean_t
        Mean of the truth.
    mean_p
        Mean of the prediction.
    ss_t
        Centred sum of squares of the truth.
    ss_p
        Centred sum of squares of the prediction.
    sp
        Centred cross-product of truth and prediction.
    sse
        Sum of squared errors ``(p - t)^2``.
    sae
        Sum of absolute errors ``|p - t|``.
    min_t
        Minimum of the truth.
    max_t
        Maximum of the truth (a gene is constant in truth when ``min_t == max_t``).
    min_p
        Minimum of the prediction.
    max_p
        Maximum of the prediction.
    """

    n: int
    mean_t: np.ndarray
    mean_p: np.ndarray
    ss_t: np.ndarray
    ss_p: np.ndarray
    sp: np.ndarray
    sse: np.ndarray
    sae: np.ndarray
    min_t: np.ndarray
    max_t: np.ndarray
    min_p: np.ndarray
    max_p: np.ndarray

    @classmethod
    def of(cls, t: np.ndarray, p: np.ndarray) -> GeneStats:
        """Statistics of the spots (rows) of ``t`` and ``p``.

        Parameters
        ----------
        t
            Truth, spots × genes.
        p
            Prediction, same shape.
        """
        t = np.asarray(t, dtype=np.float64)
        p = np.asarray(p, dtype=np.float64)
        mt = t.mean(axis=0)
        mp = p.mean(axis=0)
        zt = t - mt
        zp = p - mp
        d = p - t
        return cls(
            n=int(t.shape[0]),
            mean_t=mt,
            mean_p=mp,
            ss_t=np.einsum("ij,ij->j", zt, zt),
            ss_p=np.einsum("ij,ij->j", zp, zp),
            sp=np.einsum("ij,ij->j", zt, zp),
            sse=np.einsum("ij,ij->j", d, d),
            sae=np.abs(d).sum(axis=0),
            min_t=t.min(axis=0),
            max_t=t.max(axis=0),
            min_p=p.min(axis=0),
            max_p=p.max(axis=0),
        )

    @classmethod
    def combine(cls, parts: Sequence[GeneStats]) -> GeneStats:
        """Statistics of the union of the spots of ``parts`` (exact).

        Parameters
        ----------
        parts
            Statistics of disjoint sets of spots (e.g. one per slide), same genes.
        """
        if len(parts) == 1:
            return parts[0]
        w = np.array([s.n for s in parts], dtype=np.float64)
        n = int(w.sum())
        Mt = np.stack([s.mean_t for s in parts])
        Mp = np.stack([s.mean_p for s in parts])
        mt = w @ Mt / n
        mp = w @ Mp / n
        dt = Mt - mt
        dp = Mp - mp

        def total(name: str) -> np.ndarray:
            return np.sum([getattr(s, name) for s in parts], axis=0)

        return cls(
            n=n,
            mean_t=mt,
            mean_p=mp,
            ss_t=total("ss_t") + w @ (dt * dt),
            ss_p=total("ss_p") + w @ (dp * dp),
            sp=total("sp") + w @ (dt * dp),
            sse=total("sse"),
            sae=total("sae"),
            min_t=np.min([s.min_t for s in parts], axis=0),
            max_t=np.max([s.max_t for s in parts], axis=0),
            min_p=np.min([s.min_p for s in parts], axis=0),
            max_p=np.max([s.max_p for s in parts], axis=0),
        )

    @property
    def constant_t(self) -> np.ndarray:
        """Genes constant over the spots in truth."""
        return self.max_t == self.min_t

    @property
    def constant_p(self) -> np.ndarray:
        """Genes constant over the spots in the prediction."""
        return self.max_p == self.min_p

    @property
    def valid(self) -> np.ndarray:
        """Genes varying in truth and in the prediction (PCC, GSC and SSC are defined)."""
        return ~(self.constant_t | self.constant_p)

    def pcc(self) -> np.ndarray:
        """Pearson correlation per gene; NaN for constant genes."""
        with np.errstate(invalid="ignore", divide="ignore"):
            r = self.sp / np.sqrt(self.ss_t * self.ss_p)
        return np.where(self.valid, np.clip(r, -1.0, 1.0), np.nan)

    def rvd(self) -> np.ndarray:
        """``(var_pred - var_true)^2 / var_true^2`` per gene; NaN where the truth is constant."""
        with np.errstate(invalid="ignore", divide="ignore"):
            r = (self.ss_p - self.ss_t) ** 2 / self.ss_t**2
        return np.where(self.constant_t, np.nan, r)


def _unit_stats(t: np.ndarray, p: np.ndarray, index: list[np.ndarray]) -> list[GeneStats]:
    return [GeneStats.of(t[i], p[i]) for i in index]


# --------------------------------------------------------------------------------------------------------------------
# PCC, errors, RVD


@doc_params()
def pcc_per_gene(y_true: Any, y_pred: Any) -> np.ndarray:
    """Pearson correlation coefficient of each gene across spots.

    ``r_g = sum_i (t_ig - mean_t_g)(p_ig - mean_p_g) / sqrt(sum_i (t_ig - mean_t_g)^2 sum_i (p_ig - mean_p_g)^2)``,
    identical to :func:`scipy.stats.pearsonr` on each column.

    Parameters
    ----------
    {doc_metric_arrays}

    Returns
    -------
    One PCC per gene; ``NaN`` for a gene constant over the spots in ``y_true`` or in ``y_pred`` (undefined; left
    out of every mean, never counted as zero).
    """
    t, p = _pair(y_true, y_pred)
    return GeneStats.of(t, p).pcc()


@doc_params()
def pcc(
    y_true: Any,
    y_pred: Any,
    *,
    groups: Any = None,
    aggregation: Aggregation = "per_slide",
    k: int | None = None,
) -> float:
    """Mean Pearson correlation over genes, in one of the two published aggregations.

    - ``"per_slide"`` (MoLF, Stem): for each slide (value of ``groups``), the PCC of every gene across the slide's
      spots (:func:`pcc_per_gene`); the slide score is their mean over the genes where it is defined (``nanmean``);
      the result is the mean of the slide scores.
    - ``"pooled"`` (HEST-benchmark, STFlow, FLAG): the PCC of every gene across all spots, then the mean over genes.

    With ``k`` (PCC@k, Stem/FLAG's PCC-10/PCC-50) only the ``k`` best genes enter each mean: per slide the ``k``
    best genes of that slide, pooled the ``k`` best genes overall (all defined genes when fewer than ``k``).

    Parameters
    ----------
    {doc_metric_arrays}
    groups
        Slide label of each spot; ``None``: one slide (both aggregations agree).
    aggregation
        ``"per_slide"`` or ``"pooled"``.
    k
        Average only the ``k`` best genes (PCC@k); ``None`` averages all genes.

    Returns
    -------
    The mean PCC (``NaN`` when no gene has a defined PCC). Constant genes are left out (see :func:`pcc_per_gene`).
    """
    t, p = _pair(y_true, y_pred)
    check_choice(aggregation, AGGREGATIONS, "aggregation")
    k = _check_k(k)
    if aggregation == "pooled":
        V = GeneStats.of(t, p).pcc()[None, :]
        return float(_topk_mean(V, k)[0])
    _, index = _group_index(groups, t.shape[0])
    V = np.stack([s.pcc() for s in _unit_stats(t, p, index)])
    n_nan = int(np.isnan(V).sum())
    if n_nan:
        logger.info("pcc: %d (slide, gene) pair(s) with a constant gene left out.", n_nan)
    return _mean_valid(_topk_mean(V, k))


def _error(
    y_true: Any, y_pred: Any, groups: Any, aggregation: str, squared: bool
) -> float:  # shared body of mse and mae
    t, p = _pair(y_true, y_pred)
    check_choice(aggregation, AGGREGATIONS, "aggregation")
    d = p - t
    e = d * d if squared else np.abs(d)
    if aggregation == "pooled":
        return float(e.mean(dtype=np.float64))
    _, index = _group_index(groups, t.shape[0])
    return float(np.mean([e[i].mean(dtype=np.float64) for i in index]))


@doc_params()
def mse(y_true: Any, y_pred: Any, *, groups: Any = None, aggregation: Aggregation = "per_slide") -> float:
    """Mean squared error ``mean_{i,g} (p_ig - t_ig)^2`` over spots and genes.

    Parameters
    ----------
    {doc_metric_groups}
    aggregation
        ``"per_slide"``: the MSE of each slide, then the mean over slides; ``"pooled"``: over all entries.

    Returns
    -------
    The MSE.
    """
    return _error(y_true, y_pred, groups, aggregation, squared=True)


@doc_params()
def mae(y_true: Any, y_pred: Any, *, groups: Any = None, aggregation: Aggregation = "per_slide") -> float:
    """Mean absolute error ``mean_{i,g} |p_ig - t_ig|`` over spots and genes.

    Parameters
    ----------
    {doc_metric_groups}
    aggregation
        ``"per_slide"``: the MAE of each slide, then the mean over slides; ``"pooled"``: over all entries.

    Returns
    -------
    The MAE.
    """
    return _error(y_true, y_pred, groups, aggregation, squared=False)


@doc_params()
def rvd(y_true: Any, y_pred: Any, *, groups: Any = None, aggregation: Aggregation = "per_slide") -> float:
    """Relative variance difference (Stem): ``mean_g (var_pred_g - var_true_g)^2 / var_true_g^2``.

    ``var_*_g`` is the variance of gene ``g`` across spots (the ratio does not depend on ``ddof``). Genes constant in
    truth (``var_true_g = 0``) are left out. 0 when every gene's spread is reproduced; an over-smoothed prediction
    (all variances near 0) gives about 1.

    Parameters
    ----------
    {doc_metric_groups}
    aggregation
        ``"per_slide"``: the RVD of each slide (variances over its spots), then the mean over slides;
        ``"pooled"``: variances over all spots.

    Returns
    -------
    The RVD (``NaN`` when every gene is constant in truth).
    """
    t, p = _pair(y_true, y_pred)
    check_choice(aggregation, AGGREGATIONS, "aggregation")
    if aggregation == "pooled":
        return _mean_valid(GeneStats.of(t, p).rvd())
    _, index = _group_index(groups, t.shape[0])
    return _mean_valid(np.array([_mean_valid(s.rvd()) for s in _unit_stats(t, p, index)]))


# --------------------------------------------------------------------------------------------------------------------
# GSC: gene-gene correlation structure


def _scatter(X: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Centred scatter matrix ``Z^T Z`` (genes × genes), float64."""
    Z = np.asarray(X, dtype=np.float64) - mean
    return Z.T @ Z


def _corr_from_scatter(S: np.ndarray, cols: np.ndarray) -> np.ndarray:
    sub = S[np.ix_(cols, cols)]
    d = np.sqrt(np.diag(sub))
    C = sub / np.outer(d, d)
    return np.clip(C, -1.0, 1.0)


def _gsc_from_scatter(St: np.ndarray, Sp: np.ndarray, valid: np.ndarray, cols: np.ndarray) -> tuple[float, int]:
    """GSC over the genes ``cols`` from the truth and prediction scatter matrices; and the number of genes left out."""
    v = cols[valid[cols]]
    excluded = int(cols.size - v.size)
    if v.size < 3:
        return float("nan"), excluded
    iu = np.triu_indices(v.size, k=1)
    return _pearson(_corr_from_scatter(St, v)[iu], _corr_from_scatter(Sp, v)[iu]), excluded


def gene_correlation(X: Any) -> np.ndarray:
    """Pearson correlation matrix of the genes (columns) of ``X`` across spots.

    Parameters
    ----------
    X
        Expression, spots × genes.

    Returns
    -------
    Genes × genes correlation matrix; rows and columns of genes constant over the spots are ``NaN``.
    """
    X = _as_matrix(X, "X")
    S = _scatter(X, X.mean(axis=0))
    const = np.ptp(X, axis=0) == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.sqrt(np.diag(S))
        C = np.clip(S / np.outer(d, d), -1.0, 1.0)
    C[const, :] = np.nan
    C[:, const] = np.nan
    return C


@doc_params()
def gsc(y_true: Any, y_pred: Any, *, groups: Any = None, aggregation: Aggregation = "per_slide") -> float:
    """Gene structural correlation: agreement of the predicted and true gene–gene correlation structure.

    Definition (histoflow's; FLAG describes GSC but published no code): on a set of spots, ``C_true`` and ``C_pred``
    are the Pearson correlation matrices of the genes across the spots (:func:`gene_correlation`), over the genes
    that vary in both truth and prediction. GSC is the Pearson correlation between the upper triangles
    (``i < j``, diagonal excluded) of ``C_true`` and ``C_pred``. 1: the prediction reproduces every gene–gene
    correlation up to a common affine map; about 0: no shared co-expression structure. Permuting spots keeps GSC at
    1 (a row permutation keeps gene–gene correlations); permuting each gene independently gives about 0. At least
    3 varying genes are needed (``NaN`` otherwise). For scale: the same formula between two *measured* sections of
    one HER2ST patient (50 highly variable genes) gives 0.64–0.80, so about 0.8 is the agreement of a replicate
    section (``benchmarks/structure_ceiling.py``).

    Parameters
    ----------
    {doc_metric_groups}
    aggregation
        ``"per_slide"``: correlation matrices over each slide's spots, GSC per slide, then the mean over slides;
        ``"pooled"``: correlation matrices over all spots.

    Returns
    -------
    The GSC.
    """
    t, p = _pair(y_true, y_pred)
    check_choice(aggregation, AGGREGATIONS, "aggregation")
    index = [np.arange(t.shape[0])] if aggregation == "pooled" else _group_index(groups, t.shape[0])[1]
    cols = np.arange(t.shape[1])
    values = []
    for i in index:
        s = GeneStats.of(t[i], p[i])
        St, Sp = _scatter(t[i], s.mean_t), _scatter(p[i], s.mean_p)
        values.append(_gsc_from_scatter(St, Sp, s.valid, cols)[0])
    return _mean_valid(np.array(values))


# --------------------------------------------------------------------------------------------------------------------
# Moran's I and SSC


def _check_connectivity(connectivity: Any, n: int, arg: str = "connectivity") -> sp.csr_matrix:
    if not (sp.issparse(connectivity) or isinstance(connectivity, np.ndarray)):
        raise TypeError(
            f"`{arg}` must be a spots × spots sparse matrix (e.g. `adata.obsp['spatial_connectivities']` or "
            f"`histoflow.tl.metrics.spatial_connectivity(adata)`), got {type(connectivity).__name__}."
        )
    W = sp.csr_matrix(connectivity, dtype=np.float64)
    if W.shape != (n, n):
        raise ValueError(f"`{arg}` must be {n} × {n} (one row and column per spot), got {W.shape[0]} × {W.shape[1]}.")
    check_finite(W, arg)
    if W.nnz and W.data.min() < 0:
        raise ValueError(f"`{arg}` has negative weights; spatial weights must be non-negative.")
    return W


def _row_normalize(W: sp.csr_matrix) -> sp.csr_matrix:
    """Rows divided by their sums (rows without neighbours stay zero)."""
    rs = np.asarray(W.sum(axis=1)).ravel()
    inv = np.divide(1.0, rs, out=np.zeros_like(rs), where=rs > 0)
    W = sp.diags(inv) @ W
    W = sp.csr_matrix(W)
    W.eliminate_zeros()
    return W


@dataclass
class MoranParts:
    """Per-gene pieces of Moran's I on one slide, from slide-centred values ``u`` and row-normalised weights ``W``.

    ``A = sum_i u_i (W u)_i``, ``B = sum_i r_i u_i``, ``C = sum_i (W u)_i`` (``r_i`` the row sums, 1 or 0) and
    ``D = sum_i r_i``. Slides are pooled exactly (block-diagonal weights, centring on the pooled mean) by
    :func:`_pooled_moran`.
    """

    A: np.ndarray
    B: np.ndarray
    C: np.ndarray
    D: float

    @classmethod
    def of(cls, U: np.ndarray, W: sp.csr_matrix) -> MoranParts:
        WU = np.asarray(W @ U)
        r = np.asarray(W.sum(axis=1)).ravel()
        return cls(A=np.einsum("ij,ij->j", U, WU), B=r @ U, C=WU.sum(axis=0), D=float(r.sum()))


def _moran_from(n: int, num: np.ndarray, ss: np.ndarray, s0: float, constant: np.ndarray) -> np.ndarray:
    if s0 <= 0:
        return np.full(num.shape, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = n / s0 * num / ss
    return np.where(constant | (ss <= 0), np.nan, value)


def _pooled_moran(
    stats: Sequence[GeneStats], parts: Sequence[MoranParts], which: Literal["t", "p"]
) -> tuple[np.ndarray, GeneStats]:
    """Moran's I over the union of slides (block-diagonal weights, values centred on the pooled mean)."""
    pooled = GeneStats.combine(stats)
    m = pooled.mean_t if which == "t" else pooled.mean_p
    num = np.zeros_like(m)
    s0 = 0.0
    for s, q in zip(stats, parts):
        delta = (s.mean_t if which == "t" else s.mean_p) - m
        num += q.A + delta * (q.B + q.C) + delta * delta * q.D
        s0 += q.D
    ss = pooled.ss_t if which == "t" else pooled.ss_p
    const = pooled.constant_t if which == "t" else pooled.constant_p
    return _moran_from(pooled.n, num, ss, s0, const), pooled


def morans_i(X: Any, connectivity: Any) -> np.ndarray:
    """Moran's I of every gene, with row-normalised spatial weights (squidpy's default).

    ``I_g = (N / S0) * sum_ij w_ij z_ig z_jg / sum_i z_ig^2`` with ``z_ig = x_ig - mean_g`` over all ``N`` spots,
    ``w_ij = a_ij / sum_j a_ij`` (the connectivity ``a`` divided by its row sums; spots without neighbours keep a zero
    row) and ``S0 = sum_ij w_ij`` (the number of spots with at least one neighbour). This equals the ``I`` of
    :func:`squidpy.gr.spatial_autocorr` with ``mode="moran"`` and ``transformation=True``.

    Parameters
    ----------
    X
        Expression, spots × genes.
    connectivity
        Spots × spots spatial connectivity, e.g. from :func:`spatial_connectivity` or
        ``adata.obsp["spatial_connectivities"]``.

    Returns
    -------
    One Moran's I per gene; ``NaN`` for genes constant over the spots (or when no spot has a neighbour).
    """
    X = _as_matrix(X, "X")
    W = _row_normalize(_check_connectivity(connectivity, X.shape[0]))
    mean = X.mean(axis=0)
    Z = np.asarray(X, dtype=np.float64) - mean
    q = MoranParts.of(Z, W)
    return _moran_from(X.shape[0], q.A, np.einsum("ij,ij->j", Z, Z), q.D, np.ptp(X, axis=0) == 0)


@doc_params()
def ssc(
    y_true: Any,
    y_pred: Any,
    connectivity: Any,
    *,
    groups: Any = None,
    aggregation: Aggregation = "per_slide",
) -> float:
    """Spatial structural correlation: whether predicted genes keep their spatial autocorrelation.

    Definition (histoflow's; FLAG describes SSC but published no code): compute Moran's I of every gene in truth and
    in prediction (:func:`morans_i`: row-normalised weights of the spatial graph, e.g. the 6 hexagonal neighbours on
    Visium or the 4 grid neighbours on ST), then take the Pearson correlation across genes of the two Moran's I
    vectors, over the genes where both are defined. 1: the ranking of genes by spatial structure is kept up to an
    affine map; permuting spots destroys the prediction's spatial structure (SSC about 0). At least 3 genes with a
    defined Moran's I are needed (``NaN`` otherwise). For scale: the same formula between two *measured* sections of
    one HER2ST patient (50 highly variable genes, each on its own grid) gives 0.79–0.93
    (``benchmarks/structure_ceiling.py``).

    Parameters
    ----------
    {doc_metric_arrays}
    connectivity
        Spots × spots spatial connectivity (:func:`spatial_connectivity`). Edges between slides should not exist.
    groups
        Slide label of each spot; ``None``: one slide.
    aggregation
        ``"per_slide"``: Moran's I on each slide's sub-graph (rows re-normalised within the slide), SSC per slide,
        then the mean over slides; ``"pooled"``: Moran's I on the whole graph with values centred on the mean over
        all spots (what :func:`squidpy.gr.spatial_autocorr` gives on a multi-slide table).

    Returns
    -------
    The SSC.
    """
    t, p = _pair(y_true, y_pred)
    check_choice(aggregation, AGGREGATIONS, "aggregation")
    W = _check_connectivity(connectivity, t.shape[0])
    index = [np.arange(t.shape[0])] if aggregation == "pooled" else _group_index(groups, t.shape[0])[1]
    values = []
    for i in index:
        sub = W if i.size == t.shape[0] else W[i][:, i]
        values.append(_pearson_valid(morans_i(t[i], sub), morans_i(p[i], sub)))
    return _mean_valid(np.array(values))


def _pearson_valid(a: np.ndarray, b: np.ndarray) -> float:
    r, _ = _masked_row_pearson(a[None, :], b[None, :])
    return float(r[0])


class _StructureScorer:
    """GSC and SSC (per slide, mean over slides) of many predictions of the same spots, the truth's parts computed once.

    ``scorer(pred)`` equals ``(gsc(truth, pred, groups=groups), ssc(truth, pred, connectivity, groups=groups))``; a
    selection that scores dozens of candidate predictions against one truth (``tl.select_smoothing``,
    ``tl.select_blend``) pays for the truth's correlation matrices and Moran's I once.
    """

    def __init__(self, truth: np.ndarray, groups: Any, connectivity: sp.spmatrix) -> None:
        truth = np.asarray(truth, dtype=np.float64)
        W = _check_connectivity(connectivity, truth.shape[0])
        _, self.index = _group_index(groups, truth.shape[0])
        self.parts = []
        for i in self.index:
            t, sub = truth[i], (W if i.size == truth.shape[0] else W[i][:, i])
            self.parts.append((_scatter(t, t.mean(axis=0)), np.ptp(t, axis=0) > 0, morans_i(t, sub), sub))
        self.cols = np.arange(truth.shape[1])

    def __call__(self, pred: np.ndarray) -> tuple[float, float]:
        pred = np.asarray(pred, dtype=np.float64)
        g, s = [], []
        for i, (St, varies, I_true, sub) in zip(self.index, self.parts, strict=True):
            p = pred[i]
            valid = varies & (np.ptp(p, axis=0) > 0)
            g.append(_gsc_from_scatter(St, _scatter(p, p.mean(axis=0)), valid, self.cols)[0])
            s.append(_pearson_valid(I_true, morans_i(p, sub)))
        return _mean_valid(np.array(g)), _mean_valid(np.array(s))


def _technology_grid(technology: str) -> tuple[str, int]:
    tech = str(technology).strip().lower()
    if tech in HEX_GRID_TECHNOLOGIES:
        return "grid", 6
    if tech in SQUARE_GRID_TECHNOLOGIES:
        return "grid", 4
    return "generic", 6


@doc_params()
def spatial_connectivity(
    sdata: SpatialData | AnnData,
    *,
    table_key: str = Key.table,
    library_key: str | None = Key.library,
    spatial_key: str = Key.spatial,
    coord_type: Literal["grid", "generic"] | None = None,
    n_neighs: int | None = None,
    technology_key: str = Key.technology,
) -> sp.csr_matrix:
    """Spatial graph of the spots, one block per slide (no edge joins two slides), built with squidpy.

    Grid technologies use :func:`squidpy.gr.spatial_neighbors_grid`: Visium (hexagonal grid, ``n_neighs=6``), legacy
    ST and Visium HD (square grid, ``n_neighs=4``); other technologies use :func:`squidpy.gr.spatial_neighbors_knn`
    (``n_neighs=6``). squidpy is always called on an AnnData holding only the coordinates, with ``library_key``.
    Slides with at most ``n_neighs`` spots get no edges (logged).

    Parameters
    ----------
    {doc_sdata}
    library_key
        ``obs`` column naming the slide of each spot; ``None``: one slide.
    spatial_key
        ``obsm`` key of the spot centres.
    coord_type
        ``"grid"`` or ``"generic"`` (kNN) for every slide; ``None`` chooses per slide from ``obs[technology_key]``
        (kNN when the column is missing or the technology is not a grid one).
    n_neighs
        Neighbours per spot (grid: the ring size, 6 hexagonal or 4 square; kNN: k); ``None`` as above.
    technology_key
        ``obs`` column with the technology.

    Returns
    -------
    The binary connectivity, spots × spots (CSR, in ``obs`` order); nothing is written into ``sdata``.
    """
    import squidpy as sq
    from anndata import AnnData

    adata = get_table(sdata, table_key)
    check_obsm_key(adata, spatial_key, "spatial_key", hint="Spot centres are needed to build the spatial graph.")
    coords = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise ValueError(f"`obsm[{spatial_key!r}]` must be spots × 2 coordinates, got shape {coords.shape}.")
    coords = np.ascontiguousarray(coords[:, :2])
    check_finite(coords, f"obsm[{spatial_key!r}]")
    if coord_type is not None:
        check_choice(coord_type, COORD_TYPES, "coord_type")
    if n_neighs is not None and (isinstance(n_neighs, bool) or not isinstance(n_neighs, int | np.integer)):
        raise ValueError(f"`n_neighs` must be a positive integer or None, got {n_neighs!r}.")
    if n_neighs is not None and n_neighs < 1:
        raise ValueError(f"`n_neighs` must be a positive integer or None, got {n_neighs!r}.")
    n = adata.n_obs
    if library_key is None:
        libs = np.zeros(n, dtype=object)
        libs[:] = _ALL
    else:
        check_obs_key(adata, library_key, "library_key", hint="Pass `library_key=None` for a single slide.")
        col = adata.obs[library_key]
        if col.isna().any():
            raise ValueError(f"`library_key={library_key!r}` has missing values; every spot needs a slide.")
        libs = col.astype(str).to_numpy()
    names, index = _group_index(libs, n, "library_key")
    has_tech = technology_key in adata.obs.columns
    if coord_type is None and not has_tech:
        logger.info("No `obs[%r]`; building a kNN graph (pass `coord_type=` to choose).", technology_key)
    configs: dict[tuple[str, int], list[int]] = {}
    for j, rows in enumerate(index):
        if coord_type is None and has_tech:
            techs = adata.obs[technology_key].iloc[rows].astype(str).unique()
            ctype, default_k = _technology_grid(techs[0]) if len(techs) == 1 else ("generic", 6)
        else:
            ctype = coord_type or "generic"
            default_k = 6
        k = int(n_neighs) if n_neighs is not None else default_k
        configs.setdefault((ctype, k), []).append(j)

    rows_all: list[np.ndarray] = []
    cols_all: list[np.ndarray] = []
    for (ctype, k), slide_ids in configs.items():
        small = [names[j] for j in slide_ids if index[j].size <= k]
        if small:
            logger.warning("Slides %s have at most %d spots; they get no spatial edges.", small, k)
        keep = [j for j in slide_ids if index[j].size > k]
        if not keep:
            continue
        rows = np.concatenate([index[j] for j in keep])
        obs = pd.DataFrame({"library": pd.Categorical(libs[rows])}, index=pd.RangeIndex(rows.size).astype(str))
        tmp = AnnData(obs=obs, obsm={"spatial": coords[rows]})
        build = sq.gr.spatial_neighbors_grid if ctype == "grid" else sq.gr.spatial_neighbors_knn
        with quiet("spatialdata._logging"):  # squidpy logs "Creating graph ..." there; the line below says it once
            res = build(tmp, spatial_key="spatial", library_key="library", n_neighs=k, copy=True)
        A = sp.coo_matrix(res.connectivities)
        rows_all.append(rows[A.row])
        cols_all.append(rows[A.col])
        logger.info("Spatial graph: %d slide(s) as %s with n_neighs=%d.", len(keep), ctype, k)
    if rows_all:
        r = np.concatenate(rows_all)
        c = np.concatenate(cols_all)
    else:
        r = c = np.zeros(0, dtype=np.int64)
    G = sp.csr_matrix((np.ones(r.size), (r, c)), shape=(n, n))
    G.data[:] = 1.0
    return G


# --------------------------------------------------------------------------------------------------------------------
# distribution metrics


def _w1_sorted(a_sorted: np.ndarray, b_sorted: np.ndarray, axis: int) -> np.ndarray:
    """Mean absolute difference of sorted samples (differences in the inputs' precision, mean in float64)."""
    dtype = np.result_type(a_sorted, b_sorted, np.float32)
    diff = np.subtract(a_sorted, b_sorted, dtype=dtype)
    np.abs(diff, out=diff)
    return diff.mean(axis=axis, dtype=np.float64)


@doc_params()
def wasserstein_per_gene(y_true: Any, y_pred: Any) -> np.ndarray:
    """1-Wasserstein distance between the true and predicted distributions of each gene over spots.

    Both empirical distributions have the same number of samples (the spots), so
    ``W1 = mean_i |sort(t)_i - sort(p)_i|`` exactly (equal to :func:`scipy.stats.wasserstein_distance`).

    Parameters
    ----------
    {doc_metric_arrays}

    Returns
    -------
    One distance per gene.
    """
    t, p = _pair(y_true, y_pred)
    return _w1_sorted(np.sort(t, axis=0), np.sort(p, axis=0), axis=0)


@doc_params()
def wasserstein_per_spot(y_true: Any, y_pred: Any) -> np.ndarray:
    """1-Wasserstein distance between the true and predicted distributions of expression values within each spot.

    The distribution of a spot is the multiset of its values over the genes (MoLF's ``D_W1`` of filter-and-rank is
    the mean of these over spots); ``W1 = mean_g |sort(t_i)_g - sort(p_i)_g|`` exactly.

    Parameters
    ----------
    {doc_metric_arrays}

    Returns
    -------
    One distance per spot.
    """
    t, p = _pair(y_true, y_pred)
    return _w1_sorted(np.sort(t, axis=1), np.sort(p, axis=1), axis=1)


@doc_params()
def cosine_distance_per_spot(y_true: Any, y_pred: Any) -> np.ndarray:
    """Cosine distance ``1 - <t_i, p_i> / (|t_i| |p_i|)`` between the true and predicted profile of each spot.

    Parameters
    ----------
    {doc_metric_arrays}

    Returns
    -------
    One distance in ``[0, 2]`` per spot; ``NaN`` where either profile is all zeros (undefined).
    """
    t, p = _pair(y_true, y_pred)
    return _cosine_rows(t, p)


def _cosine_rows(t: np.ndarray, p: np.ndarray) -> np.ndarray:
    t = np.asarray(t, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    dot = np.einsum("ij,ij->i", t, p)
    nt = np.sqrt(np.einsum("ij,ij->i", t, t))
    npred = np.sqrt(np.einsum("ij,ij->i", p, p))
    with np.errstate(invalid="ignore", divide="ignore"):
        d = 1.0 - dot / (nt * npred)
    return np.where((nt > 0) & (npred > 0), np.clip(d, 0.0, 2.0), np.nan)


@doc_params()
def cosine_distance(y_true: Any, y_pred: Any, *, groups: Any = None, aggregation: Aggregation = "per_slide") -> float:
    """Mean cosine distance between the true and predicted profiles of the spots (MoLF's filter-and-rank ``D_cos``).

    Parameters
    ----------
    {doc_metric_groups}
    aggregation
        ``"per_slide"``: mean over each slide's spots, then over slides; ``"pooled"``: mean over all spots.

    Returns
    -------
    The mean of :func:`cosine_distance_per_spot` over the spots where it is defined.
    """
    t, p = _pair(y_true, y_pred)
    check_choice(aggregation, AGGREGATIONS, "aggregation")
    d = _cosine_rows(t, p)
    if aggregation == "pooled":
        return _mean_valid(d)
    _, index = _group_index(groups, t.shape[0])
    return _mean_valid(np.array([_mean_valid(d[i]) for i in index]))


# --------------------------------------------------------------------------------------------------------------------
# spatial domains


def _pcs(X: np.ndarray, n_pcs: int, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    X = np.asarray(X, dtype=np.float64)
    sd = X.std(axis=0)
    Z = np.divide(X - X.mean(axis=0), sd, out=np.zeros_like(X), where=sd > 0)
    n_comp = int(min(n_pcs, X.shape[0] - 1, X.shape[1]))
    if n_comp < 1 or not np.any(sd > 0):
        return Z[:, :0]
    return PCA(n_components=n_comp, random_state=seed).fit_transform(Z)


def _cluster(pcs: np.ndarray, n_domains: int, method: str, seed: int) -> np.ndarray:
    if pcs.shape[1] == 0:
        return np.zeros(pcs.shape[0], dtype=np.int64)
    if method == "kmeans":
        from sklearn.cluster import KMeans

        return KMeans(n_clusters=n_domains, n_init=10, random_state=seed).fit_predict(pcs)
    return _leiden(pcs, n_domains, seed)


def _leiden(pcs: np.ndarray, n_domains: int, seed: int) -> np.ndarray:
    try:
        import igraph  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "`method='leiden'` needs the `igraph` package (`pip install igraph`); or use `method='kmeans'`."
        ) from err
    import scanpy as sc
    from anndata import AnnData
    from sklearn.neighbors import kneighbors_graph

    # symmetric binary 15-NN graph on the PCs (sklearn; no UMAP weighting)
    knn = kneighbors_graph(pcs, n_neighbors=min(15, pcs.shape[0] - 1), mode="connectivity", include_self=False)
    adjacency = sp.csr_matrix(knn.maximum(knn.T))
    tmp = AnnData(obs=pd.DataFrame(index=pd.RangeIndex(pcs.shape[0]).astype(str)))
    lo, hi = 0.01, 5.0
    best: tuple[int, np.ndarray] | None = None
    for _ in range(25):  # bisection on the resolution for n_domains clusters
        res = (lo + hi) / 2
        sc.tl.leiden(
            tmp,
            resolution=res,
            adjacency=adjacency,
            flavor="igraph",
            n_iterations=2,
            directed=False,
            random_state=seed,
            key_added="d",
        )
        labels = tmp.obs["d"].cat.codes.to_numpy().astype(np.int64)
        n_found = int(labels.max()) + 1
        if best is None or abs(n_found - n_domains) < best[0]:
            best = (abs(n_found - n_domains), labels)
        if n_found == n_domains:
            break
        if n_found < n_domains:
            lo = res
        else:
            hi = res
    assert best is not None
    if best[0]:
        logger.info("Leiden: no resolution gave exactly %d domains; using the closest.", n_domains)
    return best[1]


def domain_agreement(
    y_true: Any,
    y_pred: Any,
    *,
    n_domains: int,
    method: Literal["kmeans", "leiden"] = "kmeans",
    labels: Any = None,
    n_pcs: int = 30,
    seed: int = 0,
) -> dict[str, float]:
    """Spatial domains found from predicted vs from true expression: adjusted Rand index and NMI.

    The same procedure runs on truth and on prediction (of one slide): genes z-scored over spots (constant genes
    set to 0), PCA to ``n_pcs`` components, then ``n_domains`` clusters by k-means (``n_init=10``) or by Leiden
    (:func:`scanpy.tl.leiden` with igraph on the symmetrised binary 15-NN graph of the PCs, resolution bisected
    to give ``n_domains`` clusters; needs ``igraph``).
    ``ari``/``nmi`` compare the domains of the prediction with those of the truth (1: identical partitions; 0:
    chance). With ``labels`` (e.g. pathologist annotations), ``label_*_pred`` and ``label_*_true`` compare each
    partition with them over the labelled spots (the ``*_true`` values are the ceiling the prediction can reach).

    Parameters
    ----------
    y_true
        Measured expression of one slide, spots × genes.
    y_pred
        Predicted expression, same shape.
    n_domains
        Number of domains (clusters).
    method
        ``"kmeans"`` or ``"leiden"``.
    labels
        Optional reference label per spot; missing values (``NaN``/``None``) are ignored.
    n_pcs
        Number of principal components.
    seed
        Seed of PCA, k-means and Leiden (same seed, same domains).

    Returns
    -------
    ``{"ari", "nmi"}`` and, with ``labels``, ``{"label_ari_pred", "label_nmi_pred", "label_ari_true",
    "label_nmi_true"}``. NMI is scikit-learn's (arithmetic normalisation).
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    t, p = _pair(y_true, y_pred)
    check_choice(method, DOMAIN_METHODS, "method")
    if isinstance(n_domains, bool) or not isinstance(n_domains, int | np.integer) or n_domains < 2:
        raise ValueError(f"`n_domains` must be an integer >= 2, got {n_domains!r}.")
    if t.shape[0] <= n_domains:
        raise ValueError(f"`n_domains={n_domains}` needs more spots than domains; got {t.shape[0]} spots.")
    if isinstance(n_pcs, bool) or not isinstance(n_pcs, int | np.integer) or n_pcs < 1:
        raise ValueError(f"`n_pcs` must be a positive integer, got {n_pcs!r}.")
    from threadpoolctl import threadpool_limits

    seed = int(seed)
    # one slide (a few thousand spots × <= 30 PCs): a single thread is as fast as several on a quiet machine and
    # avoids OpenBLAS/OpenMP oversubscription (seconds instead of milliseconds) on a busy one
    with threadpool_limits(limits=1):
        dom_t = _cluster(_pcs(t, n_pcs, seed), int(n_domains), method, seed)
        dom_p = _cluster(_pcs(p, n_pcs, seed), int(n_domains), method, seed)
    out = {
        "ari": float(adjusted_rand_score(dom_t, dom_p)),
        "nmi": float(normalized_mutual_info_score(dom_t, dom_p)),
    }
    if labels is not None:
        lab = pd.Series(np.asarray(labels, dtype=object))
        if len(lab) != t.shape[0]:
            raise ValueError(f"`labels` must hold one label per spot ({t.shape[0]}), got {len(lab)}.")
        ok = ~lab.isna().to_numpy()
        if ok.sum() < 2:
            raise ValueError("`labels` has fewer than 2 labelled spots; nothing to compare with.")
        ref = lab[ok].astype(str).to_numpy()
        for name, dom in (("pred", dom_p), ("true", dom_t)):
            out[f"label_ari_{name}"] = float(adjusted_rand_score(ref, dom[ok]))
            out[f"label_nmi_{name}"] = float(normalized_mutual_info_score(ref, dom[ok]))
    return out


# --------------------------------------------------------------------------------------------------------------------
# folds


def summarize_folds(frames: Sequence[pd.DataFrame] | Mapping[str, pd.DataFrame], *, ddof: int = 0) -> pd.DataFrame:
    """Mean ± standard deviation over folds of tidy metric frames (the HEST-benchmark / STFlow protocol).

    Parameters
    ----------
    frames
        One frame per fold as returned by :func:`histoflow.tl.evaluate` (columns ``metric``, ``aggregation``,
        ``group``, ``gene_set``, ``value``), as a list or a dict ``{fold name: frame}``.
    ddof
        Delta degrees of freedom of the standard deviation (0, as HEST-benchmark's ``np.std``; 1 for the sample
        standard deviation).

    Returns
    -------
    One row per (metric, aggregation, group, gene_set) with ``mean``, ``std`` and ``n_folds`` (the folds where the
    value is defined; undefined values are left out).
    """
    items = list(frames.items()) if isinstance(frames, Mapping) else list(enumerate(frames))
    if not items:
        raise ValueError("`frames` is empty; pass one metric frame per fold.")
    parts = []
    for name, df in items:
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"`frames` must hold DataFrames from `histoflow.tl.evaluate`, got {type(df).__name__}.")
        missing = [c for c in (*ROW_KEYS, "value") if c not in df.columns]
        if missing:
            raise ValueError(f"Fold {name!r} lacks the column(s) {missing}; pass frames from `histoflow.tl.evaluate`.")
        parts.append(df[[*ROW_KEYS, "value"]].assign(fold=str(name)))
    data = pd.concat(parts, ignore_index=True)
    grouped = data.groupby(list(ROW_KEYS), sort=False, observed=True)["value"]
    out = grouped.agg(["mean", "count"]).rename(columns={"count": "n_folds"})
    out["std"] = grouped.std(ddof=ddof)
    return out[["mean", "std", "n_folds"]].reset_index()
