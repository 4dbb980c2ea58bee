from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from histoflow.models import MLPBaseline, RidgeProbe, _data

N, D, G = 600, 32, 8
TRAIN, VAL, TEST = slice(0, 400), slice(400, 500), slice(500, 600)
FAST = {"enable_progress_bar": False, "batch_size": 64}


def make_table(seed: int = 0) -> ad.AnnData:
    """Six slides of 100 spots; log1p targets linear in the features plus noise; train/val/test by slide."""
    rng = np.random.default_rng(seed)
    F = rng.normal(size=(N, D)).astype(np.float32)
    W = rng.normal(size=(D, G)) / np.sqrt(D)
    Y = (F @ W + 1.5 + 0.3 * rng.normal(size=(N, G))).astype(np.float32)
    obs = pd.DataFrame(
        {
            "library_id": np.repeat([f"s{i}" for i in range(6)], 100),
            "split": ["train"] * 400 + ["val"] * 100 + ["test"] * 100,
        },
        index=[f"spot{i}" for i in range(N)],
    )
    a = ad.AnnData(X=np.expm1(Y).round(), obs=obs, var=pd.DataFrame(index=[f"G{j}" for j in range(G)]))
    a.layers["log1p"] = Y
    a.obsm["X_feat"] = F
    return a


def mean_pcc(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean([np.corrcoef(pred[:, j], y[:, j])[0, 1] for j in range(y.shape[1])]))


@pytest.fixture(scope="module")
def table() -> ad.AnnData:
    return make_table()


@pytest.fixture(scope="module")
def mlp(table) -> MLPBaseline:
    return MLPBaseline(table, embedding_key="X_feat", hidden_dims=(64, 64)).train(max_epochs=10, lr=3e-3, **FAST)


# ---------------------------------------------------------------------------------------------- ridge
def test_ridge_reaches_high_pcc_on_held_out_slides(table):
    model = RidgeProbe(table, embedding_key="X_feat").train()
    pred = model.predict(table)
    assert pred.shape == (N, G) and pred.dtype == np.float32
    assert mean_pcc(pred[TEST], table.layers["log1p"][TEST]) > 0.9
    hist = model.history
    assert list(hist.index) == [0] and {"train_loss", "val_loss", "val_pcc"} <= set(hist.columns)
    assert hist["val_pcc"].iloc[0] == pytest.approx(mean_pcc(pred[VAL], table.layers["log1p"][VAL]), abs=1e-5)


@pytest.mark.parametrize("n_components", [256, 12])
def test_ridge_equals_the_hest_sklearn_pipeline(table, n_components):
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    model = RidgeProbe(table, embedding_key="X_feat", n_components=n_components, seed=3).train()
    n_pc = min(n_components, D)  # fewer features than components: PCA keeps D
    alpha = 100 / (n_pc * G)  # HEST: 100 / (width of the PCA output * number of genes)
    assert model.train_params["n_components_fitted"] == n_pc
    assert model.train_params["alpha_fitted"] == pytest.approx(alpha)
    pipe = Pipeline(
        [
            ("scaler", StandardScaler()),
            ("pca", PCA(n_components=n_pc, random_state=3)),
            ("ridge", Ridge(solver="lsqr", alpha=alpha, fit_intercept=False, max_iter=1000, random_state=3)),
        ]
    )
    X = table.obsm["X_feat"].astype(np.float64)
    pipe.fit(X[TRAIN], table.layers["log1p"][TRAIN].astype(np.float64))
    np.testing.assert_allclose(model.predict(table), pipe.predict(X), rtol=1e-5, atol=1e-5)
    # the folded affine map gives the same predictions in any batch size
    np.testing.assert_allclose(model.predict(table, batch_size=7), model.predict(table), rtol=1e-6, atol=1e-7)
    # no intercept: predictions are centred on the training spots while the targets are not (MSE meaningless)
    assert abs(model.predict(table)[TRAIN].mean()) < 0.05 < table.layers["log1p"][TRAIN].mean()


def test_ridge_intercept_puts_predictions_on_the_target_scale_and_keeps_the_correlations(table, tmp_path):
    plain = RidgeProbe(table, embedding_key="X_feat").train().predict(table)
    model = RidgeProbe(table, embedding_key="X_feat", fit_intercept=True).train()
    pred = model.predict(table)
    y = table.layers["log1p"]
    # the intercept is each gene's training mean (the training PCA scores are centred), up to lsqr's tolerance
    np.testing.assert_allclose(pred - plain, np.broadcast_to(y[TRAIN].mean(axis=0), pred.shape), atol=2e-3)
    assert np.mean((pred[TEST] - y[TEST]) ** 2) < 0.2 < np.mean((plain[TEST] - y[TEST]) ** 2)
    assert mean_pcc(pred[TEST], y[TEST]) == pytest.approx(mean_pcc(plain[TEST], y[TEST]), abs=1e-4)
    model.save(tmp_path / "m")
    loaded = RidgeProbe.load(tmp_path / "m", table)
    assert loaded.fit_intercept and loaded.params["fit_intercept"] is True
    np.testing.assert_array_equal(loaded.predict(), pred)
    with pytest.raises(TypeError, match="`fit_intercept` must be True or False"):
        RidgeProbe(table, embedding_key="X_feat", fit_intercept="yes")


