from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from _model_data import MOLF_SMALL, molf_table
from anndata import AnnData

import histoflow as hf
from histoflow.models import MoLF
from histoflow.tl._molf import _filter_and_rank

SMALL = MOLF_SMALL
TRAIN = {"show_progress_bar": False, "patience": 5}


_table = molf_table


@pytest.fixture(scope="module")
def fitted():
    a = _table()
    model = hf.tl.fit_molf(
        a,
        embedding_key="X_feat",
        max_epochs=6,
        batch_size=64,
        accelerator="cpu",
        devices=1,
        train_kwargs=TRAIN,
        n_samples=2,
        **SMALL,
    )
    return a, model


def test_fit_writes_documented_keys_only(fitted):
    a, model = fitted
    assert {"molf", "molf_std", "X_molf_latent", "molf_routing"} <= set(a.obsm)
    assert set(a.obsm) == {"spatial", "X_feat", "molf", "molf_std", "X_molf_latent", "molf_routing"}
    assert set(a.layers) == {"log1p", "counts", "molf"}  # var_names == panel: also a layer
    pred = a.obsm["molf"]
    assert isinstance(pred, pd.DataFrame) and list(pred.columns) == list(a.var_names)
    assert (pred.index == a.obs_names).all() and np.isfinite(pred.to_numpy()).all() and (pred.to_numpy() >= 0).all()
    r = a.obsm["molf_routing"].to_numpy()
    np.testing.assert_allclose(r.sum(1), 1.0, rtol=1e-5)
    assert ((r > 0).sum(1) >= 2).all()  # mean over 2 samples of top-2 routings
    r1 = model.predict(a, n_samples=1)["routing"]
    assert ((r1 > 0).sum(1) == 2).all()  # one sample: exactly the top-2 of 3 experts
    assert a.obsm["X_molf_latent"].shape == (a.n_obs, 8)
    u = a.uns["molf"]
    assert u["genes"] == list(a.var_names)
    assert {"train_flow", "train_gene", "train_aux", "val_loss", "train_load_0"} <= set(u["history"]["flow"].columns)
    assert {"train_rec", "train_kl", "val_loss"} <= set(u["history"]["vae"].columns)
    assert u["train_libraries"]["train"] == ["S0", "S1", "S2"]
    assert list(a.obs.columns) == ["library_id", "cancer_type", "patient", "split", "pixel_size_um"]


def test_same_seed_same_numbers(fitted):
    a, model = fitted
    p1 = model.predict(a, seed=3)["mean"]
    p2 = model.predict(a, seed=3)["mean"]
    np.testing.assert_array_equal(p1, p2)
    assert not np.array_equal(p1, model.predict(a, seed=4)["mean"])
    b = _table()
    m2 = hf.tl.fit_molf(
        b,
        embedding_key="X_feat",
        max_epochs=6,
        batch_size=64,
        accelerator="cpu",
        devices=1,
        train_kwargs=TRAIN,
        n_samples=2,
        **SMALL,
    )
    np.testing.assert_allclose(b.obsm["molf"].to_numpy(), a.obsm["molf"].to_numpy(), rtol=1e-5, atol=1e-6)
    assert m2.history["flow"].shape == model.history["flow"].shape


def test_save_load_round_trip_and_refusals(fitted, tmp_path):
    a, model = fitted
    model.save(tmp_path / "m")
    with pytest.raises(FileExistsError, match="overwrite"):
        model.save(tmp_path / "m")
    model.save(tmp_path / "m", overwrite=True)
    loaded = MoLF.load(tmp_path / "m", adata=a)
    np.testing.assert_array_equal(loaded.predict(a, seed=1)["mean"], model.predict(a, seed=1)["mean"])
    pd.testing.assert_frame_equal(loaded.history["flow"], model.history["flow"])
    other = a.copy()
    other.obs["cancer_type"] = other.obs["cancer_type"].astype(str).replace({"IDC": "LUAD"})
    with pytest.raises(ValueError, match="LUAD"):
        MoLF.load(tmp_path / "m", adata=other)
    genes = a[:, :6].copy()
    with pytest.raises(ValueError, match="genes"):
        MoLF.load(tmp_path / "m", adata=genes)
    with pytest.raises(FileNotFoundError, match="model.pt"):
        MoLF.load(tmp_path / "nothing")


