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


def test_gene_wise_weights_blend_each_gene_with_its_own_row(helpers, tmp_path):
    adata = helpers.make(n_slides=2, grid=(4, 5), n_genes=4)
    rng = np.random.default_rng(1)
    A, B = rng.normal(size=(2, adata.n_obs, 4))
    helpers.add_prediction(adata, A, key="a")
    helpers.add_prediction(adata, B, key="b")
    genes = list(adata.var_names)
    # rows in another order, one extra gene, one row not normalised
    weights = pd.DataFrame({"b": [0.0, 1.0, 0.5, 0.25, 7.0], "a": [1.0, 0.0, 0.5, 0.75, 7.0]},
                           index=[genes[0], genes[1], genes[3], genes[2], "EXTRA"])  # fmt: skip
    hf.tl.blend_predictions(adata, weights)
    wa = np.array([1.0, 0.0, 0.75, 0.5])
    np.testing.assert_allclose(adata.obsm["blend"].to_numpy(), wa * A + (1 - wa) * B, rtol=1e-12)
    stored = adata.uns["blend"]["weights"]
    assert list(stored.index) == genes and list(stored.columns) == ["b", "a"]
    np.testing.assert_allclose(stored["a"].to_numpy(), wa)
    adata.write_h5ad(tmp_path / "t.h5ad")
    back = ad.read_h5ad(tmp_path / "t.h5ad").uns["blend"]["weights"]
    pd.testing.assert_frame_equal(back, stored, check_names=False)
    # the same weight on every row is the plain blend
    hf.tl.blend_predictions(adata, pd.DataFrame({"a": 3.0, "b": 1.0}, index=genes), key_added="even")
    np.testing.assert_allclose(adata.obsm["even"].to_numpy(), 0.75 * A + 0.25 * B, rtol=1e-12)


@pytest.mark.parametrize(
    ("weights", "error", "match"),
    [
        (pd.DataFrame({"a": [1.0, 1.0], "b": [0.0, 0.0]}, index=["G00", "G01"]), ValueError, r"no row for 1 .*'G02'"),
        (pd.DataFrame({"a": [1.0, -1.0, 1.0], "b": 1.0}, index=["G00", "G01", "G02"]), ValueError, "at least 0"),
        (pd.DataFrame({"a": [1.0, np.nan, 1.0], "b": 1.0}, index=["G00", "G01", "G02"]), ValueError, "NaN"),
        (pd.DataFrame({"a": [1.0, 0.0, 1.0], "b": [0.0, 0.0, 1.0]}, index=["G00", "G01", "G02"]), ValueError,
         r"all 0 for gene\(s\) \['G01'\]"),
        (pd.DataFrame({"a": ["x", "y", "z"], "b": 1.0}, index=["G00", "G01", "G02"]), TypeError, "numbers"),
        (pd.DataFrame({0: [1.0, 1.0, 1.0]}, index=["G00", "G01", "G02"]), TypeError, "columns must be `obsm` keys"),
        (pd.DataFrame([[1.0, 1.0]] * 3, index=["G00", "G01", "G02"], columns=["a", "a"]), ValueError, "repeated"),
        (pd.DataFrame([[1.0, 1.0]] * 2, index=["G00", "G00"], columns=["a", "b"]), ValueError, "repeated"),
        (pd.DataFrame(columns=["a", "b"], dtype=float), ValueError, "at least one gene"),
        (pd.DataFrame({"a": 1.0, "nope": 1.0}, index=["G00", "G01", "G02"]), KeyError, "pred_key"),
    ],
)  # fmt: skip
def test_bad_gene_wise_weights_name_the_argument_and_write_nothing(helpers, weights, error, match):
    adata = helpers.make(n_slides=1, grid=(4, 4), n_genes=3)
    helpers.add_prediction(adata, np.ones((adata.n_obs, 3)), key="a")
    helpers.add_prediction(adata, np.zeros((adata.n_obs, 3)), key="b")
    before = (set(adata.obsm), set(adata.layers), set(adata.uns))
    with pytest.raises(error, match=match):
        hf.tl.blend_predictions(adata, weights)
    assert (set(adata.obsm), set(adata.layers), set(adata.uns)) == before


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
    assert list(sweep.columns) == ["weight", "spread", "pcc", "gsc", "ssc", "structure", "chosen"]
    assert (sweep["spread"] == 0).all()
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
    assert stored["spread"] == 0.0 and "gene_structure" not in stored and "structure_split" not in stored
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


