"""The real-data harness (benchmarks/her2st.py): its HEST-Bench mode on a tiny folder in HEST-Bench's on-disk format."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from _scripts import load_script


def _harness():
    return load_script("benchmarks/her2st.py", "her2st_bench")


def _hest_bench(root: Path, features: Path, n_samples: int = 4, n_spots: int = 60, n_genes: int = 12) -> list[str]:
    """``<root>/IDC/{adata,splits,var_50genes.json}`` and ``<features>/IDC/enc/fp32/<id>.h5`` (HEST-Bench layout)."""
    rng = np.random.default_rng(0)
    task = root / "IDC"
    (task / "adata").mkdir(parents=True)
    (task / "splits").mkdir()
    (features / "IDC" / "enc" / "fp32").mkdir(parents=True)
    genes = [f"G{i}" for i in range(n_genes + 3)]
    ids = [f"TENX{i}" for i in range(n_samples)]
    load = rng.normal(size=(4, n_genes + 3))
    for sid in ids:
        grid = np.stack(np.meshgrid(np.arange(10), np.arange(6)), -1).reshape(-1, 2)[:n_spots]
        latent = np.c_[np.sin(grid[:, 0] / 2), np.cos(grid[:, 1] / 2), rng.normal(size=(n_spots, 2))]
        counts = rng.poisson(np.exp(1 + 0.8 * latent @ load)).astype(np.float32)
        barcodes = [f"AAAC{j:04d}-1" for j in range(n_spots)]
        a = ad.AnnData(counts, obs=pd.DataFrame(index=barcodes), var=pd.DataFrame(index=genes))
        a.obsm["spatial"] = grid * 200.0
        a.write_h5ad(task / "adata" / f"{sid}.h5ad")
        order = rng.permutation(n_spots)  # the feature file lists spots in its own order: joined by barcode
        emb = np.c_[latent, rng.normal(size=(n_spots, 12))].astype(np.float32)
        with h5py.File(features / "IDC" / "enc" / "fp32" / f"{sid}.h5", "w") as h:
            h["embeddings"] = emb[order]
            h["barcodes"] = np.asarray([barcodes[j].encode() for j in order])[:, None]
            h["coords"] = (grid * 200)[order]
    (task / "var_50genes.json").write_text(json.dumps({"genes": genes[:n_genes]}))
    for k, test in enumerate([ids[:2], ids[2:]]):
        train = [s for s in ids if s not in test]
        for name, members in (("train", train), ("test", test)):
            pd.DataFrame(
                {"sample_id": members, "patches_path": [f"patches/{s}.h5" for s in members],
                 "expr_path": [f"adata/{s}.h5ad" for s in members]}
            ).to_csv(task / "splits" / f"{name}_{k}.csv", index=False)  # fmt: skip
    return ids


def test_hest_bench_mode_reads_the_layout_and_scores_every_fold(tmp_path, capsys):
    harness = _harness()
    ids = _hest_bench(tmp_path / "bench", tmp_path / "feats")
    table = harness.read_hest_bench_task(
        tmp_path / "bench", "IDC", features=tmp_path / "feats", encoder="enc", patch_px=224
    )
    assert table.n_obs == 4 * 60 and list(table.var_names) == [f"G{i}" for i in range(12)]
    assert sorted(table.obs["library_id"].unique()) == ids
    # features joined by barcode, not by row order: the first two feature columns are the spot's latent programs
    first = table[table.obs["library_id"] == ids[0]]
    grid = np.stack(np.meshgrid(np.arange(10), np.arange(6)), -1).reshape(-1, 2)
    np.testing.assert_allclose(first.obsm["X_enc"][:, 0], np.sin(grid[:, 0] / 2), atol=1e-6)
    X = np.asarray(table.X.todense() if hasattr(table.X, "todense") else table.X)
    log1p = table.layers["log1p"]
    np.testing.assert_allclose(np.asarray(log1p.todense() if hasattr(log1p, "todense") else log1p), np.log1p(X))

    results = harness.main(
        ["--hest-bench", str(tmp_path / "bench"), "--task", "IDC", "--features", str(tmp_path / "feats"),
         "--encoder", "enc", "--methods", "ridge", "mlp", "--threads", "1", "--cache", str(tmp_path / "cache")]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert set(results["fold"]) == {"split0", "split1"} and set(results["method"]) == {"ridge", "mlp"}
    pcc = results[(results["metric"] == "pcc") & (results["gene_set"] == "all")]
    assert len(pcc) == 4 and pcc["value"].between(-1, 1).all()
    assert pcc.groupby("method")["value"].mean().max() > 0.3  # the features carry the expression programs
    assert "| ridge (HEST probe) |" in out and "mean ± std over 2 folds" in out


def test_hest_bench_read_scales_features_per_sample_and_refuses_dihedral_on_precomputed(tmp_path):
    harness = _harness()
    ids = _hest_bench(tmp_path / "bench", tmp_path / "feats")
    kw = {"features": tmp_path / "feats", "encoder": "enc", "patch_px": 224}
    table = harness.read_hest_bench_task(tmp_path / "bench", "IDC", scale_features="slide", **kw)
    for sid in ids:
        block = table.obsm["X_enc"][(table.obs["library_id"] == sid).to_numpy()]
        np.testing.assert_allclose(block.mean(0), 0.0, atol=1e-5)
        np.testing.assert_allclose(block.std(0), 1.0, atol=1e-4)
    with pytest.raises(ValueError, match="--dihedral needs the patches"):
        harness.read_hest_bench_task(tmp_path / "bench", "IDC", dihedral=True, **kw)


def test_her2st_folds_leave_one_section_out():
    folds = _harness().her2st_folds(["C2", "C3", "C4", "C5", "C6"])
    assert len(folds) == 5
    for i, fold in enumerate(folds):
        assert list(fold.values()).count("test") == 1 and list(fold.values()).count("val") == 1
        assert fold[["C2", "C3", "C4", "C5", "C6"][i]] == "test"
    assert [next(s for s, v in f.items() if v == "test") for f in folds] == ["C2", "C3", "C4", "C5", "C6"]


def test_hest_bench_mode_refuses_context_patches(tmp_path):
    _hest_bench(tmp_path / "bench", tmp_path / "feats")
    argv = ["--hest-bench", str(tmp_path / "bench"), "--features", str(tmp_path / "feats"), "--context-um", "224"]
    with pytest.raises(SystemExit, match="--context-um needs the whole image"):
        _harness().main(argv)


@pytest.mark.parametrize("bad", ["missing"])
def test_hest_bench_mode_without_adata_folder_is_a_clear_error(tmp_path, bad):
    with pytest.raises(FileNotFoundError, match="adata"):
        _harness().read_hest_bench_task(tmp_path, "IDC", features=None, encoder="enc", patch_px=224)


def test_set_passes_molf_settings_to_every_molf_variant(tmp_path, monkeypatch, capsys):
    harness = _harness()
    _hest_bench(tmp_path / "bench", tmp_path / "feats")
    seen = []

    class Stop(Exception):
        pass

    class Recorder(harness.hf.models.MoLF):
        def __init__(self, table, **kwargs):
            seen.append(kwargs)
            raise Stop

    monkeypatch.setattr(harness.hf.models, "MoLF", Recorder)
    base = ["--hest-bench", str(tmp_path / "bench"), "--task", "IDC", "--features", str(tmp_path / "feats"),
            "--encoder", "enc", "--threads", "1", "--cache", str(tmp_path / "cache")]  # fmt: skip
    with pytest.raises(Stop):
        harness.main([*base, "--methods", "dense", "--set", "cond_dim=32", "--set", "top_k=1"])
    assert seen[-1]["velocity"] == "dense" and seen[-1]["cond_dim"] == 32 and seen[-1]["top_k"] == 1
    for bad, message in (("nope=1", "'nope' is not a setting of the molf model"), ("cond_dim=x", "fix the value")):
        with pytest.raises(SystemExit):
            harness.main([*base, "--methods", "molf", "--set", bad])
        assert message in capsys.readouterr().err


def test_hest_bench_mode_trains_molf(tmp_path, capsys):
    """MoLF variants run in HEST-Bench mode too (the harness hands them a table, not a SpatialData)."""
    _hest_bench(tmp_path / "bench", tmp_path / "feats")
    results = _harness().main(
        ["--hest-bench", str(tmp_path / "bench"), "--task", "IDC", "--features", str(tmp_path / "feats"),
         "--encoder", "enc", "--methods", "molf", "--epochs", "2", "--n-samples", "1", "--threads", "1",
         "--cache", str(tmp_path / "cache"), "--set", "cond_dim=32", "--set", "latent_dim=8"]
    )  # fmt: skip
    pcc = results[(results["metric"] == "pcc") & (results["gene_set"] == "all")]
    assert list(pcc["method"]) == ["molf", "molf"] and pcc["value"].between(-1, 1).all()
    assert (results["fit_s"] > 0).all() and (results["predict_s"] > 0).all()
    assert "| MoLF (MoE, window context) |" in capsys.readouterr().out


def _fit_setup(tmp_path, **overrides):
    """The harness, a tiny HEST-Bench table with a validation sample, and fit_method's arguments (tiny MoLF)."""
    harness = _harness()
    _hest_bench(tmp_path / "bench", tmp_path / "feats")
    table = harness.read_hest_bench_task(
        tmp_path / "bench", "IDC", features=tmp_path / "feats", encoder="enc", patch_px=224
    )
    table.obs["split"] = pd.Categorical(np.where(table.obs["library_id"] == "TENX0", "val", "train"))
    args = harness.argparse.Namespace(
        encoder="enc", molf_config={"cond_dim": 16, "latent_dim": 4}, molf_train={}, patience=2, epochs=2,
        batch_size=64, accelerator="cpu", select_guidance=False, n_samples=2, temperature=1.0, seed=0,
        stage_one=False, ensemble=1, shared_stage_one=False, rotate_validation=False, antithetic=False, draws=None,
        distil=None,
    )  # fmt: skip
    vars(args).update(overrides)
    return harness, table, args