def test_vae_value_path_trains_saves_and_loads(tmp_path):
    a = _table()
    model = MoLF(a, embedding_key="X_feat", **SMALL, vae_value_path=True)
    assert model.vae.value_path is not None and MoLF(a, embedding_key="X_feat", **SMALL).vae.value_path is None
    model.train(3, batch_size=64, accelerator="cpu", devices=1, **TRAIN)
    assert model.vae.value_path.weight.abs().sum() > 0  # trained away from its zero start
    model.save(tmp_path / "m")
    loaded = MoLF.load(tmp_path / "m", adata=a)
    assert loaded.config.vae_value_path is True
    x = torch.from_numpy(np.asarray(a.layers["log1p"].toarray(), dtype=np.float32))
    with torch.no_grad():
        torch.testing.assert_close(loaded.vae.encode(x), model.vae.encode(x), rtol=0, atol=0)
    np.testing.assert_array_equal(loaded.predict(a, seed=1)["mean"], model.predict(a, seed=1)["mean"])
    with pytest.raises(TypeError, match="vae_value_path"):
        MoLF(a, embedding_key="X_feat", vae_value_path="yes")


def test_endpoint_prediction_trains_saves_and_loads(tmp_path):
    a = _table()
    model = MoLF(a, embedding_key="X_feat", **SMALL, prediction="endpoint")
    assert model.flow.prediction == "endpoint"
    assert MoLF(a, embedding_key="X_feat", **SMALL).flow.prediction == "velocity"
    model.train(3, batch_size=64, accelerator="cpu", devices=1, **TRAIN)
    assert np.isfinite(model.history["flow"]["train_flow"]).all()
    model.save(tmp_path / "m")
    loaded = MoLF.load(tmp_path / "m", adata=a)
    assert loaded.config.prediction == "endpoint" and loaded.flow.prediction == "endpoint"
    np.testing.assert_array_equal(loaded.predict(a, seed=1)["mean"], model.predict(a, seed=1)["mean"])
    with pytest.raises(ValueError, match="prediction"):
        MoLF(a, embedding_key="X_feat", prediction="noise")


def test_ema_decay_averages_stage_two_only_and_is_checked_before_training():
    a = _table()
    kw = {"batch_size": 64, "accelerator": "cpu", "devices": 1, **TRAIN}
    plain = MoLF(a, embedding_key="X_feat", **SMALL).train(3, **kw)
    ema = MoLF(a, embedding_key="X_feat", **SMALL).train(3, ema_decay=0.9, **kw)
    # Stage I trains as before (same seed, same weights); Stage II keeps the average instead of the raw weights
    assert all(torch.equal(v, ema.vae.state_dict()[k]) for k, v in plain.vae.state_dict().items())
    assert not all(torch.equal(v, ema.flow.state_dict()[k]) for k, v in plain.flow.state_dict().items())
    assert np.isfinite(ema.history["flow"]["val_loss"]).all()
    assert np.isfinite(ema.predict(a, seed=0)["mean"]).all()
    fresh = MoLF(a, embedding_key="X_feat", **SMALL)
    with pytest.raises(ValueError, match="ema_decay"):
        fresh.train(3, ema_decay=1.0, **kw)
    assert not fresh.is_trained and not fresh.history


