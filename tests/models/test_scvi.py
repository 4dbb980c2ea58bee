"""MoLF with scvi-tools' SCVI as Stage I (``latent="scvi"``): training, latent, decoder, save/load, bad input."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from anndata import AnnData

import histoflow as hf
from histoflow.models import MoLF
from histoflow.models._scvi import ScviLatent, panel_counts

needs_scvi = pytest.mark.skipif(importlib.util.find_spec("scvi") is None, reason="scvi-tools (histoflow[scvi])")

SMALL = {
    "latent": "scvi",
    "latent_dim": 4,
    "scvi_n_hidden": 16,
    "scvi_n_layers": 2,
    "cond_dim": 16,
    "expert_width": 16,
    "n_experts": 3,
    "top_k": 2,
    "expert_heads": 2,
}
FIT = {
    "embedding_key": "X_feat",
    "max_epochs": 3,
    "batch_size": 64,
    "accelerator": "cpu",
    "devices": 1,
    "train_kwargs": {"show_progress_bar": False, "patience": 5},
}


def _table(seed: int = 0, n_genes: int = 10) -> AnnData:
    """Six slides × 36 spots (6×6 grid), raw counts in X with a slide-specific depth, features carrying the programs."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(np.arange(6), np.arange(6)), -1).reshape(-1, 2)
    load = rng.normal(size=(2, n_genes))
    blocks, obs, coords, progs = [], [], [], []
    for s in range(6):
        prog = np.column_stack([np.sin(g[:, 0] / 2 + s), np.cos(g[:, 1] / 2 - s)])
        blocks.append(rng.poisson(np.exp(1.5 + 0.3 * s + prog @ load * 0.6)))  # batch effect: depth per slide
        progs.append(prog)
        coords.append(g * 100.0)
        obs.append(
            pd.DataFrame(
                {
                    "library_id": f"S{s}",
                    "cancer_type": ["IDC", "PRAD"][s % 2],
                    "split": ["train", "train", "train", "val", "val", "test"][s],
                },
                index=[f"S{s}_{i}" for i in range(len(g))],
            )
        )
    o = pd.concat(obs)
    for c in o.columns:
        o[c] = o[c].astype("category")
    a = AnnData(
        sp.csr_matrix(np.concatenate(blocks).astype(np.float32)),
        obs=o,
        var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)]),
    )
    a.obs["pixel_size_um"] = 1.0
    a.obsm["spatial"] = np.concatenate(coords)
    prog = np.concatenate(progs)
    a.obsm["X_feat"] = np.c_[prog, rng.normal(size=(a.n_obs, 4))].astype(np.float32) @ rng.normal(size=(6, 12)).astype(
        np.float32
    )
    hf.pp.normalize(a)  # layers["log1p"]; the raw counts are copied to layers["counts"]
    return a


@pytest.fixture(scope="module")
def fitted():
    if importlib.util.find_spec("scvi") is None:
        pytest.skip("scvi-tools (histoflow[scvi]) is not installed")
    a = _table()
    model = hf.tl.fit_molf(a, **FIT, **SMALL)
    return a, model


def _train_counts(a: AnnData) -> tuple[np.ndarray, np.ndarray]:
    rows = np.flatnonzero(a.obs["split"].to_numpy() == "train")
    return rows, a.layers["counts"][rows].toarray()


def test_fit_writes_keys_and_scvi_history(fitted):
    a, model = fitted
    assert set(a.obsm) == {"spatial", "X_feat", "molf", "X_molf_latent", "molf_routing"}
    assert set(a.layers) == {"counts", "log1p", "molf"}
    pred = a.obsm["molf"].to_numpy()
    assert pred.shape == (a.n_obs, 10) and np.isfinite(pred).all() and (pred >= 0).all()
    assert a.obsm["X_molf_latent"].shape == (a.n_obs, 4)
    hist = a.uns["molf"]["history"]
    assert set(hist) == {"scvi", "flow"}  # no VAE was trained
    assert {"train_loss", "train_elbo", "train_reconstruction_loss", "val_elbo", "kl_weight"} <= set(hist["scvi"])
    assert 1 <= len(hist["scvi"]) <= 3 and np.isfinite(hist["scvi"]["train_loss"]).all()
    assert a.uns["molf"]["config"]["latent"] == "scvi"
    assert model.vae is None and isinstance(model.scvi, ScviLatent)
    # one batch per training slide; the library size is the median total panel count of the training spots
    assert model.scvi.spec["batches"] == ["S0", "S1", "S2"]
    _, counts = _train_counts(a)
    assert model.scvi.spec["library_size"] == pytest.approx(float(np.median(counts.sum(1))))


