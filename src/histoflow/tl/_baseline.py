"""Fit a baseline (HEST ridge probe or MLP) on patch features and write its predictions into the table."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from histoflow._constants import Key
from histoflow._docs import doc_params
from histoflow._logging import logger
from histoflow._utils import copy_data, get_table
from histoflow._validate import check_choice, check_obs_key, check_obsm_key

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from histoflow.models._baselines import MLPBaseline, RidgeProbe

__all__ = ["fit_baseline", "baseline_kind", "baseline_uns"]

KINDS = ("mlp", "ridge")


def _uns_safe(d: dict[str, Any]) -> dict[str, Any]:
    """Drop None (not writable to h5ad/zarr) and turn tuples into lists."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if v is None:
            continue
        if isinstance(v, dict):
            out[k] = _uns_safe(v)
        elif isinstance(v, tuple):
            out[k] = list(v)
        else:
            out[k] = v
    return out


def _rows_to_predict(table: AnnData, embedding_key: str, predict_on: str | Sequence[str], split_key: str) -> np.ndarray:
    F = table.obsm[embedding_key]
    F = F.to_numpy() if isinstance(F, pd.DataFrame) else np.asarray(F)
    has_features = np.ones(table.n_obs, dtype=bool)
    if F.ndim == 2 and F.dtype.kind in "fc":
        with np.errstate(over="ignore", invalid="ignore"):
            every = np.isfinite(F.sum())  # NaN and inf make the sum non-finite: one read clears every row
        if not every:  # a missing feature somewhere (or an overflowing sum): row by row
            has_features = np.isfinite(F).all(axis=1)
    if isinstance(predict_on, str) and predict_on == "all":
        selected = np.ones(table.n_obs, dtype=bool)
    else:
        names = [predict_on] if isinstance(predict_on, str) else [str(x) for x in predict_on]
        check_obs_key(
            table,
            split_key,
            "split_key",
            hint="Pass `predict_on='all'` or mark splits with `histoflow.pp.split_slides`.",
        )
        split = table.obs[split_key].astype(str).to_numpy()
        selected = np.isin(split, names)
        if not selected.any():
            raise ValueError(
                f"`predict_on={predict_on!r}` selects no spot: `obs[{split_key!r}]` has {sorted(set(split))}."
            )
    skipped = int((selected & ~has_features).sum())
    if skipped:
        logger.info("Skipping %d spots without patch features (NaN in `obsm[%r]`).", skipped, embedding_key)
    rows = np.flatnonzero(selected & has_features)
    if rows.size == 0:
        raise ValueError(f"No selected spot has finite features in `obsm[{embedding_key!r}]`; nothing to predict.")
    return rows


