"""tl.smooth_predictions: each spot averaged with its spatial neighbours' predictions."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import histoflow as hf
from histoflow.tl import metrics as M


def _brute_neighbours(adata, spacing: float) -> list[np.ndarray]:
    """Neighbours of every spot found from the coordinates alone: same slide, at one grid spacing."""
    xy = adata.obsm["spatial"]
    lib = adata.obs["library_id"].to_numpy()
    out = []
    for i in range(adata.n_obs):
        d = np.hypot(*(xy - xy[i]).T)
        out.append(np.flatnonzero((lib == lib[i]) & np.isclose(d, spacing)))
    return out


def test_each_spot_is_weighted_with_the_mean_of_its_grid_neighbours(helpers):
    adata = helpers.make(n_slides=2, grid=(5, 6), n_genes=4, technology="Spatial Transcriptomics")
    rng = np.random.default_rng(1)
    P = rng.normal(size=(adata.n_obs, 4)).astype(np.float32)
    helpers.add_prediction(adata, P, key="molf")
    hf.tl.smooth_predictions(adata, self_weight=0.3)
    S = adata.obsm["molf_smoothed"]
    assert list(S.columns) == list(adata.var_names) and S.index.equals(adata.obs_names)
    assert S.to_numpy().dtype == np.float32
    nbrs = _brute_neighbours(adata, 200.0)
    assert {len(n) for n in nbrs} == {2, 3, 4}  # corners, edges, interior of a square grid
    expected = np.stack([0.3 * P[i] + 0.7 * P[n].mean(axis=0) for i, n in enumerate(nbrs)])
    np.testing.assert_allclose(S.to_numpy(), expected, rtol=1e-5, atol=1e-6)
    # the table's var names are the prediction's genes: a layer too, and the parameters
    np.testing.assert_array_equal(adata.layers["molf_smoothed"], S.to_numpy())
    assert adata.uns["molf_smoothed"]["self_weight"] == 0.3 and adata.uns["molf_smoothed"]["pred_key"] == "molf"
    assert adata.uns["molf_smoothed"]["n_smoothed"] == adata.n_obs


def test_weights_one_and_zero_and_slides_kept_apart(helpers):
    # identical coordinates on every slide: only library_key separates them
    adata = helpers.make(n_slides=3, grid=(4, 5), n_genes=3)
    lib = adata.obs["library_id"].cat.codes.to_numpy()
    per_slide = np.c_[lib, 10 * lib, -lib].astype(np.float32)  # constant within a slide
    helpers.add_prediction(adata, per_slide, key="p")
    hf.tl.smooth_predictions(adata, pred_key="p", self_weight=0.0, key_added="nb")
    np.testing.assert_allclose(adata.obsm["nb"].to_numpy(), per_slide, atol=1e-6)  # no value leaks across slides
    P = np.random.default_rng(0).normal(size=(adata.n_obs, 3))
    helpers.add_prediction(adata, P, key="p")
    hf.tl.smooth_predictions(adata, pred_key="p", self_weight=1.0, key_added="same")
    np.testing.assert_allclose(adata.obsm["same"].to_numpy(), P)
    assert adata.obsm["same"].to_numpy().dtype == np.float64  # float64 predictions stay float64
    hf.tl.smooth_predictions(adata, pred_key="p", self_weight=0.0, key_added="nb")
    W = M.spatial_connectivity(adata)
    deg = np.asarray(W.sum(axis=1)).ravel()
    np.testing.assert_allclose(adata.obsm["nb"].to_numpy(), (W @ P) / deg[:, None])


def test_spots_without_a_prediction_stay_empty_and_are_left_out_of_their_neighbours_mean(helpers):
    adata = helpers.make(n_slides=1, grid=(5, 6), n_genes=2, technology="Spatial Transcriptomics")
    P = np.random.default_rng(2).normal(size=(adata.n_obs, 2)).astype(np.float32)
    missing = np.zeros(adata.n_obs, bool)
    missing[::4] = True
    P[missing] = np.nan
    helpers.add_prediction(adata, P, key="molf")
    hf.tl.smooth_predictions(adata, self_weight=0.5)
    S = adata.obsm["molf_smoothed"].to_numpy()
    assert np.isnan(S[missing]).all() and np.isfinite(S[~missing]).all()
    n_alone = 0
    for i, n in enumerate(_brute_neighbours(adata, 200.0)):
        if missing[i]:
            continue
        have = n[~missing[n]]
        if have.size == 0:  # no predicted neighbour: the prediction is kept
            n_alone += 1
            np.testing.assert_allclose(S[i], P[i])
        else:
            np.testing.assert_allclose(S[i], 0.5 * P[i] + 0.5 * P[have].mean(axis=0), rtol=1e-5, atol=1e-6)
    assert adata.uns["molf_smoothed"]["n_smoothed"] == (~missing).sum() - n_alone


def test_averaging_noisy_predictions_of_a_smooth_field_raises_their_pcc(helpers):
    adata = helpers.make(n_slides=2, grid=(10, 10), n_genes=6)
    truth = adata.layers["log1p"]
    rng = np.random.default_rng(3)
    pred = truth + rng.normal(scale=1.5, size=truth.shape)  # errors independent between spots
    helpers.add_prediction(adata, pred, key="molf")
    hf.tl.smooth_predictions(adata)
    before = M.pcc(truth, pred, groups=adata.obs["library_id"])
    after = M.pcc(truth, adata.obsm["molf_smoothed"].to_numpy(), groups=adata.obs["library_id"])
    assert after > before + 0.05


def test_writes_only_its_keys_and_copy_leaves_the_input(helpers):
    adata = helpers.make(n_slides=2, grid=(4, 4), n_genes=3)
    helpers.add_prediction(adata, np.ones((adata.n_obs, 2)), key="molf", genes=["G00", "G01"])
    before = (set(adata.obsm), set(adata.layers), set(adata.uns), set(adata.obs.columns))
    out = hf.tl.smooth_predictions(adata, copy=True)
    assert (set(adata.obsm), set(adata.layers), set(adata.uns), set(adata.obs.columns)) == before
    assert set(out.obsm) == before[0] | {"molf_smoothed"} and set(out.uns) == before[2] | {"molf_smoothed"}
    assert set(out.layers) == before[1]  # two of three genes: no layer
    assert hf.tl.smooth_predictions(adata) is None
    assert set(adata.obsm) == before[0] | {"molf_smoothed"}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"pred_key": "nope"}, KeyError, "pred_key"),
        ({"self_weight": 1.5}, ValueError, "self_weight"),
        ({"self_weight": -0.1}, ValueError, "self_weight"),
        ({"self_weight": True}, TypeError, "self_weight"),
        ({"self_weight": "half"}, TypeError, "self_weight"),
        ({"key_added": ""}, TypeError, "key_added"),
        ({"library_key": "sample"}, KeyError, "library_key"),
    ],
)
def test_bad_input_names_the_argument_and_writes_nothing(helpers, kwargs, error, match):
    adata = helpers.make(n_slides=2, grid=(4, 4), n_genes=3)
    helpers.add_prediction(adata, np.ones((adata.n_obs, 3)), key="molf")
    before = (set(adata.obsm), set(adata.layers), set(adata.uns))
    with pytest.raises(error, match=match):
        hf.tl.smooth_predictions(adata, **kwargs)
    assert (set(adata.obsm), set(adata.layers), set(adata.uns)) == before


def test_bad_predictions_are_refused(helpers):
    adata = helpers.make(n_slides=1, grid=(4, 4), n_genes=2)
    adata.obsm["arr"] = np.ones((adata.n_obs, 2))
    with pytest.raises(TypeError, match="DataFrame"):
        hf.tl.smooth_predictions(adata, pred_key="arr")
    inf = np.ones((adata.n_obs, 2))
    inf[3, 1] = np.inf
    helpers.add_prediction(adata, inf, key="inf")
    with pytest.raises(ValueError, match="infinite"):
        hf.tl.smooth_predictions(adata, pred_key="inf")
    adata.obsm["text"] = pd.DataFrame({"a": ["x"] * adata.n_obs}, index=adata.obs_names)
    with pytest.raises(TypeError, match="numbers"):
        hf.tl.smooth_predictions(adata, pred_key="text")
    assert not any(k.endswith("_smoothed") for k in adata.obsm)


def test_a_given_graph_is_used_and_checked(helpers, tmp_path):
    import scipy.sparse as sp

    adata = helpers.make(n_slides=2, grid=(4, 5), n_genes=3)
    P = np.random.default_rng(4).normal(size=(adata.n_obs, 3))
    helpers.add_prediction(adata, P, key="molf")
    W = M.spatial_connectivity(adata)
    adata.obsp["g"] = 2.0 * W  # the same graph with other (equal) weights: the same mean
    hf.tl.smooth_predictions(adata, connectivity_key="g", key_added="given")
    hf.tl.smooth_predictions(adata, key_added="built")
    np.testing.assert_allclose(adata.obsm["given"].to_numpy(), adata.obsm["built"].to_numpy())
    assert adata.uns["given"]["connectivity_key"] == "g"
    hf.tl.smooth_predictions(adata, connectivity_key="g", n_rings=2, key_added="rings")
    assert abs(adata.obsp["g"] - 2.0 * W).sum() == 0  # the user's graph is left as it was
    adata.write_h5ad(tmp_path / "smoothed.h5ad")  # the parameters store in h5ad
    # a weighted graph gives the weighted mean: one spot's only neighbour weighs everything
    one = sp.csr_matrix(([1.0], ([0], [1])), shape=(adata.n_obs, adata.n_obs))
    adata.obsp["one"] = one
    hf.tl.smooth_predictions(adata, connectivity_key="one", self_weight=0.25, key_added="one")
    S = adata.obsm["one"].to_numpy()
    np.testing.assert_allclose(S[0], 0.25 * P[0] + 0.75 * P[1])
    np.testing.assert_allclose(S[1:], P[1:])
    with pytest.raises(KeyError, match="connectivity_key"):
        hf.tl.smooth_predictions(adata, connectivity_key="spatial_connectivities")
    adata.obsp["neg"] = -W
    with pytest.raises(ValueError, match="negative"):
        hf.tl.smooth_predictions(adata, connectivity_key="neg", key_added="neg")
    assert "neg" not in adata.obsm


def test_two_rings_are_squidpys_two_rings_and_stay_on_their_slide(helpers):
    import squidpy as sq

    adata = helpers.make(n_slides=2, grid=(6, 7), n_genes=3, technology="Spatial Transcriptomics")
    W = M.spatial_connectivity(adata)
    R = hf.tl._smooth.within_rings(W, 2)
    lib = adata.obs["library_id"].to_numpy()
    r, c = R.nonzero()
    assert (lib[r] == lib[c]).all() and (r != c).all()
    assert np.asarray(R.sum(axis=1)).max() == 12  # 4 + 8 on a square grid
    for s in ("S0", "S1"):
        sub = adata[lib == s].copy()
        ref = sq.gr.spatial_neighbors_grid(sub, n_neighs=4, n_rings=2, copy=True).connectivities
        mine = R[np.ix_(lib == s, lib == s)]
        assert abs((ref > 0).astype(float) - mine).sum() == 0
    P = np.random.default_rng(5).normal(size=(adata.n_obs, 3))
    helpers.add_prediction(adata, P, key="molf")
    hf.tl.smooth_predictions(adata, n_rings=2, self_weight=0.35)
    deg = np.asarray(R.sum(axis=1)).ravel()
    np.testing.assert_allclose(
        adata.obsm["molf_smoothed"].to_numpy(), 0.35 * P + 0.65 * (R @ P) / deg[:, None], rtol=1e-5, atol=1e-6
    )
    assert adata.uns["molf_smoothed"]["n_rings"] == 2
    with pytest.raises(ValueError, match="n_rings"):
        hf.tl.smooth_predictions(adata, n_rings=0, key_added="bad")
    assert "bad" not in adata.obsm


# ---------------------------------------------------------------------------------------- select_smoothing


def _with_val(helpers, **kw):
    adata = helpers.make(n_slides=3, grid=(8, 8), n_genes=6, **kw)
    adata.obs["split"] = pd.Categorical(adata.obs["library_id"].map({"S0": "train", "S1": "val", "S2": "test"}))
    return adata


def test_select_smoothing_smooths_noisy_predictions_and_leaves_exact_ones(helpers):
    adata = _with_val(helpers)
    truth = adata.layers["log1p"]
    helpers.add_prediction(adata, truth, key="exact")
    sweep = hf.tl.select_smoothing(adata, pred_key="exact")
    chosen = sweep[sweep["chosen"]].iloc[0]
    assert chosen["self_weight"] == 1.0 and np.isclose(chosen["pcc"], 1.0)
    assert (sweep["self_weight"] == 1.0).sum() == 1  # no smoothing appears once
    assert len(sweep) == 1 + 5 * 3 and sweep["chosen"].sum() == 1
    noisy = truth + np.random.default_rng(6).normal(scale=2.0, size=truth.shape)
    helpers.add_prediction(adata, noisy, key="noisy")
    sweep = hf.tl.select_smoothing(adata, pred_key="noisy", self_weights=(1.0, 0.5, 0.3), n_rings=(1, 2))
    chosen = sweep[sweep["chosen"]].iloc[0]
    assert chosen["self_weight"] < 1.0 and chosen["pcc"] == sweep["pcc"].max()
    # the chosen row scores what smooth_predictions then writes, on the validation slide
    hf.tl.smooth_predictions(adata, pred_key="noisy", self_weight=chosen["self_weight"], n_rings=int(chosen["n_rings"]))
    val = (adata.obs["split"] == "val").to_numpy()
    assert np.isclose(M.pcc(truth[val], adata.obsm["noisy_smoothed"].to_numpy()[val]), chosen["pcc"], atol=1e-6)
    stored = adata.uns["noisy_smoothing"]
    assert stored["self_weight"] == chosen["self_weight"] and stored["n_rings"] == chosen["n_rings"]
    assert stored["split"] == "val" and stored["sweep"].equals(sweep)


def test_select_smoothing_never_looks_at_other_slides(helpers):
    adata = _with_val(helpers)
    P = adata.layers["log1p"] + np.random.default_rng(7).normal(size=adata.shape)
    helpers.add_prediction(adata, P, key="molf")
    first = hf.tl.select_smoothing(adata, self_weights=(1.0, 0.5), n_rings=(1, 2))
    other = (adata.obs["split"] != "val").to_numpy()
    P2 = P.copy()
    P2[other] = np.random.default_rng(8).normal(size=(other.sum(), P.shape[1]))
    adata.layers["log1p"][other] = 0.0  # neither the other slides' predictions nor their truth count
    helpers.add_prediction(adata, P2, key="molf")
    pd.testing.assert_frame_equal(hf.tl.select_smoothing(adata, self_weights=(1.0, 0.5), n_rings=(1, 2)), first)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"split": "holdout"}, ValueError, "split"),
        ({"split_key": "fold"}, KeyError, "split_key"),
        ({"self_weights": ()}, ValueError, "self_weights"),
        ({"self_weights": (0.5, 2.0)}, ValueError, "self_weight"),
        ({"n_rings": (0,)}, ValueError, "n_rings"),
        ({"true_layer": "counts"}, KeyError, "true_layer"),
        ({"pred_key": "other_genes"}, KeyError, "no truth for them"),
        ({"spreads": ()}, ValueError, "spreads"),
        ({"spreads": (0, -1)}, ValueError, "spreads"),
        ({"spreads": ("wide",)}, TypeError, "spreads"),
        ({"tolerance": -0.1}, ValueError, "tolerance"),
        ({"tolerance": "small"}, TypeError, "tolerance"),
        ({"spreads": (1,), "structure_split": "holdout"}, ValueError, "structure_split="),
    ],
)
def test_select_smoothing_bad_input(helpers, kwargs, error, match):
    adata = _with_val(helpers)
    helpers.add_prediction(adata, adata.layers["log1p"], key="molf")
    helpers.add_prediction(adata, np.ones((adata.n_obs, 2)), key="other_genes", genes=["G00", "X1"])
    before = set(adata.uns)
    with pytest.raises(error, match=match):
        hf.tl.select_smoothing(adata, **kwargs)
    assert set(adata.uns) == before


# ---------------------------------------------------------------------------------------- gene-wise weights


def _patterned_and_noisy(helpers):
    """G00–G03 smooth in space, G04–G07 spot-to-spot noise; a prediction = truth + errors that neighbours do not share.

    Averaging with the neighbours removes errors and keeps the signal of the smooth genes, and removes the signal of
    the noisy ones: they want different weights.
    """
    adata = helpers.make(n_slides=3, grid=(8, 8), n_genes=8, seed=6)
    adata.obs["split"] = pd.Categorical(adata.obs["library_id"].map({"S0": "train", "S1": "val", "S2": "test"}))
    rng = np.random.default_rng(11)
    x, y = adata.obsm["spatial"].T
    fields = np.stack([np.sin(x / (150 + 40 * k) + k) * np.cos(y / (170 + 30 * k) - k) for k in range(4)], axis=1)
    truth = 3.0 + np.hstack([fields, rng.normal(size=(adata.n_obs, 4))])
    adata.layers["log1p"] = truth
    helpers.add_prediction(adata, truth + rng.normal(scale=1.0, size=truth.shape), key="molf")
    return adata


def test_gene_wise_smoothing_averages_the_patterned_genes_more(helpers, tmp_path):
    adata = _patterned_and_noisy(helpers)
    hf.tl.smooth_predictions(adata, self_weight=0.5, spread=1.0)
    stored = adata.uns["molf_smoothed"]
    assert stored["self_weight"] == 0.5 and stored["spread"] == 1.0 and stored["structure_split"] == "train"
    gw = stored["gene_weights"]
    assert list(gw.index) == list(adata.var_names) and list(gw.columns) == ["self_weight", "morans_i", "rank"]
    # ranked by Moran's I of the measured expression on the training slide
    train = (adata.obs["split"] == "train").to_numpy()
    W = M.spatial_connectivity(adata[train])
    np.testing.assert_allclose(gw["morans_i"], M.morans_i(adata.layers["log1p"][train], W))
    assert gw["rank"].iloc[:4].min() > gw["rank"].iloc[4:].max()
    np.testing.assert_allclose(gw["self_weight"], np.clip(0.5 - (gw["rank"] - 0.5), 0, 1))
    assert gw["self_weight"].iloc[:4].max() < gw["self_weight"].iloc[4:].min()
    # each gene as smoothed with its own weight alone
    out = adata.obsm["molf_smoothed"].to_numpy()
    for j, w in enumerate(gw["self_weight"]):
        one = hf.tl.smooth_predictions(adata, self_weight=float(w), key_added="one", copy=True)
        np.testing.assert_allclose(out[:, j], one.obsm["one"].to_numpy()[:, j])
    # the stored weights smooth a table without training slides (a new slide) the same way, and survive h5ad
    adata.write_h5ad(tmp_path / "t.h5ad")
    new = ad.read_h5ad(tmp_path / "t.h5ad")
    new.obs["split"] = "test"
    weights = new.uns["molf_smoothed"]["gene_weights"]["self_weight"]
    hf.tl.smooth_predictions(new, self_weight=weights, key_added="again")
    np.testing.assert_allclose(new.obsm["again"].to_numpy(), out)
    assert "self_weight" not in new.uns["again"] and new.uns["again"]["spread"] == 0.0
    # the caller's weights are read, never changed (an integer-indexed copy keeps its index)
    numbered = weights.reset_index(drop=True)
    with pytest.raises(ValueError, match="no weight for 8 predicted gene"):
        hf.tl.smooth_predictions(new, self_weight=numbered, key_added="numbered")
    assert numbered.index.dtype.kind == "i" and "numbered" not in new.obsm
    # a mapping of gene -> weight does the same
    mapping = dict(zip(adata.var_names, gw["self_weight"], strict=True))
    hf.tl.smooth_predictions(new, self_weight=mapping, key_added="mapped")
    np.testing.assert_allclose(new.obsm["mapped"].to_numpy(), out)
    # spread 0 is the plain smoothing
    plain = hf.tl.smooth_predictions(adata, self_weight=0.5, copy=True)
    zero = hf.tl.smooth_predictions(adata, self_weight=0.5, spread=0, copy=True)
    np.testing.assert_array_equal(zero.obsm["molf_smoothed"].to_numpy(), plain.obsm["molf_smoothed"].to_numpy())
    assert "gene_weights" not in zero.uns["molf_smoothed"]


def test_gene_wise_smoothing_is_chosen_where_the_genes_differ(helpers):
    adata = _patterned_and_noisy(helpers)
    sweep = hf.tl.select_smoothing(adata, self_weights=(1.0, 0.6, 0.3), n_rings=(1,), spreads=(0, 2))
    assert list(sweep.columns) == [
        "self_weight", "n_rings", "spread", "pcc", "gsc", "ssc", "structure", "chosen"
    ]  # fmt: skip
    assert len(sweep) == 6 and sweep["chosen"].sum() == 1
    chosen = sweep[sweep["chosen"]].iloc[0]
    # spread 2 smooths the patterned genes fully and leaves the noisy ones: better than any one weight
    assert chosen["spread"] == 2.0 and chosen["pcc"] > sweep.loc[sweep["spread"] == 0, "pcc"].max() + 0.02
    stored = adata.uns["molf_smoothing"]
    assert stored["spread"] == 2.0 and stored["tolerance"] == 0.0 and stored["structure_split"] == "train"
    assert stored["gene_structure"]["rank"].iloc[:4].min() > stored["gene_structure"]["rank"].iloc[4:].max()
    # the chosen row scores what smooth_predictions then writes, on the validation slide
    hf.tl.smooth_predictions(
        adata, self_weight=stored["self_weight"], n_rings=stored["n_rings"], spread=stored["spread"]
    )
    val = (adata.obs["split"] == "val").to_numpy()
    truth, smoothed = adata.layers["log1p"][val], adata.obsm["molf_smoothed"].to_numpy()[val]
    W = M.spatial_connectivity(adata[val])
    assert np.isclose(M.pcc(truth, smoothed), chosen["pcc"]) and np.isclose(M.ssc(truth, smoothed, W), chosen["ssc"])
    assert np.isclose(M.gsc(truth, smoothed), chosen["gsc"])
    # a tolerance of 1 admits every row: the most structure (mean of GSC and SSC) is chosen
    sweep = hf.tl.select_smoothing(adata, self_weights=(1.0, 0.6, 0.3), n_rings=(1, 2), spreads=(0, 2), tolerance=1)
    assert sweep.loc[sweep["chosen"], "structure"].iloc[0] == sweep["structure"].max()
    # the default sweep: one weight for every gene, the best PCC
    sweep = hf.tl.select_smoothing(adata)
    assert (sweep["spread"] == 0).all() and sweep.loc[sweep["chosen"], "pcc"].iloc[0] == sweep["pcc"].max()
    assert "gene_structure" not in adata.uns["molf_smoothing"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"spread": -1.0}, ValueError, "spread"),
        ({"spread": "wide"}, TypeError, "spread"),
        ({"spread": float("nan")}, ValueError, "spread"),
        ({"self_weight": {"G00": 0.5}}, ValueError, r"`self_weight` has no weight for 7 predicted gene"),
        ({"self_weight": pd.Series(1.5, index=[f"G{j:02d}" for j in range(8)])}, ValueError, "between 0 and 1"),
        ({"self_weight": pd.Series(0.5, index=[f"G{j:02d}" for j in range(8)]), "spread": 1.0}, ValueError, "spread=0"),
        ({"spread": 1.0, "structure_split": "holdout"}, ValueError, "structure_split="),
        ({"spread": 1.0, "true_layer": "counts"}, KeyError, "true_layer"),
    ],
)
def test_gene_wise_smoothing_bad_input_names_the_argument_and_writes_nothing(helpers, kwargs, error, match):
    adata = _patterned_and_noisy(helpers)
    before = (set(adata.obsm), set(adata.uns), set(adata.layers))
    with pytest.raises(error, match=match):
        hf.tl.smooth_predictions(adata, **kwargs)
    assert (set(adata.obsm), set(adata.uns), set(adata.layers)) == before
