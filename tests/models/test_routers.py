"""Routers of the MoE velocity field: top-1 gradient (Switch gating), metadata routers, and MoLF end to end."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from anndata import AnnData

import histoflow as hf
from histoflow.models import MoLF
from histoflow.models._flow import LatentFlow
from histoflow.models._moe import MixtureOfExperts, MLPExpert
from histoflow.models._velocity import ConditionEncoder, VelocityField

TYPES = ["COAD", "IDC", "PRAD"]  # sorted: the category codes are 0, 1, 2


def _vel(router: str, **kw) -> VelocityField:
    kw = {"time_dim": 8, "expert_width": 8, "top_k": 1, "router": router, **kw}
    return VelocityField(4, 6, **kw)


# ------------------------------------------------------------------------------------------------- gating


def test_top1_gate_is_the_full_softmax_probability_and_gets_a_gradient():
    torch.manual_seed(0)
    moe = MixtureOfExperts(5, lambda: MLPExpert(5, 8, 3), n_experts=4, top_k=1, gate_noise=0.0)
    x = torch.randn(32, 5)
    y, info = moe(x)
    p = torch.softmax(moe.gate(x), -1)
    top = p.argmax(1)
    # gates: the chosen expert's full probability (< 1), routing shares: one-hot on it
    torch.testing.assert_close(info["gates"], torch.zeros_like(p).scatter(1, top[:, None], p.max(1, keepdim=True)[0]))
    torch.testing.assert_close(info["weights"], torch.nn.functional.one_hot(top, 4).float())
    assert (info["gates"].sum(1) < 1).all()
    expected = torch.stack([moe.experts[int(e)](x[i : i + 1])[0] * p[i, e] for i, e in enumerate(top)])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    assert moe.renormalize is False
    (y**2).sum().backward()
    grad = moe.gate.weight.grad.abs().sum().item()
    assert grad > 1e-3
    # the renormalised top-1 gate is identically 1: no gradient reaches the router from the output
    old = MixtureOfExperts(5, lambda: MLPExpert(5, 8, 3), n_experts=4, top_k=1, gate_noise=0.0, renormalize=True)
    y_old, info_old = old(x)
    torch.testing.assert_close(info_old["gates"].sum(1), torch.ones(32))
    (y_old**2).sum().backward()
    assert old.gate.weight.grad.abs().sum().item() < 1e-5 * grad  # zero up to rounding of p / p
    # z-loss is mean(logsumexp(logits)^2)
    np.testing.assert_allclose(info["z_loss"].item(), torch.logsumexp(moe.gate(x), -1).pow(2).mean().item(), 1e-5)


def test_top2_gates_stay_renormalised():
    moe = MixtureOfExperts(5, lambda: MLPExpert(5, 8, 3), n_experts=4, top_k=2, gate_noise=0.0)
    _, info = moe(torch.randn(16, 5))
    assert moe.renormalize is True
    torch.testing.assert_close(info["gates"], info["weights"])
    torch.testing.assert_close(info["gates"].sum(1), torch.ones(16))
    assert ((info["gates"] > 0).sum(1) == 2).all()


def test_input_router_top1_learns_from_the_flow_loss():
    torch.manual_seed(0)
    cond = ConditionEncoder(6, 6, spatial_context=None, n_heads=2)
    flow = LatentFlow(cond, _vel("input", n_experts=3))
    batch = {"feats": torch.randn(64, 6), "z1": torch.randn(64, 4), "x": torch.rand(64, 4)}
    out = flow.loss(batch, torch.nn.Identity(), lambda_gene=0.0, lambda_aux=0.0, p_uncond=0.0)
    out["loss"].backward()
    grad = flow.velocity.block.gate.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert flow.velocity.block.gate.in_features == 4 + 8 + 6


# ------------------------------------------------------------------------------------------------- metadata routers


def test_cancer_type_router_is_hard_with_uniform_fallback():
    torch.manual_seed(0)
    vel = _vel("cancer_type", metadata_sizes=[2, 3], cancer_type_field=1).eval()
    assert vel.block.n_experts == 3 and vel.block.gate is None and vel.uses_metadata
    z, c = torch.randn(7, 4), torch.randn(7, 6)
    meta = torch.tensor([[0, 0], [1, 1], [0, 2], [1, 2], [0, -1], [-1, 1], [1, 0]])
    v, info = vel(z, torch.full((1,), 0.3), c, meta=meta)
    expected = torch.tensor(
        [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1], [1 / 3, 1 / 3, 1 / 3], [0, 1, 0], [1, 0, 0]], dtype=torch.float32
    )
    torch.testing.assert_close(info["weights"], expected)
    torch.testing.assert_close(info["gates"], expected)
    assert info["weights"].shape == (7, 3) and info["aux"].item() == 0
    # the output of a known type is exactly its expert's; unknown is the mean of all experts
    x = vel.norm(torch.cat([z, hf.models._velocity.timestep_embedding(torch.full((7,), 0.3), 8), c], -1))
    torch.testing.assert_close(v[1], vel.block.experts[1](x[1:2])[0])
    torch.testing.assert_close(v[4], sum(e(x[4:5])[0] for e in vel.block.experts) / 3)
    # routing ignores the image and the state
    _, info2 = vel(z * 3, torch.full((1,), 0.9), c + 1, meta=meta)
    torch.testing.assert_close(info["weights"], info2["weights"])


def test_image_metadata_router_depends_on_metadata_and_image():
    torch.manual_seed(0)
    vel = _vel("image+metadata", metadata_sizes=[3, 2], n_experts=4, top_k=2).eval()
    assert vel.block.gate.in_features == 6 + 2 * 16
    z, c, t = torch.randn(8, 4), torch.randn(8, 6), torch.full((1,), 0.5)
    m0 = torch.zeros(8, 2, dtype=torch.long)
    _, a = vel(z, t, c, meta=m0)
    _, b = vel(z, t, c, meta=m0 + torch.tensor([2, 1]))  # only the metadata changes
    assert not torch.allclose(a["probs"], b["probs"])
    _, d = vel(z, t, c + 2.0, meta=m0)  # only the image condition changes
    assert not torch.allclose(a["probs"], d["probs"])
    _, e = vel(z * 4, torch.full((1,), 0.9), c, meta=m0)  # state and time do not route
    torch.testing.assert_close(a["probs"], e["probs"])
    # unknown (-1) uses the null embedding: finite, and different from every known value
    _, u = vel(z, t, c, meta=torch.full((8, 2), -1))
    assert torch.isfinite(u["probs"]).all() and not torch.allclose(u["probs"], a["probs"])
    torch.testing.assert_close(u["weights"].sum(1), torch.ones(8))


def test_guided_sampling_routes_the_null_branch_as_unknown():
    torch.manual_seed(0)
    cond = ConditionEncoder(6, 6, spatial_context=None, n_heads=2, metadata_sizes=[3], tokens_per_value=2)
    flow = LatentFlow(cond, _vel("cancer_type", metadata_sizes=[3])).eval()
    seen = []
    inner = flow.velocity.forward

    def spy(z, t, c, gate_input=None, *, meta=None):
        seen.append(meta)
        return inner(z, t, c, gate_input, meta=meta)

    flow.velocity.forward = spy
    c, z0, meta = torch.randn(5, 6), torch.randn(5, 4), torch.tensor([[0], [1], [2], [1], [-1]])
    out = flow.sample(c, z0, meta=meta, steps=1, guidance=2.0)
    assert len(seen) == 1 and seen[0].shape == (10, 1)
    torch.testing.assert_close(seen[0][:5], meta)
    assert (seen[0][5:] == -1).all()
    torch.testing.assert_close(out["routing"][:4], torch.nn.functional.one_hot(meta[:4, 0], 3).float())
    torch.testing.assert_close(out["routing"][4], torch.full((3,), 1 / 3))
    # every draw from the prior mean: the null branch runs once, on one row routed as unknown, and gives the same
    seen.clear()
    zero = torch.zeros(5, 4)
    once = flow.sample(c, zero, meta=meta, steps=1, guidance=2.0)
    assert [m.shape for m in seen] == [(5, 1), (1, 1)] and (seen[1] == -1).all()
    torch.testing.assert_close(seen[0], meta)
    v_u, _ = inner(zero, torch.zeros(1), cond.null.expand_as(c), meta=torch.full_like(meta, -1))
    v_c, _ = inner(zero, torch.zeros(1), c, meta=meta)
    torch.testing.assert_close(once["z1"], v_u + 2.0 * (v_c - v_u))
    # training: rows whose condition is dropped route as unknown as well
    seen.clear()
    batch = {"feats": torch.randn(64, 6), "z1": torch.randn(64, 4), "meta": torch.randint(0, 3, (64, 1))}
    batch["x"] = batch["z1"]
    flow.train().loss(batch, torch.nn.Identity(), p_uncond=0.5, p_meta_drop=0.0, lambda_gene=0.0)
    routed = seen[0][:, 0]
    assert ((routed == -1) | (routed == batch["meta"][:, 0])).all() and 10 < (routed == -1).sum() < 54


def test_router_bad_inputs():
    with pytest.raises(ValueError, match="router"):
        _vel("nope")
    with pytest.raises(ValueError, match="metadata_sizes"):
        _vel("cancer_type")
    with pytest.raises(ValueError, match="metadata_keys"):
        _vel("image+metadata")
    with pytest.raises(ValueError, match=r"one expert per cancer type \(3\).*n_experts=5"):
        _vel("cancer_type", metadata_sizes=[3], n_experts=5)
    with pytest.raises(ValueError, match="cancer_type_field"):
        _vel("cancer_type", metadata_sizes=[3], cancer_type_field=1)
    with pytest.raises(ValueError, match="velocity='moe'"):
        _vel("cancer_type", metadata_sizes=[3], velocity="dense")
    vel = _vel("cancer_type", metadata_sizes=[3])
    z, t, c = torch.randn(2, 4), torch.zeros(1), torch.randn(2, 6)
    with pytest.raises(ValueError, match="pass the metadata codes `meta`"):
        vel(z, t, c)
    with pytest.raises(ValueError, match=r"`meta` must have shape \(2, 1\)"):
        vel(z, t, c, meta=torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"codes must be in -1..2.*\[3\]"):
        vel(z, t, c, meta=torch.tensor([[0], [3]]))
    moe = MixtureOfExperts(4, lambda: MLPExpert(4, 8, 2), n_experts=3, top_k=1)
    with pytest.raises(ValueError, match=r"`weights` must have shape \(2, 3\)"):
        moe(torch.randn(2, 4), weights=torch.ones(2, 2))
    with pytest.raises(ValueError, match="gate_noise"):
        MixtureOfExperts(4, lambda: MLPExpert(4, 8, 2), n_experts=3, top_k=1, gate_noise=-1.0)


# ------------------------------------------------------------------------------------------------- MoLF end to end

SMALL = {
    "latent_dim": 4,
    "vae_d_model": 16,
    "vae_heads": 2,
    "vae_ff_dim": 32,
    "cond_dim": 16,
    "expert_width": 16,
    "expert_heads": 2,
    "spatial_context": None,
    "top_k": 1,
}
TRAIN = {"show_progress_bar": False, "patience": 5}


def _table(seed: int = 0) -> AnnData:
    """Six 5×5-grid slides, three cancer types (two slides each), features carrying the expression program."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(np.arange(5), np.arange(5)), -1).reshape(-1, 2)
    obs, prog = [], []
    for s in range(6):
        prog.append(np.column_stack([np.sin(g[:, 0] / 2 + s), np.cos(g[:, 1] / 2 - s)]))
        obs.append(
            pd.DataFrame(
                {
                    "library_id": f"S{s}",
                    "cancer_type": ["IDC", "PRAD", "COAD"][s % 3],
                    "organ": ["breast", "prostate", "bowel"][s % 3],
                    "split": ["train", "train", "train", "val", "val", "test"][s],
                },
                index=[f"S{s}_{i}" for i in range(len(g))],
            )
        )
    obs = pd.concat(obs)
    prog = np.concatenate(prog)
    counts = rng.poisson(np.exp(1.0 + prog @ rng.normal(size=(2, 8)) * 0.8)).astype(np.float32)
    a = AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(8)]))
    a.obs["pixel_size_um"] = 1.0
    a.obsm["spatial"] = np.tile(g * 100.0, (6, 1))
    a.obsm["X_feat"] = np.concatenate([prog, rng.normal(size=(len(obs), 4))], 1).astype(np.float32)
    for col in ("library_id", "cancer_type", "organ", "split"):
        a.obs[col] = a.obs[col].astype("category")
    hf.pp.normalize(a)
    return a


