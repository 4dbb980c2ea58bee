from __future__ import annotations

import inspect
import logging

import numpy as np
import pandas as pd
import pytest
import torch
from _model_data import molf_table as _table  # the tiny six-slide table shared with the MoLF tests

from histoflow.models import FLAG, MoLF
from histoflow.models._flag import GeneTokenDenoiser, GeneTokenFlow, alignment_loss
from histoflow.models._velocity import ConditionEncoder

SMALL = {"d_model": 32, "n_heads": 2, "n_layers": 2, "cond_dim": 32, "align_layer": 1, "align_hidden": 32}
TRAIN = {"show_progress_bar": False, "patience": 5, "batch_size": 64, "accelerator": "cpu", "devices": 1}


def _embeddings(genes: list[str], dim: int = 16, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(rng.normal(size=(len(genes), dim)), index=genes, columns=[f"e{i}" for i in range(dim)])


def _panel_embeddings() -> pd.DataFrame:
    """Embeddings for G0..G9 (G10, G11 of the panel have none) and a gene outside the panel."""
    return _embeddings([f"G{i}" for i in range(10)] + ["NOT_IN_PANEL"])


@pytest.fixture(scope="module")
def trained():
    a = _table()
    m = FLAG(a, gene_embeddings=_panel_embeddings(), embedding_key="X_feat", **SMALL)
    m.train(8, **TRAIN)
    return a, m


def test_alignment_loss_falls_and_unknown_genes_reported(trained, caplog):
    a, m = trained
    h = m.history["flow"]
    assert {"train_loss", "train_flow", "train_align", "val_loss", "val_flow", "val_align"} <= set(h.columns)
    assert h["train_align"].iloc[-1] < h["train_align"].iloc[0] - 0.05
    assert h["val_align"].iloc[-1] < h["val_align"].iloc[0]
    rep = m.alignment
    assert rep["enabled"] and rep["n_known"] == 10 and rep["n_missing"] == 2 and rep["missing"] == ["G10", "G11"]
    assert rep["dim"] == 16 and m.uns_extra() == {"alignment": rep}
    known = m.flow.align_known.numpy()
    assert known[:10].all() and not known[10:].any()
    with caplog.at_level(logging.WARNING, logger="histoflow"):
        FLAG(a, gene_embeddings=_embeddings(["G0", "G1"]), embedding_key="X_feat", **SMALL)
    assert "10 of 12 panel genes have no embedding" in caplog.text and "G11" in caplog.text


def test_alignment_loss_known_answer():
    target = torch.tensor([[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    known = torch.tensor([True, True, False])
    same = target[None].repeat(3, 1, 1)
    same[:, 2] = torch.tensor([-1.0, 0.0])  # the unknown gene's token is ignored
    assert alignment_loss(same, target, known).item() == pytest.approx(0.0, abs=1e-6)
    ortho = torch.tensor([[[0.0, 3.0], [1.0, 0.0], [1.0, 1.0]]])
    assert alignment_loss(ortho, target, known).item() == pytest.approx(1.0, abs=1e-6)
    opposite = -target[None]
    assert alignment_loss(opposite, target, known).item() == pytest.approx(2.0, abs=1e-6)


def test_masked_genes_leave_the_flow_loss_unchanged():
    torch.manual_seed(0)
    cond = ConditionEncoder(8, 16, spatial_context=None)
    flow = GeneTokenFlow(cond, GeneTokenDenoiser(5, 16, d_model=16, n_heads=2, n_layers=2)).eval()
    for p in flow.parameters():  # adaLN-Zero starts as identity: perturb so every part matters
        p.data += 0.1 * torch.randn_like(p)
    x = torch.rand(4, 5) * 3
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[:2, 1] = False
    batch = {"x": x, "mask": mask, "feats": torch.randn(4, 8)}

    def loss(b: dict) -> float:
        return flow.loss(b, p_uncond=0, p_meta_drop=0, generator=torch.Generator().manual_seed(3))["flow"].item()

    x2 = x.clone()
    x2[:2, 1] = 100.0  # values of unmeasured genes are not seen (masked from attention and loss)
    assert loss(batch) == pytest.approx(loss({**batch, "x": x2}), rel=1e-6)
    x3 = x.clone()
    x3[2, 1] = 100.0  # a measured gene's value does matter
    assert loss(batch) != pytest.approx(loss({**batch, "x": x3}), rel=1e-3)


def test_predict_outputs_and_seed(trained):
    a, m = trained
    res = m.predict(a, steps=3, n_samples=2, seed=1, record_trajectories=True)
    n = a.n_obs
    assert res["mean"].shape == (n, 12) and (res["mean"] >= 0).all() and np.isfinite(res["mean"]).all()
    assert res["std"].shape == (n, 12) and (res["std"] > 0).any()
    assert res["latent"].shape == (n, 32) and res["z0"].shape == (n, 12)
    np.testing.assert_array_equal(res["routing"], np.ones((n, 1)))
    assert res["trajectory"].shape == (4, n, 12) and res["metadata_attention"].shape[0] == n
    np.testing.assert_array_equal(res["trajectory"][0], res["z0"])
    np.testing.assert_array_equal(m.predict(a, seed=1)["mean"], m.predict(a, seed=1)["mean"])
    assert not np.array_equal(m.predict(a, seed=1)["mean"], m.predict(a, seed=2)["mean"])


def test_guided_draws_from_one_point_evaluate_the_null_branch_once(trained):
    _, m = trained
    flow = m.flow.eval()
    torch.manual_seed(0)
    c, x0 = torch.randn(6, 32), torch.zeros(6, 12)  # every spot at the prior mean (temperature 0)
    rows = []
    denoise = flow.denoiser.forward
    flow.denoiser.forward = lambda x, t, cc: rows.append(x.shape[0]) or denoise(x, t, cc)
    try:
        with torch.no_grad():
            out = flow.sample(c, x0, steps=2, guidance=2.5)
            v_c = denoise(x0, torch.zeros(1), c)[0]
            v_u = denoise(x0, torch.zeros(1), flow.condition.null.expand_as(c))[0]
            x_half = x0 + 0.5 * (v_u + 2.5 * (v_c - v_u))
            w_c = denoise(x_half, torch.full((1,), 0.5), c)[0]
            w_u = denoise(x_half, torch.full((1,), 0.5), flow.condition.null.expand_as(c))[0]
    finally:
        del flow.denoiser.forward
    assert rows == [6, 1, 12]  # one row for the null branch from the common start, both branches after it
    torch.testing.assert_close(out["x1"], x_half + 0.5 * (w_u + 2.5 * (w_c - w_u)), rtol=1e-5, atol=1e-5)


def test_same_seed_same_training():
    runs = []
    for _ in range(2):
        b = _table()
        m = FLAG(b, gene_embeddings=_panel_embeddings(), embedding_key="X_feat", **SMALL)
        m.train(2, **TRAIN)
        runs.append((m.predict(b, seed=1)["mean"], m.history["flow"].drop(columns="time_s")))
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=1e-5, atol=1e-6)
    pd.testing.assert_frame_equal(runs[0][1], runs[1][1])


def test_save_load_round_trip_and_refusals(trained, tmp_path):
    a, m = trained
    m.save(tmp_path / "f")
    with pytest.raises(FileExistsError, match="overwrite"):
        m.save(tmp_path / "f")
    loaded = FLAG.load(tmp_path / "f", adata=a)
    np.testing.assert_array_equal(loaded.predict(a, seed=4, steps=2)["mean"], m.predict(a, seed=4, steps=2)["mean"])
    assert loaded.alignment == m.alignment
    pd.testing.assert_frame_equal(loaded.history["flow"], m.history["flow"])
    torch.testing.assert_close(loaded.flow.align_target, m.flow.align_target)
    with pytest.raises(ValueError, match="genes"):
        FLAG.load(tmp_path / "f", adata=a[:, :6].copy())
    other = a.copy()
    other.obs["cancer_type"] = other.obs["cancer_type"].astype(str).replace({"IDC": "LUAD"})
    with pytest.raises(ValueError, match="LUAD"):
        FLAG.load(tmp_path / "f", adata=other)
    with pytest.raises(ValueError, match="holds a FLAG, not a MoLF"):
        MoLF.load(tmp_path / "f")
    with pytest.raises(FileNotFoundError, match="model.pt"):
        FLAG.load(tmp_path / "nothing")


def test_bad_inputs():
    a = _table()
    genes = [f"G{i}" for i in range(12)]
    with pytest.raises(ValueError, match="covers none of the 12 panel genes"):
        FLAG(a, gene_embeddings=_embeddings(["ERBB2", "GRB7"]), embedding_key="X_feat", **SMALL)
    with pytest.raises(ValueError, match=r"transpose it \(`df.T`\)"):
        FLAG(a, gene_embeddings=_embeddings(genes).T, embedding_key="X_feat", **SMALL)
    with pytest.raises(TypeError, match="must be a DataFrame"):
        FLAG(a, gene_embeddings=np.ones((12, 4)), embedding_key="X_feat", **SMALL)
    text = _embeddings(genes)
    text["label"] = "x"
    with pytest.raises(ValueError, match="non-numeric columns"):
        FLAG(a, gene_embeddings=text, embedding_key="X_feat", **SMALL)
    with pytest.raises(FileNotFoundError, match="gene_embeddings"):
        FLAG(a, gene_embeddings="/nonexistent/emb.csv", embedding_key="X_feat", **SMALL)
    with pytest.raises(ValueError, match="max_genes"):
        FLAG(a, embedding_key="X_feat", max_genes=8, **SMALL)
    with pytest.raises(ValueError, match="align_layer"):
        FLAG(a, embedding_key="X_feat", **{**SMALL, "align_layer": 3})
    with pytest.raises(ValueError, match="divisible"):
        FLAG(a, embedding_key="X_feat", **{**SMALL, "n_heads": 3})
    with pytest.raises(ValueError, match="lambda_align"):
        FLAG(a, embedding_key="X_feat", lambda_align=-1.0, **SMALL)
    with pytest.raises(TypeError, match="Unknown FLAG settings"):
        FLAG(a, embedding_key="X_feat", n_layer=3)
    with pytest.raises(KeyError, match="embed_patches"):
        FLAG(a, embedding_key="X_missing")
    m = FLAG(a, embedding_key="X_feat", **SMALL)
    assert m.alignment == {"enabled": False, "n_genes": 12} and not m.flow.aligned
    with pytest.raises(RuntimeError, match="not trained"):
        m.predict(a)
    a.obs["split"] = "val"
    with pytest.raises(ValueError, match="train"):
        m.train(1, **TRAIN)


def test_gene_mask_and_spatial_variants():
    a = _table(seed=1)
    a.uns["histoflow_gene_mask"] = pd.DataFrame(True, index=[f"S{i}" for i in range(6)], columns=a.var_names)
    a.uns["histoflow_gene_mask"].loc[["S0", "S1"], "G0"] = False
    m = FLAG(a, gene_embeddings=_panel_embeddings(), embedding_key="X_feat", spatial_context=None, **SMALL)
    m.train(2, **TRAIN)
    assert np.isfinite(m.history["flow"]["train_flow"]).all()
    assert np.isfinite(m.predict(a)["mean"]).all()
    if "graph" not in inspect.signature(ConditionEncoder).parameters["spatial_context"].annotation:
        pytest.skip("this ConditionEncoder has no graph context")
    g = FLAG(a, embedding_key="X_feat", spatial_context="graph", **SMALL)
    g.train(1, **TRAIN)
    assert np.isfinite(g.predict(a)["mean"]).all()