def _masked_copy(table, garbage: bool):
    a = table.copy()
    gm = pd.DataFrame(True, index=[f"s{i}" for i in range(6)], columns=list(a.var_names))
    gm.loc["s0", ["G1", "G2"]] = False  # slide s0 (train) did not measure G1, G2
    gm.loc["s4", "G1"] = False  # slide s4 (val) did not measure G1
    a.uns["histoflow_gene_mask"] = gm
    Y = a.layers["log1p"].copy()
    rows0, rows4 = np.arange(0, 100), np.arange(400, 500)
    fill = (lambda shape: np.random.default_rng(1).uniform(50, 100, size=shape)) if garbage else np.zeros
    Y[np.ix_(rows0, [1, 2])] = fill((100, 2))
    Y[rows4, 1] = fill(100)
    a.layers["log1p"] = Y
    return a


def test_ridge_ignores_unmeasured_genes(table):
    p_garbage = RidgeProbe(_masked_copy(table, True), embedding_key="X_feat").train().predict(table)
    p_zero = RidgeProbe(_masked_copy(table, False), embedding_key="X_feat").train().predict(table)
    np.testing.assert_array_equal(p_garbage, p_zero)
    assert mean_pcc(p_garbage[TEST], table.layers["log1p"][TEST]) > 0.9


# ---------------------------------------------------------------------------------------------- MLP
def test_mlp_reaches_high_pcc_and_records_history(mlp, table):
    pred = mlp.predict(table)
    assert pred.shape == (N, G) and pred.dtype == np.float32
    assert mean_pcc(pred[TEST], table.layers["log1p"][TEST]) > 0.85
    hist = mlp.history
    assert {"train_loss", "val_loss"} <= set(hist.columns)
    assert len(hist) == mlp.train_params["epochs_trained"] >= 2
    assert hist["val_loss"].min() < 0.5 * hist["val_loss"].iloc[0]
    # restore_best: the model holds the best epoch's weights (dropout is off in eval)
    y = table.layers["log1p"][VAL]
    assert np.mean((pred[VAL] - y) ** 2) == pytest.approx(hist["val_loss"].min(), rel=1e-4)


def _state(model):
    return {k: v.clone() for k, v in model.module.state_dict().items()}


def test_mlp_masked_genes_do_not_affect_training(table):
    kw = {"max_epochs": 2, "early_stopping": False, **FAST}
    a = MLPBaseline(_masked_copy(table, True), embedding_key="X_feat", hidden_dims=(16,)).train(**kw)
    b = MLPBaseline(_masked_copy(table, False), embedding_key="X_feat", hidden_dims=(16,)).train(**kw)
    sa, sb = _state(a), _state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert np.array_equal(a.history.drop(columns="time_s"), b.history.drop(columns="time_s"))
    # ... while the same garbage in measured entries changes the fit
    c = MLPBaseline(_masked_copy(table, True).copy(), embedding_key="X_feat", hidden_dims=(16,))
    c.adata.uns.pop("histoflow_gene_mask")
    sc = _state(c.train(**kw))
    assert not torch.equal(sa["net.0.weight"], sc["net.0.weight"])


def test_mlp_masked_loss_is_mean_over_measured_entries():
    from histoflow.models._baselines import _MLPModule

    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    y = torch.tensor([[0.0, float("nan")], [1.0, 1e9]])
    m = torch.tensor([[True, False], [True, False]])
    assert float(_MLPModule.masked_mse(pred, y, m)) == pytest.approx((1 + 4) / 2)


def test_mlp_same_seed_same_predictions(table):
    kw = {"max_epochs": 2, "early_stopping": False, **FAST}
    p1 = MLPBaseline(table, embedding_key="X_feat", hidden_dims=(16,), seed=5).train(**kw).predict(table)
    p2 = MLPBaseline(table, embedding_key="X_feat", hidden_dims=(16,), seed=5).train(**kw).predict(table)
    p3 = MLPBaseline(table, embedding_key="X_feat", hidden_dims=(16,), seed=6).train(**kw).predict(table)
    np.testing.assert_array_equal(p1, p2)
    assert not np.allclose(p1, p3)


