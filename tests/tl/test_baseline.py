from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import histoflow as hf
from histoflow._utils import copy_data

FAST = {"enable_progress_bar": False, "hidden_dims": (32,), "lr": 1e-2}


@pytest.fixture(scope="module")
def base_sdata():
    """Synthetic SpatialData (4 slides × 64 spots, 20 genes), log1p targets, one train/val/test slide split, and
    'patch features' that carry the expression (log1p + noise columns) so predictions can be checked row by row."""
    sdata = hf.datasets.synthetic(n_slides=4, grid=(8, 8), n_genes=20, seed=0)
    hf.pp.normalize(sdata)
    hf.pp.split_slides(sdata, stratify=None, val_frac=1, test_frac=1, seed=0)
    t = sdata["table"]
    Y = t.layers["log1p"]
    Y = Y.toarray() if hasattr(Y, "toarray") else np.asarray(Y)
    rng = np.random.default_rng(0)
    t.obsm["X_test"] = np.concatenate([Y + 0.1 * rng.normal(size=Y.shape), rng.normal(size=(t.n_obs, 4))], axis=1)
    return sdata


@pytest.fixture
def sdata(base_sdata):
    return copy_data(base_sdata)


def _snapshot(t: ad.AnnData) -> dict:
    return {
        "obs": t.obs.copy(),
        "var": t.var.copy(),
        "obsm": {k: np.array(v, copy=True) for k, v in t.obsm.items()},
        "layers": {k: v.copy() for k, v in t.layers.items()},
        "uns": set(t.uns),
        "X": t.X.copy(),
    }


def _assert_untouched(before: dict, t: ad.AnnData, new: set[str]) -> None:
    pd.testing.assert_frame_equal(t.obs, before["obs"])
    pd.testing.assert_frame_equal(t.var, before["var"])
    assert set(t.obsm) - set(before["obsm"]) <= new
    for k, v in before["obsm"].items():
        np.testing.assert_array_equal(np.asarray(t.obsm[k]), v)
    for k, v in before["layers"].items():
        assert (t.layers[k] != v).sum() == 0
    assert set(t.uns) - before["uns"] <= new
    assert (t.X != before["X"]).sum() == 0


def _pcc(pred, y):
    return float(np.nanmean([np.corrcoef(pred[:, j], y[:, j])[0, 1] for j in range(y.shape[1])]))


def test_fit_baseline_ridge_writes_predictions_and_nothing_else(sdata, tmp_path):
    t = sdata["table"]
    before = _snapshot(t)
    model = hf.tl.fit_baseline(sdata, "ridge", embedding_key="X_test")
    assert isinstance(model, hf.models.RidgeProbe) and model.is_trained
    _assert_untouched(before, t, new={"ridge"})
    assert set(t.obsm) - set(before["obsm"]) == {"ridge"}
    assert set(t.layers) - set(before["layers"]) == {"ridge"}  # the table's genes are exactly the panel
    pred = t.obsm["ridge"]
    assert isinstance(pred, pd.DataFrame)
    assert list(pred.columns) == list(t.var_names) and pred.index.equals(t.obs_names)
    assert np.isfinite(pred.to_numpy()).all()  # predict_on="all"
    np.testing.assert_array_equal(t.layers["ridge"], pred.to_numpy())
    # predictions sit on the right rows: high PCC on the test slide
    test = (t.obs["split"] == "test").to_numpy()
    y = t.layers["log1p"]
    y = y.toarray() if hasattr(y, "toarray") else np.asarray(y)
    assert _pcc(pred.to_numpy()[test], y[test]) > 0.8
    uns = t.uns["ridge"]
    assert uns["model"] == "RidgeProbe" and uns["kind"] == "ridge" and uns["n_predicted"] == t.n_obs
    assert uns["params"]["alpha_fitted"] == pytest.approx(100 / (24 * 20))  # 24 features < 256 components
    assert uns["params"]["genes"] == list(t.var_names)
    assert list(uns["history"].columns) == ["epoch", "train_loss", "val_loss", "val_pcc"]
    # everything written can be saved with the table
    t.write_h5ad(tmp_path / "t.h5ad")
    back = ad.read_h5ad(tmp_path / "t.h5ad")
    assert back.uns["ridge"]["params"]["n_components_fitted"] == 24
    pd.testing.assert_frame_equal(back.obsm["ridge"], pred)