def test_stage_one_rows_score_one_draw_and_the_stage_one_reconstruction(tmp_path, capsys):
    harness, table, args = _fit_setup(tmp_path, stage_one=True)
    harness.fit_method(table, "molf", args, None)
    genes = list(table.obsm["bench_molf"].columns)
    for key in ("bench_molf_1draw", "bench_molf_stage1"):
        out = table.obsm[key]
        assert list(out.columns) == genes and out.index.equals(table.obs_names) and np.isfinite(out.to_numpy()).all()
    assert "bench_molf_std" in table.obsm and "bench_molf_1draw_std" not in table.obsm  # 2 draws, then 1
    assert not np.allclose(table.obsm["bench_molf_stage1"], table.obsm["bench_molf"])
    results = pd.DataFrame(
        [("C2", "hvg50", m, "all", "pcc", 0.1, 1.0, 0.1) for m in ("molf", "molf_1draw", "molf_stage1")],
        columns=["fold", "panel", "method", "gene_set", "metric", "value", "fit_s", "predict_s"],
    )
    harness.print_table(results, "hvg50", "all", "t")
    out = capsys.readouterr().out
    assert "| MoLF (MoE, window context), one draw |" in out
    assert "| MoLF (MoE, window context), Stage I reconstruction |" in out
    with pytest.raises(SystemExit, match="--stage-one applies to the HER2ST mode only"):
        harness.main(["--hest-bench", str(tmp_path / "bench"), "--features", str(tmp_path / "feats"), "--stage-one"])


