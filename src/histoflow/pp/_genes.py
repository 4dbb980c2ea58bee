"""Gene panels: highly variable genes per cancer type, HMHVG, MSigDB Hallmark genes and their variance tiers."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from histoflow._constants import Key
from histoflow._docs import doc_params
from histoflow._logging import logger
from histoflow._utils import copy_data, get_table, is_spatialdata, log_write
from histoflow._validate import check_choice, check_counts, check_obs_key, get_matrix

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["select_genes", "read_gene_sets", "hallmark_tiers", "MOLF_TIER_THRESHOLDS"]

Flavor = Literal["hvg", "hmhvg", "hallmark"]
FLAVORS: tuple[str, ...] = ("hvg", "hmhvg", "hallmark")
TIER_METHODS: tuple[str, ...] = ("molf", "tertiles")
TIERS: tuple[str, ...] = ("low", "mid", "high")

#: Hallmark variance tiers of MoLF (Table 12): low < 0.9178 <= mid <= 1.0211 < high. The paper's table leaves
#: 1.0209-1.0211 between "mid" (max 1.0209) and "high" (min 1.0211); histoflow puts that gap into "mid".
MOLF_TIER_THRESHOLDS: tuple[float, float] = (0.9178, 1.0211)

# loess spans tried in turn for seurat_v3 (the first is scanpy's default); larger spans fit groups with few spots
_SPANS: tuple[float, ...] = (0.3, 0.5, 1.0)
_ALL = "all"


@doc_params()
def select_genes(
    sdata: SpatialData | AnnData,
    flavor: Flavor | Sequence[Flavor] = "hvg",
    *,
    table_key: str = Key.table,
    n_top: int = 50,
    groupby: str | None = Key.cancer_type,
    layer: str | None = None,
    gene_sets: str | os.PathLike[str] | Mapping[str, Sequence[str]] | None = None,
    mask_obs: str | np.ndarray | Sequence[bool] | pd.Series | None = None,
    exclude_prefixes: Sequence[str] | None = ("MT-", "RPL", "RPS"),
    tiers: Literal["molf", "tertiles"] | None = "molf",
    key_added: str = Key.panel,
    subset: bool = False,
    copy: bool = False,
) -> SpatialData | AnnData | None:
    """Choose the gene panel that models are trained on and evaluated with.

    Flavors (pass one, or a sequence of them for their union):

    - ``"hvg"``: the top-``n_top`` highly variable genes of **each** cancer type (``groupby``), computed with
      :func:`scanpy.pp.highly_variable_genes` (``flavor="seurat_v3"``) on raw counts, then the union over
      types (HEST-benchmark / MoLF style; ``groupby=None`` uses all spots at once). Each group contributes
      exactly ``n_top`` genes, so the union has at most ``n_groups * n_top`` genes. When scanpy's loess fit
      fails on a small group, larger spans (0.5, then 1.0) are tried; the span used is stored.
    - ``"hmhvg"``: high-mean, high-variance genes (Stem/FLAG): the top-``n_top`` genes by mean raw count
      intersected with the top-``n_top`` genes by standard deviation of raw counts (population std),
      over all (masked) spots at once; at most ``n_top`` genes. Ties are broken by ``var`` order.
    - ``"hallmark"``: every gene of the MSigDB Hallmark sets (``gene_sets``) that is in ``var_names``
      (exact, case-sensitive match).

    ``exclude_prefixes`` removes genes from the data-driven flavors (``"hvg"``, ``"hmhvg"``) before ranking;
    the match is case-insensitive (``"MT-"`` also drops mouse ``mt-`` genes). Curated Hallmark genes are kept
    as they are.

    Hallmark variance tiers (MoLF, Table 12): the variance (``ddof=1``) of ``log1p`` raw counts of each
    Hallmark gene over the (masked) spots, split into ``"low"``, ``"mid"`` and ``"high"``. ``tiers="molf"``
    uses the paper's thresholds: low < 0.9178 <= mid <= 1.0211 < high (the paper's table has mid up to 1.0209
    and high from 1.0211; genes in between go to mid). ``tiers="tertiles"`` uses the tertiles ``q1, q2`` of
    the variances of all Hallmark genes present in the data: low < q1 <= mid <= q2 < high. Tiers are stored
    for the Hallmark genes of the panel, when Hallmark genes are part of the selection or ``gene_sets`` is
    given.

    Parameters
    ----------
    {doc_sdata_only}
    flavor
        ``"hvg"``, ``"hmhvg"``, ``"hallmark"``, or a sequence of them (the panel is their union).
    {doc_table_key}
    n_top
        Number of genes per group (``"hvg"``) or of each ranking (``"hmhvg"``).
    groupby
        ``obs`` column with the cancer type; ``"hvg"`` selects genes per group. ``None`` treats all spots
        as one group.
    layer
        Layer holding raw counts; ``None`` uses ``layers["counts"]`` when present, else ``X``. Non-integer,
        negative or non-finite values raise an error.
    gene_sets
        The Hallmark gene sets: a GMT file path (read with :func:`gseapy.read_gmt`), a dict
        ``{set name: genes}``, or a gseapy/Enrichr library name such as ``"MSigDB_Hallmark_2020"``
        (fetched with :func:`gseapy.get_library`, needs internet). Required for ``"hallmark"``.
    mask_obs
        Boolean array (one value per spot) or the name of a boolean ``obs`` column: statistics (HVGs, means,
        variances, tiers) are computed on these spots only, e.g. the training sections.
    exclude_prefixes
        Gene-name prefixes dropped from ``"hvg"`` and ``"hmhvg"`` (``None`` keeps every gene).
    tiers
        ``"molf"``, ``"tertiles"`` or ``None`` (no tiers).
    key_added
        Name of the ``var`` column and ``uns`` entry written.
    subset
        Keep only the panel genes in the table. Allowed for AnnData input, or with ``copy=True`` (the
        returned SpatialData holds a subset table; the input is untouched).
    {doc_copy}

    Returns
    -------
    ``None``, or the modified copy when ``copy=True``. Writes into the table:

    - ``var[key_added]``: boolean, the panel;
    - ``var[f"{key_added}_{flavor}"]``: boolean, the genes each requested flavor selected;
    - ``uns[key_added]``: ``{"params": {...}, "genes": [panel genes in var order],
      "hvg_by_group": {group: [genes by rank]}, "hallmark_tiers": {gene: "low" | "mid" | "high"},
      "hallmark_sets": {set: [its genes in the panel]}}``.
    """
    adata = get_table(sdata, table_key)
    flavors = _as_flavors(flavor)
    if tiers is not None:
        check_choice(tiers, TIER_METHODS, "tiers")
    if subset and not copy and is_spatialdata(sdata):
        raise ValueError(
            "`subset=True` would replace the table of a SpatialData in place; pass `copy=True` to get a copy "
            "with the subset table, or use `subset=False` and index `var[key_added]` yourself."
        )
    if not adata.var_names.is_unique:
        dup = adata.var_names[adata.var_names.duplicated()].unique()[:5].tolist()
        raise ValueError(f"`var_names` are not unique (e.g. {dup}); call `adata.var_names_make_unique()` first.")
    n_vars = adata.n_vars
    data_driven = [f for f in flavors if f != "hallmark"]
    bad_type = isinstance(n_top, bool) or not isinstance(n_top, int | np.integer)
    if bad_type or n_top < 1 or (data_driven and n_top > n_vars):
        raise ValueError(f"`n_top` must be an integer between 1 and the number of genes ({n_vars}), got {n_top!r}.")
    n_top = int(n_top)

    # raw counts
    if layer is None and Key.counts in adata.layers:
        layer = Key.counts
    X = get_matrix(adata, layer)
    counts_arg = "adata.X" if layer is None else f"layers[{layer!r}]"
    check_counts(X, counts_arg, warn_logged=False)
    if sp.issparse(X):
        X = sp.csr_matrix(X)  # row slicing below; no copy for CSR input

    mask, mask_desc = _resolve_mask(adata, mask_obs)
    n_used = int(mask.sum())
    idx = np.flatnonzero(mask)
    genes = adata.var_names.astype(str)

    # candidates of the data-driven flavors
    prefixes = tuple(exclude_prefixes or ())
    keep = _keep_genes(genes, prefixes)
    n_cand = int(keep.sum())
    if data_driven and n_top > n_cand:
        raise ValueError(
            f"`n_top={n_top}` is larger than the {n_cand} genes left after `exclude_prefixes={list(prefixes)}` "
            f"(of {n_vars}); lower `n_top` or exclude fewer prefixes."
        )

    sets: dict[str, list[str]] = {}
    sets_source: str | None = None
    hallmark_present = np.zeros(n_vars, dtype=bool)
    if "hallmark" in flavors or gene_sets is not None:
        sets, sets_source = read_gene_sets(gene_sets)
        all_set_genes = pd.Index(sorted({g for v in sets.values() for g in v}))
        hallmark_present = genes.isin(all_set_genes)
        if "hallmark" in flavors and not hallmark_present.any():
            upper = pd.Index(genes.str.upper())
            n_ci = int(upper.isin(all_set_genes.str.upper()).sum())
            hint = (
                f" {n_ci} genes match when ignoring case (e.g. mouse symbols): convert `var_names` to the "
                "gene-set symbols first."
                if n_ci
                else " Check that `var_names` are gene symbols (not Ensembl ids) of the same species."
            )
            raise ValueError(
                f"None of the {len(all_set_genes)} genes of the {len(sets)} gene sets read from {sets_source} "
                f"is in `var_names` ({n_vars} genes, e.g. {genes[:5].tolist()})." + hint
            )

    computed: dict[str, np.ndarray] = {}
    hvg_by_group: dict[str, list[str]] = {}
    spans: dict[str, float] = {}
    if "hvg" in flavors:
        groups = _groups(adata, groupby, mask)
        cand_idx = np.flatnonzero(keep)
        sel = np.zeros(n_vars, dtype=bool)
        for name, rows in groups.items():
            sub = _take(X, rows, cand_idx)
            top, span = _hvg_seurat_v3(sub, genes[cand_idx], n_top, name)
            hvg_by_group[name] = top
            spans[name] = span
            sel |= genes.isin(top)
        computed["hvg"] = sel
    if "hmhvg" in flavors:
        cand_idx = np.flatnonzero(keep)
        mean, var = _mean_var(_take(X, idx, cand_idx), ddof=0)
        std = np.sqrt(var)
        by_mean = np.argsort(-mean, kind="stable")[:n_top]
        by_std = np.argsort(-std, kind="stable")[:n_top]
        chosen = cand_idx[np.intersect1d(by_mean, by_std)]
        sel = np.zeros(n_vars, dtype=bool)
        sel[chosen] = True
        if not sel.any():
            logger.warning("`flavor='hmhvg'`: the top-%d genes by mean and by std do not overlap.", n_top)
        computed["hmhvg"] = sel

    if "hallmark" in flavors:
        computed["hallmark"] = hallmark_present.copy()
    selected = {f: computed[f] for f in flavors}

    panel = np.zeros(n_vars, dtype=bool)
    for sel in selected.values():
        panel |= sel
    if not panel.any():
        raise ValueError(f"`flavor={flavors}` selected no gene; try another flavor or a larger `n_top`.")
    panel_genes = genes[panel].tolist()
    panel_set = set(panel_genes)

    tier_map: dict[str, str] = {}
    thresholds: list[float] | None = None
    if tiers is not None and sets:
        hall_idx = np.flatnonzero(hallmark_present)
        if hall_idx.size:
            _, hvar = _mean_var(_log1p(_take(X, idx, hall_idx)), ddof=1)
            labels, (lo, hi) = hallmark_tiers(hvar, method=tiers)
            thresholds = [float(lo), float(hi)]
            tier_map = {g: t for g, t in zip(genes[hall_idx], labels) if g in panel_set}
    hallmark_sets = {}
    for name, members in sets.items():
        kept = list(dict.fromkeys(g for g in members if g in panel_set))
        if kept:
            hallmark_sets[name] = kept

    params: dict[str, Any] = {
        "flavor": list(flavors),
        "n_top": n_top,
        "groupby": groupby if "hvg" in flavors else None,
        "layer": layer if layer is not None else "X",
        "mask_obs": mask_desc,
        "n_obs_used": n_used,
        "exclude_prefixes": list(prefixes),
        "tiers": tiers,
        "tier_thresholds": thresholds,
        "gene_sets": sets_source,
        "n_gene_sets": len(sets),
        "loess_span_by_group": spans,
    }
    info = {
        "params": params,
        "genes": panel_genes,
        "hvg_by_group": hvg_by_group,
        "hallmark_tiers": tier_map,
        "hallmark_sets": hallmark_sets,
    }
    logger.info(
        "Selected %d genes (%s).", len(panel_genes), ", ".join(f"{f}: {int(s.sum())}" for f, s in selected.items())
    )

    # write (everything above succeeded)
    if copy:
        if is_spatialdata(sdata):
            target = copy_data(sdata, table_key)
            if subset:
                target.tables[table_key] = get_table(target, table_key)[:, panel].copy()
        else:
            target = adata[:, panel].copy() if subset else adata.copy()
        sel_mask = np.ones(int(panel.sum()), dtype=bool) if subset else panel
        per_flavor = {f: (s[panel] if subset else s) for f, s in selected.items()}
    else:
        target = sdata
        sel_mask, per_flavor = panel, selected
    table = get_table(target, table_key)
    if subset and not copy:
        table._inplace_subset_var(panel)
        sel_mask = np.ones(int(panel.sum()), dtype=bool)
        per_flavor = {f: s[panel] for f, s in selected.items()}
    table.var[key_added] = sel_mask
    log_write("var", key_added)
    for f in FLAVORS:
        col = f"{key_added}_{f}"
        if f in per_flavor:
            table.var[col] = per_flavor[f]
            log_write("var", col)
        elif col in table.var:  # left over from an earlier call with other flavors
            del table.var[col]
            logger.info("Removing stale `adata.var[%r]`", col)
    table.uns[key_added] = info
    log_write("uns", key_added)
    return target if copy else None


def read_gene_sets(
    gene_sets: str | os.PathLike[str] | Mapping[str, Sequence[str]] | None,
) -> tuple[dict[str, list[str]], str]:
    """Read gene sets from a GMT path, a dict or a gseapy/Enrichr library name.

    Parameters
    ----------
    gene_sets
        A GMT file path, a dict ``{set name: genes}``, or a gseapy/Enrichr library name (needs internet).

    Returns
    -------
    ``({set name: [genes]}, description of the source)``.
    """
    if gene_sets is None:
        raise ValueError(
            "`gene_sets` is required for `flavor='hallmark'`: pass the path of the MSigDB Hallmark GMT file "
            "(e.g. 'h.all.v2023.1.Hs.symbols.gmt' from https://www.gsea-msigdb.org), a dict {set: genes}, or a "
            "gseapy/Enrichr library name such as 'MSigDB_Hallmark_2020' (downloaded, needs internet)."
        )
    if isinstance(gene_sets, Mapping):
        raw: Mapping[str, Any] = gene_sets
        source = f"a dict of {len(gene_sets)} sets"
    elif isinstance(gene_sets, str | os.PathLike):
        path = Path(gene_sets)
        text = str(gene_sets)
        looks_like_path = isinstance(gene_sets, os.PathLike) or any(
            s in text for s in ("/", "\\", ".gmt", ".GMT", ".txt")
        )
        if path.is_file():
            import gseapy

            if not text.lower().endswith("gmt"):
                raise ValueError(f"`gene_sets={text!r}` must be a GMT file whose name ends with '.gmt'.")
            raw = gseapy.read_gmt(text)
            source = text
        elif looks_like_path:
            raise FileNotFoundError(f"`gene_sets={text!r}`: no such file. Pass the path of an existing GMT file.")
        else:
            import gseapy

            try:
                raw = gseapy.get_library(name=text)
            except Exception as err:
                raise RuntimeError(
                    f"Could not fetch the gseapy/Enrichr library `gene_sets={text!r}` ({type(err).__name__}: {err}). "
                    "This needs internet access and a valid library name (see `gseapy.get_library_name()`); "
                    "offline, pass the path of a GMT file instead (e.g. MSigDB's 'h.all.*.symbols.gmt')."
                ) from err
            source = f"gseapy library {text!r}"
    else:
        raise TypeError(
            f"`gene_sets` must be a GMT path, a dict {{set: genes}} or a library name, got {type(gene_sets).__name__}."
        )
    sets: dict[str, list[str]] = {}
    for name, members in raw.items():
        if isinstance(members, str):
            members = [members]
        cleaned = [str(g).strip() for g in members if str(g).strip()]
        if cleaned:
            sets[str(name)] = list(dict.fromkeys(cleaned))
    if not sets:
        raise ValueError(f"`gene_sets` ({source}) holds no gene set with genes.")
    return sets, source


def hallmark_tiers(
    variances: np.ndarray, *, method: Literal["molf", "tertiles"] = "molf"
) -> tuple[list[str], tuple[float, float]]:
    """Assign ``"low"``/``"mid"``/``"high"`` variance tiers: low < lo <= mid <= hi < high.

    Parameters
    ----------
    variances
        One variance (of log1p expression) per gene.
    method
        ``"molf"``: MoLF's thresholds :data:`MOLF_TIER_THRESHOLDS`; ``"tertiles"``: the tertiles of ``variances``.

    Returns
    -------
    The tier of each gene and the thresholds ``(lo, hi)``.
    """
    check_choice(method, TIER_METHODS, "tiers")
    v = np.asarray(variances, dtype=np.float64)
    if method == "molf":
        lo, hi = MOLF_TIER_THRESHOLDS
    else:
        lo, hi = (float(q) for q in np.quantile(v, [1 / 3, 2 / 3]))
    labels = np.where(v < lo, "low", np.where(v > hi, "high", "mid"))
    return labels.tolist(), (float(lo), float(hi))


def _as_flavors(flavor: str | Sequence[str]) -> list[str]:
    items = [flavor] if isinstance(flavor, str) else list(flavor)
    if not items:
        raise ValueError(f"`flavor` is empty; choose one or more of {list(FLAVORS)}.")
    for f in items:
        check_choice(f, FLAVORS, "flavor")
    return list(dict.fromkeys(items))


def _resolve_mask(
    adata: AnnData, mask_obs: str | np.ndarray | Sequence[bool] | pd.Series | None
) -> tuple[np.ndarray, str | None]:
    if mask_obs is None:
        mask, desc = np.ones(adata.n_obs, dtype=bool), None
    elif isinstance(mask_obs, str):
        check_obs_key(adata, mask_obs, "mask_obs")
        col = adata.obs[mask_obs]
        if not pd.api.types.is_bool_dtype(col):
            raise TypeError(
                f"`mask_obs={mask_obs!r}` must be a boolean column, got dtype {col.dtype}; e.g. "
                f"`adata.obs['is_train'] = adata.obs['split'] == 'train'` and pass `mask_obs='is_train'`."
            )
        mask, desc = col.to_numpy(dtype=bool), mask_obs
    else:
        if isinstance(mask_obs, pd.Series) and not mask_obs.index.equals(adata.obs_names):
            if len(mask_obs) == adata.n_obs and set(mask_obs.index) == set(adata.obs_names):
                mask_obs = mask_obs.reindex(adata.obs_names)  # align a Series on obs_names, not on order
        arr = np.asarray(mask_obs)
        if arr.dtype != bool or arr.shape != (adata.n_obs,):
            raise ValueError(
                f"`mask_obs` must be a boolean array with one value per spot ({adata.n_obs}), got dtype "
                f"{arr.dtype} and shape {arr.shape}."
            )
        mask, desc = arr.copy(), "array"
    n = int(mask.sum())
    if n < 2:
        raise ValueError(
            f"`mask_obs` selects {n} spot(s) of {adata.n_obs}; at least 2 are needed to compute gene statistics."
        )
    return mask, desc


def _groups(adata: AnnData, groupby: str | None, mask: np.ndarray) -> dict[str, np.ndarray]:
    if groupby is None:
        return {_ALL: np.flatnonzero(mask)}
    check_obs_key(adata, groupby, "groupby", hint="Pass `groupby=None` to select genes on all spots at once.")
    col = adata.obs[groupby]
    missing = col.isna().to_numpy() & mask
    if missing.any():
        raise ValueError(
            f"`groupby={groupby!r}` has {int(missing.sum())} missing value(s) among the spots used; fill them or "
            "exclude those spots with `mask_obs=`."
        )
    values = col.astype(str).to_numpy()
    out: dict[str, np.ndarray] = {}
    for name in sorted(set(values[mask])):
        rows = np.flatnonzero(mask & (values == name))
        if rows.size < 2:
            raise ValueError(
                f"`groupby={groupby!r}`: group {name!r} has {rows.size} spot (at least 2 are needed for highly "
                "variable genes); exclude it with `mask_obs=` or pass `groupby=None`."
            )
        out[name] = rows
    return out


def _keep_genes(genes: pd.Index, prefixes: tuple[str, ...]) -> np.ndarray:
    if not prefixes:
        return np.ones(len(genes), dtype=bool)
    upper = genes.str.upper()
    return ~np.asarray(upper.str.startswith(tuple(p.upper() for p in prefixes)), dtype=bool)


def _take(X: Any, rows: np.ndarray, cols: np.ndarray) -> Any:
    if sp.issparse(X):
        return X[rows][:, cols]
    return np.asarray(X)[np.ix_(rows, cols)]


def _log1p(X: Any) -> Any:
    if sp.issparse(X):
        Y = X.astype(np.float64, copy=True)
        Y.data = np.log1p(Y.data)
        return Y
    return np.log1p(np.asarray(X, dtype=np.float64))


def _mean_var(X: Any, *, ddof: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and variance of a dense or sparse matrix, in float64."""
    n = X.shape[0]
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float64)
        mean = np.asarray(X.mean(axis=0)).ravel()
        sq = np.asarray(X.multiply(X).mean(axis=0)).ravel()
        var = np.maximum(sq - mean**2, 0.0) * (n / (n - ddof))
        return mean, var
    X = np.asarray(X, dtype=np.float64)
    return X.mean(axis=0), X.var(axis=0, ddof=ddof)


