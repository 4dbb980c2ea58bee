from __future__ import annotations

import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import spatialdata as sd

import histoflow as hf
from histoflow.cli import api_defaults, build_parser, main, write_atomic

# a MoLF small enough to train in seconds on 2 CPU cores
SMALL = [
    "latent_dim=8", "vae_d_model=16", "vae_ff_dim=32", "vae_heads=2", "cond_dim=16", "expert_width=16",
    "n_experts=3", "top_k=2", "expert_heads=2", "patience=2",
]  # fmt: skip
SETS = [x for s in SMALL for x in ("--set", s)]
FEATURES = "X_efficientnet_lite0"


def _h5ad_table(sdata) -> ad.AnnData:
    """The SpatialData table as a scanpy-style AnnData: each slide's H&E image in ``uns['spatial']``."""
    table = sdata.tables["table"].copy()
    del table.uns["spatialdata_attrs"]
    table.uns["spatial"] = {
        lib: {
            "images": {"hires": np.moveaxis(np.asarray(sdata.images[f"{lib}_full_image"]), 0, -1)},
            "scalefactors": {"tissue_hires_scalef": 1.0, "spot_diameter_fullres": 55.0},
        }
        for lib in table.obs["library_id"].cat.categories
    }
    return table


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A tiny synthetic dataset (6 slides of 4 × 4 spots, 30 genes, 2 µm pixels) as a SpatialData .zarr and an .h5ad."""
    root = tmp_path_factory.mktemp("cli")
    sdata = hf.datasets.synthetic(n_slides=6, grid=(4, 4), n_genes=30, pixel_size_um=2.0, seed=0)
    sdata.write(root / "tiny.zarr")
    _h5ad_table(sdata).write_h5ad(root / "tiny.h5ad")
    return {"zarr": root / "tiny.zarr", "h5ad": root / "tiny.h5ad", "root": root}


@pytest.fixture(scope="module")
def embedded(inputs) -> dict[str, Path]:
    """``histoflow embed`` on both inputs (EfficientNet-Lite0 at 32 px)."""
    out = {}
    for fmt in ("zarr", "h5ad"):
        out[fmt] = inputs["root"] / f"emb.{fmt}"
        argv = ["embed", str(inputs[fmt]), "--output", str(out[fmt]), "--patch-px", "32", "--batch-size", "96", "-q"]
        assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def fitted_ridge(inputs, embedded) -> dict[str, Path]:
    root = inputs["root"]
    model, fitted = root / "ridge_model", root / "ridge.h5ad"
    argv = ["fit", str(embedded["h5ad"]), "--model-dir", str(model), "--model", "ridge", "-o", str(fitted)]
    assert main([*argv, "--n-genes", "8", "--set", "n_components=8", "--quiet"]) == 0
    return {"model": model, "fitted": fitted}


def _read(path: Path) -> ad.AnnData:
    return sd.read_zarr(path).tables["table"] if path.suffix == ".zarr" else ad.read_h5ad(path)


def _error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"histoflow {command}: error: "), err
    return line


# ---------------------------------------------------------------------------------------------------------- help


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip()
    assert main([]) == 2
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0
    assert "--dataset" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("demo", ["--dataset", "--out", "--epochs", "--baselines", "--set"]),
        ("embed", ["INPUT", "--output", "--overwrite", "--encoder", "--patch-size-um", "--batch-size", "--devices"]),
        ("fit", ["INPUT", "--model-dir", "--model", "--epochs", "--key-added", "--set", "--output"]),
        ("predict", ["INPUT", "--model-dir", "--steps", "--guidance", "--n-samples", "--key-added"]),
        ("evaluate", ["INPUT", "--pred-key", "--split", "--csv"]),
    ],
)
def test_help_of_each_command(capsys, command, options):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: histoflow {command}")
    for option in options:
        assert option in out


def test_histoflow_help_subprocess():
    out = subprocess.run([sys.executable, "-m", "histoflow", "--help"], capture_output=True, text=True, check=True)
    for command in ("demo", "embed", "fit", "predict", "evaluate"):
        assert command in out.stdout


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "histoflow", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip()


def test_defaults_are_those_of_the_python_api():
    parser = build_parser()
    sig = {name: inspect.signature(f).parameters for name, f in [
        ("embed", hf.pp.embed_patches), ("molf", hf.tl.fit_molf), ("predict", hf.tl.predict),
        ("evaluate", hf.tl.evaluate), ("split", hf.pp.split_slides), ("genes", hf.pp.select_genes),
    ]}  # fmt: skip
    embed = parser.parse_args(["embed", "x.zarr"])
    assert embed.encoder == sig["embed"]["encoder"].default == "efficientnet_lite0"
    assert embed.patch_size_um == sig["embed"]["patch_size_um"].default == 112.0
    assert embed.patch_px == sig["embed"]["patch_px"].default
    assert embed.batch_size == sig["embed"]["batch_size"].default
    assert embed.devices is sig["embed"]["devices"].default is None
    assert embed.dihedral is sig["embed"]["dihedral"].default is False
    assert parser.parse_args(["embed", "x.zarr", "--dihedral"]).dihedral is True
    assert embed.context_size_um is sig["embed"]["context_size_um"].default is None
    assert parser.parse_args(["embed", "x.zarr", "--context-size-um", "224", "448"]).context_size_um == [224.0, 448.0]
    fit = parser.parse_args(["fit", "x.zarr", "--model-dir", "m"])
    assert fit.model == "molf"
    assert fit.embedding_key == sig["molf"]["embedding_key"].default
    assert fit.seed == sig["molf"]["seed"].default
    assert fit.devices == sig["molf"]["devices"].default
    assert fit.n_genes == sig["genes"]["n_top"].default
    assert (fit.val_frac, fit.test_frac) == (sig["split"]["val_frac"].default, sig["split"]["test_frac"].default)
    pred = parser.parse_args(["predict", "x.zarr", "--model-dir", "m"])
    assert pred.guidance is sig["predict"]["guidance"].default is None
    assert pred.seed == sig["predict"]["seed"].default
    ev = parser.parse_args(["evaluate", "x.zarr", "--pred-key", "molf"])
    assert ev.split is sig["evaluate"]["split"].default is None
    assert ev.split_key == sig["evaluate"]["split_key"].default
    demo = parser.parse_args(["demo"])
    assert (demo.patch_size_um, demo.patch_px) == (embed.patch_size_um, embed.patch_px)
    assert demo.out == "histoflow-demo"
    # what the commands fill in when an option is left out
    d = api_defaults()
    assert d["fit_molf"]["max_epochs"] == 300 and d["fit_baseline"]["max_epochs"] == 100
    assert d["predict"]["steps"] == 1 and d["predict"]["n_samples"] == 1 and d["predict"]["key_added"] is None
    assert pred.temperature is None and d["predict"]["temperature"] == 1.0
    assert pred.antithetic is None and d["predict"]["antithetic"] is False
    assert pred.device is None and d["predict"]["device"] == "auto"


# ---------------------------------------------------------------------------------------------------------- runs


def test_embed_writes_features_in_the_input_format(inputs, embedded):
    z, h = _read(embedded["zarr"]), _read(embedded["h5ad"])
    for t in (z, h):
        assert t.obsm[FEATURES].shape == (96, 1280)
        assert np.isfinite(t.obsm[FEATURES]).all() and float(np.abs(t.obsm[FEATURES]).sum()) > 0
        assert t.uns[FEATURES]["patch_px"] == 32
    # the same patches from the SpatialData image and from the scanpy-style uns['spatial'] image
    np.testing.assert_allclose(z.obsm[FEATURES], h.obsm[FEATURES], rtol=1e-4, atol=1e-4)
    assert sorted(sd.read_zarr(embedded["zarr"]).images) == sorted(sd.read_zarr(inputs["zarr"]).images)
    assert FEATURES not in _read(inputs["zarr"]).obsm and FEATURES not in _read(inputs["h5ad"]).obsm  # inputs untouched


def test_zarr_chain_fit_predict_evaluate(embedded, tmp_path, capsys):
    emb = tmp_path / "emb.zarr"
    shutil.copytree(embedded["zarr"], emb)
    # fit with the default output name; the model is saved; log1p, split and panel are made on the way
    model = tmp_path / "model"
    capsys.readouterr()
    rc = main(["fit", str(emb), "--model-dir", str(model), "--epochs", "2", "--n-genes", "8", *SETS])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "INFO histoflow: No `layers['log1p']`: running histoflow.pp.normalize" in err  # logging at INFO
    fitted = tmp_path / "emb_fit.zarr"
    assert (model / "model.pt").is_file() and (model / "model.json").is_file()
    t = _read(fitted)
    panel = t.var_names[t.var["histoflow_panel"].to_numpy()].tolist()
    assert isinstance(t.obsm["molf"], pd.DataFrame) and list(t.obsm["molf"].columns) == panel
    assert t.obsm["molf"].shape == (96, len(panel)) and np.isfinite(t.obsm["molf"].to_numpy()).all()
    assert set(t.obs["split"].astype(str)) == {"train", "val", "test"}
    assert t.obsm["molf_routing"].shape == (96, 3)
    assert "log1p" in t.layers

    # predict with the saved model into another key: the same numbers as right after training (same seed)
    pred = tmp_path / "pred.zarr"
    args = ["predict", str(fitted), "--model-dir", str(model), "--output", str(pred), "--seed", "0"]
    assert main([*args, "--key-added", "again", "--quiet"]) == 0
    t2 = _read(pred)
    assert list(t2.obsm["again"].columns) == panel
    assert t2.uns["again"]["params"]["steps"] == 1 and t2.uns["again"]["params"]["n_samples"] == 1
    np.testing.assert_allclose(t2.obsm["again"].to_numpy(), t.obsm["molf"].to_numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(t2.obsm["molf"].to_numpy(), t.obsm["molf"].to_numpy())  # other keys untouched
    # the point estimate (prior mean, no noise) does not depend on the seed
    point = tmp_path / "point.zarr"
    args = ["predict", str(fitted), "--model-dir", str(model), "--temperature", "0", "--key-added", "point", "-q"]
    assert main([*args, "--output", str(point), "--seed", "3"]) == 0
    assert main([*args, "--output", str(tmp_path / "point7.zarr"), "--seed", "7"]) == 0
    tp, tp7 = _read(point), _read(tmp_path / "point7.zarr")
    assert tp.uns["point"]["params"]["temperature"] == 0.0
    np.testing.assert_allclose(tp.obsm["point"].to_numpy(), tp7.obsm["point"].to_numpy(), rtol=1e-6, atol=1e-7)
    # antithetic pairs of draws: recorded, and the mean of the pair differs from two independent draws
    pairs = tmp_path / "pairs.zarr"
    args = ["predict", str(fitted), "--model-dir", str(model), "--n-samples", "2", "--key-added", "pairs", "-q"]
    assert main([*args, "--output", str(pairs), "--antithetic"]) == 0
    assert main([*args, "--output", str(tmp_path / "iid.zarr")]) == 0
    tpair, tiid = _read(pairs), _read(tmp_path / "iid.zarr")
    assert tpair.uns["pairs"]["params"]["antithetic"] and not tiid.uns["pairs"]["params"]["antithetic"]
    assert not np.allclose(tpair.obsm["pairs"].to_numpy(), tiid.obsm["pairs"].to_numpy())
    # --smooth: the prediction and, beside it, the prediction averaged with the spatial neighbours
    smooth = tmp_path / "smooth.zarr"
    args = ["predict", str(fitted), "--model-dir", str(model), "--temperature", "0", "--key-added", "point", "-q"]
    assert main([*args, "--output", str(smooth), "--smooth", "0.25", "--smooth-rings", "2"]) == 0
    ts = _read(smooth)
    np.testing.assert_allclose(ts.obsm["point"].to_numpy(), tp.obsm["point"].to_numpy(), rtol=1e-6, atol=1e-7)
    assert ts.uns["point_smoothed"]["self_weight"] == 0.25 and ts.uns["point_smoothed"]["n_rings"] == 2
    ref = hf.tl.smooth_predictions(tp, pred_key="point", self_weight=0.25, n_rings=2, copy=True)
    np.testing.assert_allclose(ts.obsm["point_smoothed"].to_numpy(), ref.obsm["point_smoothed"].to_numpy(), rtol=1e-6)
    assert not np.allclose(ts.obsm["point_smoothed"].to_numpy(), ts.obsm["point"].to_numpy())
    with pytest.raises(SystemExit):
        main([*args, "--output", str(tmp_path / "bad.zarr"), "--smooth", "1.5"])
    assert "expected a weight between 0 and 1, got '1.5'" in capsys.readouterr().err
    # --smooth-spread: one weight per gene, the genes ranked by Moran's I of their measured expression on the train
    # spots; the same numbers and weights as the API
    genes_out = tmp_path / "genes.zarr"
    assert main([*args, "--output", str(genes_out), "--smooth", "0.6", "--smooth-spread", "1"]) == 0
    tg = _read(genes_out)
    ref = hf.tl.smooth_predictions(tp, pred_key="point", self_weight=0.6, spread=1.0, copy=True)
    stored = tg.uns["point_smoothed"]["gene_weights"]
    pd.testing.assert_frame_equal(stored, ref.uns["point_smoothed"]["gene_weights"], check_exact=False, rtol=1e-6)
    assert tg.uns["point_smoothed"]["spread"] == 1.0 and tg.uns["point_smoothed"]["structure_split"] == "train"
    assert stored["self_weight"].nunique() > 1  # the genes differ
    np.testing.assert_allclose(tg.obsm["point_smoothed"].to_numpy(), ref.obsm["point_smoothed"].to_numpy(), rtol=1e-6)
    # --smooth-weights: those weights from a CSV (as to_csv writes them) smooth a slide without measured expression
    # the same way
    weights_csv = tmp_path / "gene_weights.csv"
    stored.to_csv(weights_csv)
    bare = tmp_path / "bare.h5ad"
    h = tp.copy()
    del h.layers["log1p"]
    h.X = np.zeros(h.shape, dtype=np.float32)
    h.obs["split"] = "test"
    h.write_h5ad(bare)
    weighted = tmp_path / "weighted.h5ad"
    wargs = ["predict", str(bare), "--model-dir", str(model), "--temperature", "0", "--key-added", "point", "-q"]
    assert main([*wargs, "--output", str(weighted), "--smooth-weights", str(weights_csv)]) == 0
    tw = _read(weighted)
    np.testing.assert_allclose(tw.obsm["point_smoothed"].to_numpy(), tg.obsm["point_smoothed"].to_numpy(), rtol=1e-5)
    np.testing.assert_allclose(tw.uns["point_smoothed"]["gene_weights"]["self_weight"], stored["self_weight"])
    # the spread needs measured expression: a library error (status 1), nothing written
    capsys.readouterr()
    assert main([*wargs, "--output", str(tmp_path / "no.h5ad"), "--smooth", "0.6", "--smooth-spread", "1"]) == 1
    assert "histoflow predict: error:" in capsys.readouterr().err and not (tmp_path / "no.h5ad").exists()
    # a weight for a gene the model does not predict missing: status 1 naming the gene, nothing written
    stored.iloc[1:].to_csv(tmp_path / "short.csv")
    assert main([*wargs, "--output", str(tmp_path / "no.h5ad"), "--smooth-weights", str(tmp_path / "short.csv")]) == 1
    assert repr(str(stored.index[0])) in capsys.readouterr().err and not (tmp_path / "no.h5ad").exists()
    # argument errors: status 2, the option and the fix named
    (tmp_path / "nocol.csv").write_text("gene,weight\nA,0.5\n")
    (tmp_path / "nan.csv").write_text("gene,self_weight\nA,high\n")
    (tmp_path / "twice.csv").write_text("gene,self_weight\nA,0.5\nA,0.6\n")
    bad = {
        ("--smooth-spread", "1"): "argument --smooth-spread: needs --smooth WEIGHT",
        ("--smooth", "0.5", "--smooth-split", "val"): "argument --smooth-split: applies only with --smooth-spread",
        ("--smooth", "0.5", "--smooth-spread", "-1"): "expected a non-negative number, got '-1'",
        ("--smooth-weights", str(weights_csv), "--smooth", "0.5"): "argument --smooth: not allowed with --smooth-weig",
        ("--smooth-weights", str(tmp_path / "none.csv")): "none.csv' is not a file",
        ("--smooth-weights", str(tmp_path / "nocol.csv")): "has no self_weight column (columns: ['weight'])",
        ("--smooth-weights", str(tmp_path / "nan.csv")): "self_weight that is not a number for gene 'A'",
        ("--smooth-weights", str(tmp_path / "twice.csv")): "gives gene 'A' twice",
    }
    for extra, message in bad.items():
        with pytest.raises(SystemExit) as e:
            main([*wargs, "--output", str(tmp_path / "no.h5ad"), *extra])
        assert e.value.code == 2 and message in capsys.readouterr().err, extra
    assert not (tmp_path / "no.h5ad").exists()

    # evaluate: printed table, CSV with every row
    csv = tmp_path / "metrics.csv"
    capsys.readouterr()
    assert main(["evaluate", str(pred), "--pred-key", "again", "--split", "test", "--csv", str(csv), "-q"]) == 0
    out = capsys.readouterr().out
    assert "pcc" in out and "gsc" in out and "pooled" in out
    df = pd.read_csv(csv)
    assert {"metric", "aggregation", "group", "gene_set", "value"} <= set(df.columns)
    row = df[(df.metric == "pcc") & (df.aggregation == "pooled") & (df.group == "all") & (df.gene_set == "all")]
    assert len(row) == 1 and -1 <= row["value"].iloc[0] <= 1
    assert row["n_spots"].iloc[0] == (t2.obs["split"] == "test").sum()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary siblings left


def test_h5ad_chain_with_baselines(embedded, fitted_ridge, tmp_path, capsys):
    emb = embedded["h5ad"]
    runs = {"ridge": (fitted_ridge["model"], fitted_ridge["fitted"])}
    model, fitted = tmp_path / "mlp_model", tmp_path / "mlp.h5ad"
    args = ["fit", str(emb), "--model-dir", str(model), "--model", "mlp", "-o", str(fitted), "--n-genes", "8"]
    assert main([*args, "--epochs", "2", "--set", "hidden_dims=16,8", "--quiet"]) == 0, capsys.readouterr().err
    assert ad.read_h5ad(fitted).uns["mlp"]["params"]["hidden_dims"].tolist() == [16, 8]
    runs["mlp"] = (model, fitted)
    for kind, (model, fitted) in runs.items():
        t = ad.read_h5ad(fitted)
        assert t.obsm[kind].shape == (96, int(t.var["histoflow_panel"].sum()))
        assert (model / "model.json").is_file()
        pred = tmp_path / f"{kind}_pred.h5ad"
        assert main(["predict", str(fitted), "--model-dir", str(model), "-o", str(pred), "--quiet"]) == 0
        tp = ad.read_h5ad(pred)
        # the saved model gives back the predictions made right after training
        np.testing.assert_allclose(tp.obsm[kind].to_numpy(), t.obsm[kind].to_numpy(), rtol=1e-5, atol=1e-5)
        capsys.readouterr()
        assert main(["evaluate", str(pred), "--pred-key", kind, "--split", "test", "-q"]) == 0
        assert "pcc" in capsys.readouterr().out


def test_overwrite_replaces_atomically(fitted_ridge, tmp_path, capsys):
    out = tmp_path / "out.h5ad"
    out.write_text("old")
    args = ["evaluate", str(fitted_ridge["fitted"]), "--pred-key", "ridge", "-o", str(out), "--metrics", "pcc", "-q"]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    line = _error_line(capsys, "evaluate")
    assert "argument --output" in line and "--overwrite" in line
    assert out.read_text() == "old"  # left as it was
    assert main([*args, "--overwrite"]) == 0
    summary = ad.read_h5ad(out).uns["ridge_metrics"]["summary"]
    assert set(summary["metric"]) >= {"pcc", "pcc@10"}
    assert [p.name for p in tmp_path.iterdir()] == ["out.h5ad"]


def test_write_atomic_keeps_the_old_output_on_failure(tmp_path):
    out = tmp_path / "x.h5ad"
    out.write_text("old")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_atomic(ad.AnnData(np.zeros((2, 2))), out)
    bad = ad.AnnData(np.zeros((2, 2)))
    bad.uns["unwritable"] = object()
    with pytest.raises(Exception):  # noqa: B017 - whatever anndata raises, the old file must survive
        write_atomic(bad, out, overwrite=True)
    assert out.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.h5ad"]


# ---------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("argv", "command", "expected"),
    [
        (["embed", "{root}/missing.zarr"], "embed", r"argument INPUT: .*missing.zarr' does not exist"),
        (
            ["embed", "{root}/data.csv"],
            "embed",
            r"argument INPUT: .* neither a SpatialData \.zarr folder nor an \.h5ad",
        ),
        (
            ["embed", "{h5ad}", "--encoder", "no_such_net"],
            "embed",
            r"argument --encoder: unknown encoder 'no_such_net'",
        ),
        (["embed", "{h5ad}", "--patch-px", "0"], "embed", r"argument --patch-px: expected a positive integer, got '0'"),
        (["embed", "{h5ad}", "-o", "{root}/out.zarr"], "embed", r"argument --output: .* must end in \.h5ad like INPUT"),
        (
            ["embed", "{h5ad}", "-o", "{root}/no/dir/o.h5ad"],
            "embed",
            r"argument --output: the folder .* does not exist",
        ),
        (["embed", "{h5ad}", "--devices", "two"], "embed", r"argument --devices: expected 'auto', a number"),
        (["fit", "{h5ad}", "--model-dir", "m", "--model", "svm"], "fit", r"argument --model: invalid choice: 'svm'"),
        (
            ["fit", "{h5ad}", "--model-dir", "{root}/m", "--set", "velocity"],
            "fit",
            r"argument --set: expected key=value",
        ),
        (["fit", "{h5ad}", "--model-dir", "{root}/m", "--set", "nope=1"], "fit", r"--set: 'nope' is not a setting of"),
        (
            ["fit", "{h5ad}", "--model-dir", "{root}/m", "--set", "velocity=sparse"],
            "fit",
            r"velocity='sparse' is not one",
        ),
        (
            ["fit", "{h5ad}", "--model-dir", "{root}/m", "--set", "n_experts=many"],
            "fit",
            r"n_experts='many' is not an int",
        ),
        (
            ["fit", "{h5ad}", "--model-dir", "{root}/m", "--epochs", "0"],
            "fit",
            r"argument --epochs: expected a positive",
        ),
        (["fit", "{h5ad}", "--model-dir", "{model}"], "fit", r"argument --model-dir: .* exists; pass --overwrite"),
        (["fit", "{h5ad}"], "fit", r"the following arguments are required: --model-dir"),
        (["predict", "{h5ad}", "--model-dir", "{root}"], "predict", r"--model-dir: .* holds no saved histoflow model"),
        (["predict", "{h5ad}", "--model-dir", "{root}/nothing"], "predict", r"--model-dir: .* is not a folder"),
        (["predict", "{h5ad}", "--model-dir", "{model}", "--steps", "2"], "predict", r"--steps: applies to MoLF"),
        (["predict", "{h5ad}", "--model-dir", "{model}", "--device", "cpu"], "predict", r"--device: applies to MoLF"),
        (["predict", "{h5ad}", "--model-dir", "{model}", "--antithetic"], "predict", r"--antithetic: applies to MoLF"),
        (["evaluate", "{h5ad}"], "evaluate", r"the following arguments are required: --pred-key"),
        (["evaluate", "{fitted}", "--pred-key", "ridge", "--csv", "{fitted}"], "evaluate", r"--csv: .* exists; pass"),
        (["demo", "--baselines", "svm"], "demo", r"argument --baselines: unknown baseline\(s\) \['svm'\]"),
        (["demo", "--set", "top_k=two"], "demo", r"argument --set: top_k='two' is not an integer"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(inputs, fitted_ridge, capsys, argv, command, expected):
    fill = {"root": inputs["root"], "h5ad": inputs["h5ad"], **fitted_ridge}
    (inputs["root"] / "data.csv").write_text("a,b\n")
    with pytest.raises(SystemExit) as e:
        main([a.format(**fill) for a in argv])
    assert e.value.code == 2
    line = _error_line(capsys, command)
    assert re.search(expected, line), line


def test_library_errors_exit_1_with_one_line(inputs, fitted_ridge, capsys):
    assert main(["evaluate", str(fitted_ridge["fitted"]), "--pred-key", "nope"]) == 1
    line = _error_line(capsys, "evaluate")
    assert "nope" in line
    # a table without patch features: fitting says what to run first; nothing is written
    out = inputs["root"] / "never.h5ad"
    args = ["fit", str(inputs["h5ad"]), "--model-dir", str(inputs["root"] / "m_never"), "--model", "ridge"]
    assert main([*args, "-o", str(out), "-q"]) == 1
    line = _error_line(capsys, "fit")
    assert "`obsm['X_efficientnet_lite0']` (patch features) is missing" in line and "histoflow embed" in line
    assert not out.exists() and not (inputs["root"] / "m_never").exists()


def test_bad_demo_arguments_give_clear_messages(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--dataset", "nope"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["demo", "--n-slides", "0", "--quiet"]) == 1
    assert "n_slides" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------- demo


def test_demo_runs_end_to_end(tmp_path, capsys):
    out_dir = tmp_path / "report"
    args = ["demo", "--n-slides", "6", "--grid", "4", "--patch-px", "32", "--epochs", "2", "--quiet"]
    rc = main([*args, *SETS, "--baselines", "ridge", "--out", str(out_dir)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "obsm['X_efficientnet_lite0']: 96 × 1280" in out
    for word in ("train", "val", "test", "panel", "guidance scale"):
        assert word in out
    assert "spots: 96" in (out_dir / "summary.txt").read_text()
    metrics = pd.read_csv(out_dir / "metrics.csv")
    assert set(metrics["method"]) == {"molf", "ridge"}
    pooled = metrics[(metrics.aggregation == "pooled") & (metrics.group == "all") & (metrics.gene_set == "all")]
    assert set(pooled.loc[pooled.metric == "pcc", "method"]) == {"molf", "ridge"}
    report = (out_dir / "report.md").read_text()
    assert "| method | pcc | pcc@10 | mse | gsc | ssc |" in report
    assert "| molf |" in report and "| ridge |" in report
    molf_pcc = pooled[(pooled.metric == "pcc") & (pooled.method == "molf")]["value"].iloc[0]
    assert f"| molf | {molf_pcc:.3f} |" in report
    for name in ("spatial", "metrics", "routing", "history"):
        png = out_dir / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{name}]({name}.png)" in report
    assert "## Timings" in report and "fit MoLF" in report
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")]
