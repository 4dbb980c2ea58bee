"""MoLF's eight-Gaussian check (Table 1) in miniature: the MoE velocity learns the condition → mode map.

The same code path as ``benchmarks/eight_gaussians.py``: ``eight_gaussians`` data, ``LatentFlow.loss`` (linear path,
N(0, I) prior, target ``z1 − z0``, load balancing) and ``LatentFlow.sample`` (Euler) around a top-1 MoE
``VelocityField`` of eight width-32 Transformer experts; the condition ``(cos θ, sin θ)`` is used as is.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from histoflow.datasets import eight_gaussians
from histoflow.models._flow import LatentFlow
from histoflow.models._velocity import VelocityField

_ANGLES = np.arange(8) * np.pi / 4
_MEANS = 3.0 * np.stack([np.cos(_ANGLES), np.sin(_ANGLES)], axis=1)  # the eight mode means (radius 3)


class _IdentityCondition(nn.Module):
    """``c`` passed through unchanged, with the ``null`` condition :class:`LatentFlow` expects."""

    def __init__(self) -> None:
        super().__init__()
        self.null = nn.Parameter(torch.zeros(2), requires_grad=False)

    def forward(self, feats, offsets=None, valid=None, meta=None, drop=None):
        return feats, None


def _sample_scores(model: LatentFlow, steps: int) -> dict[str, float]:
    """Generate one point per held-out condition; distances to the condition's own mode mean."""
    cond, _, mode = eight_gaussians(1000, seed=123)
    z0 = torch.randn(1000, 2, generator=torch.Generator().manual_seed(5))
    model.eval()
    z = model.sample(torch.from_numpy(cond), z0, steps=steps)["z1"].numpy()
    model.train()
    d = np.linalg.norm(z[:, None, :] - _MEANS[None], axis=2)  # (n, 8)
    own = d[np.arange(len(mode)), mode]
    return {
        "nearest": float(np.mean(d.argmin(1) == mode)),  # closest mode mean is the right one
        "in_3sigma": float(np.mean(own < 0.3)),
        "dist": float(own.mean()),
    }


@pytest.fixture
def one_thread():
    """Tiny models train fastest (and steadiest on shared CPUs) on one thread; restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_moe_flow_matching_moves_samples_to_the_conditions_mode(one_thread):
    torch.manual_seed(0)
    cond, z, _ = eight_gaussians(20_000, seed=0)
    cond, z = torch.from_numpy(cond), torch.from_numpy(z)
    velocity = VelocityField(
        latent_dim=2, cond_dim=2, velocity="moe", n_experts=8, top_k=1, expert="transformer", expert_width=32,
        expert_heads=1,
    )  # fmt: skip
    model = LatentFlow(_IdentityCondition(), velocity)
    before = _sample_scores(model, steps=5)
    # untrained: samples stay near the origin, about 3 away from every mode
    assert before["nearest"] < 0.3
    assert before["in_3sigma"] < 0.02
    assert before["dist"] > 2.5

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    loads, flows = [], []
    for _ in range(200):
        idx = torch.randint(0, len(z), (256,), generator=gen)
        out = model.loss(
            {"z1": z[idx], "feats": cond[idx]}, nn.Identity(), p_uncond=0.0, lambda_gene=0.0, lambda_aux=0.01
        )
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        loads.append(out["load"])
        flows.append(out["flow"].item())

    after = _sample_scores(model, steps=5)
    # samples now go to their condition's mode (not to a neighbouring or an averaged one)
    assert after["nearest"] > 0.6
    assert after["dist"] < 0.5 * before["dist"]
    assert after["in_3sigma"] > 0.05
    assert np.mean(flows[-20:]) < 0.8 * np.mean(flows[:20])
    # top-1 gating is Switch-style (the chosen expert scaled by its softmax probability), so the router learns from
    # the flow loss; at this budget and λ_aux = 0.01 that concentrates the routing on a few experts (measured: 2 of 8),
    # but it must not collapse onto a single one
    load = torch.stack(loads[-50:]).mean(0)
    assert load.shape == (8,)
    torch.testing.assert_close(load.sum(), torch.tensor(1.0))
    assert (load > 0.05).sum() >= 2, load
    assert load.max() < 0.9, load
    assert velocity.block.renormalize is False
