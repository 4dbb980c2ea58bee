"""Tiny raw-count tables for the pp tests (normalize, select_genes, split_slides, split_from_csv)."""

from __future__ import annotations

from collections.abc import Callable

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

CANCER_TYPES = ("IDC", "PRAD", "CCRCC")
#: genes of the MSigDB Hallmark sets put into the fixture (RPL14 is a Hallmark gene with an excluded prefix)
HALLMARK_GENES = ("JUNB", "ATF3", "NFKBIA", "PGK1", "VEGFA", "LDHA", "MKI67", "KRT8", "CDH1", "VIM", "CD3D", "RPL14")
MT_RP_GENES = ("MT-CO1", "MT-ND1", "RPL3", "RPS6")
FILLER_GENES = tuple(f"GENE{i:02d}" for i in range(30))
MARKER_GENES = tuple(f"{t}_M{i}" for t in CANCER_TYPES for i in range(3))
SPIKE_GENE = "SPIKE"  # expressed on slide S01 only


def make_counts_adata(
    *,
    seed: int = 0,
    sparse: bool = False,
    patients_per_type: int = 2,
    slides_per_patient: int = 2,
    spots_per_slide: int = 15,
) -> ad.AnnData:
    """Raw counts with obs ``library_id``, ``patient``, ``cancer_type``; genes carry per-type signal."""
    rng = np.random.default_rng(seed)
    genes = [*FILLER_GENES, *MARKER_GENES, *MT_RP_GENES, *HALLMARK_GENES, SPIKE_GENE]
    rows = []
    slide = 0
    for t in CANCER_TYPES:
        for p in range(patients_per_type):
            for _ in range(slides_per_patient):
                slide += 1
                for s in range(spots_per_slide):
                    rows.append((f"S{slide:02d}_{s}", f"S{slide:02d}", f"{t}-P{p + 1}", t))
    obs = pd.DataFrame(rows, columns=["spot", "library_id", "patient", "cancer_type"]).set_index("spot")
    for col in ("library_id", "patient", "cancer_type"):
        obs[col] = pd.Categorical(obs[col])
    n = len(obs)
    base = rng.gamma(2.0, 2.0, size=len(genes))
    mu = np.tile(base, (n, 1))
    types = obs["cancer_type"].astype(str).to_numpy()
    for t in CANCER_TYPES:
        for i in range(3):
            g = genes.index(f"{t}_M{i}")
            # each marker varies strongly within its own type and is absent elsewhere
            mu[:, g] = np.where(types == t, rng.gamma(0.5, 40.0, size=n), 0.0)
    for g in MT_RP_GENES:
        mu[:, genes.index(g)] = rng.gamma(0.3, 100.0, size=n)  # very overdispersed
    for g, shape in zip(HALLMARK_GENES, np.geomspace(4.0, 0.8, len(HALLMARK_GENES))):
        # spot-to-spot spread from mild to strong, so log1p variances cover MoLF's three tiers
        mu[:, genes.index(g)] = rng.gamma(shape, 20.0 / shape, size=n)
    spike = genes.index(SPIKE_GENE)
    mu[:, spike] = np.where(obs["library_id"].astype(str).to_numpy() == "S01", rng.gamma(0.5, 400.0, size=n), 0.0)
    X = rng.poisson(mu).astype(np.float32)
    adata = ad.AnnData(X=sp.csr_matrix(X) if sparse else X, obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    return adata


@pytest.fixture
def make_counts() -> Callable[..., ad.AnnData]:
    """Factory: ``make_counts(seed=0, sparse=False, patients_per_type=2, slides_per_patient=2, spots_per_slide=15)``."""
    return make_counts_adata


@pytest.fixture
def counts_adata() -> ad.AnnData:
    """180 spots (3 cancer types x 2 patients x 2 slides x 15 spots) x 56 genes, dense raw counts."""
    return make_counts_adata()


@pytest.fixture
def counts_sdata(counts_adata: ad.AnnData):
    """A SpatialData holding ``counts_adata`` as ``tables["table"]``."""
    from spatialdata import SpatialData

    return SpatialData(tables={"table": counts_adata})
