"""Fixtures for the plots: a tiny fitted MoLF on the synthetic dataset, and constructed stored keys for baselines."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from _model_data import MOLF_SMALL
from anndata import AnnData

import histoflow as hf

IMAGES = Path(__file__).parent / "_images"
DPI = 60
TOL = 8.0  # RMS over 0–255 pixel values: catches layout and data changes, ignores antialiasing noise

SMALL = MOLF_SMALL


def _tiny_encoder():
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 5, stride=2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    )
    return hf.pp.get_encoder(net, input_size=32, name="tiny")


@pytest.fixture(scope="session")
def fitted():
    """4 synthetic slides (IDC, PRAD) of 6×6 spots, 16 genes; MoLF fitted for 4 epochs with 2 samples per spot;
    evaluated, guidance swept over 3 scales and 30 trajectories recorded."""
    sdata = hf.datasets.synthetic(4, grid=(6, 6), n_genes=16, seed=0, cancer_types=("IDC", "PRAD"))
    hf.pp.embed_patches(sdata, _tiny_encoder(), patch_px=32, show_progress_bar=False, device="cpu")
    hf.pp.normalize(sdata)
    hf.pp.split_slides(sdata, val_frac=1, test_frac=1, stratify=None)
    model = hf.tl.fit_molf(
        sdata,
        embedding_key="X_tiny",
        max_epochs=4,
        batch_size=64,
        accelerator="cpu",
        devices=1,
        train_kwargs={"show_progress_bar": False, "patience": 5},
        n_samples=2,
        **SMALL,
    )
    hf.tl.evaluate(sdata, pred_key="molf")
    hf.tl.select_guidance(model, sdata, scales=(0.0, 1.0, 2.0))
    hf.tl.trajectories(model, sdata, steps=4, n_spots=30)
    return sdata, model


# --------------------------------------------------------------------------------------------------------------------
# constructed stored keys (no training): deterministic inputs for the image comparisons


def _grid_table(seed: int = 0) -> AnnData:
    """4 slides (2 IDC, 2 PRAD) of 8×8 square-grid spots, 12 genes from 3 smooth fields; predictions = truth blurred
    and noised, routing that depends on the cancer type."""
    rng = np.random.default_rng(seed)
    r, c = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    xy = np.c_[c.ravel(), r.ravel()] * 100.0
    load = rng.normal(size=(3, 12))
    blocks, preds, obs, routes = [], [], [], []
    for s in range(4):
        freq = rng.uniform(1 / 500, 1 / 200, size=(3, 2))
        fields = np.sin(xy @ freq.T + rng.uniform(0, 2 * np.pi, 3))
        truth = np.clip(2.0 + fields @ load + rng.normal(scale=np.linspace(0.1, 1.2, 12), size=(64, 12)), 0, None)
        blocks.append(truth)
        preds.append(np.clip(2.0 + 0.7 * fields @ load + rng.normal(scale=0.3, size=(64, 12)), 0, None))
        ct = ("IDC", "PRAD")[s % 2]
        base = np.array([0.6, 0.3, 0.1]) if ct == "IDC" else np.array([0.15, 0.35, 0.5])
        routes.append(rng.dirichlet(base * 20, size=64))
        obs.append(
            pd.DataFrame(
                {"library_id": f"S{s}", "cancer_type": ct, "technology": "Spatial Transcriptomics"},
                index=[f"S{s}_{i}" for i in range(64)],
            )
        )
    obs_df = pd.concat(obs)
    for col in obs_df:
        obs_df[col] = obs_df[col].astype("category")
    genes = [f"G{j:02d}" for j in range(12)]
    X = np.concatenate(blocks).astype(np.float32)
    a = AnnData(X=X.copy(), obs=obs_df, var=pd.DataFrame(index=genes))
    a.layers["log1p"] = X
    a.obsm["spatial"] = np.tile(xy, (4, 1)).astype(np.float64)
    a.obs["pixel_size_um"] = 1.0
    a.obs["spot_diameter_um"] = 80.0
    a.obsm["pred"] = pd.DataFrame(np.concatenate(preds).astype(np.float32), index=a.obs_names, columns=genes)
    a.obsm["pred_routing"] = pd.DataFrame(
        np.concatenate(routes).astype(np.float32), index=a.obs_names, columns=[f"expert_{e}" for e in range(3)]
    )
    return a


@pytest.fixture(scope="session")
def constructed() -> AnnData:
    """The table of :func:`_grid_table` evaluated with ``tl.evaluate`` (pcc, gsc, ssc, mse), plus a guidance sweep
    and a training history written by hand. Tests must not modify it."""
    a = _grid_table()
    hf.tl.evaluate(a, pred_key="pred", metrics=["pcc", "gsc", "ssc", "mse"], k=None)
    sweep = pd.DataFrame(
        {"guidance": [0.0, 0.5, 1.0, 1.5, 2.0, 3.0], "w1": [0.52, 0.47, 0.45, 0.46, 0.49, 0.58]}
    ).assign(cosine=[0.21, 0.19, 0.18, 0.16, 0.15, 0.17])
    tau = 0.05
    sweep["feasible"] = sweep["w1"] <= (1 + tau) * sweep["w1"].min()
    sweep["chosen"] = sweep["guidance"] == 1.5
    a.uns["pred_guidance"] = {"sweep": sweep, "tau": tau, "chosen": 1.5, "split": "val"}
    epochs = np.arange(8)
    vae = pd.DataFrame(
        {
            "epoch": epochs,
            "train_loss": 2.0 * np.exp(-epochs / 3) + 0.5,
            "train_rec": 1.8 * np.exp(-epochs / 3) + 0.45,
            "train_kl": 0.2 + 0.02 * epochs,
            "val_loss": 2.1 * np.exp(-epochs / 3.5) + 0.55,
            "val_rec": 1.9 * np.exp(-epochs / 3.5) + 0.5,
            "val_kl": 0.21 + 0.02 * epochs,
        }
    )
    flow = pd.DataFrame(
        {
            "epoch": epochs,
            "train_loss": 3.0 * np.exp(-epochs / 4) + 1.0,
            "train_flow": 2.0 * np.exp(-epochs / 4) + 0.8,
            "train_gene": 0.8 * np.exp(-epochs / 2) + 0.2,
            "train_aux": 1.0 + 0.05 * np.exp(-epochs),
            "train_load_0": 0.5 - 0.02 * epochs,
            "train_load_1": 0.3 + 0.01 * epochs,
            "train_load_2": 0.2 + 0.01 * epochs,
            "val_loss": 2.9 * np.exp(-epochs / 4) + 1.1,
            "val_flow": 2.0 * np.exp(-epochs / 4) + 0.9,
            "val_gene": 0.9 * np.exp(-epochs / 2) + 0.2,
        }
    )
    a.uns["pred"] = {"history": {"vae": vae, "flow": flow}, "genes": list(a.var_names)}
    return a


def snapshot(table: AnnData) -> dict:
    """What a plot must leave unchanged: obs, obsm, layers, uns keys and values (for later comparison)."""
    return {
        "obs": table.obs.copy(),
        "obsm": {k: (v.copy() if hasattr(v, "copy") else v) for k, v in table.obsm.items()},
        "layers": sorted(table.layers),
        "uns": sorted(table.uns),
        "X": table.X.copy(),
    }


def assert_unchanged(table: AnnData, before: dict) -> None:
    pd.testing.assert_frame_equal(table.obs, before["obs"])
    assert sorted(table.obsm) == sorted(before["obsm"])
    for k, v in before["obsm"].items():
        now = table.obsm[k]
        if isinstance(v, pd.DataFrame):
            pd.testing.assert_frame_equal(now, v)
        else:
            np.testing.assert_array_equal(np.asarray(now), np.asarray(v))
    assert sorted(table.layers) == before["layers"]
    assert sorted(table.uns) == before["uns"]
    X, Y = table.X, before["X"]
    X = X.toarray() if hasattr(X, "toarray") else X
    Y = Y.toarray() if hasattr(Y, "toarray") else Y
    np.testing.assert_array_equal(X, Y)


@pytest.fixture
def compare_figure(tmp_path):
    """``compare_figure(fig, name)``: the figure saved at fixed dpi must match ``tests/pl/_images/<name>.png``.

    ``HISTOFLOW_UPDATE_BASELINES=1`` rewrites the baselines instead.
    """
    from matplotlib.testing.compare import compare_images

    def compare(fig, name: str, tol: float = TOL) -> None:
        actual = tmp_path / f"{name}.png"
        fig.savefig(actual, dpi=DPI)
        plt.close(fig)
        expected = IMAGES / f"{name}.png"
        if os.environ.get("HISTOFLOW_UPDATE_BASELINES", "") == "1":
            IMAGES.mkdir(exist_ok=True)
            expected.write_bytes(actual.read_bytes())
            return
        assert expected.exists(), f"No baseline {expected}; run with HISTOFLOW_UPDATE_BASELINES=1 to create it."
        result = compare_images(str(expected), str(actual), tol=tol)
        assert result is None, result

    return compare


@pytest.fixture
def guard() -> SimpleNamespace:
    """``guard.snapshot(table)`` then ``guard.check(table, snap)``: the table was left as it was."""
    return SimpleNamespace(snapshot=snapshot, check=assert_unchanged)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")