def test_fit_baseline_mlp_on_a_panel_predicts_only_the_test_slide(sdata):
    t = sdata["table"]
    panel = list(t.var_names[::2])
    t.var["histoflow_panel"] = t.var_names.isin(panel)
    before = _snapshot(t)
    model = hf.tl.fit_baseline(
        sdata, "mlp", embedding_key="X_test", key_added="mlp_test", predict_on="test", max_epochs=3, **FAST
    )
    assert isinstance(model, hf.models.MLPBaseline) and model.genes == panel
    _assert_untouched(before, t, new={"mlp_test"})
    assert "mlp_test" not in t.layers  # the panel is not the table's genes
    pred = t.obsm["mlp_test"]
    assert list(pred.columns) == panel
    test = (t.obs["split"] == "test").to_numpy()
    assert np.isfinite(pred.to_numpy()[test]).all() and np.isnan(pred.to_numpy()[~test]).all()
    np.testing.assert_array_equal(pred.to_numpy()[test], model.predict(t, rows=np.flatnonzero(test)))
    uns = t.uns["mlp_test"]
    assert uns["n_predicted"] == test.sum() and uns["predict_on"] == ["test"]
    assert uns["params"]["hidden_dims"] == [32] and uns["params"]["lr"] == 1e-2
    assert len(uns["history"]) == 3 and {"train_loss", "val_loss"} <= set(uns["history"].columns)


def test_fit_baseline_same_seed_same_predictions_on_anndata(sdata):
    t = sdata["table"]
    kw = {"embedding_key": "X_test", "max_epochs": 2, "early_stopping": False, **FAST}
    hf.tl.fit_baseline(t, "mlp", key_added="a", seed=1, **kw)
    hf.tl.fit_baseline(t, "mlp", key_added="b", seed=1, **kw)
    hf.tl.fit_baseline(t, "mlp", key_added="c", seed=2, **kw)
    pd.testing.assert_frame_equal(t.obsm["a"], t.obsm["b"])
    assert not np.allclose(t.obsm["a"].to_numpy(), t.obsm["c"].to_numpy())


def test_fit_baseline_copy_leaves_the_input_alone(sdata):
    t = sdata["table"]
    before = _snapshot(t)
    model, out = hf.tl.fit_baseline(sdata, "ridge", embedding_key="X_test", copy=True)
    _assert_untouched(before, t, new=set())
    assert "ridge" not in t.obsm
    assert "ridge" in out["table"].obsm and model.adata is out["table"]


def test_fit_baseline_skips_spots_without_features(sdata):
    t = sdata["table"]
    F = t.obsm["X_test"].copy()
    test = np.flatnonzero((t.obs["split"] == "test").to_numpy())
    F[test[:5], 0] = np.nan
    t.obsm["X_test"] = F
    hf.tl.fit_baseline(sdata, "ridge", embedding_key="X_test")
    pred = t.obsm["ridge"].to_numpy()
    assert np.isnan(pred[test[:5]]).all()
    assert np.isfinite(np.delete(pred, test[:5], axis=0)).all()
    assert t.uns["ridge"]["n_predicted"] == t.n_obs - 5


def test_fit_baseline_bad_inputs_leave_the_table_as_it_was(sdata):
    t = sdata["table"]
    before = _snapshot(t)
    with pytest.raises(ValueError, match="kind='svm'"):
        hf.tl.fit_baseline(sdata, "svm", embedding_key="X_test")
    with pytest.raises(KeyError, match="embedding_key='X_uni'.*embed_patches"):
        hf.tl.fit_baseline(sdata, "ridge", embedding_key="X_uni")
    with pytest.raises(ValueError, match="predict_on='holdout'.*selects no spot"):
        hf.tl.fit_baseline(sdata, "ridge", embedding_key="X_test", predict_on="holdout")
    with pytest.raises(TypeError, match=r"unexpected arguments \['hidden_dims'\]"):
        hf.tl.fit_baseline(sdata, "ridge", embedding_key="X_test", hidden_dims=(8,))
    with pytest.raises(KeyError, match="split_key='fold'"):
        hf.tl.fit_baseline(sdata, "ridge", embedding_key="X_test", split_key="fold", predict_on="test")
    t.obs["nosplit"] = "test"
    before["obs"] = t.obs.copy()
    with pytest.raises(ValueError, match="no spot as 'train'"):
        hf.tl.fit_baseline(sdata, "ridge", embedding_key="X_test", split_key="nosplit")
    t.obs["noval"] = t.obs["split"].astype(str).replace("val", "test")
    before["obs"] = t.obs.copy()
    with pytest.raises(ValueError, match="no spot as 'val'"):
        hf.tl.fit_baseline(sdata, "mlp", embedding_key="X_test", split_key="noval", max_epochs=1, **FAST)
    _assert_untouched(before, t, new=set())


def _image_only(t: ad.AnnData) -> ad.AnnData:
    """A new 'slide': the table's features and coordinates, no expression and none of its genes."""
    new = ad.AnnData(np.zeros((t.n_obs, 1), dtype=np.float32), obs=t.obs[["library_id"]].copy())
    new.var_names = ["unrelated"]
    new.obsm["X_test"] = np.asarray(t.obsm["X_test"]).copy()
    return new


