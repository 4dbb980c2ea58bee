"""Structure benchmark (issue 6): spatial graph condition, gene-embedding alignment and metadata routers.

    python benchmarks/structure.py [--datasets synthetic her2st] [--rows ...] [--epochs 60] [--folds 0 1 2 3 4]
                                   [--quick] [--threads 2] [--seed 0] [--csv results.csv]

Every row is trained on the training slides (early stopping on the validation slides), then every spot is predicted
with ``tl.predict`` and the test slides are scored with ``tl.evaluate``: PCC (per gene over a test slide's spots, mean
over genes, mean over test slides), GSC (correlation of the true and predicted gene–gene correlation matrices) and SSC
(correlation across genes of true and predicted Moran's I). Times: training (both stages) and sampling (all spots).

Rows (each is one small function; a row whose feature is missing from this checkout prints ``n/a (not available)``):

- ``molf_window``: MoLF, MoE velocity, spatial window (Transformer over the spot and its neighbours);
- ``molf_graph``: MoLF with the graph encoder (``spatial_context="graph"``: complete graph over the window, edge
  features = pairwise distance in µm and cosine similarity of the projected patch features);
- ``flag_align``: FLAG-style gene-token flow (``tl.fit_flag``'s model) with the graph condition and REPA-style
  alignment to per-gene embeddings; no gene foundation model is available offline, so the embeddings are the
  knowledge-derived ones of ``pp.gene_embeddings_from_gene_sets`` (TF-IDF + SVD of GO Biological Process 2021);
- ``flag_noalign``: the same without alignment;
- ``router_image_meta``: MoLF whose router sees the image condition and the metadata (``router="image+metadata"``);
- ``router_cancer_type``: MoLF with one expert per cancer type (``router="cancer_type"``).

Data:

- ``synthetic``: ``datasets.synthetic`` (three cancer types, IDC/PRAD/COAD), slides split by ``pp.split_slides``
  (stratified by cancer type), 50 HMHVG chosen on the training slides, EfficientNet-Lite0 features
  (``pp.embed_patches``), as in ``benchmarks/synthetic.py``; one split per ``--synthetic-splits`` seed (mean ± std
  over splits when several);
- ``her2st``: sections C2–C6 (patient C, the imaged ones; ``HISTOFLOW_SHARED_DATA`` or ``../shared/data``), leave one
  section out (the next section validates, the other three train), top-50 HVG (``seurat_v3``) on the training
  sections, EfficientNet-Lite0 features at the HEST convention (112 µm → 224 px). One section = one fold; PCC is the
  mean over genes of the per-gene correlation over that section's spots; mean ± std over folds.

Features are cached under ``--cache`` (the HER2ST file is shared with ``benchmarks/her2st.py``). ``--quick`` runs a
small synthetic set and one HER2ST fold with 6 epochs: a smoke run of every row (the scores are not meaningful).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

import histoflow as hf

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = Path(os.environ.get("HISTOFLOW_SHARED_DATA", HERE.parent.parent / "shared" / "data"))
IMAGED = ["C2", "C3", "C4", "C5", "C6"]
ENCODER = "efficientnet_lite0"
FEAT_KEY = f"X_{ENCODER}"
METRICS = ("pcc", "gsc", "ssc")


class NotAvailable(Exception):
    """The row's feature does not exist in this checkout (yet)."""


# ----------------------------------------------------------------------------------------------------------------------
# rows: each fits a model on the current split and returns it (already trained); prediction and timing are shared


def _supports(field: str, value: str) -> None:
    """Raise :class:`NotAvailable` when ``MoLFConfig.<field>`` does not accept ``value`` in this checkout."""
    from histoflow.models import MoLFConfig

    f = MoLFConfig.__dataclass_fields__.get(field)
    if f is None or f"'{value}'" not in str(f.type) and f'"{value}"' not in str(f.type):
        raise NotAvailable(f"MoLF has no {field}={value!r}")


def _molf(table, args, **cfg):
    from histoflow.models import MoLF

    for k, v in cfg.items():
        if isinstance(v, str):
            _supports(k, v)
    model = MoLF(table, embedding_key=FEAT_KEY, seed=args.seed, **cfg)
    return model.train(args.epochs, batch_size=args.batch_size, **_train_kwargs(args))


