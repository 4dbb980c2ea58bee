"""``histoflow.pl`` on a tiny fitted MoLF and on constructed stored keys: what is drawn, bad input, no writes."""

from __future__ import annotations

import sys
import types
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from matplotlib.axes import Axes
from matplotlib.collections import EllipseCollection, PathCollection
from matplotlib.figure import Figure
from scipy.spatial.distance import jensenshannon

import histoflow as hf
from histoflow.pl._routing import routing_usage

NS = {"show": False}


def _table(sdata):
    return sdata.tables["table"]


# --------------------------------------------------------------------------------------------------------------------
# every plot on the fitted model


def test_every_plot_draws_and_writes_nothing(fitted, guard):
    sdata, model = fitted
    table = _table(sdata)
    before = guard.snapshot(table)
    out = {
        "routing": hf.pl.routing(sdata, **NS),
        "routing_similarity": hf.pl.routing_similarity(sdata, **NS),
        "expert_patches": hf.pl.expert_patches(sdata, n=4, patch_px=16, **NS),
        "trajectories": hf.pl.trajectories(sdata, basis="pca", **NS),
        "gsc": hf.pl.gsc(sdata, **NS),
        "ssc": hf.pl.ssc(sdata, **NS),
        "morans_i": hf.pl.morans_i(sdata, **NS),
        "spatial": hf.pl.spatial(sdata, "EPCAM", library_id="S0", **NS),
        "guidance_model": hf.pl.guidance(model, **NS),
        "guidance": hf.pl.guidance(sdata, **NS),
        "history_model": hf.pl.history(model, **NS),
        "history": hf.pl.history(sdata, **NS),
        "metrics": hf.pl.metrics(sdata, "pcc", **NS),
    }
    for name in ("routing", "routing_similarity", "ssc", "morans_i", "guidance", "guidance_model", "metrics"):
        assert isinstance(out[name], Axes), name
    assert len(out["expert_patches"]) == 3  # one panel per expert
    assert len(out["trajectories"]) == 2 and len(out["gsc"]) == 3
    assert out["spatial"].shape == (1, 3)  # true, predicted, std (2 samples per spot)
    assert len(out["history"]) == 3 and len(out["history_model"]) == 3  # vae, flow, expert load
    guard.check(table, before)


def test_show_save_return_fig_and_ax(constructed, tmp_path):
    path = tmp_path / "routing.png"
    fig = hf.pl.routing(constructed, "pred", save=path, return_fig=True, show=False)
    assert isinstance(fig, Figure) and path.stat().st_size > 1000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Agg cannot show
        assert hf.pl.ssc(constructed, "pred") is None  # shown (scanpy default), nothing returned
    _, ax = plt.subplots()
    assert hf.pl.metrics(constructed, "pcc", key="pred", ax=ax, show=False) is ax
    assert len(ax.patches) == 3


# --------------------------------------------------------------------------------------------------------------------
# routing


def test_routing_values(fitted, constructed):
    sdata, _ = fitted
    table = _table(sdata)
    W = table.obsm["molf_routing"]
    usage = routing_usage(table, "molf", "cancer_type")
    expected = W.groupby(table.obs["cancer_type"].astype(str).to_numpy()).mean() * 100
    np.testing.assert_allclose(usage.to_numpy(), expected.loc[usage.index].to_numpy(), rtol=1e-5)
    np.testing.assert_allclose(usage.sum(1), 100.0, rtol=1e-5)
    ax = hf.pl.routing(sdata, **NS)
    texts = [t.get_text() for t in ax.texts]
    assert texts == [f"{v:.0f}" for v in usage.to_numpy().ravel()]
    top1 = routing_usage(table, "molf", None, "top1")
    counts = np.bincount(W.to_numpy().argmax(1), minlength=W.shape[1]) / table.n_obs * 100
    np.testing.assert_allclose(top1.to_numpy().ravel(), counts)
    # constructed routing: IDC slides prefer expert 0, PRAD slides expert 2
    u = routing_usage(constructed, "pred", "cancer_type")
    assert u.loc["IDC"].idxmax() == "expert_0" and u.loc["PRAD"].idxmax() == "expert_2"


