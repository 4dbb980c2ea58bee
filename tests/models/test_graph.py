"""The spatial graph encoder (`spatial_context="graph"`): geometry, similarity, padding, gradients, MoLF end to end."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from _model_data import MOLF_SMALL
from anndata import AnnData

import histoflow as hf
from histoflow.models import MoLF
from histoflow.models._graph import GraphContextEncoder, gaussian_rbf
from histoflow.models._velocity import ConditionEncoder

DIM = 16


def _window(b: int = 3, n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Node tokens, offsets (µm, centre at 0) and validity of ``b`` windows of ``n`` nodes, all real."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, n, DIM, generator=g)
    off = torch.randn(b, n, 2, generator=g) * 120.0
    off[:, 0] = 0.0
    return h, off, torch.ones(b, n, dtype=torch.bool)


def _encoder(**kw) -> GraphContextEncoder:
    torch.manual_seed(0)
    return GraphContextEncoder(DIM, n_heads=2, **kw).eval()


# ---------------------------------------------------------------------------------------------- geometry


def test_moving_one_neighbour_changes_the_centre_context():
    enc = _encoder()
    h, off, valid = _window()
    out = enc(h, off, valid)
    moved = off.clone()
    moved[:, 3] += torch.tensor([60.0, -40.0])
    out_moved = enc(h, moved, valid)
    assert (out_moved - out).abs().amax(1).min() > 1e-3  # every window's context changed
    # the distance edge features follow the move: only pairs involving node 3 change
    d0, _ = enc.edge_geometry(h, off, valid)
    d1, _ = enc.edge_geometry(h, moved, valid)
    changed = (d1 - d0).abs() > 1e-4
    assert changed[:, 3, :].any() and changed[:, :, 3].any()
    keep = torch.ones(6, dtype=torch.bool)
    keep[3] = False
    assert not changed[:, keep][:, :, keep].any()
    torch.testing.assert_close(d0[0, 0, 3], off[0, 3].norm())


def test_neighbour_order_rotation_and_translation_do_not_matter():
    enc = _encoder()
    h, off, valid = _window()
    out = enc(h, off, valid)
    perm = torch.tensor([0, 4, 2, 5, 1, 3])  # the centre stays first, neighbours shuffled
    torch.testing.assert_close(enc(h[:, perm], off[:, perm], valid[:, perm]), out, rtol=1e-5, atol=1e-5)
    # only pairwise distances enter: rotating or reflecting the tissue changes nothing
    a = math.radians(37.0)
    rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    torch.testing.assert_close(enc(h, off @ rot.T, valid), out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(enc(h, off * torch.tensor([-1.0, 1.0]), valid), out, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- visual similarity


def test_visual_similarity_is_the_cosine_of_the_tokens_and_drives_the_edge_bias():
    enc = _encoder(n_layers=3)
    h, off, valid = _window()
    _, sim = enc.edge_geometry(h, off, valid)
    hn = h / h.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(sim, hn @ hn.transpose(1, 2), rtol=1e-5, atol=1e-5)
    bias = enc.edge_bias(h, off, valid)
    assert bias.shape == (3, 3, 2, 6, 6)
    h2 = h.clone()
    h2[:, 2] = torch.randn(3, DIM, generator=torch.Generator().manual_seed(5))  # new look, same position
    bias2 = enc.edge_bias(h2, off, valid)
    diff = (bias2 - bias).abs()
    assert diff[:, :, :, 0, 2].min() > 1e-4 and diff[:, :, :, 2, 0].min() > 1e-4  # centre ↔ node 2 edges changed
    others = torch.tensor([0, 1, 3, 4, 5])
    assert diff[:, :, :, others][:, :, :, :, others].max() < 1e-6  # edges not touching node 2 did not
    # cosine similarity ignores the feature scale: a brighter copy of the same look keeps the bias
    h3 = h.clone()
    h3[:, 2] *= 3.0
    torch.testing.assert_close(enc.edge_bias(h3, off, valid), bias, rtol=1e-5, atol=1e-5)
    # and the similarity edge features reach the output: a layer that ignores them gives another context
    enc_no_sim = _encoder(n_layers=3)
    enc_no_sim.sim_width = 1e6  # flat similarity basis: every pair looks alike
    assert (enc_no_sim(h, off, valid) - enc(h, off, valid)).abs().max() > 1e-4


def test_gaussian_rbf_known_values():
    x = torch.tensor([0.0, 10.0])
    out = gaussian_rbf(x, torch.tensor([0.0, 10.0]), 10.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, math.exp(-1.0)], [math.exp(-1.0), 1.0]]))


# ---------------------------------------------------------------------------------------------- padding


def test_padded_nodes_are_ignored_whatever_they_hold():
    enc = _encoder()
    h, off, valid = _window(n=5)
    out = enc(h, off, valid)
    garbage = torch.randn(3, 3, DIM) * 1e3
    garbage[0, 0, 0] = float("nan")
    h_pad = torch.cat([h[:, :2], garbage[:, :1], h[:, 2:], garbage[:, 1:]], dim=1)  # pads in the middle and at the end
    off_pad = torch.cat([off[:, :2], torch.full((3, 1, 2), 7e3), off[:, 2:], torch.full((3, 2, 2), float("inf"))], 1)
    valid_pad = torch.cat(
        [valid[:, :2], torch.zeros(3, 1, dtype=torch.bool), valid[:, 2:], torch.zeros(3, 2, dtype=torch.bool)], 1
    )
    out_pad = enc(h_pad, off_pad, valid_pad)
    assert torch.isfinite(out_pad).all()
    torch.testing.assert_close(out_pad, out, rtol=1e-5, atol=1e-5)
    # a window with no real neighbour is the spot alone
    solo = enc(h_pad, off_pad, valid_pad & (torch.arange(8) == 0))
    torch.testing.assert_close(solo, enc(h[:, :1], off[:, :1]), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- gradients


def test_gradients_reach_every_parameter_and_real_neighbours_only():
    torch.manual_seed(0)
    enc = GraphContextEncoder(DIM, n_heads=2)
    h, off, valid = _window()
    valid[:, -1] = False
    h.requires_grad_(True)
    enc(h, off, valid).pow(2).sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert (h.grad[:, 1:-1].abs().sum(-1) > 0).all()  # real neighbours influence the centre
    assert (h.grad[:, -1] == 0).all()  # the padded one does not


# ---------------------------------------------------------------------------------------------- ConditionEncoder


def test_condition_encoder_graph_projected_path_matches_and_metadata_still_applies():
    torch.manual_seed(0)
    cond = ConditionEncoder(6, DIM, spatial_context="graph", n_heads=2, metadata_sizes=[3], graph_layers=3).eval()
    assert isinstance(cond.context, GraphContextEncoder) and len(cond.context.layers) == 3
    assert cond.context.dist_centres[-1].item() == pytest.approx(500.0)  # 2 × default radius
    feats = torch.randn(4, 5, 6)
    off = torch.randn(4, 5, 2) * 100
    off[:, 0] = 0
    valid = torch.ones(4, 5, dtype=torch.bool)
    valid[1, 3:] = False
    meta = torch.tensor([[0], [1], [2], [-1]])
    c, attn = cond(feats, off, valid, meta)
    c2, _ = cond.forward_projected(cond.project(feats), off, valid, meta)
    torch.testing.assert_close(c, c2)
    assert c.shape == (4, DIM) and attn.shape == (4, 4 + 4)  # shared memory + the value's tokens
    c_other, _ = cond(feats, off, valid, torch.tensor([[1], [2], [0], [0]]))
    assert (c_other - c).abs().amax(1).min() > 1e-4
    drop = torch.tensor([True, False, False, False])
    c_drop, _ = cond(feats, off, valid, meta, drop)
    torch.testing.assert_close(c_drop[0], cond.null.detach())


def test_bad_values_give_clear_errors():
    with pytest.raises(ValueError, match="'window', 'graph' or None"):
        ConditionEncoder(6, DIM, spatial_context="grid")
    with pytest.raises(ValueError, match="`graph_layers` must be a positive integer"):
        ConditionEncoder(6, DIM, spatial_context="graph", graph_layers=0)
    with pytest.raises(ValueError, match="`context_radius_um` must be a positive"):
        ConditionEncoder(6, DIM, spatial_context="graph", context_radius_um=-5.0)
    with pytest.raises(ValueError, match="divisible by `n_heads`"):
        GraphContextEncoder(10, n_heads=4)
    with pytest.raises(ValueError, match="`n_distance_rbf`"):
        GraphContextEncoder(DIM, n_distance_rbf=1)
    with pytest.raises(ValueError, match="`dropout`"):
        GraphContextEncoder(DIM, dropout=1.0)
    enc = _encoder()
    h, off, valid = _window()
    with pytest.raises(ValueError, match="offsets_um"):
        enc(h, off[:, :, :1], valid)
    with pytest.raises(ValueError, match="`valid` must be"):
        enc(h, off, valid[:, :3])
    bad = valid.clone()
    bad[1, 0] = False
    with pytest.raises(ValueError, match="centre spot"):
        enc(h, off, bad)
    with pytest.raises(ValueError, match=r"\(batch, nodes, 16\)"):
        enc(h[..., :8], off, valid)


# ---------------------------------------------------------------------------------------------- MoLF end to end

SMALL = MOLF_SMALL
FIT = {
    "embedding_key": "X_feat",
    "max_epochs": 4,
    "batch_size": 64,
    "accelerator": "cpu",
    "devices": 1,
    "train_kwargs": {"show_progress_bar": False, "patience": 5},
    "spatial_context": "graph",
    **SMALL,
}


def _table(seed: int = 0) -> AnnData:
    """Five 6×6 slides (100 µm grid, 0.5 µm/px), three cancer types; expression follows a smooth field."""
    rng = np.random.default_rng(seed)
    blocks, obs, xy = [], [], []
    for s in range(5):
        g = np.stack(np.meshgrid(np.arange(6), np.arange(6)), -1).reshape(-1, 2).astype(float)
        blocks.append(np.column_stack([np.sin(g[:, 0] / 2 + s), np.cos(g[:, 1] / 2 - s)]))
        xy.append(g * 200.0)  # pixels: 100 µm apart at 0.5 µm/px
        obs.append(
            pd.DataFrame(
                {
                    "library_id": f"S{s}",
                    "cancer_type": ["IDC", "PRAD", "COAD"][s % 3],
                    "split": ["train", "train", "train", "val", "test"][s],
                },
                index=[f"S{s}_{i}" for i in range(len(g))],
            )
        )
    prog = np.concatenate(blocks)
    counts = rng.poisson(np.exp(1.0 + prog @ rng.normal(size=(2, 10)) * 0.8)).astype(np.float32)
    a = AnnData(sp.csr_matrix(counts), obs=pd.concat(obs), var=pd.DataFrame(index=[f"G{i}" for i in range(10)]))
    a.obs["pixel_size_um"] = 0.5
    for c in ("library_id", "cancer_type", "split"):
        a.obs[c] = a.obs[c].astype("category")
    a.obsm["spatial"] = np.concatenate(xy)
    noise = rng.normal(size=(a.n_obs, 6))
    a.obsm["X_feat"] = (np.c_[prog, noise] @ rng.normal(size=(8, 12))).astype(np.float32)
    hf.pp.normalize(a)
    return a


@pytest.fixture(scope="module")
def graph_fit():
    a = _table()
    return a, hf.tl.fit_molf(a, seed=3, **FIT)


def test_fit_molf_graph_runs_and_uses_the_neighbours(graph_fit):
    a, model = graph_fit
    assert model.config.spatial_context == "graph" and model.config.graph_layers == 2
    assert isinstance(model.flow.condition.context, GraphContextEncoder)
    pred = a.obsm["molf"].to_numpy()
    assert pred.shape == (a.n_obs, a.n_vars) and np.isfinite(pred).all()
    _, nbr, off = model._arrays(a, np.arange(a.n_obs), with_targets=False)
    # 100 µm grid, 250 µm radius: interior spots have 8 neighbours (orthogonal, diagonal, 2 steps), corners fewer
    assert nbr.shape == (a.n_obs, 8) and (nbr >= 0).sum(1).min() >= 3
    assert off.abs().max().item() <= 250.0 + 1e-4
    # a neighbour's look changes the centre's prediction, the spot's own look being unchanged
    base = model.predict(a, seed=0)["mean"]
    centre = 7  # S0, row 1 col 1
    j = int(nbr[centre, 0])
    b = a.copy()
    b.obsm["X_feat"][j] += np.linspace(-3.0, 3.0, b.obsm["X_feat"].shape[1], dtype=np.float32)  # not a constant shift
    new = model.predict(b, seed=0)["mean"]
    assert np.abs(new[centre] - base[centre]).max() > 1e-4
    far = np.flatnonzero((a.obs["library_id"] != "S0").to_numpy())  # other slides never see that spot
    np.testing.assert_array_equal(new[far], base[far])
    # moving spots (features untouched) changes predictions: coordinates are used
    c = a.copy()
    c.obsm["spatial"] = c.obsm["spatial"] * 0.6  # 60 µm spacing: other distances, more neighbours
    assert np.abs(model.predict(c, seed=0)["mean"] - base).max() > 1e-4


def test_fit_molf_graph_same_seed_same_numbers_and_save_load(graph_fit, tmp_path):
    a, model = graph_fit
    b = _table()
    hf.tl.fit_molf(b, seed=3, **FIT)
    np.testing.assert_allclose(b.obsm["molf"].to_numpy(), a.obsm["molf"].to_numpy(), rtol=1e-5, atol=1e-6)
    model.save(tmp_path / "g")
    loaded = MoLF.load(tmp_path / "g", adata=a)
    assert loaded.config.spatial_context == "graph" and isinstance(loaded.flow.condition.context, GraphContextEncoder)
    np.testing.assert_array_equal(loaded.predict(a, seed=1)["mean"], model.predict(a, seed=1)["mean"])


def test_molf_graph_bad_settings():
    a = _table()
    with pytest.raises(ValueError, match="`graph_layers` must be a positive integer"):
        MoLF(a, embedding_key="X_feat", spatial_context="graph", graph_layers=0, **SMALL)
    with pytest.raises(ValueError, match="'window', 'graph' or None"):
        MoLF(a, embedding_key="X_feat", spatial_context="graf", **SMALL)
    with pytest.raises(ValueError, match="context_radius_um"):
        MoLF(a, embedding_key="X_feat", spatial_context="graph", context_radius_um=0.0, **SMALL)
