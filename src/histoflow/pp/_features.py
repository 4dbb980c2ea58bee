"""Per-slide standardisation of patch features (removes slide-level stain and scanner shifts)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from histoflow._constants import Key
from histoflow._docs import doc_params
from histoflow._utils import copy_data, get_table, log_write
from histoflow._validate import check_finite, check_obs_key, check_obsm_key

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["scale_features"]


@doc_params()
def scale_features(
    sdata: SpatialData | AnnData,
    embedding_key: str,
    *,
    groupby: str | None = Key.library,
    table_key: str = Key.table,
    key_added: str | None = None,
    copy: bool = False,
) -> SpatialData | AnnData | None:
    """Standardise patch features within each slide: zero mean and unit variance per feature and slide.

    Features of a frozen image encoder carry each slide's staining and scanning: two sections of the same tissue
    can sit far apart in feature space, and a model trained on some slides then sees the others shifted. Centring
    and scaling the features of every slide by that slide's own mean and standard deviation removes those
    slide-level shifts and keeps the differences between spots within a slide, which is what expression varies
    with. It needs only the images, so a slide to be predicted is scaled the same way before
    :func:`histoflow.tl.predict`; it is not fitted on training slides and reused, so apply it to every slide,
    training and new, with the same ``groupby``.

    On HER2ST (leave one section out, ``benchmarks/her2st.py``) it raised the held-out PCC of the ridge probe, the MLP
    and MoLF (not of MoLF's dense ablation); see the benchmarks page of the documentation.

    Parameters
    ----------
    {doc_sdata}
    embedding_key
        ``obsm`` key of the features (e.g. ``"X_efficientnet_lite0"`` from :func:`histoflow.pp.embed_patches`).
    groupby
        ``obs`` column naming the slide of each spot; the statistics are computed per value. ``None`` standardises
        over all spots at once. Every group needs at least two spots.
    key_added
        ``obsm`` key that receives the scaled features (float32); default ``f"{embedding_key}_scaled"``. Passing
        ``embedding_key`` replaces the features.
    {doc_copy}

    Returns
    -------
    ``None``, or the modified copy when ``copy=True``. Writes ``obsm[key_added]`` (same shape as the features; a
    feature that is constant within a slide becomes 0 there) and ``uns[key_added]``: the features' own record
    (encoder, patch size, from :func:`~histoflow.pp.embed_patches`) with ``scaled_from`` (``embedding_key``) and
    ``scaled_groupby``. A model trained on the scaled features keeps that record, and :func:`histoflow.tl.predict`
    embeds a slide that lacks features and scales it the same way.

    Examples
    --------
    >>> import histoflow as hf
    >>> sdata = hf.datasets.synthetic(n_slides=2, n_genes=20, grid=(6, 6))  # doctest: +SKIP
    >>> hf.pp.embed_patches(sdata, "efficientnet_lite0")  # doctest: +SKIP
    >>> hf.pp.scale_features(sdata, "X_efficientnet_lite0")  # doctest: +SKIP
    """
    adata = get_table(sdata, table_key)
    check_obsm_key(adata, embedding_key, "embedding_key", hint="Compute features with `hf.pp.embed_patches`.")
    X = adata.obsm[embedding_key]
    X = np.asarray(X.to_numpy() if isinstance(X, pd.DataFrame) else X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"`embedding_key={embedding_key!r}` must hold a 2-d array (spots × features), got {X.ndim}-d.")
    check_finite(X, f"obsm[{embedding_key!r}]")
    key_added = f"{embedding_key}_scaled" if key_added is None else key_added
    if not isinstance(key_added, str) or not key_added:
        raise ValueError(f"`key_added` must be a non-empty string, got {key_added!r}.")

    if groupby is None:
        codes = np.zeros(adata.n_obs, dtype=np.int64)
        names = ["all"]
    else:
        check_obs_key(adata, groupby, "groupby", hint="Pass the slide column, or `groupby=None` for all spots.")
        col = adata.obs[groupby]
        if col.isna().any():
            raise ValueError(
                f"`obs[{groupby!r}]` (groupby) has {int(col.isna().sum())} missing value(s); every spot needs a "
                "slide. Fill them, or pass `groupby=None`."
            )
        cat = pd.Categorical(col)
        codes = np.asarray(cat.codes, dtype=np.int64)
        names = [str(c) for c in cat.categories]
    counts = np.bincount(codes, minlength=len(names))
    small = [n for n, c in zip(names, counts) if c == 1]
    if small:
        raise ValueError(
            f"`groupby={groupby!r}`: group(s) {small[:5]} hold a single spot; per-slide standardisation needs at "
            "least two spots per group. Drop those spots, or pass `groupby=None`."
        )

    # compute everything before writing
    out = np.empty(X.shape, dtype=np.float32)
    order = np.argsort(codes, kind="stable")  # one sort, then each slide's rows are a contiguous run
    for rows in np.split(order, np.cumsum(counts)[:-1]):
        if not rows.size:
            continue
        block = X[rows]
        mean = block.mean(axis=0)
        std = block.std(axis=0)
        out[rows] = (block - mean) / np.where(std > 0, std, 1.0)

    target = copy_data(sdata, table_key) if copy else sdata
    table = get_table(target, table_key)
    table.obsm[key_added] = out
    log_write("obsm", key_added)
    # keep the record of the features' encoder (embed_patches), so that a model trained on the scaled features can
    # embed and scale a new slide the same way (tl.predict)
    source = adata.uns.get(embedding_key)
    record = dict(source) if isinstance(source, Mapping) else {}
    record.update(scaled_from=embedding_key, scaled_groupby="None" if groupby is None else groupby)
    table.uns[key_added] = record
    log_write("uns", key_added)
    return target if copy else None