def test_routing_similarity_is_jensen_shannon(constructed):
    ax = hf.pl.routing_similarity(constructed, "pred", groupby="library_id", **NS)
    usage = routing_usage(constructed, "pred", "library_id") / 100
    values = np.array([float(t.get_text()) for t in ax.texts]).reshape(4, 4)
    np.testing.assert_allclose(np.diag(values), 0.0)
    np.testing.assert_allclose(values, values.T)
    assert values[0, 1] == pytest.approx(jensenshannon(usage.loc["S0"], usage.loc["S1"], base=2), abs=0.006)
    assert values[0, 2] < 0.1 < 0.3 < values[0, 1]  # same cancer type close, different far


def test_expert_patches_tiles_the_top_spots(fitted):
    sdata, _ = fitted
    table = _table(sdata)
    axes = hf.pl.expert_patches(sdata, n=4, experts=[1], patch_px=16, **NS)
    assert len(axes) == 1
    canvas = axes[0].images[0].get_array()
    assert canvas.shape == (32, 32, 3)  # 2 × 2 tiles of 16 px
    W = table.obsm["molf_routing"]["expert_1"]
    top = W.sort_values(ascending=False, kind="stable").index[:4]
    patches = hf.pp.crop_patches(sdata, patch_px=16, obs_names=list(top))
    np.testing.assert_array_equal(canvas[:16, :16], patches[0])
    np.testing.assert_array_equal(canvas[16:, 16:], patches[3])


# --------------------------------------------------------------------------------------------------------------------
# trajectories


def test_trajectories_pca_places_every_point(fitted):
    from sklearn.decomposition import PCA

    sdata, _ = fitted
    tr = _table(sdata).uns["molf_trajectories"]
    macro, micro = hf.pl.trajectories(sdata, basis="pca", spots=[tr["obs_names"][3]], **NS)
    pca = PCA(2, random_state=0).fit(np.concatenate([tr["z1_true"], tr["z0"]]).astype(np.float64))
    offsets = [c.get_offsets() for c in macro.collections if isinstance(c, PathCollection)]
    assert [len(o) for o in offsets] == [30, 30, 30]  # noise, true, predicted
    np.testing.assert_allclose(offsets[2], pca.transform(np.asarray(tr["z1_pred"], dtype=np.float64)), atol=1e-5)
    path = micro.lines[0].get_xydata()
    assert path.shape == (5, 2)  # 4 steps
    np.testing.assert_allclose(path, pca.transform(np.asarray(tr["trajectory"])[:, 3].astype(np.float64)), atol=1e-5)


def test_trajectories_umap_uses_umap_learn(fitted, monkeypatch):
    """The UMAP path (umap-learn's JIT compile takes a minute, so a stand-in with its API records the calls)."""
    from sklearn.decomposition import PCA

    calls = {}

    class FakeUMAP:
        def __init__(self, **kwargs):
            calls["init"] = kwargs
            self.pca = PCA(2)

        def fit_transform(self, X):
            calls["fit"] = X.shape
            return self.pca.fit_transform(X)

        def transform(self, X):
            calls.setdefault("transform", []).append(X.shape)
            return self.pca.transform(X)

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=FakeUMAP))
    sdata, _ = fitted
    axes = hf.pl.trajectories(sdata, spots=2, seed=3, **NS)
    assert calls["init"]["random_state"] == 3 and calls["init"]["n_components"] == 2
    assert calls["fit"] == (60, 8)  # true latents and noise
    assert calls["transform"][0] == (30, 8)  # predictions placed on the fitted map
    assert axes[0].get_xlabel() == "UMAP 1"
    monkeypatch.setitem(sys.modules, "umap", None)  # not installed: auto falls back to PCA
    assert hf.pl.trajectories(sdata, view="macro", **NS)[0].get_xlabel() == "PC 1"
    with pytest.raises(ImportError, match="umap-learn"):
        hf.pl.trajectories(sdata, basis="umap", **NS)


# --------------------------------------------------------------------------------------------------------------------
# evaluation plots