@doc_params()
def fit_baseline(
    sdata: SpatialData | AnnData,
    kind: Literal["mlp", "ridge"] = "mlp",
    *,
    table_key: str = Key.table,
    embedding_key: str = Key.embedding("efficientnet_lite0"),
    layer: str | None = Key.log1p,
    genes: Sequence[str] | None = None,
    split_key: str = Key.split,
    library_key: str = Key.library,
    key_added: str | None = None,
    predict_on: str | Sequence[str] = "all",
    seed: int = 0,
    max_epochs: int = 100,
    accelerator: str = "auto",
    devices: int | str | Sequence[int] = "auto",
    copy: bool = False,
    **kwargs: Any,
) -> MLPBaseline | RidgeProbe | tuple[MLPBaseline | RidgeProbe, SpatialData | AnnData]:
    """Fit a baseline that predicts expression from patch features, and write its predictions.

    ``kind="ridge"``: the HEST-benchmark linear probe (:class:`histoflow.models.RidgeProbe`: standardise → PCA(256)
    → ridge without intercept, so compare it by PCC only; ``fit_intercept=True`` adds one). ``kind="mlp"``: a
    two-hidden-layer perceptron (:class:`histoflow.models.MLPBaseline`) trained with Lightning, masked MSE on the
    targets, early stopping on the validation spots. Both fit on the spots marked ``train`` in ``obs[split_key]``; the
    MLP stops early on ``val``.

    Parameters
    ----------
    {doc_sdata}
    kind
        ``"mlp"`` or ``"ridge"``.
    embedding_key
        ``obsm`` key of the patch features (:func:`histoflow.pp.embed_patches`).
    layer
        Layer with the targets (log1p of raw counts, :func:`histoflow.pp.normalize`); None reads ``X``.
    genes
        Genes to predict; by default the panel ``var["histoflow_panel"]`` (:func:`histoflow.pp.select_genes`),
        else all genes.
    split_key
        ``obs`` column with ``train``/``val``/``test`` (:func:`histoflow.pp.split_slides`); without it, slides
        are split into train/val with ``seed`` (the table is not modified).
    {doc_library_key}
    key_added
        Where the results go; ``kind`` by default.
    predict_on
        ``"all"`` (every spot with finite features) or split names (e.g. ``"test"`` or ``["val", "test"]``) of
        ``obs[split_key]``; other spots get NaN.
    seed
        Seed of everything random (PCA, weights, batch order): the same seed gives the same predictions.
    max_epochs
        Maximum epochs of the MLP (ignored by the ridge probe).
    accelerator
        Lightning accelerator of the MLP (ignored by the ridge probe).
    devices
        Devices of the MLP (several: DDP); ignored by the ridge probe.
    copy
        Write into a copy of ``sdata`` and return it with the model instead of modifying ``sdata``.
    kwargs
        Further arguments of the model class (e.g. ``hidden_dims``, ``dropout``, ``n_components``, ``alpha``;
        ``fit_intercept=True`` puts the ridge probe's predictions on the targets' scale, e.g. to blend them with
        :func:`histoflow.tl.blend_predictions`) or
        of its ``train`` method (e.g. ``batch_size``, ``lr``, ``patience``, ``enable_progress_bar``).

    Returns
    -------
    The trained model (``(model, copy)`` with ``copy=True``). Writes into the table:

    - ``obsm[key_added]``: DataFrame of predictions (spots × panel genes, log1p space; NaN for spots not predicted);
    - ``layers[key_added]`` when the table's genes are exactly the panel;
    - ``uns[key_added]``: ``model``, ``kind``, ``params`` (keys, genes, hyperparameters, seed), ``history``
      (DataFrame, one row per epoch), ``predict_on``, ``n_predicted``.
    """
    check_choice(kind, KINDS, "kind")
    key = kind if key_added is None else key_added
    from histoflow.models._baselines import MLPBaseline, RidgeProbe
    from histoflow.tl._write import write_predictions

    cls = MLPBaseline if kind == "mlp" else RidgeProbe
    init_names = set(inspect.signature(cls.__init__).parameters) - {"self", "adata"}
    train_names = set(inspect.signature(cls.train).parameters) - {"self", "trainer_kwargs"}
    unknown = sorted(set(kwargs) - init_names - train_names)
    if unknown and kind == "ridge":
        raise TypeError(
            f"fit_baseline(kind='ridge') got unexpected arguments {unknown}; "
            f"the ridge probe takes {sorted((init_names | train_names) - {'table_key'})}."
        )
    init_kw = {k: v for k, v in kwargs.items() if k in init_names}
    train_kw = {k: v for k, v in kwargs.items() if k not in init_names}  # MLP: the rest goes to the Trainer

    target = copy_data(sdata, table_key) if copy else sdata
    table = get_table(target, table_key)
    check_obsm_key(
        table, embedding_key, "embedding_key",
        hint="Run `histoflow.pp.embed_patches` first, or pass the key of the patch features.",
    )  # fmt: skip
    rows = _rows_to_predict(table, embedding_key, predict_on, split_key)

    model = cls(
        table, embedding_key=embedding_key, layer=layer, genes=genes, library_key=library_key, seed=seed, **init_kw
    )
    if kind == "mlp":
        train_kw = {"max_epochs": max_epochs, "accelerator": accelerator, "devices": devices, **train_kw}
    model.train(split_key=split_key, **train_kw)
    mean = model.predict(table, rows=rows)

    write_predictions(table, key, rows=rows, genes=model.genes, mean=mean, uns=baseline_uns(model, predict_on, rows))
    return (model, target) if copy else model


def baseline_kind(model: MLPBaseline | RidgeProbe) -> str:
    """``"mlp"`` or ``"ridge"``: the ``kind`` of :func:`fit_baseline` that builds ``model``."""
    return "ridge" if type(model).__name__ == "RidgeProbe" else "mlp"


def baseline_uns(model: MLPBaseline | RidgeProbe, predict_on: str | Sequence[str], rows: np.ndarray) -> dict[str, Any]:
    """``uns[key]`` of a baseline's predictions (:func:`fit_baseline`, :func:`histoflow.tl.predict`)."""
    kind = baseline_kind(model)
    on = [predict_on] if isinstance(predict_on, str) else list(predict_on)
    return {
        "model": type(model).__name__,
        "kind": kind,
        "params": _uns_safe({**model.params, "kind": kind, "predict_on": on}),
        "history": model.history.reset_index(),
        "predict_on": on,
        "n_predicted": int(rows.size),
    }
