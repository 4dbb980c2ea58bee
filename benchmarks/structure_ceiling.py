"""How much structure can a point prediction of a given rank carry? GSC and SSC of oracle predictions on HER2ST.

    python benchmarks/structure_ceiling.py [--ranks 1 2 3 5 10 20] [--sections C2 C3 C4 C5 C6] [--csv out.csv]

No model is trained and no image is read. On the protocol of ``benchmarks/her2st.py`` (patient C, leave one section
out; the next section validates, the other three train; top-50 HVG, ``seurat_v3``, chosen on the training sections;
log1p of the raw counts), every test section's true expression ``T`` is replaced by predictions built from the truth
itself, and scored with histoflow's PCC, GSC and SSC (``histoflow.tl.metrics``; the section's 4-neighbour grid):

- ``own top-k axes``: ``T`` projected on the top ``k`` principal axes of the test section itself, the best rank-``k``
  approximation of ``T`` (Eckart-Young). No prediction whose spot-to-spot variation spans ``k`` directions of gene
  space fits the section better;
- ``training top-k axes``: ``T`` projected on the top ``k`` principal axes of the training sections' expression, each
  section centred on its own mean (the directions of within-section variation a model could learn from them);
- ``mean of self and neighbours``: each spot's value averaged with the mean of its grid neighbours (a spatial
  smoother of the truth, full rank);
- ``truth + independent noise``: every gene plus seeded Gaussian noise of 3.18 times its standard deviation, an
  expected PCC of 0.3 (about the best models'), full rank, no structure added.

Two more rows are not predictions but measured expression of other sections of the same patient, for scale: GSC's and
SSC's formulas (the Pearson correlation of the upper triangles of the two gene–gene correlation matrices; of the two
vectors of per-gene Moran's I) applied to the test section's truth and

- ``another measured section``: each of the other four sections (its own spots and grid; one row per pair, so the
  spread is over the 20 pairs);
- ``the training sections pooled``: the three training sections, correlations over their spots with each section
  centred on its own mean, Moran's I the mean over the sections.

These need no pairing of spots, so they have no PCC. A prediction whose GSC is above them reproduces the test section's
gene–gene correlations better than a measured replicate of the same tissue does.

Per section it also prints the effective rank of ``T`` (participation ratio of the eigenvalues of its gene-gene
covariance, ``(sum l)^2 / sum l^2``), the principal axes needed for 90 % of its variance, and the effective rank of
its gene–gene correlation matrix (what GSC compares; ``benchmarks/her2st.py`` prints the same for predictions). Mean
± std over the folds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from her2st import correlation_rank  # noqa: E402  (the harness's `corr. rank` column, for the truth)

DEFAULT_DATA = Path(os.environ.get("HISTOFLOW_SHARED_DATA", HERE.parent.parent / "shared" / "data"))
IMAGED = ["C2", "C3", "C4", "C5", "C6"]


def effective_rank(X: np.ndarray) -> tuple[float, int]:
    """Participation ratio of the covariance eigenvalues of ``X`` (spots × genes) and the axes for 90 % variance."""
    Xc = X - X.mean(axis=0)
    lam = np.linalg.svd(Xc, compute_uv=False) ** 2
    if lam.sum() <= 0:
        return 0.0, 0
    pr = float(lam.sum() ** 2 / (lam**2).sum())
    k90 = int(np.searchsorted(np.cumsum(lam) / lam.sum(), 0.9) + 1)
    return pr, k90


def _project(T: np.ndarray, axes: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``T`` centred on ``mean``, projected on the orthonormal rows of ``axes``, plus ``mean``."""
    return mean + ((T - mean) @ axes.T) @ axes


