"""Regression targets: log1p of raw counts (the HEST-benchmark convention)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from histoflow._constants import Key
from histoflow._docs import doc_params
from histoflow._utils import copy_data, get_table, log_write
from histoflow._validate import check_counts, get_matrix

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["normalize", "log1p_counts"]


def log1p_counts(X: np.ndarray | sp.spmatrix | sp.sparray) -> np.ndarray | sp.spmatrix | sp.sparray:
    """``log(1 + X)`` as float32, keeping a sparse matrix sparse (same format) and never modifying ``X``."""
    if sp.issparse(X):
        Y = X.astype(np.float32, copy=True)
        Y.data = np.log1p(Y.data)
        return Y
    return np.log1p(np.asarray(X, dtype=np.float32))


@doc_params()
def normalize(
    sdata: SpatialData | AnnData,
    *,
    table_key: str = Key.table,
    layer: str | None = None,
    key_added: str = Key.log1p,
    counts_layer: str | None = Key.counts,
    copy: bool = False,
) -> SpatialData | AnnData | None:
    """Compute the regression targets: ``log1p`` of raw counts.

    histoflow follows the HEST-benchmark convention (also used by MoLF and STFlow): targets are
    ``log(1 + counts)`` of the **raw** counts, with no library-size normalisation (no
    ``normalize_total``) and no scaling. Predictions, metrics and plots are in this space.

    Parameters
    ----------
    {doc_sdata}
    layer
        Layer holding the raw counts; ``None`` reads ``X``. The counts are checked: negative, NaN/inf or
        non-integer values raise an error; values that look already log-transformed give a warning.
    key_added
        Layer that receives ``log1p(counts)`` (float32; sparse input stays sparse, same format).
    counts_layer
        When the counts are read from ``X`` and this layer does not exist yet, a copy of the counts is
        stored there, so they are kept even if ``X`` is later replaced. ``None`` stores nothing.
    {doc_copy}

    Returns
    -------
    ``None``, or the modified copy when ``copy=True``. Writes ``layers[key_added]`` of the table and,
    when the counts come from ``X``, ``layers[counts_layer]`` (if absent).
    """
    adata = get_table(sdata, table_key)
    arg = "adata.X" if layer is None else f"layers[{layer!r}]"
    X = get_matrix(adata, layer)
    if layer is not None and key_added == layer:
        raise ValueError(
            f"`key_added={key_added!r}` is the layer holding the raw counts (`layer={layer!r}`); writing log1p "
            "there would overwrite the counts. Pass another `key_added=`."
        )
    if layer is None and counts_layer is not None and counts_layer == key_added:
        raise ValueError(
            f"`counts_layer` and `key_added` are both {key_added!r}; the counts and their log1p cannot share a "
            "layer. Pass different names (or `counts_layer=None`)."
        )
    check_counts(X, arg)

    # compute everything before writing
    logged = log1p_counts(X)
    store_counts = layer is None and counts_layer is not None and counts_layer not in adata.layers
    counts = X.copy() if store_counts else None

    target = copy_data(sdata, table_key) if copy else sdata
    table = get_table(target, table_key)
    if store_counts:
        table.layers[counts_layer] = counts
        log_write("layers", counts_layer)
    table.layers[key_added] = logged
    log_write("layers", key_added)
    return target if copy else None
