"""FastDropout: torch's dropout distribution with cheap masks on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from histoflow.models import GeneVAE
from histoflow.models._dropout import FastDropout, use_fast_dropout
from histoflow.models._velocity import ConditionEncoder


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.9])
def test_drop_rate_scale_and_independence_match_dropout(p):
    torch.manual_seed(0)
    drop = FastDropout(p).train()
    y = drop(torch.ones(1000, 1001)).numpy()  # an odd number of entries: not a multiple of four
    dropped = y == 0
    assert abs(dropped.mean() - p) < 0.003
    kept = y[~dropped]
    np.testing.assert_allclose(kept, 1 / (1 - dropped.mean()), rtol=2e-3)  # kept entries are scaled by 1 / (1 - p)
    assert abs(y.mean() - 1) < 0.005  # the expectation is the input
    # the four entries sharing one 64-bit draw, and neighbouring draws, are dropped independently
    flat = dropped.ravel()[: 4 * (dropped.size // 4)].reshape(-1, 4)
    for a, b in [(0, 1), (1, 2), (2, 3), (0, 3)]:
        assert abs((flat[:, a] & flat[:, b]).mean() - p * p) < 0.004
    assert abs((flat[:-1, 3] & flat[1:, 0]).mean() - p * p) < 0.004


def test_identity_in_eval_mode_and_at_zero_and_gradient_is_the_mask():
    x = torch.randn(7, 5, requires_grad=True)
    assert FastDropout(0.3).eval()(x) is x
    assert FastDropout(0.0).train()(x) is x
    torch.manual_seed(1)
    y = FastDropout(0.3).train()(x)
    y.sum().backward()
    mask = (y / x).detach()  # 0 or the scale, entry by entry
    torch.testing.assert_close(x.grad, mask)
    scale = 65536 / (65536 - 19661)  # 0.3 of the 2^16 levels, rounded, are dropped
    m = mask.numpy()
    assert np.all((m == 0) | np.isclose(m, scale, rtol=1e-6)) and (m == 0).any() and (m > 0).any()


def test_same_seed_same_masks():
    x = torch.ones(64, 26, 128)
    torch.manual_seed(3)
    a = FastDropout(0.1).train()(x)
    torch.manual_seed(3)
    b = FastDropout(0.1).train()(x)
    torch.manual_seed(4)
    c = FastDropout(0.1).train()(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("p", [-0.1, 1.0, float("nan"), "0.1", True])
def test_bad_probability_is_refused(p):
    with pytest.raises(ValueError, match="`p` must be a number in"):
        FastDropout(p)


def test_molf_modules_use_it_and_attention_dropout_is_kept():
    layer = nn.TransformerEncoderLayer(16, 2, 32, 0.2, batch_first=True)
    enc = use_fast_dropout(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    for lay in enc.layers:
        assert all(
            isinstance(getattr(lay, n), FastDropout) and getattr(lay, n).p == 0.2 for n in ("dropout", "dropout1")
        )
        assert lay.self_attn.dropout == 0.2  # inside MultiheadAttention: torch's own
    assert not any(type(m) is nn.Dropout for m in enc.modules())
    vae = GeneVAE(12, latent_dim=4, d_model=16, n_heads=2, ff_dim=32, decoder_hidden=(16,), dropout=0.1)
    assert sum(isinstance(m, FastDropout) for m in vae.modules()) == 3
    for context in ("window", "graph"):
        cond = ConditionEncoder(8, 16, spatial_context=context, n_heads=2)
        assert any(isinstance(m, FastDropout) for m in cond.modules())
        assert not any(type(m) is nn.Dropout for m in cond.context.modules())