def test_gsc_matrices_share_one_order(constructed):
    m = constructed.uns["pred_metrics"]
    axes = hf.pl.gsc(constructed, "pred", **NS)
    order = [t.get_text() for t in axes[0].get_yticklabels()]
    assert sorted(order) == sorted(constructed.var_names)
    assert order == [t.get_text() for t in axes[1].get_yticklabels()]
    np.testing.assert_allclose(axes[0].images[0].get_array(), m["gene_corr_true"].loc[order, order].to_numpy())
    np.testing.assert_allclose(axes[1].images[0].get_array(), m["gene_corr_pred"].loc[order, order].to_numpy())
    assert len(axes[2].collections[0].get_offsets()) == 12 * 11 // 2
    s = m["summary"]
    gsc = s[(s.metric == "gsc") & (s.aggregation == "pooled") & (s.group == "all") & (s.gene_set == "all")]
    assert axes[2].get_title() == f"GSC = {gsc['value'].iloc[0]:.3f}"
    sub = hf.pl.gsc(constructed, "pred", genes=["G00", "G01", "G02", "G03"], **NS)
    assert len(sub[2].collections[0].get_offsets()) == 6


def test_ssc_and_morans_i_values(constructed):
    pg = constructed.uns["pred_metrics"]["per_gene"]
    ax = hf.pl.ssc(constructed, "pred", n_labels=2, **NS)
    np.testing.assert_allclose(ax.collections[0].get_offsets(), pg[["morans_i_true", "morans_i_pred"]].to_numpy())
    assert ax.get_title().startswith("SSC = ") and len(ax.texts) == 2
    ax = hf.pl.morans_i(constructed, "pred", n_genes=5, **NS)
    top = pg.sort_values("morans_i_true", ascending=False).head(5)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(top.index)
    heights = [p.get_width() for p in ax.patches]
    np.testing.assert_allclose(heights[:5], top["morans_i_true"])
    np.testing.assert_allclose(heights[5:], top["morans_i_pred"])


