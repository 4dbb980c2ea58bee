"""Seed ensembles of MoLF: tl.fit_molf_ensemble, tl.predict with a list of models, the rotated validation slides."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pandas as pd
import pytest
from _model_data import MOLF_SMALL, molf_table
from anndata import AnnData

import histoflow as hf
from histoflow.models import MoLF
from histoflow.pp._split import _rotated_split
from histoflow.tl._ensemble import _Moments

TRAIN = {"show_progress_bar": False, "patience": 5}
FIT = {"embedding_key": "X_feat", "max_epochs": 3, "batch_size": 64, "accelerator": "cpu", "devices": 1}


@pytest.fixture(scope="module")
def ensemble():
    a = molf_table()
    models = hf.tl.fit_molf_ensemble(a, 2, seed=4, n_samples=2, train_kwargs=TRAIN, **FIT, **MOLF_SMALL)
    return a, models


def test_rotated_split_moves_validation_within_each_cancer_type():
    # molf_table: S0/S3 IDC (S3 val), S1/S4 PRAD (S4 val), S2 COAD (train only), S5 COAD test
    libs = np.repeat([f"S{i}" for i in range(6)], 2)
    types = np.repeat(["IDC", "PRAD", "COAD", "IDC", "PRAD", "COAD"], 2)
    split = np.repeat(["train", "train", "train", "val", "val", "test"], 2)
    np.testing.assert_array_equal(_rotated_split(split, libs, types, 0), split)
    one = _rotated_split(split, libs, types, 1)
    np.testing.assert_array_equal(one, np.repeat(["val", "val", "train", "train", "train", "test"], 2))
    np.testing.assert_array_equal(_rotated_split(split, libs, types, 2), split)  # two slides per type: back again
    # without strata: the two validation slides move as a block along S3, S4, S0, S1, S2
    none = _rotated_split(split, libs, None, 1)
    assert set(libs[none == "val"]) == {"S0", "S1"} and set(libs[none == "test"]) == {"S5"}
    two = _rotated_split(split, libs, None, 2)
    assert set(libs[two == "val"]) == {"S2", "S3"}
    with pytest.raises(ValueError, match="no `val` slides"):
        _rotated_split(np.where(split == "val", "train", split), libs, types, 1)


def test_moments_are_the_mean_and_the_spread_of_all_draws():
    rng = np.random.default_rng(0)
    draws = rng.normal(size=(3, 5, 40, 4))  # members × draws × spots × genes
    acc = _Moments()
    for d in draws:
        acc.add({"mean": d.mean(0), "std": d.std(0)})
    mean, std = acc.result()
    np.testing.assert_allclose(mean, draws.mean((0, 1)), rtol=1e-5)
    np.testing.assert_allclose(std, draws.transpose(1, 0, 2, 3).reshape(15, 40, 4).std(0), rtol=1e-5)
    one = _Moments()
    one.add({"mean": draws[0, 0], "std": None})
    assert one.result()[1] is None  # one member, one draw: no spread
    one.add({"mean": draws[1, 0], "std": None})
    np.testing.assert_allclose(one.result()[1], np.abs(draws[0, 0] - draws[1, 0]) / 2, rtol=1e-5)


def test_fit_writes_the_mean_of_its_members_and_documented_keys_only(ensemble):
    a, models = ensemble
    assert len(models) == 2 and all(isinstance(m, MoLF) and m.is_trained for m in models)
    assert set(a.obsm) == {"spatial", "X_feat", "molf", "molf_std"}  # no latent or routing for an ensemble
    assert set(a.layers) == {"log1p", "counts", "molf"}
    assert list(a.obs.columns) == [
        "library_id", "cancer_type", "patient", "split", "pixel_size_um", "molf_split_0", "molf_split_1"
    ]  # fmt: skip
    # each member: its own seed, split, guidance; the mean is theirs, with the seeds of fit_molf_ensemble
    u = a.uns["molf"]
    assert u["n_models"] == 2 and u["genes"] == list(a.var_names) and u["params"]["rotate_validation"] is True
    for i, m in enumerate(models):
        part = u["members"][str(i)]
        assert part["seed"] == 4 + i and part["split_key"] == m.keys["split_key"] == f"molf_split_{i}"
        assert part["guidance"] == m.config.guidance and bool(part["guidance_sweep"]["chosen"].sum() == 1)
        assert {"vae", "flow"} <= set(part["history"])
    libs = a.obs["library_id"].astype(str)
    val = [sorted(set(libs[a.obs[f"molf_split_{i}"] == "val"])) for i in range(2)]
    assert val == [["S3", "S4"], ["S0", "S1"]]  # member 1 validates on the IDC and PRAD slides member 0 trained on
    assert (a.obs["molf_split_0"].astype(str) == a.obs["split"].astype(str)).all()
    assert u["members"]["1"]["train_libraries"]["train"] == ["S2", "S3", "S4"]
    preds = [m.predict(a, n_samples=2, seed=4 + i) for i, m in enumerate(models)]
    np.testing.assert_allclose(a.obsm["molf"].to_numpy(), (preds[0]["mean"] + preds[1]["mean"]) / 2, rtol=1e-5)
    var = (preds[0]["std"] ** 2 + preds[1]["std"] ** 2) / 2 + ((preds[0]["mean"] - preds[1]["mean"]) / 2) ** 2
    np.testing.assert_allclose(a.obsm["molf_std"].to_numpy(), np.sqrt(var), rtol=1e-4, atol=1e-6)
    assert not np.allclose(preds[0]["mean"], preds[1]["mean"])


def test_the_table_saves_and_reads_back_with_the_ensemble(ensemble, tmp_path):
    import anndata as ad

    a, _ = ensemble
    a.write_h5ad(tmp_path / "t.h5ad")
    b = ad.read_h5ad(tmp_path / "t.h5ad")
    np.testing.assert_array_equal(b.obsm["molf"].to_numpy(), a.obsm["molf"].to_numpy())
    assert b.uns["molf"]["members"]["1"]["seed"] == 5
    assert list(b.obs["molf_split_1"].astype(str)) == list(a.obs["molf_split_1"].astype(str))


def test_predict_takes_the_members_and_gives_the_same_numbers(ensemble):
    a, models = ensemble
    b = a.copy()
    hf.tl.predict(models, b, n_samples=2, seed=4, key_added="again")
    np.testing.assert_allclose(b.obsm["again"].to_numpy(), a.obsm["molf"].to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(b.obsm["again_std"].to_numpy(), a.obsm["molf_std"].to_numpy(), rtol=1e-6)
    assert "X_again_latent" not in b.obsm and "again_routing" not in b.obsm
    assert b.uns["again"]["n_models"] == 2 and b.uns["again"]["members"]["1"]["seed"] == 5
    # an image-only slide: no expression, no panel genes in var
    c = b[b.obs["library_id"] == "S5"].copy()
    bare = pd.DataFrame(index=c.obs_names).join(c.obs[["library_id", "cancer_type", "pixel_size_um"]])
    obsm = {k: c.obsm[k] for k in ("spatial", "X_feat")}
    new = AnnData(np.zeros((c.n_obs, 0), dtype=np.float32), obs=bare, obsm=obsm)
    hf.tl.predict(tuple(models), new, n_samples=2, seed=4)
    assert list(new.obsm["molf"].columns) == list(a.var_names) and np.isfinite(new.obsm["molf"].to_numpy()).all()


def test_members_build_their_inputs_once_per_prediction(ensemble, monkeypatch):
    from histoflow.models import _molf

    a, models = ensemble
    calls = []
    search = _molf._neighbours
    monkeypatch.setattr(_molf, "_neighbours", lambda *args: calls.append(len(args[0])) or search(*args))
    b = a.copy()
    hf.tl.predict(models, b, n_samples=2, seed=4, key_added="again")
    assert calls == [a.n_obs]  # one neighbour search for both members
    np.testing.assert_allclose(b.obsm["again"].to_numpy(), a.obsm["molf"].to_numpy(), rtol=1e-6)
    models[0].predict(a)
    models[1].predict(a)
    assert calls == [a.n_obs] * 3  # outside an ensemble's prediction nothing is kept
    assert _molf._SHARED_INPUTS.get() is None
    # members whose windows differ search their own neighbours
    other = copy.copy(models[1])
    other.config = dataclasses.replace(other.config, context_radius_um=2 * other.config.context_radius_um)
    calls.clear()
    hf.tl.predict([models[0], other], b, n_samples=1, key_added="wider")
    assert len(calls) == 2


def test_same_seed_same_numbers_and_no_rotation(ensemble):
    a, _ = ensemble
    b = molf_table()
    hf.tl.fit_molf_ensemble(b, 2, seed=4, n_samples=2, train_kwargs=TRAIN, **FIT, **MOLF_SMALL)
    np.testing.assert_allclose(b.obsm["molf"].to_numpy(), a.obsm["molf"].to_numpy(), rtol=1e-5, atol=1e-6)
    c = molf_table()
    models = hf.tl.fit_molf_ensemble(
        c, 2, rotate_validation=False, select_guidance=False, seed=4, key_added="same", train_kwargs=TRAIN, **FIT,
        **MOLF_SMALL,
    )  # fmt: skip
    assert "same_split_0" not in c.obs and all(m.keys["split_key"] == "split" for m in models)
    assert all(m.config.guidance == 1.0 for m in models) and "guidance_sweep" not in c.uns["same"]["members"]["0"]
    assert "same_std" in c.obsm  # two members with one draw each still have a spread
    # member 0 is fit_molf's model with the same seed and settings
    d = molf_table()
    hf.tl.fit_molf(d, seed=4, train_kwargs=TRAIN, **FIT, **MOLF_SMALL)
    first = models[0].predict(c, seed=4)["mean"]
    np.testing.assert_allclose(first, d.obsm["molf"].to_numpy(), rtol=1e-5, atol=1e-6)


def test_bad_inputs_and_failures_leave_the_table_as_it_was(monkeypatch):
    a = molf_table()
    before = (list(a.obs.columns), set(a.obsm), set(a.layers), set(a.uns))
    for n in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="`n_models` must be a positive integer"):
            hf.tl.fit_molf_ensemble(a, n, **FIT)
    with pytest.raises(ValueError, match="pass `select_guidance=False`"):
        hf.tl.fit_molf_ensemble(a, 2, train_kwargs={"refit": True}, **FIT)
    with pytest.raises(KeyError, match="`split_key='nope'`.*split_slides"):
        hf.tl.fit_molf_ensemble(a, 2, split_key="nope", **FIT)
    no_val = a.copy()
    no_val.obs["split"] = no_val.obs["split"].astype(str).replace("val", "train")
    with pytest.raises(ValueError, match="no `val` slides"):
        hf.tl.fit_molf_ensemble(no_val, 2, **FIT)
    a.obs["molf_split_1"] = "x"
    with pytest.raises(ValueError, match=r"already has \['molf_split_1'\]"):
        hf.tl.fit_molf_ensemble(a, 2, **FIT)
    del a.obs["molf_split_1"]
    calls = []
    train = MoLF.train

    def failing_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return train(self, *args, **kwargs)

    monkeypatch.setattr(MoLF, "train", failing_second)
    with pytest.raises(RuntimeError, match="out of memory"):
        hf.tl.fit_molf_ensemble(a, 2, train_kwargs=TRAIN, **FIT, **MOLF_SMALL)
    assert (list(a.obs.columns), set(a.obsm), set(a.layers), set(a.uns)) == before


def test_predict_refuses_members_that_do_not_belong_together(ensemble):
    a, models = ensemble
    with pytest.raises(ValueError, match="empty sequence"):
        hf.tl.predict([], a)
    other = MoLF(a, embedding_key="X_feat", genes=list(a.var_names[:6]), **MOLF_SMALL)
    with pytest.raises(ValueError, match=r"`model\[1\]` predicts other genes"):
        hf.tl.predict([models[0], other], a)
    with pytest.raises(TypeError, match=r"`model\[1\]` must be a trained MoLF, FLAG.*got str"):
        hf.tl.predict([models[0], "model"], a)