@pytest.mark.parametrize(
    ("router", "extra"),
    [
        ("input", {"n_experts": 3}),
        ("condition", {"n_experts": 3}),
        ("image+metadata", {"n_experts": 3, "metadata_keys": ["cancer_type", "organ"]}),
        ("cancer_type", {}),
    ],
)
def test_fit_molf_each_router_end_to_end_and_save_load(router, extra, tmp_path):
    a = _table()
    model = hf.tl.fit_molf(
        a, embedding_key="X_feat", max_epochs=2, batch_size=50, accelerator="cpu", devices=1, train_kwargs=TRAIN,
        router=router, **extra, **SMALL,
    )  # fmt: skip
    assert model.config.router == router and model.n_experts == 3
    routing = a.obsm["molf_routing"].to_numpy()
    assert routing.shape == (a.n_obs, 3) and np.isfinite(a.obsm["molf"].to_numpy()).all()
    np.testing.assert_allclose(routing.sum(1), 1.0, rtol=1e-5)
    assert ((routing > 0).sum(1) == 1).all()  # top-1 (and the hard router): one expert per spot
    if router == "cancer_type":
        assert model.config.n_experts == 3
        code = pd.Index(TYPES).get_indexer(a.obs["cancer_type"].astype(str))
        np.testing.assert_array_equal(routing, np.eye(3, dtype=np.float32)[code])
    model.save(tmp_path / router)
    loaded = MoLF.load(tmp_path / router, adata=a)
    assert loaded.config.router == router and loaded.n_experts == 3
    for guidance in (1.0, 2.0):
        p1, p2 = model.predict(a, seed=1, guidance=guidance), loaded.predict(a, seed=1, guidance=guidance)
        np.testing.assert_array_equal(p1["mean"], p2["mean"])
        np.testing.assert_array_equal(p1["routing"], p2["routing"])


