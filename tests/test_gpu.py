"""The same code paths on a CUDA GPU: training, prediction, embedding (skipped where torch sees no GPU).

CI has no GPU; these run on a GPU machine (`pytest tests/test_gpu.py`). Predictions on the GPU are compared with the
same model's predictions on the CPU: the prior noise is drawn on the CPU, so they differ only by rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _model_data import MOLF_SMALL, molf_table, tiny_mlp_fit

import histoflow as hf

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TRAIN = {"show_progress_bar": False, "patience": 5}


def _fit_on_gpu(a, max_epochs: int, **config):
    """Tiny MoLF fitted with Lightning on the GPU (it predicts there too)."""
    return hf.tl.fit_molf(
        a, embedding_key="X_feat", max_epochs=max_epochs, batch_size=64, accelerator="gpu", devices=1,
        train_kwargs=TRAIN, **config,
    )  # fmt: skip


@pytest.fixture(scope="module")
def gpu_molf():
    """MoLF fitted on the GPU; records the device of every training batch and of the flow's parameters."""
    from histoflow.models._flow import LatentFlow

    seen: set[str] = set()
    loss = LatentFlow.loss

    def probe(self, batch, decoder, **kw):
        seen.add(batch["z1"].device.type)
        seen.update(p.device.type for p in self.parameters())
        return loss(self, batch, decoder, **kw)

    a = molf_table()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LatentFlow, "loss", probe)
        model = _fit_on_gpu(a, 4, n_samples=2, **MOLF_SMALL)
    return a, model, seen


def test_fit_molf_trains_on_the_gpu_and_leaves_the_model_on_the_cpu(gpu_molf):
    a, model, seen = gpu_molf
    assert seen == {"cuda"}
    assert {p.device.type for p in model.flow.parameters()} == {"cpu"}
    pred = a.obsm["molf"].to_numpy()
    assert np.isfinite(pred).all() and (pred >= 0).all()
    assert np.isfinite(model.history["flow"]["train_flow"]).all()


def test_prediction_on_gpu_matches_cpu(gpu_molf):
    a, model, _ = gpu_molf
    b, c = a.copy(), a.copy()
    hf.tl.predict(model, b, n_samples=3, guidance=2.0, device="cuda", key_added="p")
    hf.tl.predict(model, c, n_samples=3, guidance=2.0, device="cpu", key_added="p")
    for key in ("p", "p_std", "X_p_latent", "p_routing"):
        np.testing.assert_allclose(b.obsm[key].to_numpy() if key != "X_p_latent" else b.obsm[key],
                                   c.obsm[key].to_numpy() if key != "X_p_latent" else c.obsm[key],
                                   rtol=1e-3, atol=1e-3)  # fmt: skip
    # fit_molf predicted on the training accelerator: the same numbers as tl.predict on cuda with the same seed
    np.testing.assert_allclose(a.obsm["molf"].to_numpy(), _predict(model, a, "cuda", n_samples=2), atol=1e-5)


def _predict(model, a, device, **kw):
    b = a.copy()
    hf.tl.predict(model, b, device=device, key_added="q", **kw)
    return b.obsm["q"].to_numpy()


def test_select_guidance_and_trajectories_on_gpu(gpu_molf):
    a, model, _ = gpu_molf
    b = a.copy()
    sweep = hf.tl.select_guidance(model, b, scales=(1.0, 2.0), device="cuda")
    ref = hf.tl.select_guidance(model, a.copy(), scales=(1.0, 2.0), device="cpu")
    np.testing.assert_allclose(sweep[["w1", "cosine"]].to_numpy(), ref[["w1", "cosine"]].to_numpy(), rtol=1e-3)
    tr = hf.tl.trajectories(model, b, steps=3, n_spots=20, device="cuda")
    tr_cpu = hf.tl.trajectories(model, a.copy(), steps=3, n_spots=20, device="cpu")
    np.testing.assert_allclose(tr["trajectory"], tr_cpu["trajectory"], rtol=1e-3, atol=1e-3)


def test_save_after_gpu_training_loads_and_predicts_the_same(gpu_molf, tmp_path):
    a, model, _ = gpu_molf
    model.save(tmp_path / "m")
    loaded = hf.models.MoLF.load(tmp_path / "m", a)
    np.testing.assert_array_equal(_predict(loaded, a, "cpu"), _predict(model, a, "cpu"))
    np.testing.assert_allclose(_predict(loaded, a, "cuda"), _predict(model, a, "cpu"), rtol=1e-3, atol=1e-3)


