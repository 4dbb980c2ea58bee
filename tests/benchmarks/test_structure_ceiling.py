"""benchmarks/structure_ceiling.py: oracle predictions of a given rank, scored on real HER2ST sections."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from _scripts import load_script


def _script():
    return load_script("benchmarks/structure_ceiling.py", "structure_ceiling")


def test_effective_rank_and_projection():
    mod = _script()
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(8, 8)))[0][:, :2].T  # two orthonormal gene-space directions
    X = rng.normal(size=(4000, 2)) @ basis + 3.0
    pr, k90 = mod.effective_rank(X)
    assert pr == pytest.approx(2.0, abs=0.1) and k90 == 2
    Y = rng.normal(size=(4000, 2)) * [3.0, 1.0] @ basis
    assert mod.effective_rank(Y)[0] == pytest.approx(100 / 82, abs=0.05)  # (9 + 1)^2 / (81 + 1)
    assert mod.effective_rank(np.ones((5, 3))) == (0.0, 0)
    T = rng.normal(size=(50, 8))
    full = np.linalg.svd(T - T.mean(0), full_matrices=False)[2]
    np.testing.assert_allclose(mod._project(T, full, T.mean(0)), T, atol=1e-10)
    # a projection on fewer axes is the best approximation of that rank: its error is the dropped singular values
    s = np.linalg.svd(T - T.mean(0), compute_uv=False)
    err = np.linalg.norm(mod._project(T, full[:3], T.mean(0)) - T) ** 2
    assert err == pytest.approx((s[3:] ** 2).sum())


def test_runs_on_her2st(her2st_dir, capsys):
    mod = _script()
    res = mod.main(["--path", str(her2st_dir), "--sections", "C2", "C3", "C4", "--ranks", "1", "3", "10"])
    out = capsys.readouterr().out
    assert "| own top-10 axes |" in out and "correlation matrix" in out
    assert "| another measured section | – |" in out and "over the 6 pairs of sections" in out
    # per fold: 8 oracle predictions, the two other sections, the (one) training section pooled
    assert len(res) == 3 * (8 + 2 + 1) and set(res["test"]) == {"C2", "C3", "C4"}
    measured = res[res["prediction"].isin(["another measured section", "the training sections pooled"])]
    assert measured["PCC"].isna().all() and measured[["GSC", "SSC"]].notna().all().all()
    # another section of the same tissue shares much of the gene-gene and spatial structure, not all of it
    assert ((measured["GSC"] > 0.4) & (measured["GSC"] < 0.99)).all()
    # with one training section, "pooled" is that section: the same numbers as its "another measured section" row
    for _, g in res.groupby("test"):
        pooled = g[g["prediction"] == "the training sections pooled"][["GSC", "SSC"]].to_numpy()
        assert any(
            np.allclose(pooled, row)
            for row in g[g["prediction"] == "another measured section"][["GSC", "SSC"]].to_numpy()
        )
    m = res.groupby("prediction")[["PCC", "GSC", "SSC"]].mean()
    # more axes of the truth's own structure: better on every score
    own = m.loc[["own top-1 axes", "own top-3 axes", "own top-10 axes"]]
    assert own["PCC"].is_monotonic_increasing and own["GSC"].is_monotonic_increasing
    assert m.loc["own top-10 axes", "SSC"] > m.loc["own top-1 axes", "SSC"] + 0.3
    # the best rank-k approximation beats the projection on the training sections' axes
    for k in (1, 3, 10):
        assert m.loc[f"own top-{k} axes", "PCC"] >= m.loc[f"training top-{k} axes", "PCC"]
    assert m.loc["mean of self and neighbours", "GSC"] > 0.9
    noisy = m.loc["truth + independent noise (PCC about 0.3)"]
    assert 0.25 < noisy["PCC"] < 0.35 and noisy["GSC"] < 0.4


def test_structure_agreement_is_gsc_and_ssc_without_pairing():
    """On a prediction of the same spots the formulas are metrics.gsc and metrics.ssc; no pairing of spots is needed."""
    from histoflow.tl import metrics

    mod = _script()
    rng = np.random.default_rng(2)
    n, side = 64, 8
    xy = np.c_[np.arange(n) % side, np.arange(n) // side]
    dist = np.abs(xy[:, None] - xy[None]).sum(-1)
    W = sp.csr_matrix((dist == 1).astype(float))  # 4-neighbour grid
    T = rng.normal(size=(n, 6)) + np.c_[xy[:, 0], xy[:, 1], np.zeros((n, 4))]
    T[:, 2] = T[:, 0] + 0.5 * rng.normal(size=n)
    P = T + rng.normal(size=T.shape)
    P[:, 5] = 1.0  # a constant gene in the prediction: left out of both, as the metrics do
    got = mod.structure_agreement(*mod._pieces(metrics, T, W), *mod._pieces(metrics, P, W))
    assert np.isnan(got["PCC"])
    assert got["GSC"] == pytest.approx(metrics.gsc(T, P))
    assert got["SSC"] == pytest.approx(metrics.ssc(T, P, W))
    # other spots with the same gene-gene correlations (the spots shuffled) and Moran's I up to an affine map: 1 and 1
    moran, shuffled = metrics.morans_i(T, W), T[rng.permutation(n)]
    same = mod.structure_agreement(
        metrics.gene_correlation(T), moran, metrics.gene_correlation(shuffled), 2 * moran + 1
    )
    assert same["GSC"] == pytest.approx(1.0) and same["SSC"] == pytest.approx(1.0)


def test_refuses_too_few_sections(her2st_dir):
    with pytest.raises(SystemExit):
        _script().main(["--path", str(her2st_dir), "--sections", "C2", "C3"])


def test_correlation_rank_ignores_scale_and_constant_genes():
    mod = _script()
    rng = np.random.default_rng(1)
    X = rng.normal(size=(3000, 4)) * [1.0, 10.0, 100.0, 0.1]  # four independent genes on very different scales
    assert mod.effective_rank(X)[0] < 1.1  # the covariance sees one gene
    assert mod.correlation_rank(X) == pytest.approx(4.0, abs=0.1)
    with_constant = np.c_[X, np.full(3000, 2.0)]
    assert mod.correlation_rank(with_constant) == pytest.approx(4.0, abs=0.1)
