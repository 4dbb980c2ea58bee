"""tl.blend_predictions: the weighted mean of several predictions of the same genes."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import histoflow as hf
from histoflow.tl import metrics as M


def test_the_blend_is_the_normalised_weighted_mean_gene_by_gene(helpers, tmp_path):
    adata = helpers.make(n_slides=2, grid=(4, 5), n_genes=4)
    rng = np.random.default_rng(0)
    A = rng.normal(size=(adata.n_obs, 4)).astype(np.float32)
    B = rng.normal(size=(adata.n_obs, 4)).astype(np.float32)
    helpers.add_prediction(adata, A, key="a")
    genes = list(adata.var_names)
    adata.obsm["b"] = pd.DataFrame(B, index=adata.obs_names, columns=genes).iloc[:, ::-1]  # other column order
    hf.tl.blend_predictions(adata, {"a": 3, "b": 1.0})
    out = adata.obsm["blend"]
    assert list(out.columns) == genes and out.index.equals(adata.obs_names) and out.to_numpy().dtype == np.float32
    np.testing.assert_allclose(out.to_numpy(), 0.75 * A + 0.25 * B, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(adata.layers["blend"], out.to_numpy())
    assert adata.uns["blend"] == {"weights": {"a": 0.75, "b": 0.25}, "n_blended": adata.n_obs}
    adata.write_h5ad(tmp_path / "t.h5ad")
    back = ad.read_h5ad(tmp_path / "t.h5ad")
    assert back.uns["blend"]["weights"] == {"a": 0.75, "b": 0.25}
    np.testing.assert_array_equal(back.obsm["blend"].to_numpy(), out.to_numpy())
    # weight 0 leaves a prediction out; one prediction alone is itself
    hf.tl.blend_predictions(adata, {"a": 0, "b": 2}, key_added="only_b")
    np.testing.assert_allclose(adata.obsm["only_b"][genes].to_numpy(), B)


def test_spots_without_every_prediction_get_none(helpers):
    adata = helpers.make(n_slides=1, grid=(4, 4), n_genes=3)
    A = np.ones((adata.n_obs, 3))
    B = np.full((adata.n_obs, 3), 3.0)
    A[2] = np.nan  # spot 2 not predicted by a, spot 5 not by b
    B[5] = np.nan
    helpers.add_prediction(adata, A, key="a")
    helpers.add_prediction(adata, B, key="b")
    hf.tl.blend_predictions(adata, {"a": 1, "b": 1}, key_added="ab")
    out = adata.obsm["ab"].to_numpy()
    assert out.dtype == np.float64  # float64 predictions stay float64
    assert np.isnan(out[[2, 5]]).all() and np.allclose(np.delete(out, [2, 5], axis=0), 2.0)
    assert adata.uns["ab"]["n_blended"] == adata.n_obs - 2


def test_blending_predictions_with_independent_errors_raises_their_pcc(helpers):
    adata = helpers.make(n_slides=2, grid=(8, 9), n_genes=20)
    truth = adata.layers["log1p"]
    rng = np.random.default_rng(3)
    scale = truth.std(axis=0)
    for key in ("a", "b"):
        helpers.add_prediction(adata, truth + 1.5 * scale * rng.normal(size=truth.shape), key=key)
    hf.tl.blend_predictions(adata, {"a": 0.5, "b": 0.5})
    groups = adata.obs["library_id"].to_numpy()
    single = [M.pcc(truth, adata.obsm[k].to_numpy(), groups=groups) for k in ("a", "b")]
    assert M.pcc(truth, adata.obsm["blend"].to_numpy(), groups=groups) > max(single) + 0.05


def _with_features(helpers) -> ad.AnnData:
    adata = helpers.make(n_slides=3, grid=(6, 6), n_genes=5)
    rng = np.random.default_rng(0)
    X = adata.layers["log1p"]
    adata.obsm["X_feat"] = (X @ rng.normal(size=(5, 12)) + 0.5 * rng.normal(size=(adata.n_obs, 12))).astype(np.float32)
    return adata


def test_a_ridge_probe_without_intercept_warns_and_with_it_blends_on_the_log1p_scale(helpers):
    adata = _with_features(helpers)
    hf.tl.fit_baseline(adata, kind="ridge", embedding_key="X_feat", key_added="centred")
    hf.tl.fit_baseline(adata, kind="ridge", embedding_key="X_feat", key_added="ridge", fit_intercept=True)
    helpers.add_prediction(adata, adata.layers["log1p"], key="exact")
    with pytest.warns(UserWarning, match=r"`obsm\['centred'\]` comes from the ridge probe without intercept"):
        hf.tl.blend_predictions(adata, {"exact": 0.5, "centred": 0.5}, key_added="shifted")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf.tl.blend_predictions(adata, {"exact": 0.5, "ridge": 0.5})
    truth = adata.layers["log1p"]
    err = {k: np.abs(np.nanmean(adata.obsm[k].to_numpy() - truth)) for k in ("shifted", "blend")}
    assert err["blend"] < 0.1 < err["shifted"]  # the probe's centred values pull the blend far below the truth


@pytest.mark.parametrize(
    ("weights", "kwargs", "error", "match"),
    [
        (["a", "b"], {}, TypeError, "mapping"),
        ({}, {}, TypeError, "mapping"),
        ({1: 1.0}, {}, TypeError, "strings"),
        ({"a": -1, "b": 1}, {}, ValueError, r"weights\['a'\]"),
        ({"a": np.nan}, {}, ValueError, r"weights\['a'\]"),
        ({"a": True}, {}, TypeError, r"weights\['a'\]"),
        ({"a": "half"}, {}, TypeError, r"weights\['a'\]"),
        ({"a": 0, "b": 0}, {}, ValueError, "all 0"),
        ({"a": 1, "nope": 1}, {}, KeyError, "pred_key"),
        ({"a": 1, "other": 1}, {}, ValueError, "other genes"),
        ({"a": 1, "b": 1}, {"key_added": ""}, TypeError, "key_added"),
        ({"a": 1, "arr": 1}, {}, TypeError, "DataFrame"),
    ],
)
def test_bad_input_names_the_argument_and_writes_nothing(helpers, weights, kwargs, error, match):
    adata = helpers.make(n_slides=1, grid=(4, 4), n_genes=3)
    helpers.add_prediction(adata, np.ones((adata.n_obs, 3)), key="a")
    helpers.add_prediction(adata, np.zeros((adata.n_obs, 3)), key="b")
    helpers.add_prediction(adata, np.zeros((adata.n_obs, 2)), key="other", genes=["G00", "X"])
    adata.obsm["arr"] = np.zeros((adata.n_obs, 3))
    before = (set(adata.obsm), set(adata.layers), set(adata.uns))
    with pytest.raises(error, match=match):
        hf.tl.blend_predictions(adata, weights, **kwargs)
    assert (set(adata.obsm), set(adata.layers), set(adata.uns)) == before


def test_writes_only_its_keys_and_copy_leaves_the_input(helpers):
    adata = helpers.make(n_slides=2, grid=(4, 4), n_genes=3)
    helpers.add_prediction(adata, np.ones((adata.n_obs, 2)), key="a", genes=["G00", "G01"])
    helpers.add_prediction(adata, np.zeros((adata.n_obs, 2)), key="b", genes=["G01", "G00"])
    before = (set(adata.obsm), set(adata.layers), set(adata.uns), set(adata.obs.columns))
    out = hf.tl.blend_predictions(adata, {"a": 1, "b": 1}, copy=True)
    assert (set(adata.obsm), set(adata.layers), set(adata.uns), set(adata.obs.columns)) == before
    assert set(out.obsm) == before[0] | {"blend"} and set(out.uns) == before[2] | {"blend"}
    assert set(out.layers) == before[1]  # two of three genes: no layer
    np.testing.assert_allclose(out.obsm["blend"].to_numpy(), 0.5)
    assert hf.tl.blend_predictions(adata, {"a": 1, "b": 1}) is None
    assert set(adata.obsm) == before[0] | {"blend"}


def _with_val(helpers, **kw):
    adata = helpers.make(n_slides=3, grid=(8, 8), n_genes=8, **kw)
    adata.obs["split"] = pd.Categorical(adata.obs["library_id"].map({"S0": "train", "S1": "val", "S2": "test"}))
    return adata


def _noisy(adata, seed, scale):
    truth = adata.layers["log1p"]
    return truth + scale * truth.std(axis=0) * np.random.default_rng(seed).normal(size=truth.shape)


def test_select_blend_scores_each_weight_as_evaluate_scores_the_blend(helpers):
    adata = _with_val(helpers)
    helpers.add_prediction(adata, _noisy(adata, 1, 1.0), key="molf")
    helpers.add_prediction(adata, _noisy(adata, 2, 1.0), key="ridge")
    sweep = hf.tl.select_blend(adata, weights=(0.0, 0.25, 0.5, 0.75, 1.0))
    assert list(sweep.columns) == ["weight", "pcc", "gsc", "ssc", "structure", "chosen"]
    assert list(sweep["weight"]) == [1.0, 0.75, 0.5, 0.25, 0.0] and sweep["chosen"].sum() == 1
    for _, row in sweep.iterrows():
        hf.tl.blend_predictions(adata, {"molf": row["weight"], "ridge": 1 - row["weight"]}, key_added="b")
        scores = hf.tl.evaluate(adata, pred_key="b", split="val", metrics=["pcc", "gsc", "ssc"], inplace=False)
        overall = scores[(scores["gene_set"] == "all") & (scores["group"] == "all")]
        for metric in ("pcc", "gsc", "ssc"):
            expected = overall[(overall["metric"] == metric) & (overall["aggregation"] == "per_slide")]["value"]
            assert row[metric] == pytest.approx(float(expected.iloc[0]), abs=1e-6), (row["weight"], metric)
        assert row["structure"] == pytest.approx((row["gsc"] + row["ssc"]) / 2)
    # two predictions with independent errors of one size: their even mean has the best PCC
    chosen = sweep[sweep["chosen"]].iloc[0]
    assert chosen["weight"] == 0.5 and chosen["pcc"] == sweep["pcc"].max()
    stored = adata.uns["blend_selection"]
    assert stored["weight"] == 0.5 and stored["weights"] == {"molf": 0.5, "ridge": 0.5}
    assert stored["split"] == "val" and stored["tolerance"] == 0.0 and stored["sweep"].equals(sweep)
    hf.tl.blend_predictions(adata, stored["weights"])  # the record is blend_predictions' argument
    assert adata.uns["blend"]["weights"] == {"molf": 0.5, "ridge": 0.5}


def test_a_tolerance_trades_pcc_for_structure(helpers):
    adata = _with_val(helpers, seed=4)
    truth = adata.layers["log1p"]
    centred = truth - truth.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    one_axis = truth.mean(axis=0) + centred @ vt[:1].T @ vt[:1]  # follows the main pattern only: little structure
    helpers.add_prediction(adata, one_axis, key="molf")
    helpers.add_prediction(adata, _noisy(adata, 5, 1.5), key="ridge")  # every gene, noisily
    strict = hf.tl.select_blend(adata)
    loose = hf.tl.select_blend(adata, tolerance=0.05, key_added="loose")
    free = hf.tl.select_blend(adata, tolerance=1.0, key_added="free")
    pd.testing.assert_frame_equal(strict.drop(columns="chosen"), loose.drop(columns="chosen"))
    best = strict["pcc"].max()
    s, lo, fr = (frame[frame["chosen"]].iloc[0] for frame in (strict, loose, free))
    assert s["pcc"] == best
    feasible = loose[loose["pcc"] >= best - 0.05]
    assert lo["structure"] == feasible["structure"].max() and lo["pcc"] >= best - 0.05
    assert fr["structure"] == free["structure"].max()
    assert s["weight"] > lo["weight"] > fr["weight"]  # each step gives PCC for structure here
    assert lo["structure"] > s["structure"] and lo["pcc"] < s["pcc"]
    assert adata.uns["loose_selection"]["weights"] == {"molf": lo["weight"], "ridge": 1 - lo["weight"]}


def test_select_blend_looks_only_at_the_split_spots_with_both_predictions(helpers):
    adata = _with_val(helpers)
    A, B = _noisy(adata, 1, 1.0), _noisy(adata, 2, 2.0)
    helpers.add_prediction(adata, A, key="molf")
    helpers.add_prediction(adata, B, key="ridge")
    first = hf.tl.select_blend(adata)
    other = (adata.obs["split"] != "val").to_numpy()
    A2, B2 = A.copy(), B.copy()
    A2[other] = np.random.default_rng(8).normal(size=(other.sum(), A.shape[1]))
    B2[other] = np.nan  # neither the other slides' predictions nor their truth count
    adata.layers["log1p"][other] = 0.0
    helpers.add_prediction(adata, A2, key="molf")
    helpers.add_prediction(adata, B2, key="ridge")
    pd.testing.assert_frame_equal(hf.tl.select_blend(adata), first)
    val = np.flatnonzero(~other)
    B2[val[:4]] = np.nan  # spots without one of the predictions are left out
    helpers.add_prediction(adata, B2, key="ridge")
    keep = np.setdiff1d(val, val[:4])
    sub = adata[keep].copy()
    assert not hf.tl.select_blend(adata).equals(first)
    pd.testing.assert_frame_equal(hf.tl.select_blend(adata), hf.tl.select_blend(sub))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"split": "holdout"}, ValueError, "split='holdout'|== 'holdout'"),
        ({"split_key": "fold"}, KeyError, "split_key"),
        ({"weights": ()}, ValueError, "weights"),
        ({"weights": 0.5}, ValueError, "weights"),
        ({"weights": (0.5, 2.0)}, ValueError, "`weights` must be between 0 and 1"),
        ({"weights": (0.5, "x")}, TypeError, "weights"),
        ({"tolerance": -0.1}, ValueError, "tolerance"),
        ({"tolerance": "0.1"}, TypeError, "tolerance"),
        ({"tolerance": np.nan}, ValueError, "tolerance"),
        ({"true_layer": "counts"}, KeyError, "true_layer"),
        ({"other_key": "molf"}, ValueError, "both 'molf'"),
        ({"other_key": "nope"}, KeyError, "`other_key=.nope.` is not in `adata.obsm`"),
        ({"other_key": 3}, TypeError, "`other_key` must be an `obsm` key"),
        ({"other_key": "other_genes"}, ValueError, "other genes"),
        ({"key_added": ""}, TypeError, "key_added"),
        ({"library_key": "slide"}, KeyError, "library_key"),
    ],
)
def test_select_blend_bad_input_names_the_argument_and_writes_nothing(helpers, kwargs, error, match):
    adata = _with_val(helpers)
    helpers.add_prediction(adata, adata.layers["log1p"], key="molf")
    helpers.add_prediction(adata, adata.layers["log1p"] + 1, key="ridge")
    helpers.add_prediction(adata, np.ones((adata.n_obs, 2)), key="other_genes", genes=["G00", "X1"])
    before = (set(adata.obsm), set(adata.layers), set(adata.uns))
    with pytest.raises(error, match=match):
        hf.tl.select_blend(adata, **kwargs)
    assert (set(adata.obsm), set(adata.layers), set(adata.uns)) == before