def test_stage_one_from_another_model_trains_stage_two_only(tmp_path, caplog):
    a = _table()
    kw = {"batch_size": 64, "accelerator": "cpu", "devices": 1, **TRAIN}
    whole = MoLF(a, embedding_key="X_feat", **SMALL).train(3, **kw)
    # the same seed on the same Stage I gives the same Stage II as the model that trained both stages
    again = MoLF(a, embedding_key="X_feat", **SMALL).train(3, stage_one=whole, **kw)
    for name in ("vae", "flow"):
        ours, theirs = getattr(again, name).state_dict(), getattr(whole, name).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in ours.items()), name
    pd.testing.assert_frame_equal(again.history["vae"], whole.history["vae"])
    np.testing.assert_array_equal(again.predict(a, seed=1)["mean"], whole.predict(a, seed=1)["mean"])
    # another seed and another Stage II on the shared (copied, frozen) Stage I
    other = MoLF(a, embedding_key="X_feat", **{**SMALL, "seed": 1}, velocity="dense").train(2, stage_one=whole, **kw)
    assert other.vae is not whole.vae and not any(p.requires_grad for p in other.vae.parameters())
    assert all(torch.equal(v, whole.vae.state_dict()[k]) for k, v in other.vae.state_dict().items())
    assert len(other.history["flow"]) == 2 and len(other.history["vae"]) == len(whole.history["vae"])
    other.save(tmp_path / "m")
    np.testing.assert_array_equal(
        MoLF.load(tmp_path / "m", adata=a).predict(a, seed=2)["mean"], other.predict(a, seed=2)["mean"]
    )
    # Stage I trained on other slides: a warning names both
    b = a.copy()
    b.obs["split"] = b.obs["split"].cat.rename_categories({"train": "val", "val": "train"})
    with caplog.at_level("WARNING", logger="histoflow"):
        MoLF(b, embedding_key="X_feat", **SMALL).train(1, stage_one=whole, **kw)
    assert "Stage I may have seen slides" in caplog.text and "'S0'" in caplog.text
    # refusals, before anything trains
    untrained = MoLF(a, embedding_key="X_feat", **SMALL)
    for bad, match in [
        (untrained, "not trained"),
        (whole.vae, "must be a trained MoLF"),
        (MoLF(a[:, :10].copy(), embedding_key="X_feat", **SMALL).train(1, **kw), "another panel"),
        (MoLF(a, embedding_key="X_feat", **{**SMALL, "beta": 0.1}).train(1, **kw), r"beta=0\.1 \(here 0\.001\)"),
    ]:
        fresh = MoLF(a, embedding_key="X_feat", **SMALL)
        with pytest.raises((TypeError, ValueError), match=match):
            fresh.train(1, stage_one=bad, **kw)
        assert not fresh.is_trained and not fresh.history
    with pytest.raises(ValueError, match="vae_extra"):
        untrained.train(1, stage_one=whole, vae_extra=a, **kw)
    assert not untrained.is_trained


def test_predict_image_only_slide_and_unknown_type(fitted):
    a, model = fitted
    img = AnnData(obs=a.obs[["library_id", "cancer_type", "pixel_size_um"]].iloc[:36].copy())
    img.obsm["X_feat"] = a.obsm["X_feat"][:36]
    img.obsm["spatial"] = a.obsm["spatial"][:36]
    hf.tl.predict(model, img, seed=0)
    assert img.obsm["molf"].shape == (36, a.n_vars) and "molf" not in img.layers
    np.testing.assert_allclose(img.obsm["molf"].to_numpy(), model.predict(a, rows=np.arange(36))["mean"], rtol=1e-5)
    img.obs["cancer_type"] = "SKCM"
    with pytest.raises(ValueError, match="allow_unknown"):
        hf.tl.predict(model, img)
    hf.tl.predict(model, img, allow_unknown=True, key_added="unk")
    assert np.isfinite(img.obsm["unk"].to_numpy()).all()