def oracle_predictions(T: np.ndarray, T_train: np.ndarray, W, ranks: list[int], seed: int = 0) -> dict[str, np.ndarray]:
    """The rows of the table for one test section (see the module docstring); ``T_train`` is centred per section."""
    from histoflow.tl._metrics import _row_normalize

    mu = T.mean(axis=0)
    own = np.linalg.svd(T - mu, full_matrices=False)[2]
    train = np.linalg.svd(T_train, full_matrices=False)[2]
    out = {}
    for k in ranks:
        out[f"own top-{k} axes"] = _project(T, own[:k], mu)
    for k in ranks:
        out[f"training top-{k} axes"] = _project(T, train[:k], mu)
    out["mean of self and neighbours"] = 0.5 * T + 0.5 * np.asarray(_row_normalize(W) @ T)
    # independent noise per gene with sd = s × the gene's sd gives an expected PCC of 1 / sqrt(1 + s^2) = 0.3
    rng = np.random.default_rng(seed)
    s = np.sqrt(1 / 0.3**2 - 1)
    out["truth + independent noise (PCC about 0.3)"] = T + rng.normal(size=T.shape) * (s * T.std(axis=0))
    return out


def structure_agreement(C_t: np.ndarray, I_t: np.ndarray, C_x: np.ndarray, I_x: np.ndarray) -> dict[str, float]:
    """GSC's and SSC's formulas on precomputed pieces: gene–gene correlation matrices ``C_*`` and Moran's I ``I_*``.

    GSC: Pearson correlation of the upper triangles (diagonal excluded) over the pairs defined in both (genes constant
    in either are ``NaN`` in :func:`histoflow.tl.metrics.gene_correlation`); SSC: Pearson correlation of the Moran's I
    vectors over the genes defined in both. For a prediction of the same spots these are ``metrics.gsc`` and
    ``metrics.ssc``; here ``x`` may be other spots (another section), so there is no PCC.
    """
    from histoflow.tl._metrics import _pearson_valid  # SSC's own masked Pearson correlation

    iu = np.triu_indices(C_t.shape[0], k=1)
    return {"PCC": np.nan, "GSC": _pearson_valid(C_t[iu], C_x[iu]), "SSC": _pearson_valid(I_t, I_x)}


def measured_rows(T: np.ndarray, W, others: dict, T_train: np.ndarray, train_libs: list[str]) -> list[dict]:
    """The two rows of measured expression (module docstring): ``others`` maps a section to ``(X, W)``."""
    from histoflow.tl import metrics

    C_t, I_t = metrics.gene_correlation(T), metrics.morans_i(T, W)
    rows = []
    for X, W_x in others.values():
        rows.append(
            {"prediction": "another measured section", **structure_agreement(C_t, I_t, *_pieces(metrics, X, W_x))}
        )
    with warnings.catch_warnings():  # a gene constant on every training section has no Moran's I: NaN, left out
        warnings.simplefilter("ignore", RuntimeWarning)
        I_train = np.nanmean([metrics.morans_i(*others[lib]) for lib in train_libs], axis=0)
    pooled = structure_agreement(C_t, I_t, metrics.gene_correlation(T_train), I_train)
    rows.append({"prediction": "the training sections pooled", **pooled})
    return rows


def _pieces(metrics, X: np.ndarray, W) -> tuple[np.ndarray, np.ndarray]:
    return metrics.gene_correlation(X), metrics.morans_i(X, W)


def _dense(X) -> np.ndarray:
    return np.asarray(X.toarray() if hasattr(X, "toarray") else X, dtype=np.float64)


