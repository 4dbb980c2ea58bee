"""Functional API of the FLAG-style gene-token flow: fit and write predictions (predict with ``tl.predict``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from histoflow._constants import Key
from histoflow._docs import doc_params
from histoflow._utils import copy_data, get_table
from histoflow.tl._molf import _train_predict_write

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from histoflow.models import FLAG

__all__ = ["fit_flag"]


@doc_params()
def fit_flag(
    sdata: SpatialData | AnnData,
    *,
    gene_embeddings: pd.DataFrame | str | os.PathLike[str] | None = None,
    table_key: str = Key.table,
    embedding_key: str = "X_efficientnet_lite0",
    layer: str | None = Key.log1p,
    genes: Sequence[str] | None = None,
    cancer_type_key: str = Key.cancer_type,
    metadata_keys: Sequence[str] | None = None,
    library_key: str = Key.library,
    split_key: str = Key.split,
    max_epochs: int = 300,
    batch_size: int = 256,
    accelerator: str = "auto",
    devices: int | str | Sequence[int] = "auto",
    strategy: str | None = None,
    steps: int = 1,
    n_samples: int = 1,
    temperature: float = 1.0,
    antithetic: bool = False,
    seed: int = 0,
    key_added: str = "flag",
    train_kwargs: dict[str, Any] | None = None,
    copy: bool = False,
    **config: Any,
) -> FLAG | tuple[FLAG, SpatialData | AnnData]:
    """Fit the FLAG-style gene-token flow model and write its predictions for every spot.

    A DiT over the panel's gene tokens (gene identity + value embedding, adaLN conditioning on patch features, spatial
    context and cancer type) is trained by flow matching in log1p expression space on the ``train`` slides, with early
    stopping on the ``val`` slides (``obs[split_key]``; made with :func:`histoflow.pp.split_slides` defaults when
    missing, without writing it). With ``gene_embeddings``, REPA-style alignment pulls the projected gene tokens of
    block ``align_layer`` towards those per-gene vectors (cosine, weight ``lambda_align``); panel genes missing from
    the table are left out of that loss and reported. Then every spot with patch features is predicted with ``steps``
    Euler steps at the model's guidance scale. The outputs have the same keys as :func:`fit_molf`, so
    :func:`histoflow.tl.predict`, :func:`histoflow.tl.evaluate` and the plots apply unchanged.

    Parameters
    ----------
    {doc_sdata}
    gene_embeddings
        Per-gene alignment targets: a DataFrame (index = genes, columns = dimensions) or a path
        (:func:`histoflow.pp.read_gene_embeddings`: ``.csv``/``.tsv``/``.parquet``, a ``{gene: vector}``
        ``.pkl``/``.pt``, a scGPT or Geneformer model folder); :func:`histoflow.pp.gene_embeddings_from_gene_sets`
        builds a knowledge-derived one. None: no alignment.
    embedding_key
        ``obsm`` key of the patch features (:func:`histoflow.pp.embed_patches`).
    layer
        Layer with log1p expression (:func:`histoflow.pp.normalize`).
    genes
        Panel genes; default ``var["histoflow_panel"]`` (:func:`histoflow.pp.select_genes`), else all genes (at most
        ``max_genes``: attention over gene tokens grows as genes²).
    cancer_type_key
        ``obs`` column with the cancer type (a metadata token when present).
    metadata_keys
        ``obs`` columns used as metadata tokens (default ``[cancer_type_key]``).
    {doc_library_key}
    split_key
        ``obs`` column with ``train``/``val``/``test``.
    max_epochs
        Maximum epochs.
    batch_size
        Spots per batch.
    accelerator, devices, strategy
        Lightning settings (several GPUs or CPU processes through DDP). The predictions are then computed in this
        process on the accelerator's device (``"auto"``: CUDA, then MPS, then CPU).
    steps
        Euler steps at prediction (1 = one velocity evaluation).
    n_samples
        Draws per spot at prediction (their spread goes to ``obsm[f"{key_added}_std"]``).
    temperature
        Scale of the prior noise at prediction: 1 samples the model, 0 gives its deterministic point estimate.
    antithetic
        Draw the prior noise in antithetic pairs at prediction (see :meth:`histoflow.models.FLAG.predict`).
    seed
        Seed for training and sampling; the same seed gives the same numbers on CPU.
    key_added
        Key of the predictions.
    train_kwargs
        More arguments for :meth:`histoflow.models.FLAG.train` (``lr``, ``patience``, ``checkpoint_dir``, ...).
    {doc_copy}
    **config
        Model settings (:class:`histoflow.models.FLAGConfig`): ``d_model``, ``n_layers``, ``n_heads``,
        ``spatial_context``, ``align_layer``, ``lambda_align``, ``guidance``, ``max_genes``, ...

    Returns
    -------
    The trained :class:`~histoflow.models.FLAG` (and the modified copy when ``copy=True``). Writes, on the table,
    ``obsm[key_added]`` (DataFrame spots × panel genes, log1p), ``layers[key_added]`` when the table's genes are
    exactly the panel, ``obsm[f"{key_added}_std"]`` when ``n_samples > 1``, ``obsm[f"X_{key_added}_latent"]`` (final
    gene tokens pooled over genes), ``obsm[f"{key_added}_routing"]`` (one column of ones: a dense model) and
    ``uns[key_added]`` (parameters, per-epoch history with ``train_flow`` and ``train_align``, versions, and
    ``alignment``: source, dimensions, number and names of panel genes without an embedding).
    """
    from histoflow.models import FLAG

    target = copy_data(sdata, table_key) if copy else sdata
    table = get_table(target, table_key)
    model = FLAG(
        table,
        gene_embeddings=gene_embeddings,
        embedding_key=embedding_key,
        layer=layer,
        genes=genes,
        metadata_keys=metadata_keys,
        cancer_type_key=cancer_type_key,
        library_key=library_key,
        split_key=split_key,
        seed=seed,
        **config,
    )
    _train_predict_write(
        model,
        table,
        max_epochs=max_epochs,
        train={"batch_size": batch_size, "accelerator": accelerator, "devices": devices, "strategy": strategy},
        train_kwargs=train_kwargs,
        steps=steps,
        n_samples=n_samples,
        temperature=temperature,
        antithetic=antithetic,
        seed=seed,
        key_added=key_added,
        embedding_key=embedding_key,
    )
    return (model, target) if copy else model