def test_latent_means_are_scvis(fitted):
    a, model = fitted
    rows, counts = _train_counts(a)
    sub = AnnData(
        counts, obs=pd.DataFrame({"batch": a.obs["library_id"].astype(str).to_numpy()[rows]}, index=a.obs_names[rows])
    )
    sub.var_names = list(a.var_names)
    ref = model.scvi_model.get_latent_representation(sub, give_mean=True)
    np.testing.assert_allclose(model.get_latent(a, rows), ref, rtol=1e-4, atol=1e-5)
    # the encoder does not read the batch: test spots encoded under any training label give the same means
    test = np.flatnonzero(a.obs["split"].to_numpy() == "test")
    sub2 = AnnData(a.layers["counts"][test].toarray(), obs=pd.DataFrame({"batch": "S1"}, index=a.obs_names[test]))
    sub2.var_names = list(a.var_names)
    ref2 = model.scvi_model.get_latent_representation(sub2, give_mean=True)
    np.testing.assert_allclose(model.get_latent(a, test), ref2, rtol=1e-4, atol=1e-5)


def test_decoder_is_scvis_generative_mean(fitted):
    a, model = fitted
    dec = model.scvi.decoder
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    lib = torch.full((5, 1), float(np.log(model.scvi.spec["library_size"])))
    per_slide = []
    with torch.no_grad():
        for k in range(3):
            _, _, rate, logit_pi = model.scvi_model.module.decoder("gene", z, lib, torch.full((5, 1), k))
            per_slide.append(rate * torch.sigmoid(-logit_pi))  # ZINB mean: (1 − π) · library · ρ
    expected = torch.log1p(torch.stack(per_slide).mean(0)).numpy()
    out = model.decode(z.numpy())
    assert out.shape == (5, 10) and (out >= 0).all()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    # frozen but differentiable in z (the gene-consistency loss back-propagates through it)
    assert not any(p.requires_grad for p in dec.parameters())
    zz = z.clone().requires_grad_(True)
    dec(zz).sum().backward()
    assert zz.grad is not None and zz.grad.abs().sum() > 0


def test_same_seed_same_numbers(fitted):
    a, model = fitted
    b = _table()
    m2 = hf.tl.fit_molf(b, **FIT, **SMALL)
    np.testing.assert_allclose(b.obsm["molf"].to_numpy(), a.obsm["molf"].to_numpy(), rtol=1e-5, atol=1e-6)
    pd.testing.assert_frame_equal(
        m2.history["scvi"].drop(columns="time_s"), model.history["scvi"].drop(columns="time_s")
    )


def test_save_load_without_scvi(fitted, tmp_path, monkeypatch):
    a, model = fitted
    model.save(tmp_path / "m")
    spec = json.loads((tmp_path / "m" / "model.json").read_text())["scvi"]
    assert spec["n_batch"] == 3 and spec["gene_likelihood"] == "zinb"
    monkeypatch.setitem(sys.modules, "scvi", None)  # loading and predicting need neither scvi nor its registration
    loaded = MoLF.load(tmp_path / "m", adata=a)
    assert loaded.scvi_model is None
    np.testing.assert_array_equal(loaded.predict(a, seed=2)["mean"], model.predict(a, seed=2)["mean"])
    np.testing.assert_array_equal(loaded.get_latent(a), model.get_latent(a))
    pd.testing.assert_frame_equal(loaded.history["scvi"], model.history["scvi"])