def test_molf_cancer_type_router_unknown_type_and_bad_inputs():
    a = _table()
    model = MoLF(a, embedding_key="X_feat", router="cancer_type", **SMALL)
    assert model.n_experts == 3 and model.flow.velocity.cancer_type_field == 0
    with pytest.raises(ValueError, match=r"one expert per cancer type \(3 in `obs\['cancer_type'\]`\).*n_experts=5"):
        MoLF(a, embedding_key="X_feat", router="cancer_type", n_experts=5, **SMALL)
    assert MoLF(a, embedding_key="X_feat", router="cancer_type", n_experts=3, **SMALL).n_experts == 3
    with pytest.raises(ValueError, match="needs the cancer type as metadata"):
        MoLF(a, embedding_key="X_feat", router="cancer_type", metadata_keys=[], **SMALL)
    b = a.copy()
    del b.obs["cancer_type"]
    with pytest.raises(ValueError, match="needs the cancer type as metadata"):
        MoLF(b, embedding_key="X_feat", router="cancer_type", **SMALL)
    with pytest.raises(ValueError, match="routes on sample metadata"):
        MoLF(b, embedding_key="X_feat", router="image+metadata", **SMALL)
    with pytest.raises(ValueError, match="router"):
        MoLF(a, embedding_key="X_feat", router="organ", **SMALL)
    # organ as the only other metadata: the cancer type's field index follows metadata_keys
    m2 = MoLF(a, embedding_key="X_feat", router="cancer_type", metadata_keys=["organ", "cancer_type"], **SMALL)
    assert m2.flow.velocity.cancer_type_field == 1
    # an unseen cancer type at prediction: uniform mixture of all experts
    model.train(1, batch_size=50, accelerator="cpu", devices=1, **TRAIN)
    img = a[a.obs["library_id"] == "S5"].copy()
    img.obs["cancer_type"] = "SKCM"
    res = model.predict(img, allow_unknown=True)
    np.testing.assert_allclose(res["routing"], np.full((img.n_obs, 3), 1 / 3), rtol=1e-6)
    assert np.isfinite(res["mean"]).all()


def test_missing_metadata_values_get_the_null_token_not_a_category():
    from histoflow.models._data import metadata_codes

    obs = pd.DataFrame({"cancer_type": ["IDC", None, "PRAD", np.nan, "IDC"]}, index=[f"c{i}" for i in range(5)])
    a = AnnData(np.zeros((5, 1), dtype=np.float32), obs=obs)
    codes, cats = metadata_codes(a, ["cancer_type"], np.arange(5))
    assert cats == {"cancer_type": ["IDC", "PRAD"]}
    assert codes[:, 0].tolist() == [0, -1, 1, -1, 0]
    codes, _ = metadata_codes(a, ["cancer_type"], np.arange(5), cats)  # at prediction, too
    assert codes[:, 0].tolist() == [0, -1, 1, -1, 0]
