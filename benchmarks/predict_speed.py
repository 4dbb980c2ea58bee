"""Prediction speed of MoLF: spots per second and peak memory.

    python benchmarks/predict_speed.py [--sizes 10000 100000] [--repeats 3] [--threads 2] [--models molf molf_16 mlp]
    python benchmarks/predict_speed.py --device cuda [--sizes 10000 100000]   # on a GPU
    python benchmarks/predict_speed.py --set cond_dim=128 --set vae_decoder_hidden=256   # other MoLF settings
    python benchmarks/predict_speed.py --feature-dim 3840   # features with two context patches (3 x 1280)

Each configuration runs in a fresh process (peak RSS is per process). Rows:
- MoLF, steps = 1 with guidance (w = 2: conditional and null branch in one batched forward pass),
- MoLF, steps = 1 with guidance, one draw from the prior mean (``temperature=0``: the null branch is evaluated once),
- the same through ``tl.predict`` (the predictions written to the table), then smoothed with
  ``tl.smooth_predictions`` (each spot averaged with its spatial neighbours) on a graph built before the timed call
  (``obsp["spatial_connectivities"]``, as squidpy leaves it), with one weight per gene (given, as a former call
  stores them) on that graph, with the graph built in the timed call, and
  smoothed on the given graph then blended half and half with the ridge probe (its prediction through ``tl.predict``,
  written to the table, and ``tl.blend_predictions`` timed too), and the same with one smoothing weight and one blend
  weight per gene (given, as stored by ``tl.smooth_predictions`` with a spread and ``tl.select_blend``),
- MoLF, steps = 10 with guidance,
- MoLF, steps = 1 with guidance, mean of 16 draws (``n_samples=16``: the condition is encoded once, each draw is a
  velocity evaluation and a decoder pass),
- MoLF, steps = 1 with guidance, mean of 4 antithetic draws (``antithetic=True``: two pairs ``z0``, ``-z0``),
- three MoLF models (``tl.predict`` on the list, as from ``tl.fit_molf_ensemble``), steps = 1 with guidance, 16
  independent draws each, 2 antithetic draws each, and one draw each from the prior mean (``temperature=0``): the
  HER2ST ensemble settings of the benchmarks page; their time includes writing the predictions to the table,
- two MoLF models, one draw each from the prior mean (the two-member ensemble of the benchmarks page),
- MoLF, steps = 1 with a condition width of 128 instead of the paper's 256 (``cond_dim=128``),
- MoLF, steps = 1 without spatial context (bag of patches),
- the ridge probe (``RidgeProbe.predict``: one affine map of the features; fitted on 5,000 spots before timing),
- the MLP baseline (one forward pass),
all on the same synthetic table (1280-d features as from EfficientNet-Lite0, a Visium-like grid, 50 genes;
``--feature-dim 3840`` for the spot patch and two context patches concatenated, as ``benchmarks/her2st.py
--context-um 224 448`` embeds them).
Weights are random: speed does not depend on training. Ratios are against the MLP baseline, measured in the same run.
With ``--device cuda`` every model predicts on the GPU (one untimed warm-up call first) and the table adds the peak
GPU memory; the prior noise is still drawn on the CPU and the results come back to the CPU, as in ``tl.predict``.
``--set KEY=VALUE`` (as ``histoflow fit --set``) changes a setting of every MoLF row.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time

import numpy as np


def _table(n: int, seed: int = 0, dim: int = 1280):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n / 4)))
    per = side * side
    libs = np.repeat([f"S{i}" for i in range(4)], per)[:n]
    g = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)
    coords = np.concatenate([g] * 4)[:n] * 100.0
    obs = pd.DataFrame(
        {
            "library_id": libs,
            "cancer_type": np.where(libs < "S2", "IDC", "PRAD"),
            "split": np.where(libs == "S3", "val", "train"),
            "pixel_size_um": 1.0,
        },
        index=[f"c{i}" for i in range(n)],
    )
    a = ad.AnnData(sp.csr_matrix(rng.poisson(2, size=(n, 50)).astype(np.float32)), obs=obs)
    a.var_names = [f"G{i}" for i in range(50)]
    a.layers["log1p"] = a.X.copy()
    a.layers["log1p"].data = np.log1p(a.layers["log1p"].data)
    a.obsm["spatial"] = coords
    a.obsm["X_efficientnet_lite0"] = rng.normal(size=(n, dim)).astype(np.float32)
    return a


#: rows of one model at temperature 0 through ``tl.predict``: alone, then smoothed on a given graph, and smoothed with
#: the graph built in the timed call
TL_ROWS = (
    "molf_t0_tl", "molf_t0_smooth", "molf_t0_smooth_genes", "molf_t0_smooth_graph", "molf_t0_smooth_ridge",
    "molf_t0_genes_ridge",
)  # fmt: skip


def _ridge(a):
    """The ridge probe with an intercept, fitted on the first 5,000 spots of ``a`` (not timed)."""
    from histoflow.models import RidgeProbe

    return RidgeProbe(a[:5000].copy(), embedding_key="X_efficientnet_lite0", fit_intercept=True).train()


def _run(kind: str, n: int, repeats: int, threads: int, device: str, config: dict, dim: int, q: mp.Queue) -> None:
    import torch

    torch.set_num_threads(threads)
    a = _table(n, dim=dim)
    times = []
    gpu = device.startswith("cuda")
    warmup = 1 if gpu else 0
    if kind == "ridge":
        m = _ridge(a)
        for _ in range(repeats):
            t = time.perf_counter()
            m.predict(a)
            times.append(time.perf_counter() - t)
    elif kind == "mlp":
        from histoflow.models import MLPBaseline

        m = MLPBaseline(a, embedding_key="X_efficientnet_lite0", layer="log1p")
        m.train(max_epochs=1, accelerator="cpu", devices=1, enable_progress_bar=False, early_stopping=False)
        m.module.to(device)  # predicts where its weights are
        for i in range(warmup + repeats):
            t = time.perf_counter()
            m.predict(a)
            if i >= warmup:
                times.append(time.perf_counter() - t)
    else:
        from histoflow.models import MoLF

        spatial = None if kind == "molf_bag" else "window"
        kw = {**config, "spatial_context": spatial, **({"cond_dim": 128} if kind == "molf_128" else {})}
        m = MoLF(a, **kw)
        m.is_trained = True
        steps = 10 if kind == "molf_10" else 1
        draws = {"molf_16": 16, "molf_anti4": 4, "ens3_16": 16, "ens3_anti2": 2}.get(kind, 1)
        sampling = {"steps": steps, "guidance": 2.0, "n_samples": draws, "antithetic": "anti" in kind}
        through_tl = kind in TL_ROWS  # one model through tl.predict (writing the table), then maybe smoothed
        if kind.endswith("_t0") or through_tl:
            sampling["temperature"] = 0.0
        ensemble = kind.startswith("ens")
        import histoflow as hf

        if kind in TL_ROWS and kind not in ("molf_t0_tl", "molf_t0_smooth_graph"):  # the graph exists: not timed
            a.obsp["spatial_connectivities"] = hf.tl.metrics.spatial_connectivity(a)
        smooth_kw, blend = {}, {"molf_smoothed": 0.5, "ridge": 0.5}
        if kind in ("molf_t0_smooth_genes", "molf_t0_genes_ridge"):  # one weight per gene, as stored by a former call
            import pandas as pd

            genes = pd.Index([str(g) for g in a.var_names], name="gene")
            smooth_kw["self_weight"] = pd.Series(np.linspace(0.2, 1.0, len(genes)), index=genes)
            w = np.linspace(0.1, 0.9, len(genes))
            blend = pd.DataFrame({"molf_smoothed": w, "ridge": 1.0 - w}, index=genes)  # gene-wise blend weights
        ridge = _ridge(a) if kind.endswith("_ridge") else None
        if ensemble:  # ens<N>_*: N members with their own weights, predicted through tl.predict
            members = [m]
            for seed in range(1, int(kind[3])):
                other = MoLF(a, **{**kw, "seed": seed})
                other.is_trained = True
                members.append(other)
        for i in range(warmup + repeats):
            if gpu and i == warmup:
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            if ensemble:
                hf.tl.predict(members, a, **sampling, device=device)
            elif through_tl:
                hf.tl.predict(m, a, **sampling, device=device, key_added="molf")
                if kind != "molf_t0_tl":
                    graph = None if kind == "molf_t0_smooth_graph" else "spatial_connectivities"
                    hf.tl.smooth_predictions(a, pred_key="molf", connectivity_key=graph, **smooth_kw)
                if ridge is not None:  # the probe's predictions into the table (tl.predict), then the blend
                    hf.tl.predict(ridge, a, key_added="ridge")
                    hf.tl.blend_predictions(a, blend)
            else:
                m.predict(a, **sampling, device=device)
            if i >= warmup:
                times.append(time.perf_counter() - t)
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if gpu else float("nan")
    q.put((statistics.median(times), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, gpu_mb))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="torch device of the predictions (cpu, cuda, cuda:1, ...)")
    p.add_argument("--models", nargs="+", help="run only these rows (the MLP baseline always runs: ratios need it)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="MoLF setting for every MoLF row; repeatable")
    p.add_argument("--feature-dim", type=int, default=1280, help="width of the patch features (default 1280)")
    args = p.parse_args()
    if args.feature_dim < 1:
        p.error(f"--feature-dim must be a positive width, got {args.feature_dim}")
    from histoflow.cli import _parse_settings

    config, train = _parse_settings(p, args.set, "molf")
    if train:
        p.error(f"--set {sorted(train)}: training settings do not change prediction speed; give model settings")
    ctx = mp.get_context("spawn")
    rows = [
        ("molf", "MoLF, 1 step, guidance w=2"),
        ("molf_t0", "MoLF, 1 step, w=2, temperature 0"),
        ("molf_t0_tl", "MoLF, 1 step, w=2, temperature 0, tl.predict"),
        ("molf_t0_smooth", "the same + tl.smooth_predictions (graph given)"),
        ("molf_t0_smooth_graph", "the same + tl.smooth_predictions (graph built)"),
        ("molf_t0_smooth_genes", "the same + tl.smooth_predictions, gene-wise weights (graph given)"),
        ("molf_t0_smooth_ridge", "the same (graph given) + ridge probe + tl.blend_predictions"),
        ("molf_t0_genes_ridge", "the same, smoothing and blend gene-wise (weights given)"),
        ("molf_10", "MoLF, 10 steps, guidance w=2"),
        ("molf_16", "MoLF, 1 step, w=2, mean of 16 draws"),
        ("molf_anti4", "MoLF, 1 step, w=2, mean of 4 antithetic draws"),
        ("ens3_16", "3 MoLF models, 1 step, w=2, 16 draws each"),
        ("ens3_anti2", "3 MoLF models, 1 step, w=2, 2 antithetic draws each"),
        ("ens3_t0", "3 MoLF models, 1 step, w=2, temperature 0 (1 draw each)"),
        ("ens2_t0", "2 MoLF models, 1 step, w=2, temperature 0 (1 draw each)"),
        ("molf_128", "MoLF, 1 step, w=2, cond_dim=128"),
        ("molf_bag", "MoLF, 1 step, w=2, no spatial context"),
        ("ridge", "ridge probe"),
        ("mlp", "MLP baseline"),
    ]
    if args.models:
        unknown = sorted(set(args.models) - {k for k, _ in rows})
        if unknown:
            p.error(f"unknown --models {unknown}; choose from {[k for k, _ in rows]}")
        rows = [(k, label) for k, label in rows if k in args.models or k == "mlp"]
    gpu = args.device.startswith("cuda")
    if gpu:
        import torch

        print(f"device={args.device} ({torch.cuda.get_device_name(args.device)}), torch {torch.__version__}")
    print(f"threads={args.threads} repeats={args.repeats} (median), features {args.feature_dim}-d, 50 genes")
    if config:
        print("MoLF settings: " + ", ".join(f"{k}={v}" for k, v in config.items()))
    print()
    print("| spots | model | seconds | spots/s | vs MLP | peak RSS (MB) |" + (" peak GPU (MB) |" if gpu else ""))
    print("|---|---|---|---|---|---|" + ("---|" if gpu else ""))
    for n in args.sizes:
        res = {}
        for kind, _ in rows:
            q = ctx.Queue()
            proc = ctx.Process(
                target=_run, args=(kind, n, args.repeats, args.threads, args.device, config, args.feature_dim, q)
            )
            proc.start()
            res[kind] = q.get()
            proc.join()
        base = n / res["mlp"][0]
        for kind, label in rows:
            sec, rss, gpu_mb = res[kind]
            row = f"| {n} | {label} | {sec:.3f} | {n / sec:,.0f} | {n / sec / base:.2f}× | {rss:,.0f} |"
            print(row + (f" {gpu_mb:,.0f} |" if gpu else ""))


if __name__ == "__main__":
    main()