def _structured(helpers):
    """Half the genes smooth in space, half spot-to-spot noise; a smooth model right on the first half only, a noisy
    model right-ish on every gene."""
    adata = _with_val(helpers, seed=6)
    rng = np.random.default_rng(7)
    x, y = adata.obsm["spatial"].T
    fields = np.stack([np.sin(x / (150 + 40 * k) + k) * np.cos(y / (170 + 30 * k) - k) for k in range(4)], axis=1)
    noise = rng.normal(size=(adata.n_obs, 4))
    truth = 3.0 + np.hstack([fields + 0.1 * rng.normal(size=fields.shape), noise])  # G00–G03 smooth, G04–G07 noise
    adata.layers["log1p"] = truth
    unrelated = np.sin(x / 130.0)[:, None] + np.cos(y / 110.0)[:, None] * np.arange(1, 5)
    helpers.add_prediction(adata, 3.0 + np.hstack([fields, unrelated]), key="molf")
    rough = np.hstack([2.0 * rng.normal(size=fields.shape), rng.normal(size=noise.shape)])
    helpers.add_prediction(adata, truth + rough, key="ridge")
    return adata


def test_gene_wise_weights_give_the_spatial_model_the_spatially_structured_genes(helpers):
    adata = _structured(helpers)
    sweep = hf.tl.select_blend(adata, weights=(0.0, 0.25, 0.5, 0.75, 1.0), spreads=(0, 20))
    assert list(sweep["spread"].unique()) == [0.0, 20.0] and len(sweep) == 10 and sweep["chosen"].sum() == 1
    chosen = sweep[sweep["chosen"]].iloc[0]
    # spread 20 puts every gene at weight 0 or 1 whatever w (ties: the larger w)
    assert chosen["spread"] == 20 and chosen["weight"] == 1.0
    assert chosen["pcc"] > sweep.loc[sweep["spread"] == 0, "pcc"].max() + 0.1  # no single weight comes close
    stored = adata.uns["blend_selection"]
    assert stored["weight"] == 1.0 and stored["spread"] == 20.0 and stored["structure_split"] == "train"
    genes = list(adata.var_names)
    weights = stored["weights"]
    assert list(weights.index) == genes and list(weights.columns) == ["molf", "ridge"]
    np.testing.assert_array_equal(weights["molf"].to_numpy(), [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(weights["ridge"].to_numpy(), 1 - weights["molf"].to_numpy())
    # the genes are ranked by Moran's I of the measured expression on the training slide
    structure = stored["gene_structure"]
    train = (adata.obs["split"] == "train").to_numpy()
    graph = M.spatial_connectivity(adata[train])
    np.testing.assert_allclose(structure["morans_i"].to_numpy(), M.morans_i(adata.layers["log1p"][train], graph))
    assert structure["rank"].min() == 0.0 and structure["rank"].max() == 1.0
    assert structure["rank"].iloc[:4].min() > structure["rank"].iloc[4:].max()
    # the stored weights are blend_predictions' argument, and the chosen row scores what tl.evaluate scores
    hf.tl.blend_predictions(adata, weights)
    scores = hf.tl.evaluate(adata, pred_key="blend", split="val", metrics=["pcc", "gsc", "ssc"], inplace=False)
    overall = scores[
        (scores["gene_set"] == "all") & (scores["group"] == "all") & (scores["aggregation"] == "per_slide")
    ]
    for metric in ("pcc", "gsc", "ssc"):
        value = float(overall.loc[overall["metric"] == metric, "value"].iloc[0])
        assert chosen[metric] == pytest.approx(value, abs=1e-6), metric
    # spread 0 rows are the plain sweep
    plain = hf.tl.select_blend(adata, weights=(0.0, 0.25, 0.5, 0.75, 1.0), key_added="plain")
    pd.testing.assert_frame_equal(
        sweep[sweep["spread"] == 0].drop(columns="chosen").reset_index(drop=True), plain.drop(columns="chosen")
    )


def test_gene_wise_weights_clip_and_rank_by_the_structure_split(helpers, tmp_path):
    adata = _structured(helpers)
    hf.tl.select_blend(adata, weights=(0.8,), spreads=(1.0,), key_added="one")
    stored = adata.uns["one_selection"]
    rank = stored["gene_structure"]["rank"].to_numpy()
    np.testing.assert_allclose(stored["weights"]["molf"].to_numpy(), np.clip(0.8 + (rank - 0.5), 0, 1))
    adata.write_h5ad(tmp_path / "t.h5ad")  # the record saves; read back, it still blends
    back = ad.read_h5ad(tmp_path / "t.h5ad")
    pd.testing.assert_frame_equal(back.uns["one_selection"]["weights"], stored["weights"], check_names=False)
    hf.tl.blend_predictions(back, back.uns["one_selection"]["weights"])
    # ranked on the test slide instead: its own structure, the same order of smooth and noisy genes here
    hf.tl.select_blend(adata, weights=(0.8,), spreads=(1.0,), structure_split="test", key_added="test")
    other = adata.uns["test_selection"]["gene_structure"]
    assert not np.allclose(other["morans_i"], stored["gene_structure"]["morans_i"])
    assert other["rank"].iloc[:4].min() > other["rank"].iloc[4:].max()
    # no training spots: spreads above 0 cannot rank the genes, spread 0 does not need them
    adata.obs["split"] = adata.obs["split"].cat.rename_categories({"train": "unused"})
    before = set(adata.uns)
    with pytest.raises(ValueError, match=r"0 spot\(s\) have `obs\['split'\] == 'train'`.*structure_split="):
        hf.tl.select_blend(adata, spreads=(0, 1), key_added="none")
    assert set(adata.uns) == before
    hf.tl.select_blend(adata, key_added="none")
    assert adata.uns["none_selection"]["spread"] == 0.0


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
        ({"spreads": ()}, ValueError, "spreads"),
        ({"spreads": 1.0}, ValueError, "spreads"),
        ({"spreads": (0, -1)}, ValueError, "`spreads` must hold finite numbers of at least 0"),
        ({"spreads": (0, np.inf)}, ValueError, "spreads"),
        ({"spreads": (0, "1")}, TypeError, "spreads"),
        ({"spreads": (1,), "structure_split": "holdout"}, ValueError, "structure_split="),
        ({"structure_split": 3}, TypeError, "structure_split"),
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


def test_written_predictions_share_the_identity_of_obs_names(helpers):
    # anndata compares every obsm DataFrame's index with obs_names at each `adata.obsm` access; an index sharing the
    # identity of obs_names (a view) answers at once, a copy compares every name (the prediction speed benchmark)
    from histoflow.tl._write import write_predictions

    adata = helpers.make(n_slides=2, grid=(4, 5), n_genes=4)
    adata.obs_names.name = "spot"
    rng = np.random.default_rng(0)
    genes = list(adata.var_names)
    write_predictions(adata, "a", rows=np.arange(adata.n_obs), genes=genes, mean=rng.normal(size=(adata.n_obs, 4)))
    write_predictions(adata, "b", rows=np.arange(adata.n_obs), genes=genes, mean=rng.normal(size=(adata.n_obs, 4)))
    hf.tl.smooth_predictions(adata, pred_key="a")
    hf.tl.blend_predictions(adata, {"a_smoothed": 1, "b": 1})
    for key in ("a", "b", "a_smoothed", "blend"):
        index = adata.obsm[key].index
        assert index.is_(adata.obs_names) and index.equals(adata.obs_names), key
    adata.obsm["blend"].index.name = "other"  # a view: renaming it leaves obs_names alone
    assert adata.obs_names.name == "spot"
    copied = hf.tl.smooth_predictions(adata, pred_key="b", copy=True)
    assert copied.obsm["b_smoothed"].index.is_(copied.obs_names) and "b_smoothed" not in adata.obsm