def test_panel_counts_sources():
    a = _table()
    rows = np.arange(5)
    y, where = panel_counts(a, ["G1", "G0"], "counts", rows)
    assert where == "adata.layers['counts']"
    np.testing.assert_array_equal(y, a.layers["counts"][:5][:, [1, 0]].toarray())
    del a.layers["counts"]  # X still holds the counts
    y2, where2 = panel_counts(a, ["G1", "G0"], "counts", rows)
    assert where2 == "adata.X"
    np.testing.assert_array_equal(y2, y)


@needs_scvi
def test_missing_raw_counts_is_a_clear_error():
    a = _table()
    a.X = a.layers["log1p"].copy()  # X holds log1p values and the counts layer is gone
    del a.layers["counts"]
    before = set(a.obsm), set(a.uns)
    with pytest.raises(ValueError, match=r"raw counts.*layers\['counts'\].*scvi_counts_layer"):
        hf.tl.fit_molf(a, **FIT, **SMALL)
    assert (set(a.obsm), set(a.uns)) == before  # nothing written
    b = _table()
    b.layers["counts"] = b.layers["counts"] * 0.5  # non-integer "counts"
    with pytest.raises(ValueError, match="non-integer"):
        hf.tl.fit_molf(b, **FIT, **SMALL)


@needs_scvi
def test_gene_masks_are_refused():
    a = _table()
    a.uns["histoflow_gene_mask"] = pd.DataFrame(
        True, index=[f"S{s}" for s in range(6)], columns=list(a.var_names)
    ).astype(bool)
    a.uns["histoflow_gene_mask"].loc["S1", "G3"] = False
    with pytest.raises(ValueError, match=r"cannot mask genes.*\['S1'\].*G3.*latent='vae'"):
        hf.tl.fit_molf(a, **FIT, **SMALL)


def test_missing_scvi_and_bad_settings(monkeypatch):
    a = _table()
    with pytest.raises(ValueError, match="latent='foo'"):
        MoLF(a, embedding_key="X_feat", latent="foo")
    with pytest.raises(ValueError, match="scvi_gene_likelihood"):
        MoLF(a, embedding_key="X_feat", latent="scvi", scvi_gene_likelihood="normal")
    with pytest.raises(ValueError, match="scvi_library_size"):
        MoLF(a, embedding_key="X_feat", latent="scvi", scvi_library_size=0.0)
    monkeypatch.setitem(sys.modules, "scvi", None)
    with pytest.raises(ImportError, match=r'pip install "histoflow\[scvi\]"'):
        MoLF(a, embedding_key="X_feat", latent="scvi")
    MoLF(a, embedding_key="X_feat", latent_dim=4)  # the default VAE does not need scvi


def test_stage_one_takes_the_trained_scvi(fitted):
    a, model = fitted
    train = {"batch_size": 64, "accelerator": "cpu", "devices": 1, "show_progress_bar": False, "patience": 5}
    other = MoLF(a, embedding_key="X_feat", **{**SMALL, "seed": 1, "velocity": "dense"})
    other.train(2, stage_one=model, **train)
    assert other.vae is None and other.scvi is not model.scvi and other.scvi_model is model.scvi_model
    assert all(torch.equal(v, model.scvi.state_dict()[k]) for k, v in other.scvi.state_dict().items())
    np.testing.assert_array_equal(other.get_latent(a), model.get_latent(a))
    pd.testing.assert_frame_equal(other.history["scvi"], model.history["scvi"])
    assert len(other.history["flow"]) == 2 and np.isfinite(other.predict(a)["mean"]).all()
    vae_model = MoLF(a, embedding_key="X_feat", latent_dim=4)
    with pytest.raises(ValueError, match=r"latent='scvi' \(here 'vae'\)"):
        vae_model.train(1, stage_one=model, **train)
    with pytest.raises(ValueError, match=r"scvi_n_hidden=16 \(here 32\)"):
        MoLF(a, embedding_key="X_feat", **{**SMALL, "scvi_n_hidden": 32}).train(1, stage_one=model, **train)
    assert not vae_model.is_trained
