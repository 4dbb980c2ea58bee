"""From the table to arrays: panel genes, targets with gene masks, patch features, metadata codes, split rows.

Shared by every model class; below this module, models see only arrays and tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from histoflow._constants import Key
from histoflow._logging import logger
from histoflow._validate import check_finite, check_layer, check_obs_key, check_obsm_key

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "Registry",
    "panel_genes",
    "targets",
    "features",
    "metadata_codes",
    "split_rows",
    "check_compatible",
    "feature_chunk_rows",
]

UNKNOWN = "<unknown>"


@dataclass
class Registry:
    """What a model was trained on; saved with it and checked against new data.

    Attributes
    ----------
    genes
        Panel genes, in model order.
    embedding_key
        ``obsm`` key of the patch features.
    embedding_dim
        Length of a feature vector.
    layer
        Layer with the targets (log1p of raw counts).
    categories
        For each metadata ``obs`` column: its categories, in code order.
    library_key
        ``obs`` column naming slides.
    encoder
        The ``uns[embedding_key]`` record written by :func:`histoflow.pp.embed_patches` (encoder, patch size), so
        prediction on new slides can embed them the same way.
    """

    genes: list[str]
    embedding_key: str
    embedding_dim: int
    layer: str | None
    categories: dict[str, list[str]] = field(default_factory=dict)
    library_key: str = Key.library
    encoder: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Registry:
        """Inverse of :meth:`to_dict`."""
        return cls(**d)


def encoder_record(record: Any) -> dict[str, Any]:
    """The JSON-able part of an ``uns[embedding_key]`` record.

    Its scalars (numpy scalars as plain numbers) and its numeric lists (such as ``context_size_um``, which anndata reads
    back as arrays) as lists of floats; anything else is left out.
    """
    if not isinstance(record, dict):
        return {}
    out: dict[str, Any] = {}
    for k, v in record.items():
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, str | int | float):
            out[k] = v
        elif isinstance(v, list | tuple | np.ndarray) and np.ndim(v) == 1:
            arr = np.asarray(v)
            if arr.dtype.kind in "iuf" or len(arr) == 0:
                out[k] = [float(x) for x in arr]
    return out


def panel_genes(table: AnnData, genes: Sequence[str] | None, panel_key: str = Key.panel) -> list[str]:
    """``genes``, else the genes flagged in ``var[panel_key]`` (from :func:`histoflow.pp.select_genes`), else all."""
    if genes is not None:
        genes = [str(g) for g in genes]
        if len(set(genes)) != len(genes):
            raise ValueError("`genes` contains duplicates.")
        missing = [g for g in genes if g not in table.var_names]
        if missing:
            raise KeyError(
                f"{len(missing)} of the {len(genes)} `genes` are not in `adata.var_names`, e.g. {missing[:5]}. "
                "Pass genes that the table measures."
            )
        return genes
    if panel_key in table.var.columns:
        flag = table.var[panel_key].to_numpy().astype(bool)
        if flag.any():
            return [str(g) for g in table.var_names[flag]]
    logger.info("No gene panel (`var[%r]`); using all %d genes.", panel_key, table.n_vars)
    return [str(g) for g in table.var_names]


def targets(
    table: AnnData, genes: Sequence[str], layer: str | None, rows: np.ndarray, library_key: str = Key.library
) -> tuple[np.ndarray, np.ndarray]:
    """Dense ``float32`` targets ``(len(rows), len(genes))`` and the boolean gene mask of the same shape.

    The mask is False where a slide did not measure a gene (``uns["histoflow_gene_mask"]``, written by readers that
    join slides with different panels); those entries are left out of every loss.
    """
    check_layer(table, layer)
    idx = table.var_names.get_indexer(list(genes))
    if (idx < 0).any():
        missing = [g for g, i in zip(genes, idx) if i < 0][:5]
        raise KeyError(f"Panel genes missing from the table: {missing}.")
    X = table.X if layer is None else table.layers[layer]
    Y = X[rows][:, idx]
    Y = np.asarray(Y.toarray() if sp.issparse(Y) else Y, dtype=np.float32)
    check_finite(Y, f"adata.layers[{layer!r}]" if layer else "adata.X")
    mask = np.ones_like(Y, dtype=bool)
    gm = table.uns.get("histoflow_gene_mask")
    if isinstance(gm, pd.DataFrame) and library_key in table.obs:
        libs = table.obs[library_key].astype(str).to_numpy()[rows]
        gm = gm.reindex(columns=list(genes)).fillna(True).astype(bool)
        for lib in np.unique(libs):
            if lib in gm.index:
                mask[libs == lib] = gm.loc[lib].to_numpy()
    return Y, mask


def features(
    table: AnnData, embedding_key: str, rows: np.ndarray, dim: int | None = None, *, finite: bool = False
) -> np.ndarray:
    """Patch features ``(len(rows), d)`` from ``obsm[embedding_key]``, checked.

    Also for NaN and inf, unless the caller has already found these rows ``finite``.
    """
    check_obsm_key(
        table,
        embedding_key,
        "embedding_key",
        hint="Run `histoflow.pp.embed_patches` first, or pass the key of the patch features.",
    )
    F = table.obsm[embedding_key]
    F = np.asarray(F.to_numpy() if isinstance(F, pd.DataFrame) else F, dtype=np.float32)
    rows = np.asarray(rows)
    every_row = len(rows) == len(F) and (rows.dtype.kind != "b") and np.array_equal(rows, np.arange(len(F)))
    if not (every_row and F.ndim == 2 and F.flags.c_contiguous and F.flags.writeable):
        F = F[rows]  # a copy; all rows in order of a float32 array are used as they are (read only, never written)
    if F.ndim != 2:
        raise ValueError(f"`adata.obsm[{embedding_key!r}]` must be 2-D (spots × features), got shape {F.shape}.")
    if dim is not None and F.shape[1] != dim:
        raise ValueError(
            f"`adata.obsm[{embedding_key!r}]` has {F.shape[1]} features; the model was trained on {dim}. "
            "Embed the patches with the same encoder."
        )
    if not finite:
        check_finite(F, f"adata.obsm[{embedding_key!r}]")
    return F


#: bytes of patch features a CPU forward pass takes at once: a chunk and the copies its first layers make stay in
#: the processor's cache (a few MB). 4096 spots of 3 × 1280 features (63 MB) and their layer-normalised copy do not,
#: and each pass over them then goes to memory: projecting HER2ST-sized features took twice as long.
CPU_FEATURE_CHUNK_BYTES = 4 * 2**20


def feature_chunk_rows(batch_size: int, width: int, on_cpu: bool) -> int:
    """Spots per forward pass over ``width``-d float32 features: ``batch_size``, smaller on a CPU to fit the cache.

    Every layer on the path is per spot, so the chunk changes the speed and at most a matrix product's rounding,
    which can depend on how many rows it takes at once (seen only for chunks of a few spots; the predictions of the
    benchmark tables are bit for bit those of whole batches). On a GPU the chunk stays ``batch_size`` (fewer, larger
    transfers and kernels).
    """
    if not on_cpu:
        return batch_size
    return max(1, min(batch_size, CPU_FEATURE_CHUNK_BYTES // (4 * max(int(width), 1))))


def metadata_codes(
    table: AnnData,
    keys: Sequence[str],
    rows: np.ndarray,
    categories: dict[str, list[str]] | None = None,
    *,
    allow_unknown: bool = False,
) -> tuple[np.ndarray, dict[str, list[str]]]:
    """Integer codes ``(len(rows), len(keys))`` of metadata columns, and their categories.

    With ``categories`` (from a trained model), values outside them raise an error naming them, unless
    ``allow_unknown`` maps them to the learned null token (code ``-1``). Missing values (NaN/None) are not a
    category: they always get the null token (code ``-1``), in training as at prediction.
    """
    out = np.zeros((len(rows), len(keys)), dtype=np.int64)
    cats: dict[str, list[str]] = {}
    for j, key in enumerate(keys):
        check_obs_key(table, key, "metadata key", hint=f"Add `adata.obs[{key!r}]` or drop it from the metadata keys.")
        column = table.obs[key].iloc[rows]
        missing = column.isna().to_numpy()
        values = column.astype(str).to_numpy()
        known = list(categories[key]) if categories is not None else sorted(pd.unique(values[~missing]).tolist())
        codes = pd.Index(known).get_indexer(values)
        codes[missing] = -1
        if ((codes < 0) & ~missing).any():
            unseen = sorted(set(values[(codes < 0) & ~missing]))
            if not allow_unknown:
                raise ValueError(
                    f"`adata.obs[{key!r}]` has values the model was not trained on: {unseen[:5]} (known: {known}). "
                    "Pass `allow_unknown=True` to predict them with the learned null (unknown) token."
                )
            logger.warning("Values %s of %r are unknown to the model; using the null token.", unseen[:5], key)
        out[:, j] = codes
        cats[key] = known
    return out, cats


def split_rows(
    table: AnnData,
    *,
    split_key: str = Key.split,
    library_key: str = Key.library,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Row positions of the ``train``, ``val`` and ``test`` spots.

    Uses ``obs[split_key]`` (from :func:`histoflow.pp.split_slides`); without it, a slide-level split is made on a
    copy (the table is not modified) with :func:`~histoflow.pp.split_slides` defaults and ``seed``.
    """
    if split_key in table.obs:
        split = table.obs[split_key].astype(str).to_numpy()
    else:
        from histoflow.pp import split_slides

        probe = table.obs[[c for c in (library_key, Key.patient, Key.cancer_type) if c in table.obs]].copy()
        import anndata as ad

        tmp = ad.AnnData(obs=probe)
        strat = Key.cancer_type if Key.cancer_type in probe else None
        split_slides(tmp, library_key=library_key, stratify=strat, seed=seed, test_frac=0.0)
        split = tmp.obs[Key.split].astype(str).to_numpy()
        logger.info("No `obs[%r]`: split slides into train/val (seed %d).", split_key, seed)
    out = {name: np.flatnonzero(split == name) for name in ("train", "val", "test")}
    if out["train"].size == 0:
        raise ValueError(f"`obs[{split_key!r}]` marks no spot as 'train'; nothing to fit on.")
    return out


def check_compatible(registry: Registry, table: AnnData, genes_needed: bool = False) -> None:
    """Hard errors when ``table`` does not fit a trained model (gene panel, feature size, categories)."""
    if genes_needed:
        missing = [g for g in registry.genes if g not in table.var_names]
        if missing:
            raise ValueError(
                f"The table lacks {len(missing)} of the model's {len(registry.genes)} genes, e.g. {missing[:5]}; "
                "the model predicts exactly its training panel."
            )
    if registry.embedding_key in table.obsm:
        d = np.shape(table.obsm[registry.embedding_key])[1]
        if d != registry.embedding_dim:
            raise ValueError(
                f"`adata.obsm[{registry.embedding_key!r}]` has {d} features; the model expects "
                f"{registry.embedding_dim}. Embed with the same encoder ({registry.encoder.get('encoder', '?')})."
            )