def test_temperature_scales_the_prior_noise_and_zero_gives_one_deterministic_point_estimate(fitted):
    a, model = fitted
    hot = model.predict(a, seed=5, n_samples=1)
    half = model.predict(a, seed=5, n_samples=1, temperature=0.5)
    np.testing.assert_allclose(half["z0"], 0.5 * hot["z0"], rtol=1e-6)
    assert not np.allclose(half["mean"], hot["mean"])
    cold = model.predict(a, seed=5, n_samples=3, temperature=0)
    assert (cold["z0"] == 0).all() and np.abs(cold["std"]).max() < 1e-3  # identical draws (float rounding only)
    np.testing.assert_allclose(cold["mean"], model.predict(a, seed=9, temperature=0.0)["mean"], rtol=1e-6)
    # the point estimate is the flow from the prior mean through the decoder: one Euler step, v(0, t=0, c)
    flow, w = model.flow.eval(), model.config.guidance
    arrays, nbr, off = model._arrays(a, np.arange(a.n_obs), with_targets=False)
    from histoflow.models._molf import _spot_conditions

    cond, _ = _spot_conditions(flow.condition, arrays, nbr, off, 4096, torch.device("cpu"))
    with torch.no_grad():
        z1 = flow.sample(cond, torch.zeros(a.n_obs, 8), meta=arrays.get("meta"), steps=1, guidance=w)["z1"]
        expected = model._decoder()(z1).clamp_min(0).numpy()
    np.testing.assert_allclose(cold["mean"], expected, rtol=1e-5, atol=1e-6)
    # through tl.predict: recorded with the other prediction parameters, and a bad value writes nothing
    b = a.copy()
    hf.tl.predict(model, b, temperature=0, key_added="point")
    np.testing.assert_allclose(b.obsm["point"].to_numpy(), cold["mean"], rtol=1e-5, atol=1e-6)
    assert b.uns["point"]["params"]["temperature"] == 0.0 and a.uns["molf"]["params"]["temperature"] == 1.0
    keys = set(b.obsm), set(b.uns)
    with pytest.raises(ValueError, match="`temperature`"):
        hf.tl.predict(model, b, temperature=-1, key_added="bad")
    assert (set(b.obsm), set(b.uns)) == keys


def test_antithetic_draws_through_predict_and_select_guidance(fitted):
    a, model = fitted
    iid = model.predict(a, seed=5, n_samples=4)
    pairs = model.predict(a, seed=5, n_samples=4, antithetic=True)
    np.testing.assert_array_equal(pairs["z0"], iid["z0"])  # the first draw is the same
    assert not np.allclose(pairs["mean"], iid["mean"]) and (pairs["std"] > 0).any()
    np.testing.assert_array_equal(pairs["mean"], model.predict(a, seed=5, n_samples=4, antithetic=True)["mean"])
    one = model.predict(a, seed=5, antithetic=True)  # one draw has no pair: the independent draw
    np.testing.assert_array_equal(one["mean"], model.predict(a, seed=5)["mean"])
    b = a.copy()
    hf.tl.predict(model, b, n_samples=4, seed=5, antithetic=True, key_added="pairs")
    np.testing.assert_allclose(b.obsm["pairs"].to_numpy(), pairs["mean"], rtol=1e-6)
    assert b.uns["pairs"]["params"]["antithetic"] is True and a.uns["molf"]["params"]["antithetic"] is False
    guidance = model.config.guidance
    hf.tl.select_guidance(model, b, scales=(0.0, 1.0), n_samples=2, antithetic=True, key_added="pairs")
    assert b.uns["pairs_guidance"]["antithetic"] is True
    model.config.guidance = guidance
    keys = set(b.obsm), set(b.uns)
    for call in (
        lambda: hf.tl.predict(model, b, antithetic="yes", key_added="bad"),
        lambda: hf.tl.select_guidance(model, b, antithetic=1, key_added="bad"),
        lambda: model.predict(b, antithetic=None),
    ):
        with pytest.raises(TypeError, match="`antithetic` must be True or False"):
            call()
    assert (set(b.obsm), set(b.uns)) == keys and model.config.guidance == guidance