def _hvg_seurat_v3(X: Any, genes: pd.Index, n_top: int, group: str) -> tuple[list[str], float]:
    """Top-``n_top`` genes of one group by scanpy's seurat_v3 (raw counts), ordered by rank; and the loess span."""
    import scanpy as sc
    from anndata import AnnData

    tmp = AnnData(X=X, var=pd.DataFrame(index=pd.Index(genes, dtype=str)))
    n_nonconst = int((_mean_var(X, ddof=0)[1] > 0).sum())
    if n_nonconst < n_top:
        logger.warning(
            "Group %r: only %d genes vary over its %d spots; %d constant genes fill its top-%d.",
            group,
            n_nonconst,
            tmp.n_obs,
            n_top - n_nonconst,
            n_top,
        )
    errors = []
    for span in _SPANS:
        try:
            df = sc.pp.highly_variable_genes(tmp, flavor="seurat_v3", n_top_genes=n_top, span=span, inplace=False)
        except ValueError as err:  # loess fails on degenerate groups (few spots)
            errors.append(f"span={span}: {err}")
            continue
        if span != _SPANS[0]:
            logger.warning("Group %r: the seurat_v3 loess fit needed `span=%s` (%d spots).", group, span, tmp.n_obs)
        top = df.loc[df["highly_variable"]].sort_values("highly_variable_rank", kind="stable")
        return [str(g) for g in top.index], span
    raise ValueError(
        f"Highly variable genes could not be computed for group {group!r} ({tmp.n_obs} spots, {tmp.n_vars} genes): "
        f"{'; '.join(errors)}. Use more spots per group (`groupby=None` pools them) or another flavor."
    )