def test_ensemble_averages_models_with_consecutive_seeds(tmp_path, capsys):
    harness, table, args = _fit_setup(tmp_path, seed=3, ensemble=2)
    fit_s, pred_s = harness.fit_method(table, "molf", args, None)
    assert fit_s > 0 and pred_s > 0
    ensemble, first = table.obsm["bench_molf"].copy(), table.obsm["bench_molf_member"].copy()
    harness._fit_molf(table, "molf", args, None, 3)  # the members again, one at a time (same seeds, same numbers)
    np.testing.assert_array_equal(table.obsm["bench_molf"].to_numpy(), first.to_numpy())
    harness._fit_molf(table, "molf", args, None, 4)
    second = table.obsm["bench_molf"]
    assert not np.allclose(first.to_numpy(), second.to_numpy())
    np.testing.assert_allclose(ensemble.to_numpy(), (first.to_numpy() + second.to_numpy()) / 2, rtol=1e-6)
    results = pd.DataFrame(
        [("C2", "hvg50", m, "all", "pcc", 0.1, 1.0, 0.1) for m in ("molf", "molf_member")],
        columns=["fold", "panel", "method", "gene_set", "metric", "value", "fit_s", "predict_s"],
    )
    harness.print_table(results, "hvg50", "all", "t", ensemble=2)
    out = capsys.readouterr().out
    assert "| MoLF (MoE, window context), ensemble of 2 |" in out
    assert "| MoLF (MoE, window context), its first member alone |" in out
    refused = (
        (["--ensemble", "0"], "at least 1"),
        (["--ensemble", "2", "--stage-one"], "not with --ensemble"),
        (["--shared-stage-one"], "needs --ensemble N with N of at least 2"),
    )
    for argv, match in refused:
        with pytest.raises(SystemExit):
            harness.main(argv)
        assert match in capsys.readouterr().err


def test_shared_stage_one_trains_later_members_on_the_first_models_stage_one(tmp_path, monkeypatch, capsys):
    harness, table, args = _fit_setup(tmp_path, seed=3, ensemble=3, shared_stage_one=True)
    calls, fit = [], harness._fit_molf

    def recording(*a, stage_one=None, **kw):
        model, f, p = fit(*a, stage_one=stage_one, **kw)
        calls.append((a[-1], stage_one, model))
        return model, f, p

    monkeypatch.setattr(harness, "_fit_molf", recording)
    harness.fit_method(table, "molf", args, None)
    (s0, shared0, first), (s1, shared1, second), (s2, shared2, third) = calls
    assert (s0, s1, s2) == (3, 4, 5) and shared0 is None and shared1 is first and shared2 is first
    for later in (second, third):  # a frozen copy of the first model's Stage I; their own Stage II
        assert later.vae is not first.vae
        assert all(torch.equal(v, first.vae.state_dict()[k]) for k, v in later.vae.state_dict().items())
        assert not torch.equal(next(later.flow.parameters()), next(first.flow.parameters()))
    # each fit prints its stages' times; the later members trained no Stage I
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "molf (seed" in ln]
    assert len(lines) == 3 and "Stage I shared" in lines[1] and "Stage I shared" in lines[2]
    h = first.history["vae"]
    assert f"molf (seed 3): Stage I {h['time_s'].iloc[-1]:.1f} s ({len(h)} epochs), Stage II" in lines[0]


def test_rotated_split_moves_the_validation_section_along_the_non_test_sections():
    harness = _harness()
    fold = harness.her2st_folds(["C2", "C3", "C4", "C5", "C6"])[0]  # C2 tests, C3 validates, C4–C6 train
    libs = pd.Series(np.repeat(["C2", "C3", "C4", "C5", "C6"], [3, 2, 2, 2, 1]), index=[f"s{i}" for i in range(10)])
    split = pd.Series(pd.Categorical(libs.map(fold)), index=libs.index)
    vals = []
    for i in range(6):
        member = pd.Series(harness.rotated_split(split, libs, i), index=libs.index)
        assert (member[libs == "C2"] == "test").all() and (member[libs != "C2"] != "test").all()
        (val,) = pd.unique(libs[member == "val"])
        assert set(libs[member == "train"]) == {"C3", "C4", "C5", "C6"} - {val}
        vals.append(val)
    assert vals == ["C3", "C4", "C5", "C6", "C3", "C4"]  # the fold's validation section first, then cyclically
    assert list(harness.rotated_split(split, libs, 0)) == list(split)  # member 0 keeps the fold's split
    with pytest.raises(ValueError, match="exactly one validation section"):
        harness.rotated_split(split.replace({"val": "train"}), libs, 1)


def test_rotate_validation_trains_each_member_on_its_own_split_and_restores_the_fold(tmp_path, monkeypatch, capsys):
    harness, table, args = _fit_setup(tmp_path, seed=3, ensemble=3, rotate_validation=True)
    before = table.obs["split"].copy()
    seen, fit = [], harness._fit_molf

    def recording(sdata, *a, **kw):
        libs = sdata.obs["library_id"].astype(str)
        seen.append((sorted(set(libs[sdata.obs["split"] == "val"])), sorted(set(libs[sdata.obs["split"] == "train"]))))
        return fit(sdata, *a, **kw)

    monkeypatch.setattr(harness, "_fit_molf", recording)
    harness.fit_method(table, "molf", args, None)
    assert seen == [
        (["TENX0"], ["TENX1", "TENX2", "TENX3"]),
        (["TENX1"], ["TENX0", "TENX2", "TENX3"]),
        (["TENX2"], ["TENX0", "TENX1", "TENX3"]),
    ]
    pd.testing.assert_series_equal(table.obs["split"], before)  # the fold's split is back
    out = capsys.readouterr().out
    assert "molf (seed 4): validation section TENX1" in out and "molf (seed 5): validation section TENX2" in out
    # a member that fails (the second, on its own split) leaves the fold's split as it was
    calls = []

    def failing_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return fit(*a, **kw)

    monkeypatch.setattr(harness, "_fit_molf", failing_second)
    with pytest.raises(RuntimeError, match="boom"):
        harness.fit_method(table, "molf", args, None)
    pd.testing.assert_series_equal(table.obs["split"], before)
    with pytest.raises(SystemExit):
        harness.main(["--rotate-validation"])
    assert "--rotate-validation: needs --ensemble N" in capsys.readouterr().err