def test_refit_trains_again_on_the_validation_slides_for_the_best_epochs(caplog):
    a = _table()
    run = {"batch_size": 64, "accelerator": "cpu", "devices": 1, **TRAIN}
    model = MoLF(a, embedding_key="X_feat", **SMALL).train(8, refit=True, **run)
    assert set(model.history) == {"vae_val", "flow_val", "vae", "flow"}
    best = {k: int(model.history[f"{k}_val"]["val_loss"].idxmin()) + 1 for k in ("vae", "flow")}
    assert {k: len(model.history[k]) for k in best} == best and "val_loss" not in model.history["flow"]
    libs = a.obs["library_id"].astype(str)
    train_val = sorted(libs[a.obs["split"].isin(["train", "val"])].unique())
    assert model._train_libraries["train"] == train_val and model._train_libraries["val"] == []
    # the same as a model that never had validation slides, trained for those epochs from the same weights
    b = a.copy()
    b.obs["split"] = b.obs["split"].astype(str).replace("val", "train")
    plain = MoLF(b, embedding_key="X_feat", **SMALL).train(best["flow"], vae_epochs=best["vae"], **run)
    np.testing.assert_allclose(model.predict(a, seed=1)["mean"], plain.predict(b, seed=1)["mean"], rtol=1e-5, atol=1e-6)
    # through fit_molf's train_kwargs, recorded in the history written to uns
    hf.tl.fit_molf(b := a.copy(), embedding_key="X_feat", max_epochs=8, train_kwargs={**TRAIN, "refit": True},
                   batch_size=64, accelerator="cpu", devices=1, **SMALL)  # fmt: skip
    assert {"vae_val", "flow_val", "vae", "flow"} == set(b.uns["molf"]["history"])
    np.testing.assert_allclose(b.obsm["molf"].to_numpy(), model.predict(a)["mean"], rtol=1e-5, atol=1e-6)
    with caplog.at_level("WARNING", logger="histoflow"):
        hf.tl.select_guidance(model, a, scales=(1.0,), key_added="refit")
    assert "the sweep scores slides it trained on" in caplog.text
    # refused before anything is trained
    no_val = a.copy()
    no_val.obs["split"] = no_val.obs["split"].astype(str).replace("val", "train")
    for m, kwargs, err, match in (
        (MoLF(no_val, embedding_key="X_feat", **SMALL), {"refit": True}, ValueError, "no validation slides"),
        (MoLF(a, embedding_key="X_feat", **SMALL), {"refit": "yes"}, TypeError, "`refit` must be True or False"),
        (MoLF(a, embedding_key="X_feat", **SMALL), {"refit": True, "resume": True}, ValueError, "Drop one"),
    ):
        with pytest.raises(err, match=match):
            m.train(2, **run, **kwargs)
        assert not m.is_trained and m.history == {}