def _train_kwargs(args) -> dict:
    return {
        "accelerator": "cpu",
        "devices": 1,
        "patience": args.patience,
        "show_progress_bar": False,
        "seed": args.seed,
    }


def row_molf_window(table, args, ctx):
    return _molf(table, args, spatial_context="window")


def row_molf_graph(table, args, ctx):
    return _molf(table, args, spatial_context="graph", graph_layers=args.graph_layers)


def _flag(table, args, gene_embeddings):
    try:
        from histoflow.models import FLAG
    except (ImportError, AttributeError) as err:
        raise NotAvailable(f"histoflow.models.FLAG: {err}") from None
    model = FLAG(
        table,
        embedding_key=FEAT_KEY,
        gene_embeddings=gene_embeddings,
        seed=args.seed,
        spatial_context="graph",
        graph_layers=args.graph_layers,
    )
    return model.train(args.epochs, batch_size=args.batch_size, **_train_kwargs(args))


def row_flag_align(table, args, ctx):
    if not hasattr(hf.pp, "gene_embeddings_from_gene_sets"):
        raise NotAvailable("histoflow.pp.gene_embeddings_from_gene_sets")
    gmt = DEFAULT_DATA / "genesets" / "enrichr.GO_Biological_Process_2021.gmt"
    if not gmt.is_file():
        raise NotAvailable(f"{gmt} is missing")
    genes = table.var_names[table.var["histoflow_panel"].to_numpy()].tolist()
    key = (str(gmt), tuple(genes))
    if key not in ctx:
        ctx[key] = hf.pp.gene_embeddings_from_gene_sets(gmt, genes=genes, n_components=64, seed=args.seed)
    emb = ctx[key]
    ctx["align_note"] = f"{len(emb)}/{len(genes)} panel genes have a GO embedding"
    return _flag(table, args, emb)


def row_flag_noalign(table, args, ctx):
    return _flag(table, args, None)


def row_router_image_meta(table, args, ctx):
    return _molf(table, args, router="image+metadata")


def row_router_cancer_type(table, args, ctx):
    return _molf(table, args, router="cancer_type")


ROWS: dict[str, tuple[str, Callable]] = {
    "molf_window": ("MoLF (MoE, window context)", row_molf_window),
    "molf_graph": ("MoLF, graph encoder (distance + similarity edges)", row_molf_graph),
    "flag_align": ("FLAG-style (graph, gene-embedding alignment)", row_flag_align),
    "flag_noalign": ("FLAG-style (graph, no alignment)", row_flag_noalign),
    "router_image_meta": ("MoLF, router image+metadata", row_router_image_meta),
    "router_cancer_type": ("MoLF, router cancer_type (expert per type)", row_router_cancer_type),
}


def run_row(name: str, sdata, args, ctx) -> dict:
    """Fit, predict and score one row on the current split; never raises."""
    label, fn = ROWS[name]
    table = sdata.tables["table"]
    key = f"bench_{name}"
    rec = {"row": name, "label": label, "status": "ok"}
    try:
        t = time.perf_counter()
        model = fn(table, args, ctx)
        rec["fit_s"] = time.perf_counter() - t
        t = time.perf_counter()
        hf.tl.predict(model, sdata, steps=args.steps, seed=args.seed, key_added=key)
        rec["predict_s"] = time.perf_counter() - t
        rec["spots"] = table.n_obs
        df = hf.tl.evaluate(sdata, pred_key=key, split="test", metrics=METRICS, k=None, inplace=False)
        sel = df[(df["group"] == "all") & (df["gene_set"] == "all") & (df["aggregation"] == "per_slide")]
        for m in METRICS:
            rec[m] = float(sel.loc[sel["metric"] == m, "value"].iloc[0])
    except NotAvailable as err:
        rec["status"] = "n/a"
        rec["note"] = str(err).splitlines()[0][:120]
    except Exception as err:  # noqa: BLE001 - a benchmark row that breaks is reported, the others still run
        rec["status"] = "error"
        rec["note"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
        if args.verbose:
            traceback.print_exc()
    finally:
        for where in (table.obsm, table.layers, table.uns):
            for k in [k for k in where if k.startswith(key)]:
                del where[k]
        for k in [k for k in table.obsm if k.startswith(f"X_{key}")]:
            del table.obsm[k]
    return rec


# ----------------------------------------------------------------------------------------------------------------------
# data


def _cached_features(sdata, cache: Path, patch_px: int) -> float:
    """Put EfficientNet-Lite0 features into ``obsm``, from ``cache`` when it matches; returns embedding seconds."""
    table = sdata.tables["table"]
    if cache.is_file():
        blob = np.load(cache, allow_pickle=False)
        if list(blob["obs_names"]) == list(table.obs_names):
            table.obsm[FEAT_KEY] = blob["features"]
            return float("nan")
    t = time.perf_counter()
    hf.pp.embed_patches(sdata, ENCODER, patch_px=patch_px, show_progress_bar=False)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, obs_names=np.asarray(table.obs_names, dtype=str), features=table.obsm[FEAT_KEY])
    return time.perf_counter() - t