def test_api_fits_the_ensemble_with_fit_molf_ensemble(tmp_path, capsys):
    harness, table, args = _fit_setup(tmp_path, seed=3, ensemble=2, rotate_validation=True, api=True)
    obs = list(table.obs.columns)
    fit_s, pred_s = harness.fit_method(table, "molf", args, None)
    assert fit_s > 0 and pred_s > 0 and list(table.obs.columns) == obs  # the members' split columns are dropped
    u = table.uns["bench_molf"]
    assert u["n_models"] == 2 and [u["members"][i]["seed"] for i in ("0", "1")] == [3, 4]
    np.testing.assert_allclose(
        table.obsm["bench_molf_again"].to_numpy(), table.obsm["bench_molf"].to_numpy(), rtol=1e-6
    )
    assert not np.allclose(table.obsm["bench_molf_member"].to_numpy(), table.obsm["bench_molf"].to_numpy())
    out = capsys.readouterr().out
    assert "molf (seed 4, api): Stage I" in out and "tl.predict on the members again: largest difference 0" in out
    with pytest.raises(SystemExit):
        harness.main(["--api", "--ensemble", "2", "--shared-stage-one"])
    assert "--api: not with --stage-one, --shared-stage-one or --vae-extra" in capsys.readouterr().err


def test_draws_rows_predict_the_members_again_with_other_numbers_of_draws(tmp_path, capsys):
    draws = [1, 2, "t0"]
    harness, table, args = _fit_setup(tmp_path, seed=3, ensemble=2, rotate_validation=True, api=True, draws=draws)
    harness.fit_method(table, "molf", args, None)
    rows = harness.draw_rows("molf", args.draws)
    assert rows == [("molf_n1", 1, False, None), ("molf_n2", 2, False, None), ("molf_anti2", 2, True, None),
                    ("molf_t0", 1, False, 0.0)]  # fmt: skip
    assert set(table.uns["bench_predict_s"]) == {"molf_n1", "molf_n2", "molf_anti2", "molf_t0"}
    got = {row: table.obsm[f"bench_{row}"].to_numpy() for row, *_ in rows}
    np.testing.assert_allclose(got["molf_n2"], table.obsm["bench_molf"].to_numpy(), rtol=1e-6)  # the fit's draws
    assert not np.allclose(got["molf_anti2"], got["molf_n2"]) and not np.allclose(got["molf_n1"], got["molf_n2"])
    assert table.uns["bench_molf_anti2"]["params"]["antithetic"] is True
    assert not np.allclose(got["molf_t0"], got["molf_n1"])
    assert table.uns["bench_molf_t0"]["params"]["temperature"] == 0.0 and table.uns["bench_molf_n1"]["params"][
        "temperature"] == 1.0  # fmt: skip
    results = pd.DataFrame(
        [("C2", "hvg50", m, "all", "pcc", 0.1, 1.0, 0.2) for m in ("molf", "molf_n1", "molf_anti2")],
        columns=["fold", "panel", "method", "gene_set", "metric", "value", "fit_s", "predict_s"],
    )
    capsys.readouterr()
    harness.print_table(results, "hvg50", "all", "t", ensemble=2)
    out = capsys.readouterr().out
    assert "| MoLF (MoE, window context), 1 draw per member |" in out
    assert "| MoLF (MoE, window context), 2 antithetic draws per member |" in out
    assert harness._draws_label("t0") == ", temperature 0 per member"
    # --antithetic: the fit's own draws come in pairs, in guidance selection and prediction
    harness, table, args = _fit_setup(tmp_path / "anti", seed=3, ensemble=2, api=True, antithetic=True)
    harness.fit_method(table, "molf", args, None)
    assert table.uns["bench_molf"]["params"]["antithetic"] is True
    for argv, message in (
        (["--draws", "4"], "--draws: needs --api"),
        (["--api", "--ensemble", "2", "--draws", "0"], "numbers of draws must be at least 1 (or t0), got '0'"),
        (["--api", "--ensemble", "2", "--draws", "t1"], "numbers of draws must be at least 1 (or t0), got 't1'"),
    ):
        with pytest.raises(SystemExit):
            harness.main(argv)
        assert message in capsys.readouterr().err


def _dense(m) -> np.ndarray:
    return np.asarray(m.toarray() if hasattr(m, "toarray") else m)


