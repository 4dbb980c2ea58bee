from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from histoflow.models._flow import LatentFlow
from histoflow.models._moe import DenseBlock, MixtureOfExperts, MLPExpert, TokenTransformerExpert
from histoflow.models._vae import GeneVAE, masked_mse
from histoflow.models._velocity import ConditionEncoder, VelocityField, sinusoidal_2d, timestep_embedding


def test_moe_routes_top_k_and_matches_dense_computation():
    torch.manual_seed(0)
    moe = MixtureOfExperts(8, lambda: MLPExpert(8, 16, 3), n_experts=5, top_k=2, gate_noise=0.0).eval()
    x = torch.randn(40, 8)
    y, info = moe(x)
    w = info["weights"]
    assert ((w > 0).sum(1) == 2).all()
    torch.testing.assert_close(w.sum(1), torch.ones(40))
    dense = sum(w[:, e : e + 1] * moe.experts[e](x) for e in range(5))
    torch.testing.assert_close(y, dense, rtol=1e-5, atol=1e-6)
    # the top-2 are the two largest router logits
    top = moe.gate(x).topk(2).indices.sort(1).values
    torch.testing.assert_close(torch.nonzero(w > 0)[:, 1].view(40, 2).sort(1).values, top)
    assert info["load"].sum().item() == pytest.approx(1.0)


def test_load_balancing_loss_is_one_when_uniform_and_larger_when_collapsed():
    moe = MixtureOfExperts(4, lambda: MLPExpert(4, 8, 2), n_experts=4, top_k=1, gate_noise=0.0)
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))  # everything to expert 0
    _, info = moe(torch.randn(64, 4))
    assert info["aux"].item() > 2.5  # E * f_0 * P_0 ≈ 4 * 1 * 0.96
    assert info["load"][0].item() == 1.0
    with torch.no_grad():
        moe.gate.bias.zero_()
        moe.gate.weight.copy_(torch.eye(4))
    x = torch.eye(4).repeat(16, 1) * 10  # each input strongly prefers a different expert
    _, info = moe(x)
    assert info["aux"].item() == pytest.approx(1.0, abs=1e-3)


def test_an_idle_expert_still_gets_a_zero_gradient_in_training():
    # DDP refuses a step where a parameter took no part in the loss; an expert routed no input must still take part
    torch.manual_seed(0)
    moe = MixtureOfExperts(4, lambda: MLPExpert(4, 8, 2), n_experts=3, top_k=1, gate_noise=0.0)
    x = torch.randn(6, 4)
    weights = torch.nn.functional.one_hot(torch.tensor([0, 1, 0, 1, 0, 1]), 3).float()  # expert 2 gets nothing
    y, _ = moe(x, weights=weights)
    y.sum().backward()
    idle = list(moe.experts[2].parameters())
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in idle)
    assert any(torch.count_nonzero(p.grad) > 0 for p in moe.experts[0].parameters())
    moe.zero_grad(set_to_none=True)
    moe.eval()  # at inference the idle expert is not touched at all
    moe(x, weights=weights)[0].sum().backward()
    assert all(p.grad is None for p in moe.experts[2].parameters())
    np.testing.assert_allclose(moe(x, weights=weights)[0].detach().numpy(), y.detach().numpy(), rtol=1e-6)


def test_dense_block_and_transformer_expert():
    exp = TokenTransformerExpert([3, 2, 5], width=8, out_dim=4, n_heads=2)
    assert exp(torch.randn(6, 10)).shape == (6, 4)
    d = DenseBlock(lambda: MLPExpert(10, 16, 4))
    y, info = d(torch.randn(6, 10))
    assert y.shape == (6, 4) and info["weights"].shape == (6, 1) and info["aux"].item() == 0


