"""Small multi-slide tables with spatially structured expression for the metric and evaluate tests."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest


def hex_grid(n_rows: int, n_cols: int, spacing: float = 100.0) -> np.ndarray:
    """Visium-like hexagonal grid (odd rows shifted by half a spacing), centres in pixels (x, y)."""
    r, c = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    x = c * spacing + (r % 2) * spacing / 2
    y = r * spacing * np.sqrt(3) / 2
    return np.c_[x.ravel(), y.ravel()].astype(np.float64)


def square_grid(n_rows: int, n_cols: int, spacing: float = 200.0) -> np.ndarray:
    """Legacy-ST-like square grid, centres in pixels (x, y)."""
    r, c = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    return np.c_[c.ravel() * spacing, r.ravel() * spacing].astype(np.float64)


def make_eval_adata(
    *,
    n_slides: int = 4,
    grid: tuple[int, int] = (8, 9),
    n_genes: int = 40,
    cancer_types: tuple[str, ...] = ("IDC", "PRAD"),
    technology: str = "Visium",
    seed: int = 0,
    shuffle: bool = True,
) -> ad.AnnData:
    """Slides on identical grids (same coordinates, so only ``library_key`` keeps them apart) with smooth fields.

    Expression (``layers["log1p"]``, float32, non-negative) = slide offset + loadings @ 4 smooth spatial fields + noise
    of a gene-specific size, so genes differ in spatial autocorrelation and co-vary. ``obs``: ``library_id``,
    ``cancer_type`` (slide i gets ``cancer_types[i % len]``), ``technology``, ``split`` (the last slide is "test"),
    ``region_label`` (pathologist-like labels from the first field, missing on a few spots). Rows are shuffled across
    slides (``shuffle``) so nothing relies on row order.
    """
    rng = np.random.default_rng(seed)
    xy = hex_grid(*grid) if technology.lower() == "visium" else square_grid(*grid)
    n_per = xy.shape[0]
    loadings = rng.normal(size=(4, n_genes))
    noise_sd = np.geomspace(0.1, 1.5, n_genes)
    blocks, obs, coords = [], [], []
    for s in range(n_slides):
        freq = rng.uniform(1 / 600, 1 / 250, size=(4, 2))
        phase = rng.uniform(0, 2 * np.pi, size=4)
        fields = np.sin(xy @ freq.T + phase)  # spots × 4
        expr = 3.0 + rng.normal(scale=0.3) + fields @ loadings + rng.normal(size=(n_per, n_genes)) * noise_sd
        blocks.append(np.clip(expr, 0.0, None))
        label = np.where(fields[:, 0] > 0.3, "tumor", np.where(fields[:, 0] < -0.3, "stroma", "immune")).astype(object)
        label[rng.random(n_per) < 0.05] = None
        obs.append(
            pd.DataFrame(
                {
                    "library_id": f"S{s}",
                    "cancer_type": cancer_types[s % len(cancer_types)],
                    "technology": technology,
                    "split": "test" if s == n_slides - 1 else "train",
                    "region_label": label,
                },
                index=[f"S{s}_{i}" for i in range(n_per)],
            )
        )
        coords.append(xy)
    X = np.concatenate(blocks).astype(np.float32)
    obs_df = pd.concat(obs)
    xy_all = np.concatenate(coords)
    order = rng.permutation(X.shape[0]) if shuffle else np.arange(X.shape[0])
    obs_df = obs_df.iloc[order]
    for col in ("library_id", "cancer_type", "technology", "split"):
        obs_df[col] = pd.Categorical(obs_df[col])
    genes = [f"G{j:02d}" for j in range(n_genes)]
    adata = ad.AnnData(X=X[order].copy(), obs=obs_df, var=pd.DataFrame(index=genes), obsm={"spatial": xy_all[order]})
    adata.layers["log1p"] = X[order].copy()
    return adata


def add_prediction(adata: ad.AnnData, values: np.ndarray, key: str = "pred", genes: list[str] | None = None) -> None:
    """Store predictions as histoflow does: a DataFrame in ``obsm`` indexed by ``obs_names``, columns = genes."""
    cols = list(adata.var_names) if genes is None else genes
    adata.obsm[key] = pd.DataFrame(np.asarray(values), index=adata.obs_names, columns=cols)


def permute_within(values: np.ndarray, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rows permuted within each group (slide)."""
    out = values.copy()
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        out[idx] = values[rng.permutation(idx)]
    return out


@pytest.fixture
def make_eval() -> Callable[..., ad.AnnData]:
    """Factory for :func:`make_eval_adata`."""
    return make_eval_adata


@pytest.fixture
def eval_adata() -> ad.AnnData:
    """4 Visium-like slides (2 IDC, 2 PRAD) × 72 spots × 40 genes."""
    return make_eval_adata()


@pytest.fixture
def helpers() -> SimpleNamespace:
    """``make``, ``add_prediction``, ``permute_within``, ``hex_grid``, ``square_grid``."""
    return SimpleNamespace(
        make=make_eval_adata,
        add_prediction=add_prediction,
        permute_within=permute_within,
        hex_grid=hex_grid,
        square_grid=square_grid,
    )
