from __future__ import annotations

import numpy as np
import pytest

from histoflow.datasets import eight_gaussians


def _means(radius: float = 3.0) -> np.ndarray:
    k = np.arange(8)
    return radius * np.stack([np.cos(k * np.pi / 4), np.sin(k * np.pi / 4)], axis=1)


def test_shapes_and_dtypes():
    c, z, k = eight_gaussians(257, seed=3)
    assert c.shape == (257, 2) and z.shape == (257, 2) and k.shape == (257,)
    assert c.dtype == np.float32 and z.dtype == np.float32 and k.dtype == np.int64
    assert k.min() >= 0 and k.max() <= 7


def test_condition_on_unit_circle_and_mode_matches_angle():
    c, _, k = eight_gaussians(4000, seed=0)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-5)
    theta = np.mod(np.arctan2(c[:, 1].astype(np.float64), c[:, 0].astype(np.float64)), 2 * np.pi)
    expected = np.floor(4 * theta / np.pi).astype(int)
    # float32 rounding may move an angle sitting exactly on a sector boundary; allow a handful
    assert np.mean(expected == k) > 0.999


def test_samples_near_their_mode_mean():
    sigma2 = 0.01
    _, z, k = eight_gaussians(8000, seed=1)
    mu = _means()[k]
    dist = np.linalg.norm(z - mu, axis=1)
    assert dist.max() < 6 * np.sqrt(sigma2)
    for m in range(8):
        zm = z[k == m]
        np.testing.assert_allclose(zm.mean(0), _means()[m], atol=0.02)
        np.testing.assert_allclose(zm.var(0), sigma2, rtol=0.2)


def test_mode_frequencies_roughly_uniform():
    _, _, k = eight_gaussians(8000, seed=2)
    counts = np.bincount(k, minlength=8)
    assert counts.sum() == 8000
    assert counts.min() > 850 and counts.max() < 1150


def test_radius_and_sigma2_are_honoured():
    _, z, k = eight_gaussians(500, seed=0, radius=5.0, sigma2=0.0)
    np.testing.assert_allclose(z, _means(5.0)[k], atol=1e-5)
    _, z_wide, k_wide = eight_gaussians(4000, seed=0, sigma2=0.25)
    assert np.linalg.norm(z_wide - _means()[k_wide], axis=1).std() > 0.2


def test_seed_reproducible():
    a = eight_gaussians(100, seed=7)
    b = eight_gaussians(100, seed=7)
    c = eight_gaussians(100, seed=8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[1], c[1])
    g = np.random.default_rng(7)
    d = eight_gaussians(100, seed=g)
    np.testing.assert_array_equal(d[1], a[1])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 0}, "`n` must be a positive integer"),
        ({"n": 2.5}, "`n` must be a positive integer"),
        ({"n": True}, "`n` must be a positive integer"),
        ({"radius": -1.0}, "`radius` must be positive"),
        ({"radius": float("nan")}, "`radius` must be positive"),
        ({"sigma2": -0.1}, "`sigma2` must be non-negative"),
    ],
)
def test_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        eight_gaussians(**kwargs)