def synthetic_splits(args):
    """Yield (fold name, sdata) for the synthetic data set, one split per seed."""
    sd = hf.datasets.synthetic(n_slides=args.slides, grid=(args.grid, args.grid), n_genes=100, seed=args.seed)
    table = sd.tables["table"]
    hf.pp.normalize(sd)
    px = args.synthetic_patch_px
    cache = Path(args.cache) / f"synthetic_{args.slides}x{args.grid}_seed{args.seed}_{px}px.npz"
    emb = _cached_features(sd, cache, px)
    print(
        f"synthetic: {table.n_obs} spots, {args.slides} slides, cancer types "
        f"{sorted(table.obs['cancer_type'].astype(str).unique())}; features "
        f"{'cached' if np.isnan(emb) else f'embedded in {emb:.0f} s'}",
        flush=True,
    )
    for s in range(args.synthetic_splits):
        if "split" in table.obs:
            del table.obs["split"]
        hf.pp.split_slides(sd, seed=args.seed + s)
        train = (table.obs["split"] == "train").to_numpy()
        hf.pp.select_genes(sd, flavor="hmhvg", n_top=args.genes, mask_obs=train)
        split = {
            k: sorted(table.obs.loc[table.obs["split"] == k, "library_id"].astype(str).unique())
            for k in ("train", "val", "test")
        }
        print(f"  split {s}: {split}", flush=True)
        yield f"split{s}", sd


def her2st_folds(args):
    """Yield (test section, sdata) for leave-one-section-out on C2–C6."""
    path = Path(args.her2st_path)
    if not (path / "ST-cnts").is_dir():
        print(f"her2st: no data at {path} (set HISTOFLOW_SHARED_DATA); skipped", flush=True)
        return
    sd = hf.io.read_her2st(path, sections=IMAGED)
    table = sd.tables["table"]
    hf.pp.normalize(sd)
    cache = Path(args.cache) / f"her2st_{ENCODER}_{args.patch_px}px_{'_'.join(IMAGED)}.npz"
    emb = _cached_features(sd, cache, args.patch_px)
    print(
        f"her2st: {table.n_obs} spots in {len(IMAGED)} sections; features "
        f"{'cached' if np.isnan(emb) else f'embedded in {emb:.0f} s'}",
        flush=True,
    )
    for i in args.folds:
        test, val = IMAGED[i], IMAGED[(i + 1) % len(IMAGED)]
        roles = {s: "test" if s == test else "val" if s == val else "train" for s in IMAGED}
        table.obs["split"] = pd.Categorical(table.obs["library_id"].astype(str).map(roles))
        train = (table.obs["split"] == "train").to_numpy()
        hf.pp.select_genes(sd, "hvg", n_top=args.genes, groupby=None, mask_obs=train)
        yield test, sd


# ----------------------------------------------------------------------------------------------------------------------
# output


def _cell(v: np.ndarray) -> str:
    v = v[np.isfinite(v)]
    if not len(v):
        return "n/a"
    return f"{v.mean():.3f}" if len(v) == 1 else f"{v.mean():.3f} ± {v.std():.3f}"