def test_masked_genes_never_count():
    torch.manual_seed(0)
    vae = GeneVAE(
        12, latent_dim=4, d_model=16, n_heads=2, ff_dim=32, decoder_hidden=(16,), dropout=0.0, value_path=True
    )
    vae.eval()
    torch.nn.init.normal_(vae.value_path.weight)  # the value path starts at zero: make it count here
    x = torch.rand(5, 12)
    mask = torch.ones(5, 12, dtype=torch.bool)
    mask[:, 8:] = False
    garbage = x.clone()
    garbage[:, 8:] = 1e6
    mu1, _ = vae.encode(x, mask)
    mu2, _ = vae.encode(garbage, mask)
    torch.testing.assert_close(mu1, mu2)
    pred = torch.zeros(5, 12)
    assert masked_mse(pred, garbage, mask).item() == pytest.approx(masked_mse(pred, x, mask).item())


def test_vae_value_path_starts_at_zero_and_carries_the_values():
    torch.manual_seed(0)
    x = torch.randn(128, 12)  # independent genes: no low-dimensional shortcut, every value must reach the latent
    vae = GeneVAE(
        12, latent_dim=16, d_model=16, n_heads=2, ff_dim=32, decoder_hidden=(64,), dropout=0.0, value_path=True
    )
    assert vae.value_path.weight.abs().sum() == 0 and vae.value_path.bias.abs().sum() == 0
    # the class token's branch silenced: whatever the latent knows comes through the value path
    torch.nn.init.zeros_(vae.to_stats.weight)
    torch.nn.init.zeros_(vae.to_stats.bias)
    vae.to_stats.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(200):
        out = vae.loss(x, None, beta=1e-7)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    with torch.no_grad():
        assert masked_mse(vae.decode(vae.encode(x)[0]), x, None).item() < 0.1  # each gene's variance is 1
    off = GeneVAE(12, latent_dim=16, d_model=16, n_heads=2, ff_dim=32, decoder_hidden=(64,))  # off by default
    assert off.value_path is None and not any(k.startswith("value_path") for k in off.state_dict())
    assert off.encode(x)[0].shape == (128, 16)


def test_vae_groups_genes_into_tokens_for_large_panels():
    vae = GeneVAE(300, latent_dim=8, d_model=16, n_heads=2, ff_dim=32, max_tokens=64)
    assert vae.genes_per_token == 5 and vae.n_tokens == 60
    out = vae.loss(torch.rand(3, 300), torch.ones(3, 300, dtype=torch.bool), beta=1e-3)
    assert set(out) == {"loss", "rec", "kl"} and torch.isfinite(out["loss"])
    vae2 = GeneVAE(301, latent_dim=8, d_model=16, n_heads=2, ff_dim=32, max_tokens=64)
    assert vae2.pad == vae2.n_tokens * vae2.genes_per_token - 301
    assert vae2.encode(torch.rand(2, 301))[0].shape == (2, 8)


def test_encodings():
    e = timestep_embedding(torch.tensor([0.0, 0.5]), 7)
    assert e.shape == (2, 7) and torch.allclose(e[0, :3], torch.ones(3))
    p = sinusoidal_2d(torch.tensor([[0.0, 0.0], [100.0, -50.0]]), 32)
    assert p.shape == (2, 32) and not torch.allclose(p[0], p[1])
    # at offset 0: sin 0 then cos 1 for x and for y; a width not divisible by 4 ends in zeros
    torch.testing.assert_close(p[0], torch.tensor(([0.0] * 8 + [1.0] * 8) * 2))
    odd = sinusoidal_2d(torch.tensor([[100.0, -50.0]]), 34)
    torch.testing.assert_close(odd[0, :32], p[1])
    torch.testing.assert_close(odd[0, 32:], torch.zeros(2))


def _flow(spatial=None, meta=(3,), velocity="moe", prediction="velocity"):
    cond = ConditionEncoder(6, 16, spatial_context=spatial, n_heads=2, metadata_sizes=meta, tokens_per_value=2)
    vel = VelocityField(4, 16, time_dim=8, velocity=velocity, n_experts=3, top_k=1, expert_width=8)
    return LatentFlow(cond, vel, prediction=prediction)


