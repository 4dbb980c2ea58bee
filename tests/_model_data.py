"""A tiny six-slide table for the model tests (MoLF, FLAG, routers, graph, scVI): importable from every test folder."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

import histoflow as hf

#: a MoLF small enough for the tiny tables of the tests (seconds per fit on a CPU)
MOLF_SMALL = {
    "latent_dim": 8,
    "vae_d_model": 32,
    "vae_ff_dim": 64,
    "cond_dim": 32,
    "expert_width": 32,
    "n_experts": 3,
    "top_k": 2,
    "vae_heads": 2,
    "expert_heads": 2,
}


def molf_table(seed: int = 0, n_per_slide: int = 36, n_genes: int = 12) -> AnnData:
    """Six slides on 6×6 grids, three cancer types; features carry (noisily) the expression programs."""
    rng = np.random.default_rng(seed)
    rows, obs = [], []
    for s in range(6):
        g = np.stack(np.meshgrid(np.arange(6), np.arange(6)), -1).reshape(-1, 2)[:n_per_slide]
        prog = np.column_stack([np.sin(g[:, 0] / 2 + s), np.cos(g[:, 1] / 2 - s)])
        rows.append((g * 100.0, prog))
        ct = ["IDC", "PRAD", "COAD"][s % 3]
        obs.append(
            pd.DataFrame(
                {
                    "library_id": f"S{s}",
                    "cancer_type": ct,
                    "patient": f"P{s}",
                    "split": ["train", "train", "train", "val", "val", "test"][s],
                },
                index=[f"S{s}_{i}" for i in range(len(g))],
            )
        )
    obs = pd.concat(obs)
    coords = np.concatenate([r[0] for r in rows])
    prog = np.concatenate([r[1] for r in rows])
    load = rng.normal(size=(2, n_genes))
    logmu = 1.0 + prog @ load * 0.8
    counts = rng.poisson(np.exp(logmu)).astype(np.float32)
    a = AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)]))
    a.obs["pixel_size_um"] = 1.0
    a.obsm["spatial"] = coords
    a.obsm["X_feat"] = np.concatenate([prog, rng.normal(size=(len(obs), 6))], 1).astype(np.float32) @ rng.normal(
        size=(8, 16)
    ).astype(np.float32)
    for c in ("library_id", "cancer_type", "split"):
        a.obs[c] = a.obs[c].astype("category")
    hf.pp.normalize(a)
    return a


def tiny_mlp_fit():
    """The MLP baseline's Lightning module (6 → 3, seeded) and its train/validation loaders (64 + 32 rows)."""
    from histoflow.models._baselines import _MLPModule
    from histoflow.models._train import seed_everything, tensor_loaders

    rng = np.random.default_rng(0)
    X = rng.normal(size=(96, 6)).astype(np.float32)
    Y = (X[:, :3] * 2 + 1).astype(np.float32)
    M = np.ones_like(Y, dtype=bool)
    seed_everything(0)
    module = _MLPModule(6, 3, hidden_dims=(16,), dropout=0.0, lr=1e-2)
    train, val = tensor_loaders([X[:64], Y[:64], M[:64]], [X[64:], Y[64:], M[64:]], batch_size=16, seed=0)
    return module, train, val