def _errorbars(ax):
    from matplotlib.container import ErrorbarContainer

    (container,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    return container.lines[2][0].get_segments()


def test_metrics_bars_and_error_bars(constructed):
    m = constructed.uns["pred_metrics"]
    s, ps = m["summary"], m["per_slide"]
    ax = hf.pl.metrics(constructed, "pcc", key="pred", **NS)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["all", "IDC", "PRAD"]
    sel = s[(s.metric == "pcc") & (s.aggregation == "per_slide") & (s.gene_set == "all")].set_index("group")
    np.testing.assert_allclose([p.get_height() for p in ax.patches], sel.loc[["all", "IDC", "PRAD"], "value"])
    err = _errorbars(ax)
    np.testing.assert_allclose([seg[1, 1] - seg[0, 1] for seg in err], 2 * np.array(
        [ps["pcc"].std(), ps.loc[ps.group == "IDC", "pcc"].std(), ps.loc[ps.group == "PRAD", "pcc"].std()]
    ), rtol=1e-6)  # fmt: skip
    # across folds: two evaluations with a fold column, mean ± std
    folds = pd.concat([s.assign(fold=0), s.assign(fold=1, value=s["value"] + 0.1)])
    ax = hf.pl.metrics(folds, "pcc", aggregation="pooled", **NS)
    pooled = s[(s.metric == "pcc") & (s.aggregation == "pooled") & (s.gene_set == "all")].set_index("group")
    np.testing.assert_allclose([p.get_height() for p in ax.patches], pooled.loc[["all", "IDC", "PRAD"], "value"] + 0.05)
    seg = _errorbars(ax)[0]
    assert seg[1, 1] - seg[0, 1] == pytest.approx(2 * np.std([0.0, 0.1], ddof=1))
    # several methods side by side
    both = pd.concat([s.assign(method="A"), s.assign(method="B")])
    ax = hf.pl.metrics(both, "pcc", **NS)
    assert len(ax.patches) == 6 and ax.get_legend().get_title().get_text() == "method"
    # several metrics and several methods cannot share one bar: a clear error, not an average of metrics
    with pytest.raises(ValueError, match="average different metrics"):
        hf.pl.metrics(both, ["pcc", "gsc"], **NS)


# --------------------------------------------------------------------------------------------------------------------
# spatial, guidance, history


def test_spatial_over_the_image_in_full_resolution_pixels(fitted):
    sdata, _ = fitted
    table = _table(sdata)
    axes = hf.pl.spatial(sdata, ["EPCAM", "COL1A1"], library_id="S1", max_image_px=200, **NS)
    assert axes.shape == (2, 3)
    img = sdata.images["S1_full_image"]
    h, w = img.shape[-2:]
    ax = axes[0, 1]
    (im,) = ax.images
    assert max(im.get_array().shape[:2]) <= 200
    left, right, bottom, top = im.get_extent()
    assert (left, top) == (0, 0) and right == pytest.approx(w, rel=0.02) and bottom == pytest.approx(h, rel=0.02)
    (coll,) = [c for c in ax.collections if isinstance(c, EllipseCollection)]
    rows = np.flatnonzero(table.obs["library_id"] == "S1")
    pixel = table.obs["pixel_size_um"].iloc[rows[0]]
    np.testing.assert_allclose(coll.get_offsets(), table.obsm["spatial"][rows], atol=1e-6)
    np.testing.assert_allclose(coll._widths * 2, 55.0 / pixel, rtol=1e-6)  # matplotlib keeps half-widths
    np.testing.assert_allclose(coll.get_array(), table.obsm["molf"]["EPCAM"].to_numpy()[rows], rtol=1e-6)
    true_vals = [c for c in axes[0, 0].collections if isinstance(c, EllipseCollection)][0].get_array()
    truth = sp.csr_matrix(table.layers["log1p"])[rows][:, table.var_names.get_loc("EPCAM")].toarray().ravel()
    np.testing.assert_allclose(true_vals, truth, rtol=1e-6)
    std = [c for c in axes[0, 2].collections if isinstance(c, EllipseCollection)][0].get_array()
    np.testing.assert_allclose(std, table.obsm["molf_std"]["EPCAM"].to_numpy()[rows], rtol=1e-6)
    no_std = hf.pl.spatial(sdata, "EPCAM", library_id="S1", show_std=False, img=False, **NS)
    assert no_std.shape == (1, 2) and not no_std[0, 0].images


def test_spatial_anndata_without_image_draws_spots(constructed):
    axes = hf.pl.spatial(constructed, "G03", "pred", library_id=["S0", "S2"], **NS)
    assert axes.shape == (2, 2) and not axes[0, 0].images  # no std, no image
    coll = axes[1, 1].collections[0]
    rows = np.flatnonzero(constructed.obs["library_id"] == "S2")
    np.testing.assert_allclose(coll.get_array(), constructed.obsm["pred"]["G03"].to_numpy()[rows], rtol=1e-6)
    np.testing.assert_allclose(coll._widths * 2, 80.0)  # 80 µm at 1 µm per pixel


def test_spatial_unpredicted_spots_are_masked(constructed):
    a = constructed.copy()
    a.obsm["pred"] = a.obsm["pred"].copy()
    a.obsm["pred"].iloc[:5] = np.nan
    coll = hf.pl.spatial(a, "G00", "pred", library_id="S0", **NS)[0, 1].collections[0]
    assert coll.get_array().mask[:5].all() and not coll.get_array().mask[5:].any()


def test_guidance_marks_feasible_and_chosen(constructed):
    ax = hf.pl.guidance(constructed, "pred", **NS)
    sweep = constructed.uns["pred_guidance"]["sweep"]
    spans = list(ax.patches)
    assert len(spans) == int(sweep["feasible"].sum()) == 3
    assert [line for line in ax.lines if line.get_linestyle() == ":"][0].get_xdata()[0] == 1.5
    np.testing.assert_allclose(ax.lines[0].get_ydata(), sweep["w1"])
    (thresh,) = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert thresh.get_ydata()[0] == pytest.approx(1.05 * 0.45)


def test_history_every_term_and_load(fitted, constructed):
    axes = hf.pl.history(constructed, "pred", **NS)
    labels = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in axes]
    assert labels == [["loss", "rec", "kl"], ["loss", "flow", "gene", "aux"], ["expert 0", "expert 1", "expert 2",
                                                                                  "uniform"]]  # fmt: skip
    assert len(axes[1].lines) == 4 + 3  # train for 4 terms, val for 3
    np.testing.assert_allclose(axes[2].lines[1].get_ydata(), constructed.uns["pred"]["history"]["flow"]["train_load_1"])
    _, model = fitted
    only = hf.pl.history(model, stages="flow", **NS)
    assert len(only) == 2
    np.testing.assert_allclose(only[0].lines[0].get_ydata(), model.history["flow"]["train_loss"])