def test_condition_uses_neighbour_offsets_and_metadata():
    torch.manual_seed(0)
    flow = _flow(spatial="window").eval()
    feats = torch.randn(2, 4, 6)
    offs = torch.randn(2, 4, 2) * 100
    offs[:, 0] = 0
    valid = torch.ones(2, 4, dtype=torch.bool)
    meta = torch.tensor([[0], [1]])
    c1, attn = flow.condition(feats, offs, valid, meta)
    assert attn.shape == (2, 4 + 2)  # 4 memory tokens + 2 tokens of the value
    moved = offs.clone()
    moved[:, 1:] += 300.0  # neighbours moved: context changes
    c2, _ = flow.condition(feats, moved, valid, meta)
    assert not torch.allclose(c1, c2)
    c3, _ = flow.condition(feats, offs, valid, torch.tensor([[2], [2]]))
    assert not torch.allclose(c1, c3)
    # padded neighbours do not matter
    v2 = valid.clone()
    v2[:, 3] = False
    f2 = feats.clone()
    f2[:, 3] = 1e3
    torch.testing.assert_close(flow.condition(feats, offs, v2, meta)[0], flow.condition(f2, offs, v2, meta)[0])
    # null token for unknown metadata, null condition for dropped rows
    cn, _ = flow.condition(feats, offs, valid, torch.tensor([[-1], [-1]]), drop=torch.tensor([True, False]))
    torch.testing.assert_close(cn[0], flow.condition.null)