def test_distil_trains_one_student_on_the_ensembles_predictions(tmp_path, monkeypatch, capsys):
    harness, table, args = _fit_setup(tmp_path, seed=3, ensemble=2, rotate_validation=True, api=True, distil=0.25)
    layers = {k: v.copy() for k, v in table.layers.items()}
    seen = {}
    fit_molf = harness.hf.tl.fit_molf

    def spy(sub, **kw):  # the student's training table: its targets and split
        seen["targets"], seen["split"] = sub.layers["log1p"].copy(), sub.obs["split"].copy()
        return fit_molf(sub, **kw)

    monkeypatch.setattr(harness.hf.tl, "fit_molf", spy)
    fit_s, _ = harness.fit_method(table, "molf", args, None)
    genes = list(table.obsm["bench_molf"].columns)
    expected = 0.25 * table.obsm["bench_molf"].to_numpy() + 0.75 * _dense(table[:, genes].layers["log1p"])
    np.testing.assert_allclose(seen["targets"], expected, rtol=1e-5, atol=1e-6)
    pd.testing.assert_series_equal(seen["split"], table.obs["split"])  # the fold's split, not a member's
    for k, v in layers.items():  # the table's own layers are not touched
        np.testing.assert_array_equal(_dense(table.layers[k]), _dense(v))
    rows = [row for row, *_ in harness.draw_rows("molf_distil", harness.DISTIL_DRAWS)]
    assert {"molf_distil_n1", "molf_distil_anti2", "molf_distil_anti16", "molf_distil_t0"} <= set(rows)
    got = {row: table.obsm[f"bench_{row}"] for row in rows}
    for out in got.values():
        assert list(out.columns) == genes and out.index.equals(table.obs_names) and np.isfinite(out.to_numpy()).all()
    assert not np.allclose(got["molf_distil_n1"], got["molf_distil_t0"])
    assert not np.allclose(got["molf_distil_n1"], table.obsm["bench_molf"].to_numpy())
    fits = table.uns["bench_fit_s"]
    assert set(fits) == set(rows) and all(f > fit_s for f in fits.values())  # the ensemble's time and the student's
    assert set(rows) <= set(table.uns["bench_predict_s"])
    out = capsys.readouterr().out
    assert "molf student (--distil 0.25): Stage I" in out
    results = pd.DataFrame(
        [("C2", "hvg50", m, "all", "pcc", 0.1, 1.0, 0.2) for m in ("molf", "molf_distil_anti2", "molf_distil_t0")],
        columns=["fold", "panel", "method", "gene_set", "metric", "value", "fit_s", "predict_s"],
    )
    harness.print_table(results, "hvg50", "all", "t", ensemble=2)
    out = capsys.readouterr().out
    assert "| MoLF (MoE, window context), one student of the ensemble, 2 antithetic draws |" in out
    assert "| MoLF (MoE, window context), one student of the ensemble, temperature 0 |" in out
    for argv in (["--distil", "1"], ["--api", "--distil", "1"], ["--api", "--ensemble", "2", "--distil", "1.5"]):
        with pytest.raises(SystemExit):
            harness.main(argv)
        assert "--distil: needs --api and --ensemble N" in capsys.readouterr().err


def test_refit_trains_on_the_validation_section_too_and_needs_fixed_guidance(tmp_path, capsys):
    harness, table, args = _fit_setup(tmp_path, molf_train={"refit": True})
    model, _, _ = harness._fit_molf(table, "molf", args, None, 0)
    assert model._train_libraries["val"] == [] and "TENX0" in model._train_libraries["train"]
    out = capsys.readouterr().out
    assert "with validation, then" in out and "on training + validation" in out
    for argv in (["--set", "refit=true"], ["--no-validation"], ["--no-validation", "--no-guidance-selection",
                 "--ensemble", "2", "--rotate-validation"]):  # fmt: skip
        with pytest.raises(SystemExit):
            harness.main(argv)
        assert "add --no-guidance-selection" in capsys.readouterr().err


def test_panel_is_chosen_on_the_training_sections_or_with_the_validation_section(monkeypatch):
    harness = _harness()
    obs = pd.DataFrame({"split": ["train", "val", "test", "train"]})
    table = ad.AnnData(np.ones((4, 3), dtype=np.float32), obs=obs)
    masks = []

    def fake_select_genes(sdata, flavor, mask_obs, **kwargs):
        masks.append(mask_obs.tolist())
        sdata.tables["table"].var["histoflow_panel"] = [True, False, True]

    monkeypatch.setattr(harness.hf.pp, "select_genes", fake_select_genes)
    sdata = SimpleNamespace(tables={"table": table})
    assert harness.select_panel(sdata, "hvg50", Path("h.gmt")) == ["0", "2"]
    harness.select_panel(sdata, "hvg50", Path("h.gmt"), with_validation=True)
    assert masks == [[True, False, False, True], [True, True, False, True]]


def test_prediction_rank_is_the_correlation_rank_per_test_slide():
    """The harness's `corr. rank` column: participation ratio of the predictions' gene–gene correlation, per slide."""
    mod = _harness()
    rng = np.random.default_rng(0)
    n = 400
    one_pattern = np.outer(rng.normal(size=n), rng.uniform(1, 2, size=6))  # every gene moves with one pattern
    independent = rng.normal(size=(n, 6)) * np.arange(1, 7)  # six uncorrelated genes, any scale
    table = ad.AnnData(np.zeros((3 * n, 6), dtype=np.float32))
    table.obs["library_id"] = np.repeat(["A", "B", "C"], n)
    table.obs["split"] = np.repeat(["test", "test", "train"], n)
    table.obsm["bench_x"] = np.r_[one_pattern, independent, rng.normal(size=(n, 6))]
    assert mod.correlation_rank(one_pattern) == pytest.approx(1.0)
    assert mod.correlation_rank(independent) == pytest.approx(6.0, abs=0.3)
    assert np.isnan(mod.correlation_rank(np.ones((5, 3))))
    # the mean over the two test slides; the training slide is not scored
    assert mod.prediction_rank(table, "bench_x") == pytest.approx(
        (1.0 + mod.correlation_rank(independent)) / 2, abs=1e-9
    )