# --------------------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda a: hf.pl.routing(a, "nope"), KeyError, r"nope_routing.*fit_molf"),
        (lambda a: hf.pl.routing(a, "pred", groupby="tissue"), KeyError, r"groupby='tissue'"),
        (lambda a: hf.pl.routing(a, "pred", stat="median"), ValueError, r"stat='median'"),
        (lambda a: hf.pl.routing_similarity(a, "pred", groupby="technology"), ValueError, "single group"),
        (lambda a: hf.pl.expert_patches(a, "pred", experts=[7]), ValueError, r"experts.*expert_0"),
        (lambda a: hf.pl.expert_patches(a, "pred", n=0), ValueError, r"`n` must"),
        (lambda a: hf.pl.gsc(a, "nope"), KeyError, r"nope_metrics.*tl\.evaluate"),
        (lambda a: hf.pl.gsc(a, "pred", genes=["G00", "XIST"]), KeyError, r"XIST.*not evaluated"),
        (lambda a: hf.pl.ssc(a, "pred", metrics_key="other"), KeyError, r"other.*tl\.evaluate"),
        (lambda a: hf.pl.morans_i(a, "pred", sort_by="both"), ValueError, r"sort_by='both'"),
        (lambda a: hf.pl.spatial(a, "XIST", "pred"), KeyError, r"XIST.*not predicted"),
        (lambda a: hf.pl.spatial(a, "G00", "pred", library_id="S9"), KeyError, r"library_id.*S9"),
        (lambda a: hf.pl.spatial(a, "G00", "pred", show_std=True), KeyError, r"pred_std.*n_samples"),
        (lambda a: hf.pl.spatial(a, "G00", "pred", true_layer="counts"), KeyError, r"true_layer='counts'"),
        (lambda a: hf.pl.guidance(a, "nope"), KeyError, r"nope_guidance.*select_guidance"),
        (lambda a: hf.pl.guidance(object()), TypeError, r"`data` must be"),
        (lambda a: hf.pl.history(a, "nope"), KeyError, r"nope.*fit_molf"),
        (lambda a: hf.pl.history(a, "pred", stages="gan"), ValueError, r"stages.*gan"),
        (lambda a: hf.pl.trajectories(a, "pred"), KeyError, r"pred_trajectories.*tl\.trajectories"),
        (lambda a: hf.pl.metrics(a, "r2", key="pred"), ValueError, r"metric.*r2"),
        (lambda a: hf.pl.metrics(a, "pcc", key="pred", by="organ"), ValueError, r"by='organ'"),
        (lambda a: hf.pl.metrics(a, "pcc", key="pred", by="tier"), ValueError, r"tier gene set"),
        (lambda a: hf.pl.metrics(3, "pcc"), TypeError, r"`data` must be"),
        (lambda a: hf.pl.metrics(pd.DataFrame({"metric": ["pcc"]}), "pcc"), KeyError, r"lacks the columns"),
    ],
)
def test_bad_input(constructed, call, error, match, guard):
    before = guard.snapshot(constructed)
    with pytest.raises(error, match=match):
        call(constructed)
    guard.check(constructed, before)


def test_bad_trajectory_input(fitted):
    sdata, _ = fitted
    with pytest.raises(KeyError, match="were not recorded"):
        hf.pl.trajectories(sdata, spots=["not-a-spot"], basis="pca", **NS)
    with pytest.raises(ValueError, match="view='side'"):
        hf.pl.trajectories(sdata, view="side", **NS)
    with pytest.raises(ValueError, match="basis='tsne'"):
        hf.pl.trajectories(sdata, basis="tsne", **NS)


def test_metrics_per_tier_in_tier_order(constructed):
    s = constructed.uns["pred_metrics"]["summary"]
    base = s[(s.metric == "pcc") & (s.aggregation == "pooled") & (s.gene_set == "all")]
    tiers = pd.concat(
        [base.assign(gene_set=f"tier:{t}", value=v) for t, v in (("high", 0.5), ("low", 0.1), ("mid", 0.3))]
    )
    ax = hf.pl.metrics(pd.concat([s, tiers]), "pcc", by="tier", aggregation="pooled", **NS)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["low", "mid", "high"]
    np.testing.assert_allclose([p.get_height() for p in ax.patches], [0.1, 0.3, 0.5])
