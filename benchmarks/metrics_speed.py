"""Speed of ``tl.metrics`` and ``tl.evaluate`` on 20k spots × 1.4k genes, against naive or squidpy baselines.

    python benchmarks/metrics_speed.py [--n-slides 5] [--grid 63 64] [--n-genes 1400] [--repeats 3]

Synthetic data with spatial structure: ``n_slides`` Visium-like hexagonal grids (63 × 64 = 4,032 spots each, 20,160
in all), log1p-like expression = slide offset + loadings @ 6 smooth spatial fields + gene-specific noise (float32, as
``pp.normalize`` writes it); the prediction is a noisy, shrunk copy. A MoLF-like panel is attached (HVG flag on 300
genes, Hallmark variance tiers on 1,100 genes, 50 pathways of 20–200 genes) so ``evaluate`` reports every gene subset.

Prints seconds (median over repeats) per metric and for ``evaluate`` as a whole, each with its baseline in the same
run where one exists:

- PCC per slide: a per-gene ``scipy.stats.pearsonr`` loop over every slide (run in full);
- Moran's I: ``squidpy.gr.spatial_autocorr(mode="moran", n_perms=None)`` on the same graph;
- W1 per gene / per spot: ``scipy.stats.wasserstein_distance`` loops on a subset, extrapolated linearly.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from collections.abc import Callable

import anndata as ad
import numpy as np
import pandas as pd
import scipy.stats as st

import histoflow as hf
from histoflow.tl import metrics as M
from histoflow.tl._evaluate import METRIC_FAMILIES


def hex_grid(n_rows: int, n_cols: int, spacing: float = 100.0) -> np.ndarray:
    r, c = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    return np.c_[(c * spacing + (r % 2) * spacing / 2).ravel(), (r * spacing * np.sqrt(3) / 2).ravel()]


def make_data(n_slides: int, grid: tuple[int, int], n_genes: int, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    xy = hex_grid(*grid)
    loadings = rng.normal(size=(6, n_genes)) * 0.5
    noise = np.geomspace(0.1, 1.2, n_genes)
    blocks, obs = [], []
    for s in range(n_slides):
        freq = rng.uniform(1 / 1500, 1 / 300, size=(6, 2))
        fields = np.sin(xy @ freq.T + rng.uniform(0, 2 * np.pi, size=6))
        x = 2.0 + rng.normal(scale=0.3) + fields @ loadings + rng.normal(size=(xy.shape[0], n_genes)) * noise
        blocks.append(np.clip(x, 0, None).astype(np.float32))
        obs.append(pd.DataFrame({"library_id": f"S{s}", "cancer_type": ("IDC", "PRAD", "COAD")[s % 3]},
                                index=[f"S{s}_{i}" for i in range(xy.shape[0])]))  # fmt: skip
    X = np.concatenate(blocks)
    obs_df = pd.concat(obs)
    obs_df["technology"] = "Visium"
    for col in obs_df.columns:
        obs_df[col] = pd.Categorical(obs_df[col])
    genes = [f"G{j:04d}" for j in range(n_genes)]
    adata = ad.AnnData(X=X, obs=obs_df, var=pd.DataFrame(index=genes), obsm={"spatial": np.tile(xy, (n_slides, 1))})
    adata.layers["log1p"] = X
    pred = (0.6 * X + 0.4 * X.mean(axis=0) + rng.normal(size=X.shape).astype(np.float32) * 0.5).astype(np.float32)
    adata.obsm["pred"] = pd.DataFrame(pred, index=adata.obs_names, columns=genes)
    # a MoLF-like panel: HVG flag, Hallmark tiers and pathways
    adata.var["histoflow_panel_hvg"] = np.arange(n_genes) < min(300, n_genes)
    hall = genes[min(300, n_genes) :]
    tiers = {g: ("low", "mid", "high")[i % 3] for i, g in enumerate(hall)}
    sets = {f"HALLMARK_{k:02d}": list(rng.choice(hall, size=min(len(hall), int(rng.integers(20, 200))),
                                                 replace=False)) for k in range(50)}  # fmt: skip
    adata.uns["histoflow_panel"] = {"genes": genes, "hallmark_tiers": tiers, "hallmark_sets": sets}
    return adata


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-slides", type=int, default=5)
    p.add_argument("--grid", type=int, nargs=2, default=[63, 64])
    p.add_argument("--n-genes", type=int, default=1400)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--w1-subset", type=int, default=100, help="genes/spots timed in the scipy W1 baselines")
    args = p.parse_args()
    warnings.filterwarnings("ignore")

    # imports outside the timings
    import sklearn.cluster  # noqa: F401
    import squidpy as sq

    adata = make_data(args.n_slides, tuple(args.grid), args.n_genes)
    t = adata.layers["log1p"]
    pr = adata.obsm["pred"].to_numpy()
    lib = adata.obs["library_id"].to_numpy()
    slides = [np.flatnonzero(lib == s) for s in np.unique(lib)]
    n, g = t.shape
    R = args.repeats
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{n} spots × {g} genes, {len(slides)} slides; median of {R} repeats (seconds)")
    print(f"{cpus} CPU cores, load average {load:.1f} at start\n")
    rows: list[tuple[str, float, str, float | None]] = []

    def add(name: str, sec: float, base: str = "", base_sec: float | None = None) -> None:
        rows.append((name, sec, base, base_sec))
        ratio = f"  ({base_sec / sec:.0f}× faster than {base})" if base_sec else ""
        print(f"  {name}: {sec:.3f} s{ratio}", flush=True)

    # PCC
    sec, _ = timed(lambda: M.pcc(t, pr, groups=lib), R)

    def naive_pcc() -> float:
        vals = []
        for i in slides:
            tt, pp = t[i], pr[i]
            vals.append(np.nanmean([st.pearsonr(tt[:, j], pp[:, j])[0] for j in range(g)]))
        return float(np.mean(vals))

    base, ref = timed(naive_pcc, 1)
    assert abs(ref - M.pcc(t, pr, groups=lib)) < 1e-5
    add("pcc (per slide, all genes)", sec, "scipy.pearsonr loop", base)
    sec, _ = timed(lambda: M.pcc(t, pr, aggregation="pooled"), R)
    add("pcc (pooled)", sec)

    # GSC
    sec, _ = timed(lambda: M.gsc(t, pr, groups=lib), R)
    add("gsc (per slide)", sec)
    sec, _ = timed(lambda: M.gsc(t, pr, aggregation="pooled"), R)
    add("gsc (pooled)", sec)

    # spatial graph, Moran's I, SSC
    sec, W = timed(lambda: M.spatial_connectivity(adata), R)
    add(f"spatial_connectivity (squidpy grid, {len(slides)} slides)", sec)
    sec, mi = timed(lambda: M.morans_i(t, W), R)
    tmp = ad.AnnData(X=t)
    tmp.obsp["spatial_connectivities"] = W

    def squidpy_moran() -> np.ndarray:
        return sq.gr.spatial_autocorr(tmp, mode="moran", n_perms=None, copy=True, show_progress_bar=False)

    base, df = timed(squidpy_moran, R)
    assert np.allclose(df.loc[tmp.var_names, "I"].to_numpy(), mi, atol=1e-5)
    add("morans_i (all spots)", sec, "squidpy.spatial_autocorr", base)
    sec, _ = timed(lambda: M.ssc(t, pr, W, groups=lib), R)
    add("ssc (per slide)", sec)

    # distributions
    sec, w1g = timed(lambda: M.wasserstein_per_gene(t, pr), R)
    k = min(args.w1_subset, g)
    base, _ = timed(lambda: [st.wasserstein_distance(t[:, j], pr[:, j]) for j in range(k)], 1)
    add("wasserstein_per_gene", sec, f"scipy loop ({k} genes, extrapolated)", base * g / k)
    sec, _ = timed(lambda: M.wasserstein_per_spot(t, pr), R)
    k = min(args.w1_subset * 10, n)
    base, _ = timed(lambda: [st.wasserstein_distance(t[i], pr[i]) for i in range(k)], 1)
    add("wasserstein_per_spot", sec, f"scipy loop ({k} spots, extrapolated)", base * n / k)
    sec, _ = timed(lambda: M.cosine_distance(t, pr, groups=lib), R)
    add("cosine_distance", sec)

    # domains
    sec, _ = timed(lambda: [M.domain_agreement(t[i], pr[i], n_domains=7) for i in slides], R)
    add(f"domain_agreement (k-means, {len(slides)} slides)", sec)

    # evaluate as a whole
    sec, df = timed(lambda: hf.tl.evaluate(adata, pred_key="pred", n_domains=7), R)
    add(f"evaluate (all metrics, {df['gene_set'].nunique()} gene sets, {len(df)} rows)", sec)
    no_dom = [m for m in METRIC_FAMILIES if m != "domains"]
    sec, _ = timed(lambda: hf.tl.evaluate(adata, pred_key="pred", metrics=no_dom), R)
    add("evaluate (without domains)", sec)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nload average {load:.1f} at the end")
    print("\n| step | histoflow s | baseline | baseline s | speed-up |\n|---|---|---|---|---|")
    for name, sec, base_name, base_sec in rows:
        b = f"{base_sec:.2f}" if base_sec else "—"
        r = f"{base_sec / sec:.0f}×" if base_sec else "—"
        print(f"| {name} | {sec:.3f} | {base_name or '—'} | {b} | {r} |")


if __name__ == "__main__":
    main()