def test_smooth_rows_average_each_row_with_its_neighbours_default_and_chosen_on_validation(tmp_path, capsys):
    import histoflow as hf

    harness, table, args = _fit_setup(tmp_path)
    harness.fit_method(table, "molf", args, None)
    times = {"molf": 1.5}
    assert harness.smoothed_rows(table, "molf", times) == ["molf_sm", "molf_smsel"]
    assert times["molf_sm"] > 1.5 and times["molf_smsel"] > 1.5  # the row's prediction time plus the smoothing's
    ref = hf.tl.smooth_predictions(table, pred_key="bench_molf", copy=True)
    np.testing.assert_allclose(table.obsm["bench_molf_sm"].to_numpy(), ref.obsm["bench_molf_smoothed"].to_numpy())
    chosen = table.uns["bench_molf_smoothing"]
    assert chosen["split"] == "val"
    ref = hf.tl.smooth_predictions(
        table, pred_key="bench_molf", self_weight=chosen["self_weight"], n_rings=chosen["n_rings"], copy=True
    )
    np.testing.assert_allclose(table.obsm["bench_molf_smsel"].to_numpy(), ref.obsm["bench_molf_smoothed"].to_numpy())
    assert "smoothing chosen on the validation section" in capsys.readouterr().out
    label = harness._row_label("molf_t0_sm", 1)
    assert label == "MoLF (MoE, window context), temperature 0, smoothed with the defaults"  # one model: no "member"
    assert harness._row_label("molf_t0_smsel", 3) == (
        "MoLF (MoE, window context), temperature 0 per member, smoothed as chosen on the validation section"
    )
    assert harness._row_label("molf_sm", 3) == "MoLF (MoE, window context), ensemble of 3, smoothed with the defaults"
    assert harness._row_label("ridge_sm", 1) == "ridge (HEST probe), smoothed with the defaults"
    assert harness.smoothed_rows(table, "molf", {}, choose=False) == ["molf_sm"]  # --no-validation: the defaults
    with pytest.raises(SystemExit):
        harness.main(["--smooth", "--hest-bench", "x"])
    assert "--smooth: HER2ST mode only" in capsys.readouterr().err


def test_gene_wise_smoothing_rows_fixed_and_chosen_on_validation(tmp_path, capsys):
    import histoflow as hf

    harness, table, args = _fit_setup(tmp_path)
    harness.fit_method(table, "molf", args, None)
    times = {"molf": 1.5}
    rows = harness.smoothed_rows(table, "molf", times, True, [(0.7, 1.0)], [0.0, 0.01], [0.0, 1.0])
    assert rows == ["molf_sm", "molf_smsel", "molf_smg0.7s1", "molf_smgsel0", "molf_smgsel0.01"]
    assert times["molf_smg0.7s1"] > 1.5 and times["molf_smgsel0.01"] > 1.5
    ref = hf.tl.smooth_predictions(table, pred_key="bench_molf", self_weight=0.7, spread=1.0, copy=True)
    np.testing.assert_allclose(table.obsm["bench_molf_smg0.7s1"].to_numpy(), ref.obsm["bench_molf_smoothed"].to_numpy())
    assert (ref.uns["bench_molf_smoothed"]["gene_weights"]["self_weight"].nunique()) > 1  # one weight per gene
    # the last row: what select_smoothing chooses on the validation section with these spreads and tolerance
    stored = table.uns["bench_molf_smoothing"]
    assert stored["tolerance"] == 0.01 and sorted(stored["sweep"]["spread"].unique()) == [0.0, 1.0]
    pd.testing.assert_frame_equal(
        stored["sweep"],
        hf.tl.select_smoothing(table.copy(), pred_key="bench_molf", spreads=(0.0, 1.0), tolerance=0.01),
    )
    kw = {k: stored[k] for k in ("self_weight", "n_rings", "spread")}
    ref = hf.tl.smooth_predictions(table, pred_key="bench_molf", copy=True, **kw)
    np.testing.assert_allclose(
        table.obsm["bench_molf_smgsel0.01"].to_numpy(), ref.obsm["bench_molf_smoothed"].to_numpy()
    )
    assert "smoothing chosen on the validation section (PCC tolerance 0.01): self weight" in capsys.readouterr().out
    assert harness._row_label("molf_t0_smg0.7s1", 1) == (
        "MoLF (MoE, window context), temperature 0, smoothed gene-wise (self weight 0.7, spread 1)"
    )
    assert harness._row_label("molf_t0_smgsel0.01", 1) == (
        "MoLF (MoE, window context), temperature 0, smoothed gene-wise as chosen on validation (PCC tolerance 0.01)"
    )
    assert harness._row_label("molf_smgsel0", 1).endswith("as chosen on validation (the best PCC)")
    assert harness._row_label("molf_t0_smg0.7s1_ridge0.5s1", 1) == (
        "MoLF (MoE, window context), temperature 0, smoothed gene-wise (self weight 0.7, spread 1), blended with the "
        "ridge probe (MoLF weight 0.5, gene-wise spread 1)"
    )
    # --no-validation: the fixed rows only
    assert harness.smoothed_rows(table, "molf", {}, False, [(0.7, 1.0)], [0.01]) == ["molf_sm", "molf_smg0.7s1"]
    for argv, message in [
        (["--smooth-genes", "0.7:1"], "add --smooth"),
        (["--smooth", "--smooth-genes", "0.7"], "W:S"),
        (["--smooth", "--smooth-genes", "1.2:1"], "W:S"),
        (["--smooth", "--smoothing-spreads", "1"], "needs --select-smoothing"),
        (["--smooth", "--select-smoothing", "0", "--smoothing-spreads", "-1"], "at least 0"),
        (
            ["--smooth", "--select-smoothing", "0", "--no-validation", "--no-guidance-selection"],
            "--select-smoothing: needs the validation section",
        ),
    ]:
        with pytest.raises(SystemExit):
            harness.main(argv)
        assert message in capsys.readouterr().err