def test_refit_after_choosing_on_the_validation_slides(tmp_path):
    a = _table()
    run = {"batch_size": 64, "accelerator": "cpu", "devices": 1, **TRAIN}
    once = MoLF(a, embedding_key="X_feat", **SMALL).train(8, refit=True, **run)
    # train, choose the guidance on the validation slides with the model as trained, then refit: the weights of
    # train(refit=True), the chosen guidance kept
    model = MoLF(a, embedding_key="X_feat", **SMALL).train(8, **run)
    first = model.predict(a, seed=1)["mean"]
    hf.tl.select_guidance(model, a, scales=(1.0, 3.0), key_added="g")
    chosen = model.config.guidance
    assert model.refit() is model and model.config.guidance == chosen
    assert set(model.history) == {"vae_val", "flow_val", "vae", "flow"}
    pd.testing.assert_frame_equal(
        model.history["flow_val"].drop(columns="time_s"), once.history["flow_val"].drop(columns="time_s")
    )
    model.config.guidance = once.config.guidance
    refitted = model.predict(a, seed=1)["mean"]
    np.testing.assert_allclose(refitted, once.predict(a, seed=1)["mean"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(refitted, first)
    assert model._train_libraries == once._train_libraries and model._train_libraries["val"] == []
    # once only; a loaded model and one trained without validation slides have no run to repeat
    with pytest.raises(RuntimeError, match="already refitted"):
        model.refit()
    plain = MoLF(a, embedding_key="X_feat", **SMALL).train(2, **run)
    plain.save(tmp_path / "m")
    no_val = a.copy()
    no_val.obs["split"] = no_val.obs["split"].astype(str).replace("val", "train")
    for m in (MoLF.load(tmp_path / "m", adata=a), MoLF(no_val, embedding_key="X_feat", **SMALL).train(2, **run)):
        with pytest.raises(RuntimeError, match="needs that call's rows and settings"):
            m.refit()


def test_fit_checks_temperature_before_training():
    a = _table()
    keys = set(a.obsm), set(a.uns)
    with pytest.raises(ValueError, match="`temperature` must be a finite number"):
        hf.tl.fit_molf(a, embedding_key="X_feat", max_epochs=1, temperature=-1.0, train_kwargs=TRAIN, **SMALL)
    with pytest.raises(TypeError, match="`antithetic` must be True or False"):
        hf.tl.fit_molf(a, embedding_key="X_feat", max_epochs=1, antithetic="no", train_kwargs=TRAIN, **SMALL)
    assert (set(a.obsm), set(a.uns)) == keys


def test_guidance_selection_known_answer():
    sweep = pd.DataFrame(
        {"guidance": [0.0, 1.0, 2.0, 3.0], "w1": [0.50, 0.40, 0.41, 0.60], "cosine": [0.30, 0.20, 0.10, 0.05]}
    )
    # feasible: w1 <= 0.42 -> {1, 2}; smallest cosine among them: 2 (3 has a smaller cosine but is infeasible)
    assert _filter_and_rank(sweep, 0.05) == 2.0
    assert _filter_and_rank(sweep, 0.0) == 1.0
    assert _filter_and_rank(sweep, 1.0) == 3.0


def test_select_guidance_end_to_end(fitted):
    a, model = fitted
    sweep = hf.tl.select_guidance(model, a, scales=(0.0, 1.0, 2.0))
    assert list(sweep.columns) == ["guidance", "w1", "cosine", "feasible", "chosen"]
    assert sweep["chosen"].sum() == 1 and model.config.guidance == float(sweep.loc[sweep["chosen"], "guidance"].iloc[0])
    assert a.uns["molf_guidance"]["chosen"] == model.config.guidance
    assert a.uns["molf_guidance"]["temperature"] == 1.0
    point = hf.tl.select_guidance(model, a, scales=(0.0, 1.0, 2.0), temperature=0, key_added="point")
    assert a.uns["point_guidance"]["temperature"] == 0.0 and len(point) == 3
    model.config.guidance = 1.0
    with pytest.raises(ValueError, match="split"):
        hf.tl.select_guidance(model, a, split="nope")


def test_trajectories(fitted):
    a, model = fitted
    out = hf.tl.trajectories(model, a, steps=4, n_spots=10)
    assert out["trajectory"].shape == (5, 10, 8) and out["z1_true"].shape == (10, 8)
    np.testing.assert_allclose(out["trajectory"][-1], out["z1_pred"])
    assert "molf_trajectories" in a.uns


def test_variants_and_gene_mask():
    a = _table(seed=1)
    a.uns["histoflow_gene_mask"] = pd.DataFrame(True, index=[f"S{i}" for i in range(6)], columns=a.var_names)
    a.uns["histoflow_gene_mask"].loc["S0", "G0"] = False
    m = hf.tl.fit_molf(
        a,
        embedding_key="X_feat",
        max_epochs=2,
        batch_size=64,
        accelerator="cpu",
        devices=1,
        train_kwargs=TRAIN,
        velocity="dense",
        spatial_context=None,
        key_added="dense",
        **SMALL,
    )
    assert m.n_experts == 1 and a.obsm["dense_routing"].shape == (a.n_obs, 1)
    from histoflow.models._data import targets

    _, mask = targets(a, list(a.var_names), "log1p", np.arange(a.n_obs))
    assert not mask[a.obs["library_id"] == "S0", 0].any() and mask[a.obs["library_id"] != "S0", 0].all()


def test_vae_extra_spots_train_stage_one_only():
    from histoflow.models._molf import _extra_targets

    a = _table()
    extra = _table(seed=3)[:, ["G0", "G1", "G2"]].copy()  # an expression-only table measuring 3 of the 12 genes
    del extra.obsm["X_feat"]
    got = _extra_targets(extra, list(a.var_names), "log1p", "library_id")
    assert got["x"].shape == (extra.n_obs, a.n_vars)
    assert got["mask"][:, :3].all() and not got["mask"][:, 3:].any()  # missing genes masked, never zeros counted
    np.testing.assert_allclose(
        got["x"][:, :3],
        extra.layers["log1p"].toarray() if sp.issparse(extra.layers["log1p"]) else extra.layers["log1p"],
    )

    def fit(**kw):
        m = MoLF(a, embedding_key="X_feat", **SMALL)
        return m.train(2, batch_size=64, accelerator="cpu", devices=1, **TRAIN, **kw)

    plain, more = fit(), fit(vae_extra=extra)
    w0, w1 = plain.vae.decoder[0].weight, more.vae.decoder[0].weight
    assert not torch.equal(w0, w1)  # Stage I saw more spots
    assert len(more.history["flow"]) == len(plain.history["flow"]) == 2
    with pytest.raises(TypeError, match="vae_extra"):
        MoLF(a, embedding_key="X_feat", **SMALL).train(1, vae_extra=extra.to_df(), **TRAIN)
    with pytest.raises(ValueError, match="none of the model's panel genes"):
        MoLF(a, embedding_key="X_feat", **SMALL).train(1, vae_extra=extra[:, []].copy(), **TRAIN)


def test_bad_inputs():
    a = _table()
    with pytest.raises(KeyError, match="embed_patches"):
        MoLF(a, embedding_key="X_missing")
    with pytest.raises(TypeError, match="Unknown MoLF settings"):
        MoLF(a, embedding_key="X_feat", n_expert=3)
    with pytest.raises(ValueError, match="latent"):
        MoLF(a, embedding_key="X_feat", latent="nope")
    for hidden in (256, (64, 0), ("64",), (True,)):
        with pytest.raises(ValueError, match="vae_decoder_hidden"):
            MoLF(a, embedding_key="X_feat", vae_decoder_hidden=hidden)
    small = MoLF(a, embedding_key="X_feat", **{**SMALL, "vae_decoder_hidden": [16]})
    assert small.config.vae_decoder_hidden == (16,)
    assert [m.out_features for m in small.vae.decoder if isinstance(m, torch.nn.Linear)] == [16, a.n_vars]
    for p in (0.0, 0.3):
        layer = MoLF(a, embedding_key="X_feat", **SMALL, vae_dropout=p).vae.encoder.layers[0]
        assert layer.dropout.p == layer.dropout1.p == layer.self_attn.dropout == p
    for p in (-0.1, 1.0, "0.1"):
        with pytest.raises(ValueError, match="vae_dropout"):
            MoLF(a, embedding_key="X_feat", vae_dropout=p)
    m = MoLF(a, embedding_key="X_feat", **SMALL)
    with pytest.raises(RuntimeError, match="not trained"):
        m.predict(a)
    a.obs["split"] = "val"
    with pytest.raises(ValueError, match="train"):
        m.train(1)


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"spatial_context": "graph", "graph_layers": 1, "router": "image+metadata", "metadata_keys": ["cancer_type"]},
        {"router": "cancer_type", "metadata_keys": ["cancer_type"]},
    ],
    ids=["window-input-router", "graph-image+metadata-router", "cancer_type-router"],
)
def test_ddp_two_cpu_processes(variant):
    a = _table()
    config = {**SMALL, **variant}
    if variant.get("router") == "cancer_type":
        config.update(n_experts=3, top_k=1)  # one expert per cancer type (3 in the table)
    m = MoLF(a, embedding_key="X_feat", **config)
    m.train(2, batch_size=32, accelerator="cpu", devices=2, strategy="ddp_spawn", show_progress_bar=False)
    assert m.is_trained and len(m.history["flow"]) == 2 and "val_loss" in m.history["flow"]
    out = m.predict(a)
    assert np.isfinite(out["mean"]).all()
    if variant.get("router") == "cancer_type":  # routed by type after DDP too: one expert per type, weight 1
        codes = a.obs["cancer_type"].astype("category").cat.codes.to_numpy()
        assert (out["routing"].argmax(1) == codes).all() and np.allclose(out["routing"].max(1), 1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_samples": 0}, r"`n_samples` must be an integer of at least 1, got 0"),
        ({"n_samples": 1.5}, r"`n_samples` must be an integer"),
        ({"steps": 0}, r"`steps` must be an integer of at least 1, got 0"),
        ({"steps": True}, r"`steps` must be an integer"),
        ({"rows": np.array([], dtype=int)}, r"Nothing to predict: .* `rows` selects none"),
        ({"temperature": -0.5}, r"`temperature` must be a finite number of at least 0"),
        ({"temperature": float("nan")}, r"`temperature` must be a finite number"),
        ({"temperature": float("inf")}, r"`temperature` must be a finite number"),
        ({"temperature": True}, r"`temperature` must be a finite number"),
        ({"temperature": "0"}, r"`temperature` must be a finite number"),
    ],
)
def test_predict_bad_arguments_name_the_argument(fitted, kwargs, match):
    a, model = fitted
    with pytest.raises(ValueError, match=match):
        model.predict(a, **kwargs)


