"""benchmarks/predict_speed.py: its synthetic table and its arguments."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from _scripts import load_script


def test_table_has_the_asked_feature_width_and_a_visium_like_layout():
    mod = load_script("benchmarks/predict_speed.py", "predict_speed")
    a = mod._table(400, dim=3840)
    assert a.shape == (400, 50) and a.obsm["X_efficientnet_lite0"].shape == (400, 3840)
    assert mod._table(400).obsm["X_efficientnet_lite0"].shape == (400, 1280)  # EfficientNet-Lite0's width
    assert a.obs["split"].value_counts().to_dict() == {"train": 300, "val": 100}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--feature-dim", "0"], "--feature-dim must be a positive width, got 0"),
        (["--models", "molf_2"], "unknown --models"),
    ],
)
def test_bad_arguments_are_refused_before_any_run(monkeypatch, capsys, argv, message):
    mod = load_script("benchmarks/predict_speed.py", "predict_speed")
    monkeypatch.setattr(sys, "argv", ["predict_speed.py", *argv])
    with pytest.raises(SystemExit):
        mod.main()
    assert message in capsys.readouterr().err


class _Queue(list):
    put = list.append


@pytest.mark.parametrize("kind", ["molf_anti4", "molf_t0", "ens3_anti2", "ens3_t0", "ens2_t0"])
def test_antithetic_and_ensemble_rows_predict_and_report_a_time(kind, monkeypatch):
    import torch

    import histoflow as hf

    calls = []
    predict = hf.tl.predict
    monkeypatch.setattr(
        hf.tl, "predict", lambda models, *a, **kw: calls.append((len(models), kw)) or predict(models, *a, **kw)
    )
    mod = load_script("benchmarks/predict_speed.py", "predict_speed")
    q, threads = _Queue(), torch.get_num_threads()
    try:
        mod._run(kind, 300, 2, 1, "cpu", {"cond_dim": 16, "latent_dim": 8}, 32, q)
    finally:
        torch.set_num_threads(threads)  # _run sets the thread count of its (normally fresh) process
    [(sec, rss, gpu_mb)] = q
    assert sec > 0 and rss > 0 and gpu_mb != gpu_mb  # no GPU: NaN
    if kind.startswith("ens"):  # the row's number of members, through tl.predict, once per repeat
        assert [n for n, _ in calls] == [int(kind[3])] * 2
        assert all((kw.get("temperature", 1.0) == 0) == kind.endswith("_t0") for _, kw in calls)
    else:
        assert calls == []


@pytest.mark.parametrize(
    ("kind", "graph"),
    [
        ("molf_t0_tl", None),
        ("molf_t0_smooth", "spatial_connectivities"),
        ("molf_t0_smooth_genes", "spatial_connectivities"),
        ("molf_t0_smooth_graph", None),
        ("molf_t0_smooth_ridge", "spatial_connectivities"),
        ("molf_t0_genes_ridge", "spatial_connectivities"),
    ],
)
def test_rows_through_tl_predict_write_then_smooth(kind, graph, monkeypatch):
    import torch

    import histoflow as hf

    calls = []
    predict, smooth = hf.tl.predict, hf.tl.smooth_predictions
    monkeypatch.setattr(hf.tl, "predict", lambda m, a, **kw: calls.append(("predict", kw)) or predict(m, a, **kw))

    def spy_smooth(a, **kw):
        calls.append(("smooth", kw))
        smooth(a, **kw)
        assert "molf_smoothed" in a.obsm and "molf" in a.obsm  # the prediction was written, then smoothed

    monkeypatch.setattr(hf.tl, "smooth_predictions", spy_smooth)
    blend = hf.tl.blend_predictions

    def spy_blend(a, weights, **kw):
        calls.append(("blend", weights))
        blend(a, weights, **kw)
        assert a.obsm["ridge"].shape == a.obsm["molf"].shape  # the probe's predictions were written first

    monkeypatch.setattr(hf.tl, "blend_predictions", spy_blend)
    mod = load_script("benchmarks/predict_speed.py", "predict_speed")
    q, threads = _Queue(), torch.get_num_threads()
    try:
        mod._run(kind, 300, 2, 1, "cpu", {"cond_dim": 16, "latent_dim": 8}, 32, q)
    finally:
        torch.set_num_threads(threads)
    [(sec, _, _)] = q
    assert sec > 0
    predicts = [kw for c, kw in calls if c == "predict"]
    molf = [kw for kw in predicts if kw["key_added"] == "molf"]
    assert len(molf) == 2 and all(kw["temperature"] == 0 for kw in molf)
    # the probe's predictions go through tl.predict too, each time after MoLF's
    expected = ["molf", "ridge"] * 2 if kind.endswith("_ridge") else ["molf"] * 2
    assert [kw["key_added"] for kw in predicts] == expected
    smooths = [kw for c, kw in calls if c == "smooth"]
    if kind == "molf_t0_tl":
        assert smooths == []
    else:
        assert [kw["connectivity_key"] for kw in smooths] == [graph] * 2
        weights = [kw.get("self_weight") for kw in smooths]
        if kind in ("molf_t0_smooth_genes", "molf_t0_genes_ridge"):  # one given weight per gene of the table
            assert all(list(w.index) == [str(g) for g in mod._table(300, dim=32).var_names] for w in weights)
            assert all(w.nunique() == len(w) for w in weights)
        else:
            assert weights == [None] * 2  # the default, one weight for every gene
    blends = [w for c, w in calls if c == "blend"]
    if kind == "molf_t0_genes_ridge":  # gene-wise blend weights: one row per gene, MoLF's weight varying
        assert len(blends) == 2 and all(list(w.columns) == ["molf_smoothed", "ridge"] for w in blends)
        assert all(w["molf_smoothed"].nunique() == len(w) and np.allclose(w.sum(axis=1), 1) for w in blends)
    else:
        assert blends == ([{"molf_smoothed": 0.5, "ridge": 0.5}] * 2 if kind.endswith("_ridge") else [])


def test_ridge_row_times_the_probe():
    import torch

    mod = load_script("benchmarks/predict_speed.py", "predict_speed")
    q, threads = _Queue(), torch.get_num_threads()
    try:
        mod._run("ridge", 300, 3, 1, "cpu", {}, 32, q)
    finally:
        torch.set_num_threads(threads)
    [(sec, rss, _)] = q
    assert sec > 0 and rss > 0
    probe = mod._ridge(mod._table(300, dim=32))
    assert probe.fit_intercept and probe.train_params["n_components_fitted"] == 32  # fitted on the spots it has