def test_select_blend_rows_blend_each_molf_row_with_the_weight_chosen_on_validation(tmp_path, capsys):
    import histoflow as hf

    harness, table, args = _fit_setup(tmp_path, select_blend=[0.0, 0.5])
    harness.fit_method(table, "ridge", args, None)
    assert table.uns["bench_ridge"]["params"]["fit_intercept"] is True  # the probe on the log1p scale
    harness.fit_method(table, "molf", args, None)
    times = {"molf": 1.5}
    assert harness.selected_blend_rows(table, "molf", args.select_blend, times) == [
        "molf_ridgesel0",
        "molf_ridgesel0.5",
    ]
    assert times["molf_ridgesel0.5"] > 1.5
    for tol in ("0", "0.5"):
        stored = table.uns[f"bench_molf_ridgesel{tol}_selection"]
        sweep = hf.tl.select_blend(
            table, pred_key="bench_molf", other_key="bench_ridge", tolerance=float(tol), key_added="check"
        )
        pd.testing.assert_frame_equal(stored["sweep"], sweep)  # chosen on the validation sample
        w = stored["weight"]
        ridge = table.obsm["bench_ridge"][table.obsm["bench_molf"].columns].to_numpy()
        expected = w * table.obsm["bench_molf"].to_numpy() + (1 - w) * ridge
        np.testing.assert_allclose(table.obsm[f"bench_molf_ridgesel{tol}"].to_numpy(), expected, rtol=1e-5, atol=1e-5)
    assert "blend chosen on the validation section (PCC tolerance 0.5): MoLF weight" in capsys.readouterr().out
    assert harness._row_label("molf_t0_ridgesel0", 1) == (
        "MoLF (MoE, window context), temperature 0, blended with the ridge probe, weight chosen on validation "
        "(the best PCC)"
    )
    assert harness._row_label("molf_ridgesel0.01", 1).endswith("weight chosen on validation (PCC tolerance 0.01)")
    # --blend-spreads: a second row per tolerance, with gene-wise weights
    assert harness.selected_blend_rows(table, "molf", [0.0], {}, [0.0, 1.0]) == ["molf_ridgesel0", "molf_ridgegene0"]
    stored = table.uns["bench_molf_ridgegene0_selection"]
    assert sorted(stored["sweep"]["spread"].unique()) == [0.0, 1.0] and stored["structure_split"] == "train"
    w = stored["weights"]["bench_molf"].to_numpy() if stored["spread"] > 0 else stored["weight"]
    expected = w * table.obsm["bench_molf"].to_numpy() + (1 - w) * ridge
    np.testing.assert_allclose(table.obsm["bench_molf_ridgegene0"].to_numpy(), expected, rtol=1e-5, atol=1e-5)
    assert harness._row_label("molf_t0_ridgegene0.01", 1) == (
        "MoLF (MoE, window context), temperature 0, blended with the ridge probe, gene-wise weights chosen on "
        "validation (PCC tolerance 0.01)"
    )
    for argv, match in (
        (["--blend-spreads", "1"], "needs --select-blend"),
        (["--select-blend", "0", "--blend-spreads", "-1"], "at least 0"),
        (["--select-blend", "-0.1"], "from 0 to below 1"),
        (["--select-blend", "0", "--methods", "molf"], "needs ridge in --methods"),
        (["--select-blend", "0", "--no-validation", "--no-guidance-selection"], "drop --no-validation"),
    ):
        with pytest.raises(SystemExit):
            harness.main(argv)
        assert match in capsys.readouterr().err


def test_mlp_trains_without_a_validation_section_under_no_validation(tmp_path):
    harness, table, args = _fit_setup(tmp_path, no_validation=True)
    table.obs["split"] = pd.Categorical(np.full(table.n_obs, "train"))  # what --no-validation leaves
    harness.fit_method(table, "mlp", args, None)
    history = table.uns["bench_mlp"]["history"]
    assert len(history) == 100 and np.isfinite(table.obsm["bench_mlp"].to_numpy()).all()  # no early stop: 100 epochs
    args.no_validation = False
    with pytest.raises(ValueError, match="marks no spot as 'val'"):
        harness.fit_method(table, "mlp", args, None)


def test_blend_rows_mix_each_molf_row_with_the_ridge_probe_fitted_with_an_intercept(tmp_path, capsys):
    harness, table, args = _fit_setup(tmp_path, blend=[0.5, 0.8])
    harness.fit_method(table, "ridge", args, None)
    assert table.uns["bench_ridge"]["params"]["fit_intercept"] is True  # --blend: the probe on the log1p scale
    harness.fit_method(table, "molf", args, None)
    times = {"molf": 1.5}
    assert harness.blended_rows(table, "molf", args.blend, times) == ["molf_ridge0.5", "molf_ridge0.8"]
    assert times["molf_ridge0.8"] > 1.5
    molf, ridge = table.obsm["bench_molf"], table.obsm["bench_ridge"][table.obsm["bench_molf"].columns]
    expected = 0.8 * molf.to_numpy() + 0.2 * ridge.to_numpy()
    np.testing.assert_allclose(table.obsm["bench_molf_ridge0.8"].to_numpy(), expected, rtol=1e-5, atol=1e-5)
    assert harness._row_label("molf_t0_sm_ridge0.5", 1) == (
        "MoLF (MoE, window context), temperature 0, smoothed with the defaults, blended with the ridge probe "
        "(MoLF weight 0.5)"
    )
    assert harness._row_label("ridge", 1) == "ridge (HEST probe)"
    # W:S, gene-wise weights from the genes' Moran's I on the training spots
    assert harness._blend_weight("0.5:1.5") == (0.5, 1.5) and harness._blend_weight("0.5") == 0.5
    assert harness.blended_rows(table, "molf", [(0.5, 1.0)], {}) == ["molf_ridge0.5s1"]
    stored = table.uns["bench_molf_ridge0.5s1_selection"]
    rank = stored["gene_structure"]["rank"].to_numpy()
    w = np.clip(0.5 + (rank - 0.5), 0.0, 1.0)
    np.testing.assert_allclose(stored["weights"]["bench_molf"].to_numpy(), w)
    expected = w * molf.to_numpy() + (1 - w) * ridge.to_numpy()
    np.testing.assert_allclose(table.obsm["bench_molf_ridge0.5s1"].to_numpy(), expected, rtol=1e-5, atol=1e-5)
    assert harness._row_label("molf_t0_ridge0.5s1", 1) == (
        "MoLF (MoE, window context), temperature 0, blended with the ridge probe (MoLF weight 0.5, gene-wise spread 1)"
    )
    args.blend = None  # without --blend the probe keeps HEST's protocol (no intercept)
    harness.fit_method(table, "ridge", args, None)
    assert table.uns["bench_ridge"]["params"]["fit_intercept"] is False
    for argv, match in ((["--blend", "1.5"], "strictly between 0 and 1"), (["--blend", "0.5:-1"], "(W:S)"),
                        (["--blend", "0.5", "--methods", "molf"], "needs ridge in --methods")):  # fmt: skip
        with pytest.raises(SystemExit):
            harness.main(argv)
        assert match in capsys.readouterr().err