def test_predict_without_a_table_says_how_to_attach_one(fitted, tmp_path):
    _, model = fitted
    model.save(tmp_path / "m")
    loaded = MoLF.load(tmp_path / "m")
    with pytest.raises(ValueError, match=r"No table: pass `adata`, or load the model with `MoLF.load\(path, adata="):
        loaded.predict()


@pytest.mark.parametrize("device", ["bogus", "cuda:99"] + ([] if torch.cuda.is_available() else ["cuda", "gpu"]))
def test_a_device_this_machine_lacks_is_refused_before_anything_is_written(fitted, device):
    a, model = fitted
    b = a.copy()
    obsm, uns = set(b.obsm), set(b.uns)
    with pytest.raises(ValueError, match=r"`device"):
        hf.tl.predict(model, b, device=device, key_added="elsewhere")
    assert (set(b.obsm), set(b.uns)) == (obsm, uns)
    with pytest.raises(ValueError, match=r"`device"):
        hf.tl.select_guidance(model, b, scales=(1.0,), device=device)
    with pytest.raises(ValueError, match=r"`device"):
        model.predict(b, device=device)
    assert {p.device.type for p in model.flow.parameters()} == {"cpu"}


def test_device_names():
    from histoflow._utils import accelerator_device, torch_device

    assert torch_device("cpu") == torch.device("cpu")
    assert torch_device(torch.device("cpu")) == torch.device("cpu")
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    assert torch_device("auto").type == ("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if torch.cuda.is_available():
        assert torch_device("gpu") == torch.device("cuda")
    assert [accelerator_device(a) for a in ("gpu", "cuda", "cpu", "auto", "mps", "tpu")] == [
        "cuda", "cuda", "cpu", "auto", "mps", "cpu"
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"`embed_device` must be 'auto', 'cpu', 'cuda'"):
        torch_device("nonsense", "embed_device")