def test_flag_and_mlp_baseline_on_gpu():
    a = molf_table()
    emb = hf.pp.gene_embeddings_from_gene_sets(
        {"A": ["G0", "G1", "G2"], "B": ["G3", "G4", "G5"], "C": ["G6", "G7", "G8"], "D": ["G9", "G10", "G11"]},
        n_components=3,
    )
    fit = {"embedding_key": "X_feat", "max_epochs": 3, "batch_size": 64, "devices": 1, "train_kwargs": TRAIN}
    small = {"d_model": 32, "n_heads": 2, "n_layers": 2, "cond_dim": 32, "align_layer": 1, "align_hidden": 32}
    flag = hf.tl.fit_flag(a, gene_embeddings=emb, accelerator="gpu", **fit, **small)
    assert {p.device.type for p in flag.flow.parameters()} == {"cpu"}
    np.testing.assert_allclose(_predict(flag, a, "cuda"), _predict(flag, a, "cpu"), rtol=1e-3, atol=1e-3)
    mlp = hf.tl.fit_baseline(a, kind="mlp", embedding_key="X_feat", max_epochs=3, accelerator="gpu", devices=1)
    assert np.isfinite(mlp.predict(a)).all()


def test_embed_patches_on_gpu_matches_cpu():
    pytest.importorskip("spatialdata")
    sdata = hf.datasets.synthetic(n_slides=2, grid=(4, 4), n_genes=12, pixel_size_um=2.0, seed=0)
    kw = {"patch_px": 32, "dihedral": True, "context_size_um": 224, "show_progress_bar": False}
    gpu = hf.pp.embed_patches(sdata, "efficientnet_lite0", device="cuda", copy=True, **kw)
    cpu = hf.pp.embed_patches(sdata, "efficientnet_lite0", device="cpu", copy=True, **kw)
    lit = hf.pp.embed_patches(sdata, "efficientnet_lite0", accelerator="gpu", devices=1, copy=True, **kw)
    x_gpu, x_cpu, x_lit = (s.tables["table"].obsm["X_efficientnet_lite0"] for s in (gpu, cpu, lit))
    assert x_gpu.shape == x_cpu.shape == (32, 2 * 1280)
    # encode() turns cuDNN's TF32 off: GPU and CPU features differ only by float32 rounding
    np.testing.assert_allclose(x_gpu, x_cpu, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(x_lit, x_gpu, rtol=1e-5, atol=1e-6)  # the Lightning path: the same encode()


def test_scvi_latent_on_gpu():
    pytest.importorskip("scvi")
    a = molf_table()
    small = {k: v for k, v in MOLF_SMALL.items() if not k.startswith("vae_")}
    model = _fit_on_gpu(a, 2, latent="scvi", scvi_epochs=2, **small)
    np.testing.assert_allclose(_predict(model, a, "cuda"), _predict(model, a, "cpu"), rtol=1e-3, atol=1e-3)


def test_ema_average_stays_on_the_gpu_and_molf_trains_with_it():
    from histoflow.models._train import EMAWeightsCallback, fit_module

    seen: list[set[str]] = []

    class Probe(EMAWeightsCallback):
        def on_train_end(self, trainer, pl_module):
            seen.append({p.device.type for p in self._average.parameters()})
            super().on_train_end(trainer, pl_module)

    module, train, val = tiny_mlp_fit()
    fit_module(
        module, train, val, max_epochs=2, accelerator="gpu", devices=1, callbacks=[Probe(0.9)],
        enable_progress_bar=False,
    )  # fmt: skip
    assert seen == [{"cuda"}]  # no copy to the host at every step
    a = molf_table()
    model = hf.tl.fit_molf(
        a, embedding_key="X_feat", max_epochs=3, batch_size=64, accelerator="gpu", devices=1,
        train_kwargs={**TRAIN, "ema_decay": 0.9}, n_samples=2, **MOLF_SMALL,
    )  # fmt: skip
    assert {p.device.type for p in model.flow.parameters()} == {"cpu"}
    assert np.isfinite(a.obsm["molf"].to_numpy()).all()


def test_fast_dropout_is_torchs_dropout_on_the_gpu_and_shared_stage_one_trains_there():
    from histoflow.models import MoLF
    from histoflow.models._dropout import FastDropout

    x = torch.randn(64, 26, 128, device="cuda")
    torch.manual_seed(5)
    ours = FastDropout(0.1).train()(x)
    torch.manual_seed(5)
    torchs = torch.nn.functional.dropout(x, 0.1, training=True)
    assert ours.device.type == "cuda" and torch.equal(ours, torchs)
    a = molf_table()
    first = _fit_on_gpu(a, 2, **MOLF_SMALL)
    second = MoLF(a, embedding_key="X_feat", **{**MOLF_SMALL, "seed": 1})
    second.train(2, batch_size=64, accelerator="gpu", devices=1, stage_one=first, **TRAIN)
    assert all(torch.equal(v, first.vae.state_dict()[k]) for k, v in second.vae.state_dict().items())
    assert next(second.flow.parameters()).device.type == "cpu"
    assert np.isfinite(second.predict(a, device="cuda")["mean"]).all()