def test_refit_rows_refit_every_model_and_repeat_the_choices_made_on_validation(tmp_path, capsys):
    import histoflow as hf

    harness, table, args = _fit_setup(tmp_path, api=True, draws=["t0"], methods=["ridge", "molf"], select_blend=[0.0])
    split = table.obs["split"].copy()
    harness.fit_method(table, "ridge", args, None)
    harness.fit_method(table, "molf", args, None)
    replay = []
    rows = harness.smoothed_rows(table, "molf_t0", {}, True, [(0.5, 1.0)], [0.0], [0.0, 1.0], replay=replay)
    assert rows == ["molf_t0_sm", "molf_t0_smsel", "molf_t0_smg0.5s1", "molf_t0_smgsel0"] and len(replay) == 4
    assert harness.selected_blend_rows(table, "molf_t0_smgsel0", [0.0], {}, [0.0, 1.0], replay) == [
        "molf_t0_smgsel0_ridgesel0",
        "molf_t0_smgsel0_ridgegene0",
    ]
    chosen_smoothing = {k: table.uns["bench_molf_t0_smoothing"][k] for k in ("self_weight", "n_rings", "spread")}
    chosen_blend = table.uns["bench_molf_t0_smgsel0_ridgegene0_selection"]
    before = {k: table.obsm[k].to_numpy().copy() for k in ("bench_molf_t0", "bench_ridge")}

    seconds = harness.refit_fold(table, args, None, replay)
    assert set(seconds) == {"ridge", "molf"} and min(seconds.values()) > 0
    pd.testing.assert_series_equal(table.obs["split"], split)  # the fold's split restored
    model = harness.FITTED["molf"][0]
    assert "flow_val" in model.history  # refitted: each stage for its best epochs, on the validation sample too
    assert "molf refitted: Stage I" in capsys.readouterr().out
    # the refitted models' predictions, not the first ones
    t0 = hf.tl.predict(harness.FITTED["molf"], table.copy(), temperature=0.0, seed=args.seed, copy=True)
    np.testing.assert_allclose(table.obsm["bench_molf_t0"].to_numpy(), t0.obsm["molf"].to_numpy(), rtol=1e-6)
    assert not np.allclose(table.obsm["bench_molf_t0"].to_numpy(), before["bench_molf_t0"])
    both = table.copy()
    both.obs["split"] = pd.Categorical(split.astype(str).replace("val", "train"))
    hf.tl.fit_baseline(both, kind="ridge", embedding_key="X_enc", fit_intercept=True, key_added="p", seed=0)
    np.testing.assert_allclose(table.obsm["bench_ridge"].to_numpy(), both.obsm["p"].to_numpy(), rtol=1e-5, atol=1e-6)
    # the smoothing and blend weights chosen before, on the refitted predictions (genes ranked on the four sections)
    ref = hf.tl.smooth_predictions(both, pred_key="bench_molf_t0", copy=True, **chosen_smoothing)
    np.testing.assert_allclose(table.obsm["bench_molf_t0_smgsel0"].to_numpy(), ref.obsm["bench_molf_t0_smoothed"])
    ref = hf.tl.smooth_predictions(both, pred_key="bench_molf_t0", self_weight=0.5, spread=1.0, copy=True)
    np.testing.assert_allclose(table.obsm["bench_molf_t0_smg0.5s1"].to_numpy(), ref.obsm["bench_molf_t0_smoothed"])
    w = chosen_blend["weight"]
    if chosen_blend["spread"] > 0:
        hf.tl.select_blend(both, pred_key="bench_molf_t0_smgsel0", other_key="bench_ridge", weights=(w,),
                           spreads=(chosen_blend["spread"],), split="train", key_added="b")  # fmt: skip
        w = both.uns["b_selection"]["weights"]["bench_molf_t0_smgsel0"].to_numpy()
    smoothed = table.obsm["bench_molf_t0_smgsel0"].to_numpy()
    ridge = table.obsm["bench_ridge"][table.obsm["bench_molf_t0"].columns].to_numpy()
    np.testing.assert_allclose(
        table.obsm["bench_molf_t0_smgsel0_ridgegene0"].to_numpy(), w * smoothed + (1 - w) * ridge, rtol=1e-5, atol=1e-6
    )
    assert harness._row_label("molf_t0_smgsel0_ridgegene0_refit", 1) == (
        "MoLF (MoE, window context), temperature 0, smoothed gene-wise as chosen on validation (the best PCC), blended "
        "with the ridge probe, gene-wise weights chosen on validation (the best PCC), refitted with the validation "
        "section"
    )
    for argv, match in (
        (["--refit"], "needs --api and the validation section"),
        (["--refit", "--api", "--no-validation", "--no-guidance-selection"], "needs --api and the validation section"),
        (["--refit", "--api", "--no-guidance-selection", "--set", "refit=true"], "drop --no-validation and --set"),
        (["--refit", "--api", "--ensemble", "2", "--distil", "0.5"], "not with --distil"),
    ):
        with pytest.raises(SystemExit):
            harness.main(argv)
        assert match in capsys.readouterr().err