class _Counting(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls, self.rows = inner, 0, []

    def forward(self, z, t, c, gate_input=None, **kwargs):
        self.calls += 1
        self.rows.append(z.shape[0])
        return self.inner(z, t, c, gate_input, **kwargs)


def _counted_flow() -> tuple[LatentFlow, _Counting]:
    """A seeded small flow in eval mode whose velocity network counts its calls and their rows."""
    torch.manual_seed(0)
    flow = _flow().eval()
    flow.velocity = _Counting(flow.velocity)
    return flow, flow.velocity


def test_one_step_is_one_velocity_evaluation_and_guidance_batches_two_passes():
    flow, counter = _counted_flow()
    c = torch.randn(5, 16)
    z0 = torch.randn(5, 4)
    out = flow.sample(c, z0, steps=1, guidance=1.0)
    assert counter.calls == 1 and counter.rows == [5]
    v, _ = counter.inner(z0, torch.zeros(1), c)
    torch.testing.assert_close(out["z1"], z0 + v)
    counter.calls, counter.rows = 0, []
    out = flow.sample(c, z0, steps=1, guidance=3.0)
    assert counter.calls == 1 and counter.rows == [10]  # conditional and null branch in one forward pass
    vu, _ = counter.inner(z0, torch.zeros(1), flow.condition.null.expand_as(c))
    torch.testing.assert_close(out["z1"], z0 + vu + 3.0 * (v - vu), rtol=1e-5, atol=1e-5)
    counter.calls = 0
    out = flow.sample(c, z0, steps=4, guidance=1.0, record=True)
    assert counter.calls == 4 and out["trajectory"].shape == (5, 5, 4)
    with pytest.raises(ValueError, match="steps"):
        flow.sample(c, z0, steps=0)


def test_guided_draws_from_one_point_evaluate_the_null_branch_once():
    flow, counter = _counted_flow()
    c = torch.randn(5, 16)
    for z0 in (torch.zeros(5, 4), torch.randn(1, 4).expand(5, 4)):  # the prior mean (temperature 0), any one point
        out = flow.sample(c, z0, steps=1, guidance=3.0)
        assert counter.rows == [5, 1]  # the null branch sees no spot's condition: one row is every row's
        v, info = counter.inner(z0, torch.zeros(1), c)
        vu, _ = counter.inner(z0, torch.zeros(1), flow.condition.null.expand_as(c))
        torch.testing.assert_close(out["z1"], z0 + vu + 3.0 * (v - vu), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["routing"], info["weights"])
        counter.rows = []
    # the rows part after the first step: both branches in one batched pass again
    out = flow.sample(c, torch.zeros(5, 4), steps=3, guidance=3.0)
    assert counter.rows == [5, 1, 10, 10]
    counter.rows = []
    z0 = torch.zeros(5, 4)
    z0[2, 1] = 1e-3  # one row elsewhere: both branches per row
    flow.sample(c, z0, steps=1, guidance=3.0)
    assert counter.rows == [10]


def test_flow_loss_terms_and_gradients():
    torch.manual_seed(0)
    flow = _flow(velocity="dense")
    dec = torch.nn.Linear(4, 7)
    batch = {
        "feats": torch.randn(8, 6),
        "meta": torch.zeros(8, 1, dtype=torch.long),
        "z1": torch.randn(8, 4),
        "x": torch.rand(8, 7),
        "mask": torch.ones(8, 7, dtype=torch.bool),
    }
    out = flow.loss(batch, dec)
    assert {"loss", "flow", "gene", "aux", "load"} <= set(out)
    out["loss"].backward()
    assert flow.condition.proj[1].weight.grad is not None
    np.testing.assert_allclose(out["aux"].item(), 0.0)


class _Endpoint(torch.nn.Module):
    """A network whose output is ``target(c)`` whatever the state and time."""

    def __init__(self, target):
        super().__init__()
        self.target = target

    def forward(self, z, t, c, gate_input=None, **kwargs):
        return self.target(c), {"weights": torch.ones(z.shape[0], 1), "aux": z.sum() * 0, "load": torch.ones(1)}


def test_endpoint_prediction_derives_the_velocity_and_lands_on_the_endpoint():
    torch.manual_seed(0)
    flow = _flow(prediction="endpoint").eval()
    target = torch.nn.Linear(16, 4)
    flow.velocity = _Endpoint(target)
    c, z0 = torch.randn(5, 16), torch.randn(5, 4)
    with torch.no_grad():
        want, null = target(c), target(flow.condition.null.expand_as(c))
    # one step, many steps, with guidance: every draw lands on the (guided) endpoint, whatever the noise
    for steps, w in ((1, 1.0), (1, 2.5), (7, 1.0), (3, 0.5)):
        guided = null + w * (want - null)
        for noise in (z0, 3 * torch.randn(5, 4)):
            out = flow.sample(c, noise, steps=steps, guidance=w)["z1"]
            torch.testing.assert_close(out, guided, rtol=1e-5, atol=1e-5)
    # the velocity at (z_t, t) is (endpoint - z_t) / (1 - t)
    t = torch.rand(5, 1)
    v, z1_hat, _ = flow.velocity_and_endpoint(z0, t, c)
    torch.testing.assert_close(z1_hat, want.detach())
    torch.testing.assert_close(v, (want - z0) / (1 - t))
    # the flow term is the endpoint error; the gene term decodes the endpoint
    dec = torch.nn.Linear(4, 7)
    batch = {"feats": torch.randn(8, 6), "z1": torch.randn(8, 4), "x": torch.rand(8, 7)}
    out = flow.loss(batch, dec, p_uncond=0.0, p_meta_drop=0.0)
    with torch.no_grad():
        c8, _ = flow.condition(batch["feats"], None, None, None)
        e = target(c8)
        np.testing.assert_allclose(out["flow"].item(), torch.mean((e - batch["z1"]) ** 2).item(), rtol=1e-5)
        np.testing.assert_allclose(out["gene"].item(), torch.mean((dec(e) - batch["x"]) ** 2).item(), rtol=1e-5)
    # the velocity network (default) keeps the paper's velocity target
    vflow = _flow().eval()
    vflow.condition, vflow.velocity = flow.condition, _Endpoint(target)
    out = vflow.loss(batch, dec, p_uncond=0.0, p_meta_drop=0.0, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    torch.rand(8, generator=g)  # the guidance-dropout draw
    z0 = torch.randn(8, 4, generator=g)
    with torch.no_grad():
        np.testing.assert_allclose(out["flow"].item(), torch.mean((e - (batch["z1"] - z0)) ** 2).item(), rtol=1e-5)
    with pytest.raises(ValueError, match="prediction"):
        _flow(prediction="x0")


def test_condition_router_ignores_state_and_time():
    torch.manual_seed(0)
    vel = VelocityField(4, 6, time_dim=8, n_experts=4, top_k=1, expert_width=8, router="condition").eval()
    c = torch.randn(10, 6)
    _, a = vel(torch.randn(10, 4), torch.zeros(1), c)
    _, b = vel(torch.randn(10, 4) * 5, torch.full((1,), 0.7), c)
    torch.testing.assert_close(a["weights"], b["weights"])
    inp = VelocityField(4, 6, time_dim=8, n_experts=4, top_k=1, expert_width=8).eval()
    assert inp.block.gate.in_features == 4 + 8 + 6 and vel.block.gate.in_features == 6
    with pytest.raises(ValueError, match="router"):
        VelocityField(4, 6, router="nope")


def test_window_context_computes_only_the_centre_token_exactly():
    """The centre-only last layer equals the full Transformer's first output token (1 and 2 layers, padding)."""
    torch.manual_seed(0)
    for layers in (1, 2):
        enc = ConditionEncoder(32, 64, spatial_context="window", context_layers=layers).eval()
        h = torch.randn(5, 9, 64)
        off = torch.randn(5, 9, 2) * 100
        valid = torch.ones(5, 9, dtype=torch.bool)
        valid[1, 4:] = False
        valid[3, 1:] = False  # a spot with no neighbour
        hh = h + sinusoidal_2d(off, 64)
        full = enc.context(hh, src_key_padding_mask=~valid)[:, 0]
        torch.testing.assert_close(enc._window_centre(hh, ~valid), full, atol=1e-5, rtol=1e-5)
        c, _ = enc.forward_projected(h, off, valid)
        torch.testing.assert_close(c, enc.context_norm(full), atol=1e-5, rtol=1e-5)


def test_metadata_attention_projects_table_rows_once_exactly():
    """Keys/values projected per embedding row and gathered equal nn.MultiheadAttention over the spot's tokens."""
    torch.manual_seed(0)
    enc = ConditionEncoder(8, 32, spatial_context=None, n_heads=4, metadata_sizes=(3, 5), tokens_per_value=2).eval()
    c = torch.randn(7, 32)
    meta = torch.tensor([[0, 4], [1, -1], [2, 0], [-1, -1], [0, 1], [2, 3], [1, 2]])
    for codes in (meta, None):  # None: every field unknown (null tokens)
        kv = enc.metadata_tokens(codes, 7)
        assert kv.shape == (7, 4 + 2 * 2, 32)
        ref, ref_w = enc.cross(c[:, None], kv, kv, need_weights=True)
        out, w = enc._metadata_attention(c, codes)
        torch.testing.assert_close(out, ref[:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(w, ref_w[:, 0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(w.sum(1), torch.ones(7))
    # the unknown code of a field uses that field's null row, not another value's
    unknown = enc._metadata_attention(c, torch.tensor([[-1, 0]] * 7))[0]
    known = enc._metadata_attention(c, torch.tensor([[0, 0]] * 7))[0]
    assert not torch.allclose(unknown, known)
    # in training the weights get attention dropout, and gradients reach the embeddings and the memory
    enc.train()
    out, _ = enc._metadata_attention(c, meta)
    out.sum().backward()
    assert enc.meta[1].weight.grad.abs().sum() > 0 and enc.memory.grad.abs().sum() > 0


def test_router_init_from_kmeans_sends_each_cluster_to_its_own_expert():
    torch.manual_seed(0)
    centres = torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, 0.0], [0.0, -4.0]])
    label = torch.arange(400) % 4
    r = centres[label] + 0.3 * torch.randn(400, 2)
    moe = MixtureOfExperts(5, lambda: torch.nn.Linear(5, 3), n_experts=4, top_k=1, gate_dim=2)
    before = moe.gate(r).argmax(1)
    mu = moe.init_router(r, seed=0)
    assert mu.shape == (4, 2)
    after = moe.gate(r).argmax(1)
    # every cluster goes wholly to one expert, and each to a different one
    owner = [int(after[label == k].mode().values) for k in range(4)]
    assert sorted(owner) == [0, 1, 2, 3]
    assert all(bool((after[label == k] == owner[k]).all()) for k in range(4))
    # the arg max is the nearest centroid
    nearest = torch.cdist(r, mu).argmin(1)
    assert torch.equal(after, nearest) and not torch.equal(before, after)
    # sharper routers: larger logit gaps, same partition
    gap = lambda m: m.gate(r).topk(2).values.diff(dim=1).abs().mean()  # noqa: E731
    g3 = gap(moe)
    moe.init_router(r, seed=0, sharpness=30.0)
    assert gap(moe) > 5 * g3 and torch.equal(moe.gate(r).argmax(1), after)
    with pytest.raises(ValueError, match="shape"):
        moe.init_router(torch.randn(10, 3))
    with pytest.raises(ValueError, match="at least 4 finite rows"):
        moe.init_router(torch.randn(3, 2))
    with pytest.raises(ValueError, match="sharpness"):
        moe.init_router(r, sharpness=0)
    hard = MixtureOfExperts(5, lambda: torch.nn.Linear(5, 3), n_experts=4, gate_dim=0)
    with pytest.raises(ValueError, match="no learned router"):
        hard.init_router(r)


def test_encoder_record_keeps_scalars_and_numeric_lists_as_json():
    """The registry's copy of ``uns[embedding_key]``: what anndata reads back (numpy scalars, arrays) as JSON types."""
    import json

    from histoflow.models._data import encoder_record

    record = {
        "encoder": "efficientnet_lite0",
        "patch_px": np.int64(224),
        "patch_size_um": 112.0,
        "dihedral": np.bool_(True),
        "context_size_um": np.array([224.0, 448.0]),
        "none_given": np.array([], dtype=float),
        "mean": [0.485, 0.456, 0.406],
        "names": np.array(["a", "b"]),
        "nested": {"a": 1},
        "matrix": np.zeros((2, 2)),
    }
    out = encoder_record(record)
    assert out == {
        "encoder": "efficientnet_lite0",
        "patch_px": 224,
        "patch_size_um": 112.0,
        "dihedral": True,
        "context_size_um": [224.0, 448.0],
        "none_given": [],
        "mean": [0.485, 0.456, 0.406],
    }
    assert type(out["patch_px"]) is int and type(out["dihedral"]) is bool
    assert json.loads(json.dumps(out)) == out
    assert encoder_record(None) == {} and encoder_record("X") == {}


def test_centre_attention_equals_multihead_attention_with_its_gradients():
    """One query (the first token) without per-token keys/values: nn.MultiheadAttention's output and gradients."""
    from histoflow.models._velocity import centre_attention

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, dropout=0.3, batch_first=True)
    with torch.no_grad():  # non-zero biases: the key bias must cancel, the value bias must be carried
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    h = torch.randn(6, 7, 32, requires_grad=True)
    pad = torch.zeros(6, 7, dtype=torch.bool)
    pad[2, 3:] = True
    pad[4, 1:] = True  # only the query token itself
    mha.eval()
    ref = mha(h[:, :1], h, h, key_padding_mask=pad, need_weights=False)[0][:, 0]
    new = centre_attention(mha, h, pad, training=False)
    torch.testing.assert_close(new, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    grads_ref = torch.autograd.grad((ref * g).sum(), (h, mha.in_proj_weight, mha.in_proj_bias))
    grads_new = torch.autograd.grad((new * g).sum(), (h, mha.in_proj_weight, mha.in_proj_bias))
    for a, b in zip(grads_new, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # training: dropout on the attention weights, unbiased (the output is linear in the weights)
    one = h[:1].detach().expand(20000, -1, -1)
    with torch.no_grad():
        train = centre_attention(mha, one, None, training=True)
        ev = centre_attention(mha, one[:1], None, training=False)
    assert not torch.allclose(train[0], train[1])
    torch.testing.assert_close(train.mean(0), ev[0], atol=0.03, rtol=0)


def test_features_uses_every_row_in_place_and_copies_a_selection():
    """All rows in order of a float32 table are read without a copy; a selection, other dtypes and bad input copy."""
    import anndata as ad

    from histoflow.models._data import features

    a = ad.AnnData(np.zeros((5, 2), dtype=np.float32))
    a.obsm["X_enc"] = np.arange(15, dtype=np.float32).reshape(5, 3)
    every = features(a, "X_enc", np.arange(5), dim=3)
    assert np.shares_memory(every, a.obsm["X_enc"])
    some = features(a, "X_enc", np.array([4, 0]))
    assert not np.shares_memory(some, a.obsm["X_enc"])
    np.testing.assert_array_equal(some, a.obsm["X_enc"][[4, 0]])
    shuffled = features(a, "X_enc", np.array([1, 0, 2, 3, 4]))
    np.testing.assert_array_equal(shuffled[:2], a.obsm["X_enc"][[1, 0]])
    a.obsm["X_enc"] = a.obsm["X_enc"].astype(np.float64)  # converted, hence a new array
    assert not np.shares_memory(features(a, "X_enc", np.arange(5)), a.obsm["X_enc"])
    frozen = np.arange(15, dtype=np.float32).reshape(5, 3)
    frozen.flags.writeable = False  # torch cannot wrap a read-only array: copied
    a.obsm["X_enc"] = frozen
    assert features(a, "X_enc", np.arange(5)).flags.writeable
    a.obsm["X_enc"] = np.full((5, 3), np.nan, dtype=np.float32)
    with pytest.raises(ValueError, match="NaN"):
        features(a, "X_enc", np.arange(5))
    with pytest.raises(ValueError, match="model was trained on 4"):
        features(a, "X_enc", np.arange(5), dim=4)


@pytest.mark.parametrize(("expert", "top_k"), [("mlp", 1), ("mlp", 2), ("transformer", 2), ("mlp", 3)])
def test_grouped_experts_at_inference_give_the_per_expert_sum(expert, top_k, monkeypatch):
    """Without gradients the experts run on inputs grouped by expert: the same sum, bit for bit up to top-2."""
    torch.manual_seed(0)

    def make() -> nn.Module:
        return MLPExpert(8, 16, 3) if expert == "mlp" else TokenTransformerExpert([4, 4], 16, 3, n_heads=2)

    moe = MixtureOfExperts(8, make, n_experts=5, top_k=top_k, gate_noise=0.0).eval()
    with torch.no_grad():
        moe.gate.bias[4] = -50.0  # expert 4 is never chosen: an empty group
    x = torch.randn(64, 8)
    ref, ref_info = moe(x)  # gradients enabled: the per-expert path
    assert ref.requires_grad and ref_info["load"][4].item() == 0.0
    with torch.no_grad():
        got, info = moe(x)
        per_expert = moe._per_expert(x, info["gates"])  # the same experts without gradients (Transformer fast path)
    if top_k <= 2:
        assert torch.equal(got, per_expert)
    else:
        torch.testing.assert_close(got, per_expert, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(info["weights"], ref_info["weights"].detach())
    dense = sum(info["gates"][:, e : e + 1] * moe.experts[e](x) for e in range(5))
    torch.testing.assert_close(got, dense.detach(), rtol=1e-5, atol=1e-6)

    def refuse(*args, **kwargs):
        raise AssertionError("the per-expert path ran")

    monkeypatch.setattr(MixtureOfExperts, "_per_expert", refuse)
    with torch.no_grad():
        assert torch.equal(moe(x)[0], got)  # the grouped path ran
        with pytest.raises(AssertionError, match="per-expert"):
            moe(x, weights=info["weights"])  # given weights (any number of experts per row) take the per-expert path