def print_table(res: pd.DataFrame, dataset: str) -> None:
    sub = res[res["dataset"] == dataset]
    if sub.empty:
        return
    folds = sub["fold"].nunique()
    print(f"\n### {dataset} ({folds} fold{'s' if folds > 1 else ''}; mean ± std over folds)\n")
    print("| method | PCC | GSC | SSC | train s / fold | sample s (all spots) | spots / s |")
    print("|---|---|---|---|---|---|---|")
    for name in dict.fromkeys(sub["row"]):
        r = sub[sub["row"] == name]
        label = r["label"].iloc[0]
        ok = r[r["status"] == "ok"]
        if ok.empty:
            st = r["status"].iloc[0]
            note = r["note"].iloc[0] if "note" in r else ""
            text = "n/a (not available)" if st == "n/a" else f"error ({note})"
            print(f"| {label} | {text} | | | | | |")
            continue
        cells = [_cell(ok[m].to_numpy(dtype=float)) for m in METRICS]
        fit = np.median(ok["fit_s"])
        pred = np.median(ok["predict_s"])
        rate = np.median(ok["spots"] / ok["predict_s"])
        print(f"| {label} | " + " | ".join(cells) + f" | {fit:.1f} | {pred:.2f} | {rate:,.0f} |")


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["synthetic", "her2st"], choices=["synthetic", "her2st"])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--epochs", type=int, default=40, help="maximum epochs per stage (early stopping on val)")
    p.add_argument("--patience", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--graph-layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=1, help="Euler steps at prediction (every row)")
    p.add_argument("--genes", type=int, default=50)
    p.add_argument("--slides", type=int, default=9, help="synthetic slides")
    p.add_argument("--grid", type=int, default=12, help="synthetic grid side (spots)")
    p.add_argument("--synthetic-splits", type=int, default=1, help="synthetic splits (split_slides seeds)")
    p.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="HER2ST folds (0 = test C2, ...)")
    p.add_argument("--her2st-path", default=str(DEFAULT_DATA / "her2st"))
    p.add_argument("--patch-px", type=int, default=224, help="HER2ST patch pixels (112 µm patches, HEST convention)")
    p.add_argument(
        "--synthetic-patch-px", type=int, default=112, help="synthetic patch pixels (112 = native at 1 µm/px)"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: small synthetic set, one HER2ST fold, 6 epochs")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "histoflow" / "bench"))
    p.add_argument("--csv", help="write per-fold results here")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of rows that fail")
    args = p.parse_args(argv)
    if args.quick:
        args.slides, args.grid = 6, 8
        args.epochs, args.patience = min(args.epochs, 6), 3
        args.folds = args.folds[:1]
        args.synthetic_splits = 1
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "histoflow"):
        logging.getLogger(name).setLevel(logging.ERROR)

    t0 = time.perf_counter()
    records = []
    sources = {"synthetic": synthetic_splits, "her2st": her2st_folds}
    for dataset in args.datasets:
        ctx: dict = {}
        for fold, sd in sources[dataset](args):
            for name in args.rows:
                rec = run_row(name, sd, args, ctx)
                rec.update(dataset=dataset, fold=fold)
                records.append(rec)
                msg = (
                    f"PCC {rec['pcc']:.3f} GSC {rec['gsc']:.3f} SSC {rec['ssc']:.3f} "
                    f"train {rec['fit_s']:.0f} s sample {rec['predict_s']:.2f} s"
                    if rec["status"] == "ok"
                    else f"{rec['status']}: {rec.get('note', '')}"
                )
                print(f"  {dataset} {fold} {name}: {msg}", flush=True)
        if "align_note" in ctx:
            print(f"  ({dataset}: {ctx['align_note']})")
    res = pd.DataFrame.from_records(records)
    for dataset in args.datasets:
        if len(res):
            print_table(res, dataset)
    cmd = "python benchmarks/structure.py " + " ".join(argv if argv is not None else [])
    print(f"\nTotal {time.perf_counter() - t0:.0f} s on {args.threads} thread(s). Command: {cmd.rstrip()}")
    if args.csv:
        res.to_csv(args.csv, index=False)
    return res


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
