from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _model_data import molf_table as _table  # the tiny six-slide table shared with the MoLF tests
from anndata import AnnData

import histoflow as hf
from histoflow.models import FLAG
from histoflow.tl._write import prediction_keys

SMALL = {"d_model": 32, "n_heads": 2, "n_layers": 2, "cond_dim": 32, "align_layer": 1, "align_hidden": 32}
FIT = {
    "embedding_key": "X_feat",
    "max_epochs": 6,
    "batch_size": 64,
    "accelerator": "cpu",
    "devices": 1,
    "train_kwargs": {"show_progress_bar": False, "patience": 5},
}


def _gene_sets() -> dict[str, list[str]]:
    """Gene sets over the panel G0..G11 plus outside genes; G11 is in no set (no embedding)."""
    return {
        "S_A": ["G0", "G1", "G2", "X1"],
        "S_B": ["G2", "G3", "G4"],
        "S_C": ["G5", "G6", "X2"],
        "S_D": ["G6", "G7", "G8"],
        "S_E": ["G8", "G9", "G10", "X3"],
        "S_F": ["G0", "G5", "G10"],
        "S_G": ["X1", "X2", "X3"],
    }


@pytest.fixture(scope="module")
def fitted():
    a = _table()
    emb = hf.pp.gene_embeddings_from_gene_sets(_gene_sets(), n_components=4)
    model = hf.tl.fit_flag(a, gene_embeddings=emb, n_samples=2, **FIT, **SMALL)
    return a, model


def test_fit_writes_documented_keys_only(fitted):
    a, model = fitted
    assert isinstance(model, FLAG) and model.is_trained
    k = prediction_keys("flag")
    assert set(a.obsm) == {"spatial", "X_feat", k["obsm"], k["std"], k["latent"], k["routing"]}
    assert set(a.layers) == {"log1p", "counts", "flag"}  # var_names == panel: also a layer
    assert list(a.obs.columns) == ["library_id", "cancer_type", "patient", "split", "pixel_size_um"]
    pred = a.obsm["flag"]
    assert isinstance(pred, pd.DataFrame) and list(pred.columns) == list(a.var_names)
    assert (pred.index == a.obs_names).all() and np.isfinite(pred.to_numpy()).all() and (pred.to_numpy() >= 0).all()
    np.testing.assert_array_equal(a.layers["flag"], pred.to_numpy())
    np.testing.assert_array_equal(a.obsm["flag_routing"].to_numpy(), 1.0)
    assert list(a.obsm["flag_routing"].columns) == ["expert_0"]
    assert a.obsm["X_flag_latent"].shape == (a.n_obs, 32)
    u = a.uns["flag"]
    assert u["genes"] == list(a.var_names) and u["params"]["n_samples"] == 2
    assert {"train_flow", "train_align", "val_loss", "val_align"} <= set(u["history"]["flow"].columns)
    al = u["alignment"]
    assert al["n_missing"] == 1 and al["missing"] == ["G11"] and al["n_known"] == 11 and al["dim"] == 4
    assert "knowledge-derived" in al["source"]
    assert u["train_libraries"]["train"] == ["S0", "S1", "S2"]
    h = model.history["flow"]
    assert h["train_align"].iloc[-1] < h["train_align"].iloc[0]