def test_predict_with_a_ridge_probe_writes_what_fit_baseline_writes_on_a_slide_without_expression(sdata):
    t = sdata["table"]
    model = hf.tl.fit_baseline(sdata, "ridge", embedding_key="X_test", fit_intercept=True)
    new = _image_only(t)
    F = new.obsm["X_test"]
    F[:3] = np.nan  # spots without features are left NaN
    before = _snapshot(new)
    assert hf.tl.predict(model, new) is None
    _assert_untouched(before, new, new={"ridge"})
    assert set(new.obsm) - set(before["obsm"]) == {"ridge"} and not new.layers  # the table's genes are not the panel
    pred = new.obsm["ridge"]
    assert list(pred.columns) == list(t.var_names) and pred.index.equals(new.obs_names)
    assert np.isnan(pred.to_numpy()[:3]).all()
    np.testing.assert_array_equal(pred.to_numpy()[3:], t.obsm["ridge"].to_numpy()[3:])
    uns = new.uns["ridge"]
    assert uns["model"] == "RidgeProbe" and uns["kind"] == "ridge" and uns["predict_on"] == ["all"]
    assert uns["n_predicted"] == t.n_obs - 3 and uns["params"]["fit_intercept"] is True
    assert uns["params"]["genes"] == list(t.var_names)


def test_predict_with_a_loaded_mlp_matches_its_fit_and_copy_leaves_the_input_alone(sdata, tmp_path):
    t = sdata["table"]
    model = hf.tl.fit_baseline(sdata, "mlp", embedding_key="X_test", max_epochs=2, **FAST)
    model.save(tmp_path / "mlp")
    loaded = hf.models.MLPBaseline.load(tmp_path / "mlp")
    new = _image_only(t)
    before = _snapshot(new)
    out = hf.tl.predict(loaded, new, key_added="again", copy=True)
    _assert_untouched(before, new, new=set())
    np.testing.assert_allclose(out.obsm["again"].to_numpy(), t.obsm["mlp"].to_numpy(), rtol=1e-5, atol=1e-6)
    assert out.uns["again"]["model"] == "MLPBaseline" and out.uns["again"]["params"]["hidden_dims"] == [32]
    hf.tl.predict(loaded, t, key_added="mlp_again")  # the training table: its genes are the panel → layers too
    np.testing.assert_array_equal(t.layers["mlp_again"], t.obsm["mlp_again"].to_numpy())


def test_predict_with_a_baseline_refuses_sampling_arguments_and_other_objects(sdata):
    t = sdata["table"]
    model = hf.tl.fit_baseline(sdata, "ridge", embedding_key="X_test")
    new = _image_only(t)
    before = _snapshot(new)
    for kwargs, name in [
        ({"n_samples": 4}, "n_samples=4"),
        ({"steps": 10}, "steps=10"),
        ({"guidance": 1.0}, "guidance=1.0"),
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"antithetic": True}, "antithetic=True"),
    ]:
        with pytest.raises(ValueError, match=rf"`{name}` applies to the flow models.*RidgeProbe predicts one"):
            hf.tl.predict(model, new, **kwargs)
    with pytest.raises(TypeError, match="`model` lists baselines.*blend_predictions"):
        hf.tl.predict([model, model], new)
    with pytest.raises(TypeError, match=r"`model\[1\]` must be a trained MoLF.*got str"):
        hf.tl.predict([model, "ridge"], new)
    with pytest.raises(TypeError, match="`model` must be a trained MoLF, FLAG, RidgeProbe or MLPBaseline.*got dict"):
        hf.tl.predict({"model": model}, new)
    untrained = hf.models.RidgeProbe(t, embedding_key="X_test")
    with pytest.raises(RuntimeError, match="RidgeProbe is not trained.*fit_baseline"):
        hf.tl.predict(untrained, new)
    del new.obsm["X_test"]
    before = _snapshot(new)
    with pytest.raises(KeyError, match=r"obsm\['X_test'\]` is missing.*embed_patches"):
        hf.tl.predict(model, new)  # features of no known encoder: nothing to embed with
    _assert_untouched(before, new, new=set())
    wrong = _image_only(t)
    wrong.obsm["X_test"] = wrong.obsm["X_test"][:, :5]
    with pytest.raises(ValueError, match="X_test"):
        hf.tl.predict(model, wrong)
    assert "ridge" not in wrong.obsm


def test_rows_to_predict_keeps_every_finite_row_even_when_their_sum_overflows():
    from histoflow.tl._baseline import _rows_to_predict

    t = ad.AnnData(np.zeros((4, 1), dtype=np.float32))
    t.obsm["X"] = np.full((4, 3), 3e38, dtype=np.float32)  # finite, but their float32 sum is inf
    np.testing.assert_array_equal(_rows_to_predict(t, "X", "all", "split"), [0, 1, 2, 3])
    t.obsm["X"][1, 2] = np.inf
    t.obsm["X"][3, 0] = np.nan
    np.testing.assert_array_equal(_rows_to_predict(t, "X", "all", "split"), [0, 2])
