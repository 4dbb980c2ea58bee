"""``histoflow.tl.evaluate``: known answers on synthetic cases, agreement with the array metrics, storage, bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.stats as st

import histoflow as hf
from histoflow.tl import metrics as M

FAST = ["pcc", "mse", "mae", "rvd", "gsc", "ssc", "wasserstein", "cosine"]


def _get(df, metric, aggregation="pooled", group="all", gene_set="all", col="value"):
    sel = df[
        (df["metric"] == metric)
        & (df["aggregation"] == aggregation)
        & (df["group"] == group)
        & (df["gene_set"] == gene_set)
    ]
    assert len(sel) == 1, (metric, aggregation, group, gene_set, len(sel))
    return sel[col].iloc[0]


def _squidpy_moran(X, W):
    import anndata as ad
    import squidpy as sq

    a = ad.AnnData(X=np.asarray(X, dtype=np.float64))
    a.obsp["spatial_connectivities"] = W
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = sq.gr.spatial_autocorr(a, mode="moran", copy=True, n_perms=None, show_progress_bar=False)
    return df.loc[a.var_names, "I"].to_numpy()


# ------------------------------------------------------------------------------------------------ known answers


def test_perfect_prediction(eval_adata, helpers):
    helpers.add_prediction(eval_adata, eval_adata.layers["log1p"])
    df = hf.tl.evaluate(eval_adata, pred_key="pred")
    assert list(df.columns) == ["metric", "aggregation", "group", "gene_set", "value", "n_genes", "n_excluded",
                                "n_slides", "n_spots"]  # fmt: skip
    assert set(df["group"]) == {"all", "IDC", "PRAD"}
    assert set(df["aggregation"]) == {"per_slide", "pooled"}
    for metric in ("pcc", "pcc@10", "gsc", "ssc", "domain_ari", "domain_nmi"):
        vals = df.loc[df["metric"] == metric, "value"]
        assert len(vals) and np.allclose(vals, 1.0), metric
    for metric in ("mse", "mae", "rvd", "wasserstein_gene", "wasserstein_spot", "cosine"):
        vals = df.loc[df["metric"] == metric, "value"]
        assert len(vals) and np.allclose(vals, 0.0, atol=1e-12), metric
    assert (df["n_excluded"] == 0).all()
    row = df[(df.metric == "pcc") & (df.group == "IDC") & (df.aggregation == "per_slide")].iloc[0]
    assert row["n_slides"] == 2 and row["n_spots"] == 144 and row["n_genes"] == 40
    assert "pcc@50" not in set(df["metric"])  # only 40 genes


def test_spots_permuted_within_slides(eval_adata, helpers):
    t = eval_adata.layers["log1p"]
    rng = np.random.default_rng(0)
    helpers.add_prediction(eval_adata, helpers.permute_within(t, eval_adata.obs["library_id"].to_numpy(), rng))
    df = hf.tl.evaluate(eval_adata, pred_key="pred", metrics=["pcc", "gsc", "ssc"])
    assert abs(_get(df, "pcc", "per_slide")) < 0.1
    assert abs(_get(df, "ssc", "per_slide")) < 0.3
    # a row permutation keeps gene-gene correlations, within slides and pooled
    assert _get(df, "gsc", "per_slide") == pytest.approx(1.0)
    assert _get(df, "gsc", "pooled") == pytest.approx(1.0)


def test_spots_permuted_across_slides(eval_adata, helpers):
    t = eval_adata.layers["log1p"]
    perm = np.random.default_rng(1).permutation(t.shape[0])
    helpers.add_prediction(eval_adata, t[perm])
    df = hf.tl.evaluate(eval_adata, pred_key="pred", metrics=["pcc", "gsc", "ssc"])
    assert abs(_get(df, "pcc", "pooled")) < 0.1
    assert abs(_get(df, "ssc", "pooled")) < 0.3
    assert _get(df, "gsc", "pooled") == pytest.approx(1.0)


def test_genes_permuted_independently(eval_adata, helpers):
    t = eval_adata.layers["log1p"]
    rng = np.random.default_rng(2)
    lib = eval_adata.obs["library_id"].to_numpy()
    shuffled = np.column_stack([helpers.permute_within(t[:, [j]], lib, rng)[:, 0] for j in range(t.shape[1])])
    helpers.add_prediction(eval_adata, shuffled)
    df = hf.tl.evaluate(eval_adata, pred_key="pred", metrics=["gsc", "wasserstein"])
    assert abs(_get(df, "gsc", "per_slide")) < 0.15
    # each gene keeps its distribution over every slide
    assert _get(df, "wasserstein_gene", "per_slide") == pytest.approx(0.0, abs=1e-12)
    assert _get(df, "wasserstein_gene", "pooled") == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------------- agreement with the arrays


def test_values_match_array_metrics_and_references(eval_adata, helpers):
    a = eval_adata
    rng = np.random.default_rng(3)
    t = a.layers["log1p"].astype(np.float64)
    p = 0.7 * t + rng.normal(size=t.shape) * 0.8
    p[a.obs["library_id"].to_numpy() == "S1", 5] = 2.0  # constant on one slide
    p[:, 7] = 1.0  # constant everywhere
    helpers.add_prediction(a, p)
    df = hf.tl.evaluate(a, pred_key="pred", metrics=FAST)
    lib = a.obs["library_id"].to_numpy()
    ct = a.obs["cancer_type"].astype(str).to_numpy()
    W = M.spatial_connectivity(a)

    # PCC in both aggregations, per cancer type, with excluded genes counted
    for grp, rows in (("all", np.ones(a.n_obs, bool)), ("IDC", ct == "IDC"), ("PRAD", ct == "PRAD")):
        assert _get(df, "pcc", "per_slide", grp) == pytest.approx(M.pcc(t[rows], p[rows], groups=lib[rows]))
        assert _get(df, "pcc", "pooled", grp) == pytest.approx(M.pcc(t[rows], p[rows], aggregation="pooled"))
        assert _get(df, "gsc", "pooled", grp) == pytest.approx(M.gsc(t[rows], p[rows], aggregation="pooled"))
        assert _get(df, "gsc", "per_slide", grp) == pytest.approx(M.gsc(t[rows], p[rows], groups=lib[rows]))
    assert _get(df, "pcc", "pooled", col="n_excluded") == 1
    assert _get(df, "pcc", "per_slide", col="n_excluded") == 4 + 1  # gene 7 on 4 slides, gene 5 on S1
    assert _get(df, "gsc", "pooled", col="n_excluded") == 1
    direct = np.array([st.pearsonr(t[:, j], p[:, j])[0] if j != 7 else np.nan for j in range(40)])
    assert _get(df, "pcc", "pooled") == pytest.approx(np.nanmean(direct), rel=1e-10)
    assert _get(df, "pcc@10", "pooled") == pytest.approx(np.sort(direct[np.isfinite(direct)])[-10:].mean())

    # errors and variance
    assert _get(df, "mse", "pooled") == pytest.approx(np.mean((p - t) ** 2))
    assert _get(df, "mae", "per_slide") == pytest.approx(M.mae(t, p, groups=lib))
    assert _get(df, "rvd", "per_slide", "PRAD") == pytest.approx(M.rvd(t[ct == "PRAD"], p[ct == "PRAD"],
                                                                       groups=lib[ct == "PRAD"]))  # fmt: skip
    assert _get(df, "rvd", "pooled", col="n_excluded") == 0

    # SSC: Moran's I from squidpy on the same graph
    ref_pooled = st.pearsonr(*[np.delete(_squidpy_moran(x, W), 7) for x in (t, p)])[0]
    assert _get(df, "ssc", "pooled") == pytest.approx(ref_pooled, rel=1e-6)
    assert _get(df, "ssc", "pooled", col="n_excluded") == 1
    assert _get(df, "ssc", "per_slide") == pytest.approx(M.ssc(t, p, W, groups=lib), rel=1e-9)

    # distributions
    w1 = np.mean([st.wasserstein_distance(t[:, j], p[:, j]) for j in range(40)])
    assert _get(df, "wasserstein_gene", "pooled") == pytest.approx(w1)
    assert _get(df, "wasserstein_spot", "pooled") == pytest.approx(M.wasserstein_per_spot(t, p).mean())
    assert _get(df, "cosine", "per_slide") == pytest.approx(M.cosine_distance(t, p, groups=lib))


def test_one_spot_slide_is_counted_not_zero(eval_adata, helpers):
    a = eval_adata
    a.obs["library_id"] = a.obs["library_id"].cat.add_categories("S9")
    a.obs.iloc[0, a.obs.columns.get_loc("library_id")] = "S9"  # a one-spot slide (IDC or PRAD)
    rng = np.random.default_rng(4)
    t = a.layers["log1p"]
    helpers.add_prediction(a, t + rng.normal(size=t.shape))
    df = hf.tl.evaluate(a, pred_key="pred", metrics=["pcc", "gsc", "ssc", "mse", "domains"], n_domains=3)
    lib = a.obs["library_id"].to_numpy()
    others = lib != "S9"
    ref = M.pcc(t[others], a.obsm["pred"].to_numpy()[others], groups=lib[others])
    assert _get(df, "pcc", "per_slide") == pytest.approx(ref)
    assert _get(df, "pcc", "per_slide", col="n_slides") == 4
    assert _get(df, "pcc", "per_slide", col="n_excluded") == 40
    assert _get(df, "mse", "per_slide", col="n_slides") == 5
    assert _get(df, "domain_ari", "per_slide", col="n_slides") == 4
    per_slide = a.uns["pred_metrics"]["per_slide"]
    assert np.isnan(per_slide.loc["S9", "pcc"]) and np.isnan(per_slide.loc["S9", "ssc"])


# ------------------------------------------------------------------------------------------ inputs and subsets


def test_split_mask_layer_and_array_inputs(eval_adata, helpers):
    a = eval_adata
    rng = np.random.default_rng(5)
    t = a.layers["log1p"]
    p = t + rng.normal(size=t.shape)
    helpers.add_prediction(a, p)
    test = (a.obs["split"] == "test").to_numpy()
    by_split = hf.tl.evaluate(a, pred_key="pred", split="test", metrics=["pcc", "mse"], inplace=False)
    by_mask = hf.tl.evaluate(a, pred_key="pred", mask_obs=test, metrics=["pcc", "mse"], inplace=False)
    pd.testing.assert_frame_equal(by_split, by_mask)
    assert _get(by_split, "pcc", col="n_spots") == test.sum()
    assert _get(by_split, "pcc") == pytest.approx(M.pcc(t[test], p[test], aggregation="pooled"))
    a.obs["is_test"] = test
    by_col = hf.tl.evaluate(a, pred_key="pred", mask_obs="is_test", metrics=["pcc", "mse"], inplace=False)
    pd.testing.assert_frame_equal(by_split, by_col)

    # ndarray in obsm with genes=, a layer, and a subset of genes
    genes = list(a.var_names)
    a.obsm["arr"] = np.asarray(p)
    a.layers["pred"] = np.asarray(p)
    ref = hf.tl.evaluate(a, pred_key="pred", metrics=["pcc"], inplace=False)
    pd.testing.assert_frame_equal(ref, hf.tl.evaluate(a, pred_key="arr", genes=genes, metrics=["pcc"], inplace=False))
    pd.testing.assert_frame_equal(ref, hf.tl.evaluate(a, pred_layer="pred", metrics=["pcc"], inplace=False))
    sub = hf.tl.evaluate(a, pred_key="pred", genes=genes[:5], metrics=["pcc"], inplace=False)
    assert _get(sub, "pcc") == pytest.approx(M.pcc(t[:, :5], p[:, :5], aggregation="pooled"))


def test_sparse_truth_and_reordered_columns(eval_adata, helpers):
    import scipy.sparse as sp

    a = eval_adata
    rng = np.random.default_rng(9)
    t = a.layers["log1p"]
    p = t + rng.normal(size=t.shape)
    helpers.add_prediction(a, p)
    ref = hf.tl.evaluate(a, pred_key="pred", metrics=FAST, inplace=False)
    a.obsm["reversed"] = a.obsm["pred"].iloc[:, ::-1]
    a.layers["log1p"] = sp.csr_matrix(t)
    out = hf.tl.evaluate(a, pred_key="reversed", metrics=["pcc", "mse", "gsc"], inplace=False)
    for metric in ("pcc", "mse", "gsc"):
        for agg in ("per_slide", "pooled"):
            assert _get(out, metric, agg, "PRAD") == pytest.approx(_get(ref, metric, agg, "PRAD"), rel=1e-9)


def test_metric_selection_and_k(eval_adata, helpers):
    helpers.add_prediction(eval_adata, eval_adata.layers["log1p"])
    df = hf.tl.evaluate(eval_adata, pred_key="pred", metrics="pcc", k=None, groupby=None, inplace=False)
    assert set(df["metric"]) == {"pcc"} and set(df["group"]) == {"all"}
    df = hf.tl.evaluate(eval_adata, pred_key="pred", metrics=["pcc"], k=[5, 40, 41], inplace=False)
    assert set(df["metric"]) == {"pcc", "pcc@5", "pcc@40"}  # no pcc@41 with 40 genes


def test_spatialdata_input(eval_adata, helpers):
    from spatialdata import SpatialData

    helpers.add_prediction(eval_adata, eval_adata.layers["log1p"])
    sdata = SpatialData(tables={"table": eval_adata})
    df = hf.tl.evaluate(sdata, pred_key="pred", metrics=["pcc", "ssc"], key_added="m")
    assert np.allclose(df["value"], 1.0)
    assert "m" in sdata.tables["table"].uns


def test_gene_sets_from_panel_and_user(eval_adata, helpers):
    a = eval_adata
    genes = list(a.var_names)
    a.var["histoflow_panel_hvg"] = [i < 12 for i in range(40)]
    a.uns["histoflow_panel"] = {
        "genes": genes,
        "hallmark_tiers": {g: ("low" if i < 5 else "high") for i, g in enumerate(genes[20:35])},
        "hallmark_sets": {"HALLMARK_HYPOXIA": genes[20:30], "HALLMARK_NOT_PREDICTED": ["XYZ"]},
    }
    rng = np.random.default_rng(6)
    t = a.layers["log1p"].astype(np.float64)
    p = t + rng.normal(size=t.shape)
    helpers.add_prediction(a, p)
    df = hf.tl.evaluate(a, pred_key="pred", gene_sets={"mine": genes[:3] + ["ABSENT"]}, metrics=["pcc", "gsc"])
    assert set(df["gene_set"]) == {"all", "hvg", "tier:low", "tier:high", "HALLMARK_HYPOXIA", "mine"}
    assert _get(df, "pcc", gene_set="hvg", col="n_genes") == 12
    assert _get(df, "pcc", gene_set="tier:high", col="n_genes") == 10
    assert _get(df, "pcc@10", gene_set="HALLMARK_HYPOXIA") == pytest.approx(
        _get(df, "pcc", gene_set="HALLMARK_HYPOXIA")
    )
    assert not ((df.metric == "pcc@10") & (df.gene_set == "mine")).any()  # fewer than 10 genes
    assert _get(df, "pcc", gene_set="HALLMARK_HYPOXIA") == pytest.approx(
        M.pcc(t[:, 20:30], p[:, 20:30], aggregation="pooled")
    )
    assert _get(df, "gsc", "per_slide", gene_set="mine") == pytest.approx(
        M.gsc(t[:, :3], p[:, :3], groups=a.obs["library_id"].to_numpy())
    )
    none = hf.tl.evaluate(a, pred_key="pred", panel_key=None, metrics=["pcc"], inplace=False)
    assert set(none["gene_set"]) == {"all"}


def test_domain_labels(eval_adata, helpers):
    helpers.add_prediction(eval_adata, eval_adata.layers["log1p"])
    df = hf.tl.evaluate(
        eval_adata, pred_key="pred", metrics=["domains"], n_domains=3, domain_labels_key="region_label", seed=1
    )
    assert _get(df, "label_ari_pred", "per_slide") == pytest.approx(_get(df, "label_ari_true", "per_slide"))
    assert 0 < _get(df, "label_ari_true", "per_slide") <= 1
    assert set(df["aggregation"]) == {"per_slide"}


# ------------------------------------------------------------------------------------------------------ storage


def test_uns_tables_and_h5ad_roundtrip(eval_adata, helpers, tmp_path):
    import anndata as ad

    a = eval_adata
    rng = np.random.default_rng(7)
    t = a.layers["log1p"]
    helpers.add_prediction(a, t + rng.normal(size=t.shape))
    df = hf.tl.evaluate(a, pred_key="pred", metrics=FAST)
    res = a.uns["pred_metrics"]
    assert set(res) == {"summary", "per_gene", "per_slide", "pcc_by_slide", "morans_i_true_by_slide",
                        "morans_i_pred_by_slide", "gene_corr_true", "gene_corr_pred", "params"}  # fmt: skip
    pd.testing.assert_frame_equal(res["summary"], df)
    per_gene = res["per_gene"]
    assert list(per_gene.index) == list(a.var_names)
    np.testing.assert_allclose(per_gene["pcc"], M.pcc_per_gene(t, a.obsm["pred"].to_numpy()))
    np.testing.assert_allclose(res["gene_corr_true"].to_numpy(), np.corrcoef(t.astype(np.float64), rowvar=False),
                               atol=1e-10)  # fmt: skip
    assert res["pcc_by_slide"].shape == (4, 40)
    assert per_gene["pcc_mean_over_slides"].iloc[0] == pytest.approx(res["pcc_by_slide"].iloc[:, 0].mean())
    assert res["per_slide"].loc["S0", "pcc"] == pytest.approx(res["pcc_by_slide"].loc["S0"].mean())
    assert res["params"]["n_spots"] == a.n_obs
    a.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad").uns["pred_metrics"]
    pd.testing.assert_frame_equal(back["summary"], df, check_dtype=False)
    pd.testing.assert_frame_equal(back["per_slide"], res["per_slide"], check_dtype=False)


def test_inplace_false_writes_nothing_and_failures_leave_uns_untouched(eval_adata, helpers, monkeypatch, caplog):
    import sys

    helpers.add_prediction(eval_adata, eval_adata.layers["log1p"])
    before = set(eval_adata.uns)
    hf.tl.evaluate(eval_adata, pred_key="pred", metrics=["pcc"], inplace=False)
    assert set(eval_adata.uns) == before
    # a failure in the middle of the slide loop (Leiden without igraph) writes nothing
    monkeypatch.setitem(sys.modules, "igraph", None)
    with pytest.raises(ImportError, match="needs the `igraph` package"):
        hf.tl.evaluate(eval_adata, pred_key="pred", domain_method="leiden")
    assert set(eval_adata.uns) == before
    # too few spots for the domains: a warning naming the slide, NaN values, nothing zero
    with caplog.at_level("WARNING", logger="histoflow"):
        df = hf.tl.evaluate(eval_adata, pred_key="pred", metrics=["domains"], n_domains=100)
    assert "Slide 'S0' has 72 spots" in caplog.text
    assert df["value"].isna().all() and (df["n_slides"] == 0).all()


def test_summarize_folds_of_evaluate_frames(eval_adata, helpers):
    rng = np.random.default_rng(8)
    t = eval_adata.layers["log1p"]
    helpers.add_prediction(eval_adata, t + rng.normal(size=t.shape))
    frames = {
        s: hf.tl.evaluate(eval_adata, pred_key="pred", mask_obs=(eval_adata.obs["library_id"] == s).to_numpy(),
                          metrics=["pcc"], groupby=None, inplace=False)
        for s in ("S0", "S1", "S2")
    }  # fmt: skip
    out = M.summarize_folds(frames)
    row = out[(out.metric == "pcc") & (out.aggregation == "pooled")].iloc[0]
    vals = [_get(f, "pcc") for f in frames.values()]
    assert row["mean"] == pytest.approx(np.mean(vals)) and row["std"] == pytest.approx(np.std(vals))
    assert row["n_folds"] == 3


# ---------------------------------------------------------------------------------------------------- bad input


def test_bad_input(eval_adata, helpers):
    a = eval_adata
    helpers.add_prediction(a, a.layers["log1p"])
    with pytest.raises(ValueError, match="exactly one of `pred_key=`"):
        hf.tl.evaluate(a)
    with pytest.raises(ValueError, match="exactly one of `pred_key=`"):
        hf.tl.evaluate(a, pred_key="pred", pred_layer="log1p")
    with pytest.raises(KeyError, match="pred_key='nope'"):
        hf.tl.evaluate(a, pred_key="nope")
    a.obsm["arr"] = np.zeros((a.n_obs, 40))
    with pytest.raises(ValueError, match="pass `genes=`"):
        hf.tl.evaluate(a, pred_key="arr")
    with pytest.raises(ValueError, match="names 3 genes but"):
        hf.tl.evaluate(a, pred_key="arr", genes=["G00", "G01", "G02"])
    with pytest.raises(KeyError, match="not among the columns"):
        hf.tl.evaluate(a, pred_key="pred", genes=["G00", "NOPE"])
    a.obsm["other"] = pd.DataFrame(np.zeros((a.n_obs, 2)), index=a.obs_names, columns=["G00", "FOREIGN"])
    with pytest.raises(KeyError, match="no truth for them"):
        hf.tl.evaluate(a, pred_key="other")
    with pytest.raises(KeyError, match="true_layer='counts'"):
        hf.tl.evaluate(a, pred_key="pred", true_layer="counts")
    bad = a.obsm["pred"].copy()
    bad.iloc[3, 2] = np.nan
    a.obsm["bad"] = bad
    with pytest.raises(ValueError, match=r"obsm\['bad'\]` contains 1 NaN"):
        hf.tl.evaluate(a, pred_key="bad")
    with pytest.raises(ValueError, match="metrics='auc'"):
        hf.tl.evaluate(a, pred_key="pred", metrics=["auc"])
    with pytest.raises(ValueError, match="`k` must be a positive integer"):
        hf.tl.evaluate(a, pred_key="pred", k=0)
    with pytest.raises(ValueError, match="split='validation'"):
        hf.tl.evaluate(a, pred_key="pred", split="validation")
    with pytest.raises(ValueError, match="selects 0 spot"):
        hf.tl.evaluate(a, pred_key="pred", mask_obs=np.zeros(a.n_obs, bool))
    with pytest.raises(ValueError, match="one value per spot"):
        hf.tl.evaluate(a, pred_key="pred", mask_obs=np.ones(3, bool))
    with pytest.raises(KeyError, match="library_key='sample'"):
        hf.tl.evaluate(a, pred_key="pred", library_key="sample")
    with pytest.raises(ValueError, match="`n_pcs` must be a positive integer"):
        hf.tl.evaluate(a, pred_key="pred", n_pcs=0)
    with pytest.raises(ValueError, match="domain_method='louvain'"):
        hf.tl.evaluate(a, pred_key="pred", domain_method="louvain")
    a.obs["mixed"] = np.where(np.arange(a.n_obs) % 2, "A", "B")
    with pytest.raises(ValueError, match="not constant within slide"):
        hf.tl.evaluate(a, pred_key="pred", groupby="mixed")
    with pytest.raises(ValueError, match="reserved"):
        hf.tl.evaluate(a, pred_key="pred", gene_sets={"all": ["G00"]})
    assert not any(k.endswith("_metrics") for k in a.uns)
