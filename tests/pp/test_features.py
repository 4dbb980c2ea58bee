from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import histoflow as hf


def _features(seed: int = 0) -> ad.AnnData:
    """Two slides whose features differ by a slide-level shift and scale on top of shared within-slide signal."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=(30, 4))
    X = np.concatenate([signal[:12] * 2.0 + 5.0, signal[12:] * 0.5 - 3.0]).astype(np.float32)
    adata = ad.AnnData(np.zeros((30, 2), dtype=np.float32))
    adata.obs_names = [f"s{i}" for i in range(30)]
    adata.obs["library_id"] = pd.Categorical(["A"] * 12 + ["B"] * 18)
    adata.obsm["X_enc"] = X
    adata.uns["keep"] = 1
    return adata


def test_each_slide_gets_zero_mean_unit_variance_and_other_keys_are_untouched():
    adata = _features()
    before = adata.obsm["X_enc"].copy()
    obs_before = adata.obs.copy()
    assert hf.pp.scale_features(adata, "X_enc") is None
    out = adata.obsm["X_enc_scaled"]
    assert out.dtype == np.float32 and out.shape == before.shape
    for rows in (slice(0, 12), slice(12, 30)):
        np.testing.assert_allclose(out[rows].mean(0), 0.0, atol=1e-5)
        np.testing.assert_allclose(out[rows].std(0), 1.0, atol=1e-5)
        block = before[rows].astype(np.float64)
        np.testing.assert_allclose(out[rows], (block - block.mean(0)) / block.std(0), rtol=1e-5, atol=1e-5)
    # the slide-level shift is gone: a spot's value depends only on its place within its slide
    assert abs(out[:12].mean() - out[12:].mean()) < 1e-5
    np.testing.assert_array_equal(adata.obsm["X_enc"], before)
    pd.testing.assert_frame_equal(adata.obs, obs_before)
    assert set(adata.obsm) == {"X_enc", "X_enc_scaled"}
    assert adata.uns["X_enc_scaled"] == {"scaled_from": "X_enc", "scaled_groupby": "library_id"}
    assert adata.uns["keep"] == 1


def test_groupby_none_is_a_global_standard_scaler_and_constant_features_become_zero():
    from sklearn.preprocessing import StandardScaler

    adata = _features()
    adata.obsm["X_enc"][:, 2] = 7.0  # constant everywhere
    hf.pp.scale_features(adata, "X_enc", groupby=None, key_added="z")
    ref = StandardScaler().fit_transform(adata.obsm["X_enc"].astype(np.float64))
    np.testing.assert_allclose(adata.obsm["z"], ref, rtol=1e-5, atol=1e-5)
    assert (adata.obsm["z"][:, 2] == 0).all()
    assert adata.uns["z"]["scaled_groupby"] == "None"


def test_dataframe_features_copy_and_replacing_in_place():
    adata = _features()
    df = pd.DataFrame(adata.obsm["X_enc"], index=adata.obs_names)
    adata.obsm["X_df"] = df
    out = hf.pp.scale_features(adata, "X_df", copy=True)
    assert isinstance(out, ad.AnnData) and "X_df_scaled" in out.obsm and "X_df_scaled" not in adata.obsm
    hf.pp.scale_features(adata, "X_enc", key_added="X_enc")
    np.testing.assert_allclose(adata.obsm["X_enc"], out.obsm["X_df_scaled"], atol=1e-6)


def test_spatialdata_table(her2st_dir):
    sdata = hf.io.read_her2st(her2st_dir, sections=["C2", "C3"], load_images=False)
    table = sdata.tables["table"]
    rng = np.random.default_rng(0)
    table.obsm["X_enc"] = rng.normal(size=(table.n_obs, 5)) + (table.obs["library_id"] == "C3").to_numpy()[:, None] * 4
    hf.pp.scale_features(sdata, "X_enc")
    out = table.obsm["X_enc_scaled"]
    for lib in ("C2", "C3"):
        rows = (table.obs["library_id"] == lib).to_numpy()
        np.testing.assert_allclose(out[rows].mean(0), 0.0, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "kwargs", "err", "match"),
    [
        (None, {"embedding_key": "X_missing"}, KeyError, "embedding_key='X_missing'"),
        (None, {"groupby": "slide"}, KeyError, "groupby='slide'"),
        ("nan", {}, ValueError, "NaN or infinite"),
        ("missing_lib", {}, ValueError, "missing value"),
        ("single", {}, ValueError, "single spot"),
        ("3d", {}, ValueError, "2-d array"),
        (None, {"key_added": ""}, ValueError, "key_added"),
    ],
)
def test_bad_input_raises_and_writes_nothing(change, kwargs, err, match):
    adata = _features()
    if change == "nan":
        adata.obsm["X_enc"][3, 1] = np.nan
    elif change == "missing_lib":
        adata.obs["library_id"] = adata.obs["library_id"].cat.add_categories("C")
        adata.obs.loc["s0", "library_id"] = np.nan
    elif change == "single":
        adata.obs["library_id"] = pd.Categorical(["A"] * 29 + ["C"])
    elif change == "3d":
        adata.obsm["X_enc"] = np.zeros((30, 2, 2))
    keys = set(adata.obsm), set(adata.uns)
    call = {"embedding_key": "X_enc", **kwargs}
    with pytest.raises(err, match=match):
        hf.pp.scale_features(adata, call.pop("embedding_key"), **call)
    assert (set(adata.obsm), set(adata.uns)) == keys


def test_model_trained_on_scaled_rotation_averaged_features_embeds_a_new_slide_the_same_way():
    """tl.predict on a slide without features: embedded with the model's encoder, dihedral averaging and context
    patch, then standardised per slide as the training features were, so the prediction equals the one from stored
    features."""
    sdata = hf.datasets.synthetic(n_slides=4, grid=(4, 4), n_genes=12, pixel_size_um=2.0, seed=0)
    hf.pp.normalize(sdata)
    hf.pp.split_slides(sdata, level="slide", val_frac=1, test_frac=0, stratify=None, seed=0)
    table = sdata.tables["table"]
    hf.pp.embed_patches(
        sdata, "efficientnet_lite0", patch_px=32, dihedral=True, context_size_um=224, show_progress_bar=False
    )
    assert table.obsm["X_efficientnet_lite0"].shape == (table.n_obs, 2 * 1280)
    record = dict(table.uns["X_efficientnet_lite0"])
    hf.pp.scale_features(sdata, "X_efficientnet_lite0", key_added="X_efficientnet_lite0")
    assert table.uns["X_efficientnet_lite0"]["encoder"] == record["encoder"] == "efficientnet_lite0"
    assert table.uns["X_efficientnet_lite0"]["dihedral"] is True
    assert table.uns["X_efficientnet_lite0"]["scaled_groupby"] == "library_id"
    small = {"latent_dim": 4, "vae_d_model": 16, "vae_ff_dim": 32, "cond_dim": 16, "expert_width": 16}
    model = hf.tl.fit_molf(
        sdata,
        max_epochs=1,
        batch_size=32,
        accelerator="cpu",
        devices=1,
        n_experts=2,
        top_k=1,
        vae_heads=2,
        expert_heads=2,
        train_kwargs={"show_progress_bar": False},
        **small,
    )
    assert model.registry.encoder["scaled_groupby"] == "library_id" and model.registry.encoder["dihedral"] is True
    assert list(model.registry.encoder["context_size_um"]) == [224.0]
    fresh = hf.datasets.synthetic(n_slides=4, grid=(4, 4), n_genes=12, pixel_size_um=2.0, seed=0)
    hf.tl.predict(model, fresh, seed=0, key_added="again")
    new = fresh.tables["table"]
    np.testing.assert_allclose(new.obsm["X_efficientnet_lite0"], table.obsm["X_efficientnet_lite0"], atol=1e-4)
    np.testing.assert_allclose(new.obsm["again"].to_numpy(), table.obsm["molf"].to_numpy(), rtol=1e-4, atol=1e-4)
    # a baseline on the same features embeds a new slide the same way
    ridge = hf.tl.fit_baseline(sdata, "ridge", fit_intercept=True)
    assert ridge.registry.encoder["scaled_groupby"] == "library_id"
    other = hf.datasets.synthetic(n_slides=4, grid=(4, 4), n_genes=12, pixel_size_um=2.0, seed=0)
    hf.tl.predict(ridge, other)
    np.testing.assert_allclose(other.tables["table"].obsm["X_efficientnet_lite0"], new.obsm["X_efficientnet_lite0"])
    np.testing.assert_allclose(
        other.tables["table"].obsm["ridge"].to_numpy(), table.obsm["ridge"].to_numpy(), rtol=1e-3, atol=1e-3
    )
