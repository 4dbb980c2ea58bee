"""The array metrics of ``histoflow.tl.metrics`` against direct reference computations (numpy, scipy, squidpy)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scipy.stats as st
from scipy.spatial.distance import cosine as scipy_cosine

import histoflow as hf
from histoflow.tl import metrics as M


@pytest.fixture
def pair():
    """60 spots × 7 genes over 3 slides; gene 2 constant in truth, gene 5 constant in the prediction."""
    rng = np.random.default_rng(0)
    t = rng.normal(size=(60, 7))
    p = 0.6 * t + rng.normal(size=(60, 7))
    t[:, 2] = 1.5
    p[:, 5] = -0.25
    groups = np.repeat(["s1", "s2", "s3"], 20)
    return t, p, groups


def _pearson_cols(t, p):
    out = []
    for j in range(t.shape[1]):
        if np.ptp(t[:, j]) == 0 or np.ptp(p[:, j]) == 0:
            out.append(np.nan)
        else:
            out.append(st.pearsonr(t[:, j], p[:, j])[0])
    return np.array(out)


def _squidpy_moran(X, W):
    import anndata as ad
    import squidpy as sq

    a = ad.AnnData(X=np.asarray(X, dtype=np.float64))
    a.obsp["spatial_connectivities"] = sp.csr_matrix(W)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = sq.gr.spatial_autocorr(a, mode="moran", copy=True, n_perms=None, show_progress_bar=False)
    return df.loc[a.var_names, "I"].to_numpy()


# ---------------------------------------------------------------------------------------------------------- PCC


def test_pcc_per_gene_matches_scipy_and_marks_constant_genes(pair):
    t, p, _ = pair
    r = M.pcc_per_gene(t, p)
    np.testing.assert_allclose(r, _pearson_cols(t, p), rtol=1e-12, equal_nan=True)
    assert np.isnan(r[2]) and np.isnan(r[5])
    assert np.isfinite(np.delete(r, [2, 5])).all()


def test_pcc_per_gene_accepts_sparse_and_dataframe(pair):
    t, p, _ = pair
    r = M.pcc_per_gene(sp.csr_matrix(t), pd.DataFrame(p))
    np.testing.assert_allclose(r, M.pcc_per_gene(t, p), equal_nan=True)


def test_pcc_aggregations_match_direct_loops(pair):
    t, p, groups = pair
    slides = [np.flatnonzero(groups == g) for g in ("s1", "s2", "s3")]
    per_slide = np.mean([np.nanmean(_pearson_cols(t[i], p[i])) for i in slides])
    pooled = np.nanmean(_pearson_cols(t, p))
    assert M.pcc(t, p, groups=groups) == pytest.approx(per_slide, rel=1e-12)
    assert M.pcc(t, p, groups=groups, aggregation="pooled") == pytest.approx(pooled, rel=1e-12)
    assert M.pcc(t, p, groups=groups, aggregation="per_slide") != pytest.approx(pooled, rel=1e-6)
    # without groups both aggregations are the pooled PCC
    assert M.pcc(t, p) == pytest.approx(pooled, rel=1e-12)


def test_pcc_at_k_is_the_mean_of_the_k_best_genes(pair):
    t, p, groups = pair
    r = _pearson_cols(t, p)
    best3 = np.sort(r[np.isfinite(r)])[::-1][:3].mean()
    assert M.pcc(t, p, aggregation="pooled", k=3) == pytest.approx(best3, rel=1e-12)
    slides = [np.flatnonzero(groups == g) for g in ("s1", "s2", "s3")]
    ref = np.mean([np.sort(x[np.isfinite(x)])[::-1][:2].mean() for x in (_pearson_cols(t[i], p[i]) for i in slides)])
    assert M.pcc(t, p, groups=groups, k=2) == pytest.approx(ref, rel=1e-12)
    # k larger than the defined genes: all defined genes
    assert M.pcc(t, p, aggregation="pooled", k=100) == pytest.approx(np.nanmean(r), rel=1e-12)


def test_pcc_one_spot_slide_is_left_out(pair):
    t, p, groups = pair
    groups = groups.copy()
    groups[0] = "lonely"  # a slide with a single spot: every gene is constant there
    slides = [np.flatnonzero(groups == g) for g in ("s1", "s2", "s3")]
    ref = np.mean([np.nanmean(_pearson_cols(t[i], p[i])) for i in slides])
    assert M.pcc(t, p, groups=groups) == pytest.approx(ref, rel=1e-12)


def test_pcc_all_constant_is_nan():
    t = np.ones((5, 3))
    p = np.arange(15.0).reshape(5, 3)
    assert np.isnan(M.pcc(t, p))
    assert np.isnan(M.pcc(t, p, aggregation="pooled", k=2))


def test_perfect_and_negated_predictions():
    rng = np.random.default_rng(3)
    t = rng.normal(size=(30, 5))
    assert M.pcc(t, 2 * t + 1) == pytest.approx(1.0)
    assert M.pcc(t, -t) == pytest.approx(-1.0)


# ------------------------------------------------------------------------------------------- errors and variance


def test_mse_mae_match_numpy(pair):
    t, p, groups = pair
    slides = [np.flatnonzero(groups == g) for g in ("s1", "s2", "s3")]
    assert M.mse(t, p, aggregation="pooled") == pytest.approx(np.mean((p - t) ** 2))
    assert M.mae(t, p, aggregation="pooled") == pytest.approx(np.mean(np.abs(p - t)))
    assert M.mse(t, p, groups=groups) == pytest.approx(np.mean([np.mean((p[i] - t[i]) ** 2) for i in slides]))
    assert M.mae(t, p, groups=groups) == pytest.approx(np.mean([np.mean(np.abs(p[i] - t[i])) for i in slides]))
    assert M.mse(t, t) == 0.0


def test_rvd_matches_stem_definition(pair):
    t, p, groups = pair

    def stem(tt, pp):
        vt, vp = np.var(tt, axis=0), np.var(pp, axis=0)
        ok = vt > 0
        return np.mean((vp[ok] - vt[ok]) ** 2 / vt[ok] ** 2)

    assert M.rvd(t, p, aggregation="pooled") == pytest.approx(stem(t, p), rel=1e-12)
    slides = [np.flatnonzero(groups == g) for g in ("s1", "s2", "s3")]
    assert M.rvd(t, p, groups=groups) == pytest.approx(np.mean([stem(t[i], p[i]) for i in slides]), rel=1e-12)
    assert M.rvd(t, t) == 0.0
    # an over-smoothed (constant) prediction gives 1
    assert M.rvd(t, np.zeros_like(t)) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------------- GSC


def test_gene_correlation_matches_corrcoef(pair):
    t, _, _ = pair
    C = M.gene_correlation(t)
    ref = np.corrcoef(np.delete(t, 2, axis=1), rowvar=False)
    np.testing.assert_allclose(np.delete(np.delete(C, 2, 0), 2, 1), ref, atol=1e-12)
    assert np.isnan(C[2]).all() and np.isnan(C[:, 2]).all()


def test_gsc_matches_direct_computation(pair):
    t, p, groups = pair
    keep = [0, 1, 3, 4, 6]  # genes varying in both

    def ref(tt, pp):
        iu = np.triu_indices(len(keep), 1)
        ct = np.corrcoef(tt[:, keep], rowvar=False)[iu]
        cp = np.corrcoef(pp[:, keep], rowvar=False)[iu]
        return st.pearsonr(ct, cp)[0]

    assert M.gsc(t, p, aggregation="pooled") == pytest.approx(ref(t, p), rel=1e-10)
    slides = [np.flatnonzero(groups == g) for g in ("s1", "s2", "s3")]
    assert M.gsc(t, p, groups=groups) == pytest.approx(np.mean([ref(t[i], p[i]) for i in slides]), rel=1e-10)


def test_gsc_synthetic_known_answers():
    rng = np.random.default_rng(1)
    latent = rng.normal(size=(400, 3))
    t = latent @ rng.normal(size=(3, 30)) + 0.5 * rng.normal(size=(400, 30))
    assert M.gsc(t, t) == pytest.approx(1.0)
    # a row permutation keeps every gene-gene correlation
    assert M.gsc(t, t[rng.permutation(400)]) == pytest.approx(1.0)
    # an affine map per gene keeps them too
    assert M.gsc(t, 3 * t + rng.normal(size=30)) == pytest.approx(1.0)
    # permuting each gene independently destroys them
    shuffled = np.column_stack([t[rng.permutation(400), j] for j in range(30)])
    assert abs(M.gsc(t, shuffled)) < 0.1


def test_gsc_needs_three_varying_genes():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(20, 3))
    p = rng.normal(size=(20, 3))
    assert np.isfinite(M.gsc(t, p))
    t[:, 0] = 0.0
    assert np.isnan(M.gsc(t, p))


# ------------------------------------------------------------------------------------------ Moran's I and SSC


def test_morans_i_equals_squidpy_on_a_grid(helpers):
    adata = helpers.make(n_slides=2, grid=(6, 7), n_genes=6)
    W = M.spatial_connectivity(adata)
    X = adata.layers["log1p"]
    np.testing.assert_allclose(M.morans_i(X, W), _squidpy_moran(X, W), rtol=1e-6, atol=1e-8)
    # the direct formula with dense row-normalised weights
    Wd = W.toarray()
    Wd = Wd / Wd.sum(axis=1, keepdims=True)
    Z = X - X.mean(axis=0)
    ref = X.shape[0] / Wd.sum() * np.einsum("ij,ig,jg->g", Wd, Z, Z) / (Z**2).sum(axis=0)
    np.testing.assert_allclose(M.morans_i(X, W), ref, rtol=1e-5)


def test_morans_i_constant_gene_and_no_edges():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(10, 3))
    X[:, 1] = 4.0
    W = sp.diags(np.ones(9), 1, shape=(10, 10)) + sp.diags(np.ones(9), -1, shape=(10, 10))
    i = M.morans_i(X, W)
    assert np.isnan(i[1]) and np.isfinite(i[[0, 2]]).all()
    assert np.isnan(M.morans_i(X, sp.csr_matrix((10, 10)))).all()
    # a smooth gradient on a chain is strongly autocorrelated
    assert M.morans_i(np.arange(10.0)[:, None], W)[0] > 0.7


def test_ssc_matches_squidpy_per_slide_and_pooled(helpers):
    adata = helpers.make(n_slides=3, grid=(6, 7), n_genes=12)
    rng = np.random.default_rng(2)
    t = adata.layers["log1p"].astype(np.float64)
    p = t + rng.normal(size=t.shape) * 0.8
    W = M.spatial_connectivity(adata)
    groups = adata.obs["library_id"].to_numpy()
    ref_slides = []
    for g in np.unique(groups):
        i = np.flatnonzero(groups == g)
        sub = W[i][:, i]
        ref_slides.append(st.pearsonr(_squidpy_moran(t[i], sub), _squidpy_moran(p[i], sub))[0])
    assert M.ssc(t, p, W, groups=groups) == pytest.approx(np.mean(ref_slides), rel=1e-6)
    pooled = st.pearsonr(_squidpy_moran(t, W), _squidpy_moran(p, W))[0]
    assert M.ssc(t, p, W, groups=groups, aggregation="pooled") == pytest.approx(pooled, rel=1e-6)


def test_ssc_synthetic_known_answers(helpers):
    adata = helpers.make(n_slides=1, grid=(12, 12), n_genes=40)
    t = adata.layers["log1p"].astype(np.float64)
    W = M.spatial_connectivity(adata)
    assert M.ssc(t, t, W) == pytest.approx(1.0)
    perm = t[np.random.default_rng(0).permutation(t.shape[0])]
    assert abs(M.ssc(t, perm, W)) < 0.3


# ---------------------------------------------------------------------------------------- spatial connectivity


def test_spatial_connectivity_matches_squidpy_and_never_joins_slides(helpers):
    import squidpy as sq

    adata = helpers.make(n_slides=3, grid=(5, 6), n_genes=3)  # identical coordinates on every slide, rows shuffled
    W = M.spatial_connectivity(adata)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sq.gr.spatial_neighbors_grid(adata, library_key="library_id", n_neighs=6)
    assert abs(W - adata.obsp["spatial_connectivities"]).sum() == 0
    lib = adata.obs["library_id"].to_numpy()
    r, c = W.nonzero()
    assert r.size > 0 and (lib[r] == lib[c]).all()
    # interior hexagonal spots have 6 neighbours
    assert np.asarray(W.sum(axis=1)).max() == 6


def test_spatial_connectivity_st_square_grid_and_knn(helpers):
    adata = helpers.make(n_slides=2, grid=(5, 6), n_genes=3, technology="Spatial Transcriptomics")
    W = M.spatial_connectivity(adata)
    deg = np.asarray(W.sum(axis=1)).ravel()
    assert deg.max() == 4 and deg.min() == 2  # corners of a square grid
    Wk = M.spatial_connectivity(adata, coord_type="generic", n_neighs=3)
    assert (np.diff(Wk.indptr) == 3).all()
    lib = adata.obs["library_id"].to_numpy()
    r, c = Wk.nonzero()
    assert (lib[r] == lib[c]).all()


def test_spatial_connectivity_small_slide_gets_no_edges(helpers, caplog):
    adata = helpers.make(n_slides=2, grid=(5, 6), n_genes=3)
    keep = ~((adata.obs["library_id"] == "S1").to_numpy() & (np.arange(adata.n_obs) % 10 != 0))
    sub = adata[keep].copy()
    small = (sub.obs["library_id"] == "S1").to_numpy()
    assert 1 < small.sum() <= 6
    with caplog.at_level("WARNING", logger="histoflow"):
        W = M.spatial_connectivity(sub)
    assert "no spatial edges" in caplog.text
    assert W[small].nnz == 0 and W[~small].nnz > 0


def test_spatial_connectivity_silences_squidpys_info_lines_and_restores_the_level(helpers):
    """squidpy logs "Creating graph ..." at INFO on ``spatialdata._logging`` for every call; histoflow logs once."""
    import logging

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.messages: list[str] = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    adata = helpers.make(n_slides=2, grid=(5, 6), n_genes=3)
    sd_logger = logging.getLogger("spatialdata._logging")
    handler, before = Collect(), sd_logger.level
    sd_logger.addHandler(handler)
    try:
        sd_logger.setLevel(logging.INFO)
        M.spatial_connectivity(adata)
        assert not any("Creating graph" in m for m in handler.messages)
        assert sd_logger.level == logging.INFO
        import squidpy as sq  # the same call made directly does log: the check above can fail

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sq.gr.spatial_neighbors_grid(adata, library_key="library_id", n_neighs=6)
        assert any("Creating graph" in m for m in handler.messages)
    finally:
        sd_logger.removeHandler(handler)
        sd_logger.setLevel(before)


def test_spatial_connectivity_bad_input(helpers):
    adata = helpers.make(n_slides=1, grid=(4, 4), n_genes=2)
    with pytest.raises(KeyError, match="spatial_key='nope'"):
        M.spatial_connectivity(adata, spatial_key="nope")
    with pytest.raises(ValueError, match="coord_type='hex'"):
        M.spatial_connectivity(adata, coord_type="hex")
    with pytest.raises(KeyError, match="library_key='sample'"):
        M.spatial_connectivity(adata, library_key="sample")
    with pytest.raises(ValueError, match="n_neighs"):
        M.spatial_connectivity(adata, n_neighs=0)
    adata.obsm["spatial"][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        M.spatial_connectivity(adata)


# --------------------------------------------------------------------------------------- distribution metrics


def test_wasserstein_matches_scipy(pair):
    t, p, _ = pair
    per_gene = M.wasserstein_per_gene(t, p)
    per_spot = M.wasserstein_per_spot(t, p)
    np.testing.assert_allclose(per_gene, [st.wasserstein_distance(t[:, j], p[:, j]) for j in range(t.shape[1])])
    np.testing.assert_allclose(per_spot, [st.wasserstein_distance(t[i], p[i]) for i in range(t.shape[0])])
    assert (M.wasserstein_per_gene(t, t) == 0).all()
    # a spot permutation keeps each gene's distribution
    assert np.allclose(M.wasserstein_per_gene(t, t[::-1]), 0)


def test_cosine_distance_matches_scipy(pair):
    t, p, groups = pair
    per_spot = M.cosine_distance_per_spot(t, p)
    np.testing.assert_allclose(per_spot, [scipy_cosine(t[i], p[i]) for i in range(t.shape[0])], rtol=1e-10)
    assert M.cosine_distance(t, p, aggregation="pooled") == pytest.approx(per_spot.mean())
    slides = [np.flatnonzero(groups == g) for g in ("s1", "s2", "s3")]
    assert M.cosine_distance(t, p, groups=groups) == pytest.approx(np.mean([per_spot[i].mean() for i in slides]))
    z = p.copy()
    z[4] = 0.0
    d = M.cosine_distance_per_spot(t, z)
    assert np.isnan(d[4]) and np.isfinite(np.delete(d, 4)).all()
    assert M.cosine_distance(t, z, aggregation="pooled") == pytest.approx(np.delete(d, 4).mean())


# ------------------------------------------------------------------------------------------------------ domains


def test_domain_agreement_perfect_and_with_labels(helpers):
    adata = helpers.make(n_slides=1, grid=(10, 10), n_genes=20)
    t = adata.layers["log1p"]
    res = M.domain_agreement(t, t, n_domains=3, seed=0)
    assert res == {"ari": 1.0, "nmi": pytest.approx(1.0)}
    labels = adata.obs["region_label"].to_numpy()
    rng = np.random.default_rng(0)
    noisy = t + rng.normal(size=t.shape) * 3
    res = M.domain_agreement(t, noisy, n_domains=3, labels=labels, seed=0)
    assert set(res) == {"ari", "nmi", "label_ari_pred", "label_nmi_pred", "label_ari_true", "label_nmi_true"}
    assert res["label_ari_true"] > res["label_ari_pred"]
    assert res["ari"] < 1.0
    # same seed, same numbers
    assert M.domain_agreement(t, noisy, n_domains=3, labels=labels, seed=0) == res


def test_domain_agreement_leiden(helpers):
    pytest.importorskip("igraph")
    adata = helpers.make(n_slides=1, grid=(10, 10), n_genes=20)
    t = adata.layers["log1p"]
    res = M.domain_agreement(t, t, n_domains=3, method="leiden", seed=0)
    assert res["ari"] == pytest.approx(1.0)


def test_domain_agreement_bad_input():
    t = np.random.default_rng(0).normal(size=(5, 4))
    with pytest.raises(ValueError, match="more spots than domains"):
        M.domain_agreement(t, t, n_domains=5)
    with pytest.raises(ValueError, match="n_domains"):
        M.domain_agreement(t, t, n_domains=1)
    with pytest.raises(ValueError, match="method='dbscan'"):
        M.domain_agreement(t, t, n_domains=2, method="dbscan")
    with pytest.raises(ValueError, match="one label per spot"):
        M.domain_agreement(t, t, n_domains=2, labels=["a", "b"])


# -------------------------------------------------------------------------------------------------------- folds


def _fold(values):
    return pd.DataFrame(
        {
            "metric": ["pcc", "gsc"],
            "aggregation": ["pooled", "pooled"],
            "group": ["all", "all"],
            "gene_set": ["all", "all"],
            "value": values,
        }
    )


def test_summarize_folds_mean_std():
    folds = [_fold([0.2, 0.5]), _fold([0.3, np.nan]), _fold([0.4, 0.7])]
    out = M.summarize_folds(folds)
    row = out.set_index("metric").loc["pcc"]
    assert row["mean"] == pytest.approx(0.3) and row["std"] == pytest.approx(np.std([0.2, 0.3, 0.4]))
    assert row["n_folds"] == 3
    gsc_row = out.set_index("metric").loc["gsc"]
    assert gsc_row["mean"] == pytest.approx(0.6) and gsc_row["n_folds"] == 2
    out1 = M.summarize_folds({"C2": folds[0], "C3": folds[2]}, ddof=1)
    assert out1.set_index("metric").loc["pcc", "std"] == pytest.approx(np.std([0.2, 0.4], ddof=1))


def test_summarize_folds_bad_input():
    with pytest.raises(ValueError, match="empty"):
        M.summarize_folds([])
    with pytest.raises(ValueError, match="lacks the column"):
        M.summarize_folds([pd.DataFrame({"value": [1.0]})])
    with pytest.raises(TypeError, match="DataFrames"):
        M.summarize_folds([np.zeros(3)])


# ------------------------------------------------------------------------------------------------- bad input


def test_array_bad_input(pair):
    t, p, groups = pair
    with pytest.raises(ValueError, match="same shape"):
        M.pcc(t, p[:, :3])
    with pytest.raises(ValueError, match="2-D"):
        M.pcc_per_gene(t[:, 0], p[:, 0])
    bad = p.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="`y_pred` contains 1 NaN"):
        M.pcc(t, bad)
    with pytest.raises(TypeError, match="numbers"):
        M.mse(t.astype(str), p)
    with pytest.raises(ValueError, match="aggregation='mean'"):
        M.pcc(t, p, aggregation="mean")
    with pytest.raises(ValueError, match="`k` must be a positive integer"):
        M.pcc(t, p, k=0)
    with pytest.raises(ValueError, match="one label per spot"):
        M.pcc(t, p, groups=groups[:10])
    g = groups.astype(object)
    g[0] = None
    with pytest.raises(ValueError, match="missing label"):
        M.gsc(t, p, groups=g)
    with pytest.raises(ValueError, match="hold no values"):
        M.pcc(np.zeros((0, 3)), np.zeros((0, 3)))
    with pytest.raises(ValueError, match="60 × 60"):
        M.ssc(t, p, sp.eye(10))
    with pytest.raises(ValueError, match="negative"):
        M.morans_i(t, -sp.eye(60, format="csr"))
    with pytest.raises(TypeError, match="sparse matrix"):
        M.morans_i(t, [[1]])


def test_public_namespace():
    assert hf.tl.metrics.pcc is M.pcc
    for name in M.__all__:
        assert hasattr(hf.tl.metrics, name)


def test_structure_scorer_equals_gsc_and_ssc_for_every_candidate(helpers):
    from histoflow.tl._metrics import _StructureScorer

    adata = helpers.make(n_slides=3, grid=(6, 7), n_genes=9)
    truth = adata.layers["log1p"].astype(np.float64)
    lib = adata.obs["library_id"].astype(str).to_numpy()
    truth[lib == "S1", 2] = 4.0  # a gene constant in truth on one slide
    W = M.spatial_connectivity(adata)
    score = _StructureScorer(truth, lib, W)
    rng = np.random.default_rng(3)
    for k in range(4):  # the truth's parts are reused across candidates
        pred = truth + rng.normal(scale=0.5 + k, size=truth.shape)
        pred[:, 5] = 1.0 if k == 1 else pred[:, 5]  # a constant predicted gene: left out as the metrics do
        g, s = score(pred)
        assert g == pytest.approx(M.gsc(truth, pred, groups=lib), abs=1e-12)
        assert s == pytest.approx(M.ssc(truth, pred, W, groups=lib), abs=1e-12)
    # one slide (no groups)
    one = lib == "S0"
    sub = M.spatial_connectivity(adata[one])
    g, s = _StructureScorer(truth[one], None, sub)(pred[one])
    assert (g, s) == pytest.approx((M.gsc(truth[one], pred[one]), M.ssc(truth[one], pred[one], sub)), abs=1e-12)
