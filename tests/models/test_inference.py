"""Inference internals of MoLF: the neighbour windows and the draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histoflow.models import _data
from histoflow.models._data import feature_chunk_rows
from histoflow.models._molf import _draw, _neighbours, _spot_conditions
from histoflow.models._velocity import ConditionEncoder


def _brute_force(coords, libs, radius, k):
    n = len(coords)
    idx = np.full((n, k), -1)
    off = np.zeros((n, k, 2), dtype=np.float32)
    for i in range(n):
        d = np.linalg.norm(coords - coords[i], axis=1)
        cand = [j for j in np.argsort(d, kind="stable") if j != i and libs[j] == libs[i] and d[j] <= radius][:k]
        idx[i, : len(cand)] = cand
        off[i, : len(cand)] = coords[cand] - coords[i]
    return idx, off


@pytest.mark.parametrize("threads", [1, 2])
def test_neighbours_are_the_nearest_spots_of_the_same_slide_within_the_radius(threads):
    rng = np.random.default_rng(0)
    coords = rng.uniform(0, 1000, size=(300, 2))
    libs = rng.choice(np.array(["b", "a", "c"], dtype="<U8"), size=300)  # slides interleaved in the table
    libs[17] = "lonely"  # a slide of one spot: no neighbours
    libs[[4, 5, 6, 7]] = ["pair", "pair", "far", "far"]
    coords[5] = coords[4] + [120.0, 160.0]  # exactly 200 µm apart: within a 200 µm radius
    coords[7] = coords[6] + [0.0, 200.01]  # just beyond it
    old = torch.get_num_threads()
    torch.set_num_threads(threads)  # the tree is queried on torch's threads
    try:
        idx, off = _neighbours(coords, libs, 200.0, 6)
    finally:
        torch.set_num_threads(old)
    ref_idx, ref_off = _brute_force(coords, libs, 200.0, 6)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(off, ref_off, atol=1e-4)
    assert (idx[17] == -1).all() and list(idx[4]) == [5] + [-1] * 5 and (idx[6] == -1).all()
    counts = (idx >= 0).sum(1)
    assert counts.max() == 6 and (counts < 6).sum() > 10  # full windows, and windows cut by the radius
    empty_idx, empty_off = _neighbours(coords, libs, 200.0, 0)
    assert empty_idx.shape == (300, 0) and empty_off.shape == (300, 0, 2)


def _fake_sample(sl, z0, record):
    """A stand-in for a model: expression, latent and routing are simple functions of the noise."""
    x = z0[:, :3] * 2.0
    out = {"x": x, "latent": z0 + 1.0, "routing": torch.softmax(z0[:, :2], dim=1)}
    if record:
        out["trajectory"] = torch.stack([z0, z0 + 1.0])
    return out


def test_draws_one_and_many():
    one = _draw(_fake_sample, 10, 4, (3, 4, 2), n_samples=1, seed=3, batch_size=4, record=True)
    z0 = torch.randn(10, 4, generator=torch.Generator().manual_seed(3)).numpy()
    np.testing.assert_array_equal(one["z0"], z0)
    np.testing.assert_array_equal(one["mean"], np.clip(z0[:, :3] * 2.0, 0, None))
    np.testing.assert_array_equal(one["latent"], z0 + 1.0)
    np.testing.assert_allclose(one["routing"].sum(1), 1.0, rtol=1e-6)
    assert "std" not in one and one["trajectory"].shape == (2, 10, 4)
    cold = _draw(_fake_sample, 10, 4, (3, 4, 2), n_samples=1, seed=3, batch_size=4, record=False, temperature=0.5)
    np.testing.assert_allclose(cold["z0"], 0.5 * z0, rtol=1e-6)
    frozen = _draw(_fake_sample, 10, 4, (3, 4, 2), n_samples=2, seed=3, batch_size=4, record=False, temperature=0.0)
    np.testing.assert_array_equal(frozen["z0"], np.zeros((10, 4)))  # the prior mean, for every draw and seed
    np.testing.assert_array_equal(frozen["latent"], np.ones((10, 4)))
    np.testing.assert_array_equal(frozen["std"], np.zeros((10, 3)))
    many = _draw(_fake_sample, 10, 4, (3, 4, 2), n_samples=3, seed=3, batch_size=4, record=False)
    gen = torch.Generator().manual_seed(3)
    draws = [torch.randn(10, 4, generator=gen).numpy() for _ in range(3)]
    xs = np.stack([np.clip(d[:, :3] * 2.0, 0, None) for d in draws])
    np.testing.assert_allclose(many["mean"], xs.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(many["std"], xs.std(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(many["latent"], np.mean(draws, axis=0) + 1.0, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(many["z0"], z0)  # the first draw's noise


def test_antithetic_draws_pair_each_noise_with_its_negation():
    def linear(sl, z0, record):  # a model linear in the noise: expression 5 + z0, never clipped
        return {"x": 5.0 + z0[:, :3], "latent": z0}

    gen = torch.Generator().manual_seed(3)
    first, second = (torch.randn(10, 4, generator=gen).numpy() for _ in range(2))
    iid = _draw(linear, 10, 4, (3, 4, 1), n_samples=4, seed=3, batch_size=4, record=False)
    pairs = _draw(linear, 10, 4, (3, 4, 1), n_samples=4, seed=3, batch_size=4, record=False, antithetic=True)
    # draws 0, 1 start at first and -first, draws 2, 3 at second and -second: what is linear cancels in each pair
    np.testing.assert_array_equal(pairs["z0"], first)
    np.testing.assert_allclose(pairs["mean"], 5.0, atol=1e-6)
    np.testing.assert_allclose(pairs["latent"], 0.0, atol=1e-6)
    spread = np.sqrt((first[:, :3] ** 2 + second[:, :3] ** 2) / 2)  # each draw is still a sample of the model
    np.testing.assert_allclose(pairs["std"], spread, rtol=1e-4, atol=1e-4)
    assert np.abs(iid["mean"] - 5.0).max() > 0.1  # independent draws do not cancel
    # an odd number of draws ends with an unpaired one: the third noise is the second independent draw
    odd = _draw(linear, 10, 4, (3, 4, 1), n_samples=3, seed=3, batch_size=4, record=False, antithetic=True)
    np.testing.assert_allclose(odd["mean"], 5.0 + second[:, :3] / 3, rtol=1e-5, atol=1e-6)
    # the temperature scales both members of a pair; one draw is the independent draw
    hot = _draw(linear, 10, 4, (3, 4, 1), n_samples=2, seed=3, batch_size=4, record=False, antithetic=True,
                temperature=0.5)  # fmt: skip
    np.testing.assert_allclose(hot["std"], 0.5 * np.abs(first[:, :3]), rtol=1e-4, atol=1e-4)
    one = _draw(linear, 10, 4, (3, 4, 1), n_samples=1, seed=3, batch_size=4, record=False, antithetic=True)
    np.testing.assert_array_equal(one["mean"], 5.0 + first[:, :3])


def test_feature_chunk_rows_fit_the_cache_on_a_cpu_only():
    budget = _data.CPU_FEATURE_CHUNK_BYTES
    assert feature_chunk_rows(4096, 3840, on_cpu=True) == budget // (4 * 3840) == 273
    assert feature_chunk_rows(4096, 3840, on_cpu=False) == 4096  # a GPU takes the whole batch
    assert feature_chunk_rows(100, 8, on_cpu=True) == 100  # never more than the batch
    assert feature_chunk_rows(4096, 10**9, on_cpu=True) == 1  # at least one spot


def test_spot_conditions_in_cache_sized_chunks_match_whole_batches(monkeypatch):
    torch.manual_seed(0)
    n, width = 700, 96
    cond = ConditionEncoder(width, 16, spatial_context="window", n_heads=2, metadata_sizes=[3]).eval()
    rng = np.random.default_rng(0)
    idx, off = _neighbours(rng.uniform(0, 2000, size=(n, 2)), np.zeros(n, dtype="<U1"), 300.0, 6)
    arrays = {
        "feats": torch.from_numpy(rng.normal(size=(n, width)).astype(np.float32)),
        "meta": torch.from_numpy(rng.integers(0, 3, size=(n, 1))),
    }
    calls = []
    project = cond.project
    monkeypatch.setattr(cond, "project", lambda f: calls.append(len(f)) or project(f))
    args = (cond, arrays, torch.from_numpy(idx), torch.from_numpy(off), 512, torch.device("cpu"))
    monkeypatch.setattr(_data, "CPU_FEATURE_CHUNK_BYTES", 4 * width * 100)  # 100 spots per projection
    with torch.no_grad():
        chunked, attn_chunked = _spot_conditions(*args)
    assert calls == [100] * 7
    calls.clear()
    monkeypatch.setattr(_data, "CPU_FEATURE_CHUNK_BYTES", 2**40)  # the whole batch (512 spots) at once
    with torch.no_grad():
        whole, attn_whole = _spot_conditions(*args)
    assert calls == [512, 188]
    # per-spot layers: the chunk changes the speed, and at most a matrix product's rounding
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    for a, b in zip(attn_chunked, attn_whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
