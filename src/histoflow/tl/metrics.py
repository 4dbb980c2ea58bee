"""Metrics comparing predicted with measured expression, on arrays (spots × genes).

``histoflow.tl.evaluate`` runs all of them on stored predictions; these functions work on plain arrays too::

    import histoflow as hf

    hf.tl.metrics.pcc(y_true, y_pred, groups=slide_ids, aggregation="per_slide")
    hf.tl.metrics.gsc(y_true, y_pred)
    W = hf.tl.metrics.spatial_connectivity(adata)
    hf.tl.metrics.ssc(y_true, y_pred, W, groups=adata.obs["library_id"])

Definitions (every docstring gives the exact formula):

- ``pcc``: Pearson correlation per gene across spots; ``"per_slide"`` (MoLF, Stem: nanmean over genes per slide, then
  mean over slides) or ``"pooled"`` (HEST-benchmark, STFlow: per gene over all spots, mean over genes); PCC@k with
  ``k``. Constant genes are undefined (``NaN``), left out and counted, never zero.
- ``mse``, ``mae``; ``rvd`` = ``mean_g (var_pred - var_true)^2 / var_true^2`` (Stem).
- ``gsc``: Pearson correlation of the upper triangles of the true and predicted gene–gene correlation matrices.
- ``ssc``: Pearson correlation across genes of true and predicted Moran's I (row-normalised spatial weights).
- ``wasserstein_per_gene`` / ``wasserstein_per_spot``: exact 1-D 1-Wasserstein distances; ``cosine_distance``.
- ``domain_agreement``: ARI/NMI of spatial domains (PCA + k-means or Leiden) from prediction vs truth (and labels).
- ``summarize_folds``: mean ± std over folds of :func:`histoflow.tl.evaluate` frames.
"""

from __future__ import annotations

from histoflow.tl._metrics import (
    AGGREGATIONS,
    GeneStats,
    cosine_distance,
    cosine_distance_per_spot,
    domain_agreement,
    gene_correlation,
    gsc,
    mae,
    morans_i,
    mse,
    pcc,
    pcc_per_gene,
    rvd,
    spatial_connectivity,
    ssc,
    summarize_folds,
    wasserstein_per_gene,
    wasserstein_per_spot,
)

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
    "GeneStats",
    "AGGREGATIONS",
]