def test_mlp_predictions_do_not_depend_on_the_cpu_chunk(mlp, table, monkeypatch):
    whole = mlp.predict(table, batch_size=len(table.obs_names))  # default budget: every spot at once here
    width = table.obsm["X_feat"].shape[1]
    seen = []
    forward = mlp.module.forward
    monkeypatch.setattr(mlp.module, "forward", lambda x: seen.append(len(x)) or forward(x))
    monkeypatch.setattr(_data, "CPU_FEATURE_CHUNK_BYTES", 4 * width * 7)  # 7 spots per forward pass
    chunked = mlp.predict(table, batch_size=len(table.obs_names))
    assert set(seen[:-1]) == {7} and 1 <= seen[-1] <= 7 and sum(seen) == table.n_obs
    # per-spot layers: only a matrix product's rounding may depend on how many rows it takes at once
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("kind", ["ridge", "mlp"])
def test_save_load_round_trip(kind, mlp, table, tmp_path):
    model = RidgeProbe(table, embedding_key="X_feat").train() if kind == "ridge" else mlp
    cls = type(model)
    path = tmp_path / "model"
    model.save(path)
    meta = json.loads((path / "model.json").read_text())
    assert meta["model"] == cls.__name__ and meta["registry"]["genes"] == list(table.var_names)
    loaded = cls.load(path, table)
    assert loaded.is_trained and loaded.genes == model.genes
    np.testing.assert_array_equal(loaded.predict(), model.predict(table))
    pd.testing.assert_frame_equal(loaded.history, model.history, check_dtype=False)
    assert loaded.params == model.params
    # without data: predict on a table that has only features (no expression)
    image_only = ad.AnnData(obs=table.obs[["library_id"]].iloc[:10].copy())
    image_only.obsm["X_feat"] = table.obsm["X_feat"][:10]
    np.testing.assert_array_equal(cls.load(path).predict(image_only), model.predict(table, rows=np.arange(10)))
    # overwrite protection, then an atomic overwrite
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save(path)
    model.save(path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_load_refuses_incompatible_tables(mlp, table, tmp_path):
    mlp.save(tmp_path / "m")
    other_genes = table[:, :4].copy()
    with pytest.raises(ValueError, match="lacks 4 of the model's 8 genes"):
        MLPBaseline.load(tmp_path / "m", other_genes)
    other_features = table.copy()
    other_features.obsm["X_feat"] = np.zeros((N, D + 1), dtype=np.float32)
    with pytest.raises(ValueError, match="33 features; the model expects 32"):
        MLPBaseline.load(tmp_path / "m", other_features)
    with pytest.raises(ValueError, match="has 33 features; the model expects 32"):
        MLPBaseline.load(tmp_path / "m").predict(other_features)
    with pytest.raises(ValueError, match="holds a MLPBaseline, not a RidgeProbe"):
        RidgeProbe.load(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="no saved histoflow model"):
        MLPBaseline.load(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_inputs(table):
    with pytest.raises(KeyError, match="embedding_key='X_nope'"):
        RidgeProbe(table, embedding_key="X_nope")
    with pytest.raises(KeyError, match="layer='nope'"):
        MLPBaseline(table, embedding_key="X_feat", layer="nope")
    with pytest.raises(KeyError, match="not in `adata.var_names`"):
        RidgeProbe(table, embedding_key="X_feat", genes=["G0", "NOPE"])
    with pytest.raises(RuntimeError, match="not trained"):
        RidgeProbe(table, embedding_key="X_feat").predict()
    with pytest.raises(RuntimeError, match="nothing to save"):
        MLPBaseline(table, embedding_key="X_feat").save("unused")
    with pytest.raises(ValueError, match="activation='tanh'"):
        MLPBaseline(table, embedding_key="X_feat", activation="tanh")
    no_train = table.copy()
    no_train.obs["split"] = "test"
    with pytest.raises(ValueError, match="no spot as 'train'"):
        RidgeProbe(no_train, embedding_key="X_feat").train()
    no_val = table.copy()
    no_val.obs["split"] = np.where(no_val.obs["split"] == "val", "test", no_val.obs["split"])
    with pytest.raises(ValueError, match="no spot as 'val'.*early_stopping=False"):
        MLPBaseline(no_val, embedding_key="X_feat").train(max_epochs=1, **FAST)
    nan_features = table.copy()
    nan_features.obsm["X_feat"] = nan_features.obsm["X_feat"].copy()
    nan_features.obsm["X_feat"][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        RidgeProbe(nan_features, embedding_key="X_feat").train()
