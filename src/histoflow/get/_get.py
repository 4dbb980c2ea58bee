"""Accessors: stored predictions, routing and metrics as ready-to-use objects (nothing is recomputed)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from histoflow._constants import Key
from histoflow._docs import doc_params
from histoflow._utils import get_table

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["predictions", "routing", "metrics"]

_PRED_WRITERS = "`histoflow.tl.fit_molf`, `histoflow.tl.predict` or `histoflow.tl.fit_baseline`"
_METRICS_PARTS = (
    "summary",
    "per_gene",
    "per_slide",
    "pcc_by_slide",
    "morans_i_true_by_slide",
    "morans_i_pred_by_slide",
    "gene_corr_true",
    "gene_corr_pred",
    "params",
)


def missing_key(where: str, key: str, writer: str, key_arg: str = "key", found: Sequence[str] = ()) -> KeyError:
    """A KeyError saying which stored entry is missing, what exists and which function writes it."""
    shown = sorted(str(k) for k in found)[:15]
    return KeyError(
        f"`adata.{where}[{key!r}]` is missing (found: {shown}); it is written by {writer}. Run it first, or pass "
        f"`{key_arg}=` with the key you used there."
    )


def prediction_frame(table: AnnData, key: str, *, suffix: str = "", writer: str = _PRED_WRITERS) -> pd.DataFrame:
    """``obsm[key + suffix]`` as a DataFrame indexed by ``obs_names`` (KeyError naming the writer when missing)."""
    name = f"{key}{suffix}"
    if name not in table.obsm:
        raise missing_key("obsm", name, writer, found=list(table.obsm))
    value = table.obsm[name]
    if isinstance(value, pd.DataFrame):
        return value
    arr = np.asarray(value)
    return pd.DataFrame(arr, index=table.obs_names.copy(), columns=[str(i) for i in range(arr.shape[1])])


def _check_obs_columns(table: AnnData, keys: Sequence[str], arg: str) -> list[str]:
    keys = [keys] if isinstance(keys, str) else list(keys)
    missing = [k for k in keys if k not in table.obs.columns]
    if missing:
        raise KeyError(
            f"`{arg}` names {missing}, which are not columns of `adata.obs` (columns: {list(table.obs.columns)[:20]})."
        )
    return keys


@doc_params()
def predictions(
    sdata: SpatialData | AnnData,
    key: str = "molf",
    *,
    table_key: str = Key.table,
    spatial_key: str = Key.spatial,
    true_layer: str | None = Key.log1p,
    library_key: str = Key.library,
) -> AnnData:
    """The stored predictions as an AnnData of the predicted spots, ready for scanpy and squidpy.

    Parameters
    ----------
    {doc_sdata_only}
    key
        Key of the predictions (``key_added`` of :func:`histoflow.tl.fit_molf` / :func:`histoflow.tl.predict`).
    {doc_table_key}
    spatial_key
        ``obsm`` key of the spot centres (full-resolution pixels), copied to ``obsm["spatial"]``.
    true_layer
        Layer of the table with the measured log1p expression; when every predicted gene is in ``var_names`` it is
        copied to ``layers["true"]`` (``None``: never).
    {doc_library_key} Its ``uns["spatial"]`` entries (scanpy images) are copied when present.

    Returns
    -------
    A new AnnData (the table is not modified) with only the spots that have predictions: ``X`` = predicted log1p
    expression (``obsm[key]``, var = panel genes), ``layers["std"]`` when ``obsm[f"{key}_std"]`` exists (sampled
    predictions), ``layers["true"]`` (see ``true_layer``), ``obs`` copied from the table, ``obsm["spatial"]``,
    ``obsm["routing"]`` and ``obsm["X_latent"]`` when stored, and ``uns["histoflow"]`` = ``uns[key]`` of the table.
    """
    from anndata import AnnData

    table = get_table(sdata, table_key)
    pred = prediction_frame(table, key)
    values = pred.to_numpy(dtype=np.float32)
    keep = np.isfinite(values).any(axis=1)
    if not keep.any():
        raise ValueError(f"`adata.obsm[{key!r}]` holds no prediction (every value is NaN).")
    genes = pd.Index([str(c) for c in pred.columns])
    obs = table.obs.iloc[np.flatnonzero(keep)].copy()
    out = AnnData(X=values[keep].copy(), obs=obs, var=pd.DataFrame(index=genes))
    if f"{key}_std" in table.obsm:
        out.layers["std"] = prediction_frame(table, key, suffix="_std").to_numpy(dtype=np.float32)[keep].copy()
    if true_layer is not None and true_layer in table.layers and genes.isin(table.var_names).all():
        import scipy.sparse as sp

        cols = table.var_names.get_indexer(genes)
        X = table.layers[true_layer][:, cols]
        X = X.toarray() if sp.issparse(X) else np.asarray(X)
        out.layers["true"] = np.asarray(X, dtype=np.float32)[keep]
    if spatial_key in table.obsm:
        out.obsm["spatial"] = np.asarray(table.obsm[spatial_key], dtype=np.float64)[keep].copy()
    if f"{key}_routing" in table.obsm:
        out.obsm["routing"] = prediction_frame(table, key, suffix="_routing").iloc[np.flatnonzero(keep)].copy()
    if f"X_{key}_latent" in table.obsm:
        out.obsm["X_latent"] = np.asarray(table.obsm[f"X_{key}_latent"], dtype=np.float32)[keep].copy()
    if isinstance(table.uns.get(key), dict):
        out.uns["histoflow"] = dict(table.uns[key])
    spatial_uns = table.uns.get("spatial")
    if isinstance(spatial_uns, dict) and library_key in obs:
        libs = set(obs[library_key].astype(str))
        kept = {k: v for k, v in spatial_uns.items() if k in libs}
        if kept:
            out.uns["spatial"] = kept
    return out


@doc_params()
def routing(
    sdata: SpatialData | AnnData,
    key: str = "molf",
    *,
    table_key: str = Key.table,
    obs_keys: Sequence[str] | None = None,
    tidy: bool = False,
) -> pd.DataFrame:
    """Gate weights of the experts for every predicted spot, with the ``obs`` columns to group them by.

    Parameters
    ----------
    {doc_sdata_only}
    key
        Key of the predictions; the weights are ``obsm[f"{key}_routing"]``.
    {doc_table_key}
    obs_keys
        ``obs`` columns added to the frame; default those of ``library_id`` and ``cancer_type`` the table has. Named
        columns missing from the table raise a KeyError.
    tidy
        Long format (one row per spot and expert) instead of wide.

    Returns
    -------
    Wide (default): index ``obs_names``, the ``obs_keys`` columns, then one column per expert (``expert_0``, ...),
    weights summing to 1 per spot. Tidy: columns ``obs_name``, the ``obs_keys``, ``expert`` and ``weight``. Spots
    without a prediction (NaN weights) are left out.
    """
    table = get_table(sdata, table_key)
    weights = prediction_frame(table, key, suffix="_routing")
    if obs_keys is None:
        keys = [k for k in (Key.library, Key.cancer_type) if k in table.obs.columns]
    else:
        keys = _check_obs_columns(table, obs_keys, "obs_keys")
    keep = np.isfinite(weights.to_numpy(dtype=np.float64)).all(axis=1)
    experts = [str(c) for c in weights.columns]
    wide = pd.concat(
        [table.obs.loc[keep, keys].copy(), weights.loc[keep].set_axis(experts, axis=1).astype(np.float64)], axis=1
    )
    if not tidy:
        return wide
    long = wide.rename_axis("obs_name").reset_index()
    long = long.melt(id_vars=["obs_name", *keys], value_vars=experts, var_name="expert", value_name="weight")
    long["expert"] = pd.Categorical(long["expert"], categories=experts)
    return long


@doc_params()
def metrics(
    sdata: SpatialData | AnnData,
    key: str = "molf",
    *,
    table_key: str = Key.table,
    part: str = "summary",
    metrics_key: str | None = None,
) -> Any:
    """A stored result of :func:`histoflow.tl.evaluate`.

    Parameters
    ----------
    {doc_sdata_only}
    key
        Key of the evaluated predictions (``pred_key`` of :func:`histoflow.tl.evaluate`).
    {doc_table_key}
    part
        Which part: ``"summary"`` (the tidy frame), ``"per_gene"``, ``"per_slide"``, ``"pcc_by_slide"``,
        ``"morans_i_true_by_slide"``, ``"morans_i_pred_by_slide"``, ``"gene_corr_true"``, ``"gene_corr_pred"``,
        ``"params"``.
    metrics_key
        ``uns`` key of the stored metrics (``key_added`` of :func:`histoflow.tl.evaluate`); default
        ``f"{key}_metrics"``.

    Returns
    -------
    The stored object (a DataFrame for every part but ``"params"``, a dict), not a copy.
    """
    table = get_table(sdata, table_key)
    return metrics_part(table, key, part, metrics_key=metrics_key)


def metrics_entry(table: AnnData, key: str, metrics_key: str | None = None) -> dict[str, Any]:
    """``uns[metrics_key or f"{key}_metrics"]`` with a KeyError naming :func:`histoflow.tl.evaluate` when missing."""
    name = metrics_key or f"{key}_metrics"
    entry = table.uns.get(name)
    if not isinstance(entry, dict):
        raise missing_key(
            "uns",
            name,
            f"`histoflow.tl.evaluate(sdata, pred_key={key!r})`",
            key_arg="metrics_key" if metrics_key else "key",
            found=list(table.uns),
        )
    return entry


def metrics_part(table: AnnData, key: str, part: str, *, metrics_key: str | None = None) -> Any:
    """One part of the stored metrics, with clear errors for an unknown or absent part."""
    if part not in _METRICS_PARTS:
        raise ValueError(f"`part={part!r}` is not valid; choose one of {list(_METRICS_PARTS)}.")
    entry = metrics_entry(table, key, metrics_key)
    if part not in entry:
        hint = {
            "gene_corr_true": "pass `store_gene_correlation=True` and include 'gsc' in `metrics=`",
            "gene_corr_pred": "pass `store_gene_correlation=True` and include 'gsc' in `metrics=`",
            "morans_i_true_by_slide": "include 'ssc' in `metrics=`",
            "morans_i_pred_by_slide": "include 'ssc' in `metrics=`",
            "pcc_by_slide": "include 'pcc' in `metrics=`",
        }.get(part, "run it again")
        raise KeyError(
            f"The stored metrics `uns[{metrics_key or key + '_metrics'!r}]` have no {part!r} (parts: "
            f"{sorted(entry)}); `histoflow.tl.evaluate` writes it: {hint}."
        )
    return entry[part]