def run(args: argparse.Namespace) -> pd.DataFrame:
    import histoflow as hf
    from histoflow.tl import metrics

    t0 = time.perf_counter()
    sdata = hf.io.read_her2st(Path(args.path), sections=args.sections, load_images=False)
    hf.pp.normalize(sdata)
    table = sdata.tables["table"]
    libs = table.obs["library_id"].astype(str).to_numpy()
    graphs = {lib: metrics.spatial_connectivity(table[libs == lib]) for lib in args.sections}
    rows, ranks = [], []
    for i, test in enumerate(args.sections):
        val = args.sections[(i + 1) % len(args.sections)]
        roles = {s: "test" if s == test else "val" if s == val else "train" for s in args.sections}
        table.obs["split"] = table.obs["library_id"].astype(str).map(roles)
        train = (table.obs["split"] == "train").to_numpy()
        hf.pp.select_genes(sdata, "hvg", n_top=args.n_genes, groupby=None, mask_obs=train)
        genes = table.var_names[table.var["histoflow_panel"].to_numpy()]
        is_test = (table.obs["split"] == "test").to_numpy()
        sub = table[is_test, genes]
        T = _dense(sub.layers["log1p"])
        tr = table[train, genes]
        T_train = _dense(tr.layers["log1p"])
        for lib in tr.obs["library_id"].unique():  # within-section structure, not differences between sections
            r = (tr.obs["library_id"] == lib).to_numpy()
            T_train[r] -= T_train[r].mean(axis=0)
        W = metrics.spatial_connectivity(sub)
        pr, k90 = effective_rank(T)
        ranks.append({"test": test, "effective rank": pr, "axes for 90 %": k90, "corr": correlation_rank(T)})
        for name, P in oracle_predictions(T, T_train, W, args.ranks, args.seed).items():
            rows.append({"test": test, "prediction": name, **_scores(metrics, T, P, W)})
        others = {lib: (_dense(table[libs == lib, genes].layers["log1p"]), graphs[lib]) for lib in args.sections}
        others.pop(test)
        train_libs = [lib for lib, role in roles.items() if role == "train"]
        rows += [{"test": test, **row} for row in measured_rows(T, W, others, T_train, train_libs)]
    res = pd.DataFrame(rows)
    print(
        f"HER2ST sections {', '.join(args.sections)}: top-{args.n_genes} HVG per fold, log1p; "
        f"{time.perf_counter() - t0:.0f} s\n"
    )
    print("| prediction (from the truth) | PCC | GSC | SSC |\n|---|---|---|---|")
    for name, g in res.groupby("prediction", sort=False):
        cells = " | ".join(_cell(g[c]) for c in ("PCC", "GSC", "SSC"))
        print(f"| {name} | {cells} |")
    pairs = res[res["prediction"] == "another measured section"]
    print(
        f"\nAnother measured section, over the {len(pairs)} pairs of sections: GSC {pairs['GSC'].min():.3f}–"
        f"{pairs['GSC'].max():.3f}, SSC {pairs['SSC'].min():.3f}–{pairs['SSC'].max():.3f}"
    )
    rk = pd.DataFrame(ranks)
    print(
        f"\nTruth of the test sections: effective rank {rk['effective rank'].mean():.1f} ± "
        f"{rk['effective rank'].std(ddof=0):.1f}; principal axes for 90 % of the variance "
        f"{rk['axes for 90 %'].mean():.1f} ({rk['axes for 90 %'].min()}–{rk['axes for 90 %'].max()}); effective rank "
        f"of the gene–gene correlation matrix {rk['corr'].mean():.1f} ± {rk['corr'].std(ddof=0):.1f}"
    )
    if args.csv:
        res.to_csv(args.csv, index=False)
    return res


def _cell(values: pd.Series) -> str:
    """Mean ± std over the rows (ddof 0); – when undefined."""
    if values.isna().all():
        return "–"
    return f"{values.mean():.3f} ± {values.std(ddof=0):.3f}"


def _scores(metrics, T: np.ndarray, P: np.ndarray, W) -> dict[str, float]:
    return {"PCC": metrics.pcc(T, P), "GSC": metrics.gsc(T, P), "SSC": metrics.ssc(T, P, W)}


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", default=str(DEFAULT_DATA / "her2st"), help="HER2ST data folder")
    p.add_argument("--sections", nargs="+", default=IMAGED)
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 3, 5, 10, 20])
    p.add_argument("--n-genes", type=int, default=50)
    p.add_argument("--seed", type=int, default=0, help="seed of the noise row")
    p.add_argument("--csv", help="write the per-fold rows here")
    args = p.parse_args(argv)
    if len(args.sections) < 3:
        p.error("--sections needs at least 3 sections (test, validation, training)")
    if any(k < 1 for k in args.ranks):
        p.error("--ranks must be positive")
    return run(args)


if __name__ == "__main__":
    main()