def test_predict_evaluate_trajectories_guidance(fitted):
    a, model = fitted
    img = AnnData(obs=a.obs[["library_id", "cancer_type", "pixel_size_um"]].iloc[:36].copy())
    img.obsm["X_feat"] = a.obsm["X_feat"][:36]
    img.obsm["spatial"] = a.obsm["spatial"][:36]
    hf.tl.predict(model, img, seed=0, steps=2, key_added="flag")
    assert img.obsm["flag"].shape == (36, a.n_vars) and "flag" not in img.layers
    assert img.uns["flag"]["alignment"] == a.uns["flag"]["alignment"]
    np.testing.assert_allclose(
        img.obsm["flag"].to_numpy(), model.predict(a, rows=np.arange(36), steps=2)["mean"], rtol=1e-5
    )
    ev = hf.tl.evaluate(a, pred_key="flag", split="test", metrics=["pcc", "mse", "gsc"])
    assert {"pcc", "mse", "gsc"} <= set(ev["metric"])
    vals = ev.loc[ev["metric"].isin(["pcc", "mse", "gsc"]), "value"].to_numpy(dtype=float)
    assert np.isfinite(vals).all() and (ev.loc[ev["metric"] == "mse", "value"] > 0).all()
    out = hf.tl.trajectories(model, a, steps=3, n_spots=10, key_added="flag")
    assert out["trajectory"].shape == (4, 10, 12) and out["z1_true"].shape == (10, 12)
    sweep = hf.tl.select_guidance(model, a, scales=(0.0, 1.0, 2.0), key_added="flag")
    assert sweep["chosen"].sum() == 1 and model.config.guidance in (0.0, 1.0, 2.0)
    model.config.guidance = 1.0
    # temperature 0: every draw starts at the prior mean, so the seed no longer matters
    cold = model.predict(a, steps=2, temperature=0, seed=1)
    assert (cold["z0"] == 0).all()
    np.testing.assert_allclose(cold["mean"], model.predict(a, steps=2, temperature=0, seed=2)["mean"], rtol=1e-6)
    assert not np.allclose(model.predict(a, steps=2, seed=1)["mean"], model.predict(a, steps=2, seed=2)["mean"])
    # antithetic pairs: the first draw is the independent one, the pair's mean is another prediction
    iid, pairs = (model.predict(a, steps=2, n_samples=2, seed=1, antithetic=anti) for anti in (False, True))
    np.testing.assert_array_equal(pairs["z0"], iid["z0"])
    assert not np.allclose(pairs["mean"], iid["mean"]) and (pairs["std"] > 0).any()


def test_copy_and_path_embeddings(tmp_path):
    a = _table(seed=2)
    before = (set(a.obsm), set(a.layers), set(a.uns))
    emb = pd.DataFrame(
        np.random.default_rng(0).normal(size=(12, 6)), index=[f"G{i}" for i in range(12)], columns=list("abcdef")
    )
    emb.to_csv(tmp_path / "emb.csv")
    model, out = hf.tl.fit_flag(
        a, gene_embeddings=tmp_path / "emb.csv", copy=True, key_added="fl", **{**FIT, "max_epochs": 2}, **SMALL
    )
    assert (set(a.obsm), set(a.layers), set(a.uns)) == before  # the input is untouched
    assert "fl" in out.obsm and out.uns["fl"]["alignment"]["n_missing"] == 0
    assert str(tmp_path) in out.uns["fl"]["alignment"]["source"]
    with pytest.raises(ValueError, match="covers none"):
        hf.tl.fit_flag(a, gene_embeddings=emb.rename(index=lambda g: f"X{g}"), **FIT, **SMALL)
    assert "flag" not in a.obsm  # nothing written on failure


def test_ddp_two_cpu_processes_with_alignment():
    a = _table()
    emb = hf.pp.gene_embeddings_from_gene_sets(_gene_sets(), n_components=4)
    m = FLAG(a, embedding_key="X_feat", gene_embeddings=emb, **SMALL)
    m.train(2, batch_size=32, accelerator="cpu", devices=2, strategy="ddp_spawn", show_progress_bar=False)
    assert m.is_trained and len(m.history["flow"]) == 2
    assert np.isfinite(m.history["flow"]["train_align"]).all()  # the alignment term was computed in both processes
    assert np.isfinite(m.predict(a)["mean"]).all()


def test_predict_bad_arguments_and_no_table(fitted, tmp_path):
    a, model = fitted
    with pytest.raises(ValueError, match=r"`n_samples` must be an integer of at least 1, got 0"):
        model.predict(a, n_samples=0)
    with pytest.raises(ValueError, match=r"`steps` must be an integer of at least 1, got 0"):
        model.predict(a, steps=0)
    model.save(tmp_path / "f")
    with pytest.raises(ValueError, match=r"No table: pass `adata`, or load the model with `FLAG.load\(path, adata="):
        FLAG.load(tmp_path / "f").predict()
