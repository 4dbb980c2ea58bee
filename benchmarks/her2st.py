"""Real-data benchmark: HER2ST, leave one section out, MoLF against its dense ablation and the baselines.

    python benchmarks/her2st.py [--path ../shared/data/her2st] [--sections C2 C3 C4 C5 C6]
                                [--methods molf dense mlp ridge] [--panels hvg50 hallmark] [--epochs 200]
                                [--dihedral] [--context-um 224] [--scale-features none|slide]
                                [--n-samples 4] [--temperature 1] [--set KEY=VALUE ...] [--vae-extra]
                                [--ensemble N [--shared-stage-one] [--rotate-validation]] [--antithetic]
                                [--api [--draws N [N ...]] [--distil W]] [--no-validation]
                                [--panel-with-validation] [--smooth [--smooth-genes W:S [W:S ...]]
                                [--select-smoothing T [T ...] [--smoothing-spreads S [S ...]]]]
                                [--blend W[:S] [W[:S] ...]]
                                [--select-blend T [T ...] [--blend-spreads S [S ...]]] [--refit]
                                [--quick] [--threads 2] [--accelerator cpu|gpu]
                                [--stage-one] [--csv results.csv]
    python benchmarks/her2st.py --hest-bench DIR --task IDC [--encoder uni_v1] [--features DIR]

HER2ST mode (DESIGN.md "Targets on real data"): the sections with an H&E image (C2–C6, patient C) are read with
``io.read_her2st``; patch features come from ``pp.embed_patches`` (``efficientnet_lite0``, HEST convention: 112 µm
cut to 224 px; ``--dihedral`` averages them over the 8 rotations and flips of each patch; ``--context-um 224`` adds
the features of a 224 µm patch around each spot) and are cached (``--cache``); ``--scale-features slide``
standardises them within each section (``pp.scale_features``). Each section is the test section once; of the other
four, the next one (cyclically) is the validation section (early stopping for MoLF and the MLP) and the remaining
three are training sections. Targets: ``log1p`` of raw counts.
Panels, chosen on the training sections only:

- ``hvg50``: the top 50 highly variable genes (scanpy ``seurat_v3`` on raw counts, ``pp.select_genes``);
- ``hallmark``: every MSigDB Hallmark gene measured, with MoLF's variance tiers (low/mid/high), scored per tier.

With ``--vae-extra``, MoLF's Stage I (the gene VAE) is also trained on the 25 count-only sections of the other patients
(expression only; Stage II sees only the training sections). MoLF variants choose their guidance scale by
filter-and-rank on the validation section and predict the mean of ``--n-samples`` draws (``--temperature 0``: the
deterministic draw from the prior mean; ``--n-samples 1`` is then enough); ``--ensemble N`` averages the predictions of
N MoLF models trained with consecutive seeds (``--shared-stage-one``: the later ones train only Stage II, on the first
model's Stage I; ``--rotate-validation``: member ``i`` validates on the ``i``-th non-test section, the fold's validation
section first, and trains on the others, so that the ensemble as a whole trains on every section but the test section;
the panel stays the fold's; ``--api`` fits the ensemble with ``tl.fit_molf_ensemble`` instead, and ``--draws 1 2 4``
then also scores the members' mean with each of these numbers of draws per member, independent and antithetic, as extra
rows with their own prediction times (``t0``: one draw per member at temperature 0), and ``--distil W`` also trains one
student MoLF on ``W`` × the ensemble's prediction + (1 − ``W``) × the measured expression of the training and validation
sections and scores it with 1, 2 and 16 draws (independent and antithetic) and at temperature 0); ``--antithetic`` draws
the prior noise in antithetic pairs in guidance selection and prediction; ``--no-validation`` trains on the validation
section too (the panel stays the fold's unless ``--panel-with-validation`` chooses it on all four non-test sections),
for ``--epochs`` epochs without early stopping, and ``--set refit=true`` trains each model twice, first with early
stopping on the validation section, then from the same initial weights on all four non-test sections for the best epochs
(both with ``--no-guidance-selection``); ``--smooth`` scores every row also after ``tl.smooth_predictions`` (each spot
averaged with its spatial neighbours), with its defaults and with the weight and rings ``tl.select_smoothing`` chooses
on the fold's validation section (not with ``--no-validation``), ``--smooth-genes 0.7:1`` also with gene-wise weights
(``tl.smooth_predictions`` with ``self_weight=0.7, spread=1``: own weight ``clip(0.7 − 1 × (r − 1/2), 0, 1)`` for the
gene of rank ``r`` by Moran's I on the training sections, so the spatially structured genes are averaged most) and
``--select-smoothing 0 0.01`` with the weight, rings and spread ``tl.select_smoothing`` chooses on the validation
section with each PCC tolerance (spreads ``--smoothing-spreads``, default 0 0.5 1 1.5); ``--blend 0.5`` scores every
MoLF row also blended
with the ridge probe, ``0.5`` × MoLF's prediction + ``0.5`` × the probe's (``tl.blend_predictions``; the probe is then
fitted with an intercept, which changes none of its correlations, and before MoLF; ``--blend 0.5:1`` with gene-wise
weights, ``clip(0.5 + 1 × (r − 1/2), 0, 1)`` for the gene of rank ``r`` by Moran's I on the training sections), and
``--select-blend 0 0.01`` with the weight ``tl.select_blend`` chooses on the fold's validation section (the most
structure, mean of GSC and SSC, among the weights whose validation PCC is at most ``T`` below the best;
``--blend-spreads 0 0.5 1 1.5 2`` adds rows with gene-wise weights, the genes ranked by their Moran's I on the training
sections); ``--refit`` (with ``--api``) then refits every model on the validation section too (``MoLF.refit``: each
stage for the epochs at which its validation loss was best; the probe and the MLP fitted again on the four sections)
and scores every row again with the choices made on the validation section before (guidance, smoothing, blend; rows
``…_refit``, their fit time the two fits'); each MoLF fit prints the training
time and epochs of its stages. Every method is scored on the test section with ``tl.evaluate``: PCC (per gene over
the test section's spots, mean over genes), PCC@10, MSE, MAE, RVD, GSC, SSC (Moran's I on the ST grid), per-spot
1-Wasserstein and cosine distance, and spatial domains (k-means on PCA, ARI/NMI against the domains of the truth).
Values are mean ± std over the folds; times are per fold (fit and predict; the features are shared and timed once).

HEST-Bench mode (``--hest-bench``): reads a HEST-Bench task folder (``<DIR>/<TASK>/adata/<id>.h5ad``,
``splits/{train,test}_<k>.csv``, ``var_50genes.json``, features either precomputed as
``<features>/<TASK>/<encoder>/fp32/<id>.h5`` with ``embeddings`` and ``barcodes``, or embedded from
``patches/<id>.h5`` with ``--encoder``), holds out the last training sample of each fold (by id) for early stopping,
runs the same methods on every fold and prints the same table with HEST-Bench's
aggregation (PCC per gene over all test spots of the fold, mean over the 50 genes, mean ± std over folds).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

import histoflow as hf
from histoflow._utils import accelerator_device
from histoflow.cli import _parse_settings

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = Path(os.environ.get("HISTOFLOW_SHARED_DATA", HERE.parent.parent / "shared" / "data"))
IMAGED = ["C2", "C3", "C4", "C5", "C6"]
METRICS = [
    ("pcc", "PCC"),
    ("pcc@10", "PCC@10"),
    ("mse", "MSE"),
    ("mae", "MAE"),
    ("rvd", "RVD"),
    ("gsc", "GSC"),
    ("ssc", "SSC"),
    ("wasserstein_spot", "W1 spot"),
    ("cosine", "cos dist"),
    ("domain_ari", "domain ARI"),
    ("eff_rank", "corr. rank"),
]
METHOD_LABELS = {
    "molf": "MoLF (MoE, window context)",
    "dense": "MoLF, dense velocity",
    "bag": "MoLF, no spatial context",
    "scvi": "MoLF, scVI latent",
    "graph": "MoLF, graph context",
    "mlp": "MLP",
    "ridge": "ridge (HEST probe)",
}
#: ``--api``: each MoLF variant's fitted members of the current fold (``--refit`` fits them again).
FITTED: dict[str, list] = {}
#: Spreads of the gene-wise smoothing weights that ``--select-smoothing`` tries (``--smoothing-spreads``).
SMOOTH_SPREADS = [0.0, 0.5, 1.0, 1.5]
MOLF_VARIANTS = {
    "molf": {},
    "dense": {"velocity": "dense"},
    "bag": {"spatial_context": None},
    "scvi": {"latent": "scvi"},
    "graph": {"spatial_context": "graph"},
}


# ----------------------------------------------------------------------------------------------------------------------
# data


def load_her2st(args: argparse.Namespace):
    """HER2ST sections with images (+ count-only sections for ``--vae-extra``), normalised, with patch features."""
    path = Path(args.path)
    t = time.perf_counter()
    key = f"X_{args.encoder}"
    d4 = "_d4" if args.dihedral else ""
    ctx = "".join(f"_ctx{c:g}" for c in args.context_um or [])
    cache = Path(args.cache) / f"her2st_{args.encoder}_{args.patch_px}px{d4}_{'_'.join(args.sections)}{ctx}.npz"
    # the images are needed only to embed: with cached features the counts and spot files are enough
    sdata = hf.io.read_her2st(path, sections=args.sections, load_images=not cache.is_file())
    table = sdata.tables["table"]
    if cache.is_file():
        blob = np.load(cache, allow_pickle=False)
        if list(blob["obs_names"]) == list(table.obs_names):
            table.obsm[key] = blob["features"]
        else:  # a stale cache: read the images and embed again
            sdata = hf.io.read_her2st(path, sections=args.sections)
            table = sdata.tables["table"]
    hf.pp.normalize(sdata)
    embed_s = np.nan
    if key not in table.obsm:
        t0 = time.perf_counter()
        hf.pp.embed_patches(
            sdata,
            args.encoder,
            patch_px=args.patch_px,
            dihedral=args.dihedral,
            context_size_um=args.context_um,
            show_progress_bar=False,
        )
        embed_s = time.perf_counter() - t0
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, obs_names=np.asarray(table.obs_names, dtype=str), features=table.obsm[key])
    extra = None
    if args.vae_extra:
        from histoflow.io._her2st import her2st_sections

        others = [s for s in her2st_sections(path) if s not in args.sections]
        extra = hf.io.read_her2st(path, sections=others, load_images=False).tables["table"]
        hf.pp.normalize(extra)
    if args.scale_features == "slide":
        hf.pp.scale_features(sdata, key, key_added=key)
    how = "cached" if np.isnan(embed_s) else f"embedded in {embed_s:.0f} s"
    print(
        f"HER2ST: {table.n_obs} spots in {len(args.sections)} sections, {table.n_vars} genes; features {key} "
        f"({how}); read in {time.perf_counter() - t:.0f} s"
        + (f"; Stage-I extra: {extra.n_obs} spots from {extra.obs['library_id'].nunique()} sections" if extra else "")
    )
    return sdata, extra


def her2st_folds(sections: list[str]) -> list[dict[str, str]]:
    """Leave one section out; the next section (cyclically) validates, the rest train."""
    folds = []
    for i, test in enumerate(sections):
        val = sections[(i + 1) % len(sections)]
        folds.append({s: ("test" if s == test else "val" if s == val else "train") for s in sections})
    return folds


def select_panel(sdata, panel: str, gmt: Path, with_validation: bool = False) -> list[str]:
    """Choose the panel on the training sections (``with_validation``: and the validation section)."""
    table = sdata.tables["table"]
    train = table.obs["split"].isin(["train", "val"] if with_validation else ["train"]).to_numpy()
    if panel == "hvg50":
        hf.pp.select_genes(sdata, "hvg", n_top=50, groupby=None, mask_obs=train)
    elif panel == "hallmark":
        hf.pp.select_genes(sdata, "hallmark", gene_sets=gmt, mask_obs=train)
    else:
        raise ValueError(f"unknown panel {panel!r}")
    return table.var_names[table.var["histoflow_panel"].to_numpy()].tolist()


# ----------------------------------------------------------------------------------------------------------------------
# methods


def _blends(args: argparse.Namespace) -> bool:
    """Whether MoLF's rows are blended with the ridge probe (``--blend`` or ``--select-blend``)."""
    return bool(getattr(args, "blend", None) or getattr(args, "select_blend", None))


def fit_method(sdata, method: str, args: argparse.Namespace, extra) -> tuple[float, float]:
    """Fit ``method`` on the current split and predict every spot; returns (fit s, predict s)."""
    key = f"bench_{method}"
    t = time.perf_counter()
    if method in ("mlp", "ridge"):
        hf.tl.fit_baseline(
            sdata,
            kind=method,
            embedding_key=f"X_{args.encoder}",
            key_added=key,
            accelerator=args.accelerator,
            devices=1,
            seed=args.seed,
            # --blend: the probe on the log1p scale (its coefficients, and so its scores, stay the same)
            **({"fit_intercept": True} if method == "ridge" and _blends(args) else {}),
            # --no-validation: no validation spots to stop on, so the MLP trains its full 100 epochs
            **({"early_stopping": False} if method == "mlp" and getattr(args, "no_validation", False) else {}),
        )
        return time.perf_counter() - t, np.nan
    table = sdata.tables["table"] if hasattr(sdata, "tables") else sdata  # HEST-Bench mode passes the table
    if getattr(args, "api", False):
        return _fit_molf_api(sdata, table, method, args)
    fit_s = pred_s = 0.0
    members, first = [], None
    split = table.obs["split"].copy()
    try:
        for i in range(args.ensemble):  # --ensemble N: N models with seeds seed, seed + 1, …; predictions averaged
            if getattr(args, "rotate_validation", False):  # member i validates on the i-th non-test section
                table.obs["split"] = rotated_split(split, table.obs["library_id"], i)
                val = ", ".join(pd.unique(table.obs["library_id"].astype(str)[table.obs["split"] == "val"]))
                print(f"    {method} (seed {args.seed + i}): validation section {val}", flush=True)
            shared = first if args.shared_stage_one else None  # --shared-stage-one: later members reuse its Stage I
            model, f, p = _fit_molf(sdata, method, args, extra, args.seed + i, stage_one=shared)
            first = model if first is None else first
            fit_s, pred_s = fit_s + f, pred_s + p
            members.append(table.obsm[key].copy())
    finally:
        table.obs["split"] = split
    if args.ensemble > 1:
        table.obsm[f"{key}_member"] = members[0]
        table.obsm[key] = sum(members) / len(members)
    if args.stage_one:  # the same model: one draw, and Stage I's reconstruction of the measured expression
        device = accelerator_device(args.accelerator)
        hf.tl.predict(model, sdata, n_samples=1, temperature=args.temperature, device=device, key_added=f"{key}_1draw")
        rec = model.decode(model.get_latent(table, np.arange(table.n_obs)))
        table.obsm[f"{key}_stage1"] = pd.DataFrame(rec, index=table.obs_names, columns=model.registry.genes)
    return fit_s, pred_s


def _fit_molf_api(sdata, table, method: str, args: argparse.Namespace) -> tuple[float, float]:
    """``--api``: the ensemble through ``tl.fit_molf_ensemble`` (fit, guidance, prediction in one call; its time is
    the fit time), the first member again through ``tl.predict``; the members' split columns are dropped after."""
    key = f"bench_{method}"
    cfg = {**MOLF_VARIANTS[method], **args.molf_config}
    train_kwargs = {"show_progress_bar": False, "patience": args.patience, **args.molf_train}
    t = time.perf_counter()
    models = hf.tl.fit_molf_ensemble(
        sdata, args.ensemble, rotate_validation=args.rotate_validation, select_guidance=args.select_guidance,
        embedding_key=f"X_{args.encoder}", max_epochs=args.epochs, batch_size=args.batch_size,
        accelerator=args.accelerator, devices=1, n_samples=args.n_samples, temperature=args.temperature,
        antithetic=args.antithetic, seed=args.seed, key_added=key, train_kwargs=train_kwargs, **cfg,
    )  # fmt: skip
    fit_s = time.perf_counter() - t
    FITTED[method] = models  # --refit: fitted again after the rows' choices
    for i, model in enumerate(models):
        print(f"    {method} (seed {args.seed + i}, api): {_stage_times(model, shared=False)}, guidance "
              f"{model.config.guidance:g}", flush=True)  # fmt: skip
    t = time.perf_counter()
    device = accelerator_device(args.accelerator)
    sampling = {"temperature": args.temperature, "seed": args.seed, "device": device}
    hf.tl.predict(models, sdata, n_samples=args.n_samples, antithetic=args.antithetic, **sampling,
                  key_added=f"{key}_again")  # fmt: skip
    pred_s = time.perf_counter() - t
    gap = np.nanmax(np.abs(table.obsm[f"{key}_again"].to_numpy() - table.obsm[key].to_numpy()))
    print(f"    {method}: tl.predict on the members again: largest difference {gap:.2g}", flush=True)
    if args.ensemble > 1:
        hf.tl.predict(models[0], sdata, n_samples=args.n_samples, antithetic=args.antithetic, **sampling,
                      key_added=f"{key}_member")  # fmt: skip
    times = {}
    _predict_rows(models, sdata, draw_rows(method, args.draws), sampling, times)  # --draws: other numbers of draws
    if getattr(args, "distil", None) is not None:  # --distil: one student trained on the ensemble's predictions
        fits = _fit_student(table, models, method, args, train_kwargs, sampling, times)
        table.uns["bench_fit_s"] = {row: fit_s + s for row, s in fits.items()}
    table.uns["bench_predict_s"] = times
    for k in [c for c in table.obs if c.startswith(f"{key}_split_")]:
        del table.obs[k]
    return fit_s, pred_s


def draw_rows(method: str, draws: list[int | str] | None) -> list[tuple[str, int, bool, float | None]]:
    """The extra rows of ``--draws``: (row, draws per member, antithetic, temperature; None: ``--temperature``) —
    ``{method}_n{N}`` with ``N`` independent draws, for ``N`` of at least 2 also ``{method}_anti{N}`` with ``N``
    antithetic ones, and for ``t0`` ``{method}_t0``: one draw at temperature 0 (each member's prior mean)."""
    rows = []
    for n in draws or []:
        if n == "t0":
            rows.append((f"{method}_t0", 1, False, 0.0))
            continue
        rows.append((f"{method}_n{n}", n, False, None))
        if n >= 2:
            rows.append((f"{method}_anti{n}", n, True, None))
    return rows


def _predict_rows(model, sdata, rows, sampling: dict, times: dict) -> None:
    """Predict ``obsm[f"bench_{row}"]`` for each of ``rows`` (:func:`draw_rows`) with ``model`` (or a list of
    members), each time into ``times[row]``."""
    for row, n, anti, temp in rows:
        t = time.perf_counter()
        at = sampling if temp is None else {**sampling, "temperature": temp}
        hf.tl.predict(model, sdata, n_samples=n, antithetic=anti, **at, key_added=f"bench_{row}")
        times[row] = time.perf_counter() - t


def _blend_weight(value: str) -> float | tuple[float, float]:
    """A ``--blend`` weight: MoLF's share of the blend, strictly between 0 and 1; ``W:S`` adds a gene-wise spread."""
    weight, sep, spread = value.partition(":")
    try:
        ok = _is_weight(weight) and (not sep or float(spread) >= 0)
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(
            f"MoLF's weight must be a number strictly between 0 and 1, optionally with a spread of at least 0 "
            f"(W:S), got {value!r}"
        )
    return (float(weight), float(spread)) if sep else float(weight)


def _draw_count(value: str) -> int | str:
    """A ``--draws`` value: a number of draws (at least 1) or ``t0``."""
    if value == "t0":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"numbers of draws must be at least 1 (or t0), got {value!r}")
    return n


DISTIL_DRAWS = (1, 2, 16, "t0")  # --distil: the student's rows, as --draws values


def _fit_student(table, models, method: str, args, train_kwargs, sampling, times) -> dict[str, float]:
    """``--distil W``: one MoLF (the members' settings, seed ``--seed``, the fold's split) trained on ``W`` × the
    ensemble's prediction + (1 − ``W``) × the measured log1p expression of the panel, in a copy of the panel's
    columns (the table's layers are not touched); it chooses its guidance like the members and predicts every spot
    with each of ``DISTIL_DRAWS`` (rows ``{method}_distil_n1``, ``…_anti2``, ``…_t0``, …, their times in ``times``).
    Returns each row's student fit time (s)."""
    t = time.perf_counter()
    key, genes = f"bench_{method}", list(models[0].registry.genes)
    sub = table[:, genes].copy()
    measured = sub.layers["log1p"]
    measured = np.asarray(measured.toarray() if hasattr(measured, "toarray") else measured, dtype=np.float32)
    teacher = table.obsm[key][genes].to_numpy(np.float32)  # the ensemble's mean, every spot (test rows unused)
    sub.layers["log1p"] = args.distil * teacher + (1 - args.distil) * measured
    cfg = {**MOLF_VARIANTS[method], **args.molf_config}
    student = hf.tl.fit_molf(
        sub, embedding_key=f"X_{args.encoder}", genes=genes, max_epochs=args.epochs, batch_size=args.batch_size,
        accelerator=args.accelerator, devices=1, seed=args.seed, key_added="student", train_kwargs=train_kwargs,
        **cfg,
    )  # fmt: skip
    if args.select_guidance:
        hf.tl.select_guidance(student, sub, n_samples=args.n_samples, temperature=args.temperature,
                              antithetic=args.antithetic, device=sampling["device"], key_added="student")  # fmt: skip
    fit_s = time.perf_counter() - t
    print(f"    {method} student (--distil {args.distil:g}): {_stage_times(student, shared=False)}, guidance "
          f"{student.config.guidance:g}, {fit_s:.0f} s", flush=True)  # fmt: skip
    rows = draw_rows(f"{method}_distil", DISTIL_DRAWS)
    _predict_rows(student, sub, rows, sampling, times)
    for row, *_ in rows:
        table.obsm[f"bench_{row}"] = sub.obsm[f"bench_{row}"]
    return {row: fit_s for row, *_ in rows}


def rotated_split(split: pd.Series, library_id: pd.Series, i: int) -> pd.Categorical:
    """The split of ensemble member ``i`` under ``--rotate-validation``: the test sections stay; the validation
    section moves ``i`` places along the non-test sections (the fold's validation section first, then its training
    sections in the order they appear), and the fold's validation section trains in its place
    (``tl.fit_molf_ensemble``'s rotation, with one validation section and no strata).

    Member 0 keeps the fold's split; with as many members as non-test sections each of them validates once, so the
    ensemble as a whole has trained on every section but the test section.
    """
    from histoflow.pp._split import _rotated_split

    split, libs = np.asarray(split, dtype=str), np.asarray(library_id, dtype=str)
    n_val = len(pd.unique(libs[split == "val"]))
    if n_val != 1:
        raise ValueError(f"--rotate-validation needs exactly one validation section per fold, found {n_val}")
    out = _rotated_split(split, libs, None, i)
    return pd.Categorical(out, categories=sorted(set(out)))


def _fit_molf(sdata, method: str, args: argparse.Namespace, extra, seed: int, stage_one=None):
    """One MoLF variant fitted with ``seed`` (on ``stage_one``'s Stage I if given), guidance chosen, predictions in
    ``obsm``; (model, fit s, predict s)."""
    key = f"bench_{method}"
    t = time.perf_counter()
    cfg = {**MOLF_VARIANTS[method], **args.molf_config}
    train_kwargs = {"show_progress_bar": False, "patience": args.patience, **args.molf_train}
    table = sdata.tables["table"] if hasattr(sdata, "tables") else sdata  # HEST-Bench mode passes the table
    model = hf.models.MoLF(table, embedding_key=f"X_{args.encoder}", **cfg, seed=seed)
    if stage_one is not None:
        train_kwargs["stage_one"] = stage_one
    elif extra is not None and cfg.get("latent", "vae") == "vae":
        train_kwargs["vae_extra"] = extra
    model.train(args.epochs, batch_size=args.batch_size, accelerator=args.accelerator, devices=1, **train_kwargs)
    print(f"    {method} (seed {seed}): {_stage_times(model, shared=stage_one is not None)}", flush=True)
    device = accelerator_device(args.accelerator)
    if args.select_guidance:  # MoLF's appendix C: filter-and-rank on the validation section
        hf.tl.select_guidance(
            model, sdata, n_samples=args.n_samples, temperature=args.temperature, antithetic=args.antithetic,
            device=device, key_added=key,
        )  # fmt: skip
        print(f"    {method} (seed {seed}): guidance {model.config.guidance:g} chosen by filter-and-rank", flush=True)
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    hf.tl.predict(model, sdata, n_samples=args.n_samples, temperature=args.temperature, antithetic=args.antithetic,
                  device=device, key_added=key)  # fmt: skip
    return model, fit_s, time.perf_counter() - t


def _stage_times(model, shared: bool) -> str:
    """Seconds and epochs of each stage's training loop, from the model's history (Lightning's setup not counted)."""
    parts = []
    for label, key in (("Stage I", "scvi" if model.config.latent == "scvi" else "vae"), ("Stage II", "flow")):
        h, first = model.history.get(key), model.history.get(f"{key}_val")  # refit: the validation run first
        if label == "Stage I" and shared:
            parts.append("Stage I shared")
        elif h is not None and "time_s" in h and len(h):
            if first is not None and "time_s" in first and len(first):
                parts.append(f"{label} {first['time_s'].iloc[-1]:.1f} s ({len(first)} epochs) with validation, then "
                             f"{h['time_s'].iloc[-1]:.1f} s ({len(h)} epochs) on training + validation")  # fmt: skip
            else:
                parts.append(f"{label} {h['time_s'].iloc[-1]:.1f} s ({len(h)} epochs)")
    return ", ".join(parts)


def score(sdata, method: str, split: str = "test") -> dict[str, float]:
    df = hf.tl.evaluate(sdata, pred_key=f"bench_{method}", split=split, k=10, inplace=False, n_domains=4)
    out = {}
    sel = df[(df["group"] == "all") & (df["aggregation"].isin(["pooled", "per_spot", "per_slide"]))]
    for gs, sub in sel.groupby("gene_set"):
        for m, _ in METRICS:
            rows = sub[sub["metric"] == m]
            if len(rows):
                pooled = rows[rows["aggregation"] == "pooled"]
                out[(gs, m)] = float((pooled if len(pooled) else rows)["value"].iloc[0])
    out[("all", "eff_rank")] = prediction_rank(sdata, f"bench_{method}", split)
    return out


def prediction_rank(sdata, key: str, split: str = "test") -> float:
    """Effective rank of the gene–gene correlation of the predictions ``obsm[key]`` on ``split``, mean over slides.

    The participation ratio ``(Σλ)² / Σλ²`` of the eigenvalues of the genes' correlation matrix over a slide's spots
    (genes constant there left out): 1 when every gene moves with one pattern, the number of genes when they are
    uncorrelated. GSC compares these correlation matrices; on HER2ST the truth's is about 19 for 50 genes
    (``benchmarks/structure_ceiling.py`` prints it).
    """
    table = sdata.tables["table"] if hasattr(sdata, "tables") else sdata
    P = table.obsm[key]
    P = np.asarray(P.to_numpy() if isinstance(P, pd.DataFrame) else P, dtype=np.float64)
    rows = (table.obs["split"] == split).to_numpy()
    libs = table.obs["library_id"].astype(str).to_numpy() if "library_id" in table.obs else np.zeros(len(P), str)
    return float(np.nanmean([correlation_rank(P[rows & (libs == lib)]) for lib in np.unique(libs[rows])] or [np.nan]))


def correlation_rank(X: np.ndarray) -> float:
    """Participation ratio of the eigenvalues of the correlation matrix of the columns of ``X`` (varying columns)."""
    X = X[:, np.ptp(X, axis=0) > 0]
    if X.shape[1] < 2 or X.shape[0] < 2:
        return np.nan
    lam = np.linalg.svd((X - X.mean(axis=0)) / X.std(axis=0), compute_uv=False) ** 2
    return float(lam.sum() ** 2 / (lam**2).sum())


# ----------------------------------------------------------------------------------------------------------------------
# tables


def print_table(results: pd.DataFrame, panel: str, gene_set: str, title: str, ensemble: int = 1) -> None:
    sub = results[(results["panel"] == panel) & (results["gene_set"] == gene_set)]
    if sub.empty:
        return
    metrics = [(m, lab) for m, lab in METRICS if m in set(sub["metric"])]
    print(f"\n{title}\n")
    print("| method | " + " | ".join(lab for _, lab in metrics) + " | fit s / fold | predict s / fold |")
    print("|---|" + "---|" * (len(metrics) + 2))
    for method in dict.fromkeys(sub["method"]):
        m_rows = sub[sub["method"] == method]
        cells = []
        for m, _ in metrics:
            v = m_rows.loc[m_rows["metric"] == m, "value"].to_numpy()
            cells.append(f"{np.nanmean(v):.3f} ± {np.nanstd(v):.3f}" if len(v) else "n/a")
        times = m_rows.drop_duplicates("fold")
        fit = np.nanmedian(times["fit_s"])
        pred = np.nanmedian(times["predict_s"]) if times["predict_s"].notna().any() else np.nan
        pred_cell = "incl." if np.isnan(pred) else f"{pred:.1f}"
        print(f"| {_row_label(method, ensemble)} | " + " | ".join(cells) + f" | {fit:.1f} | {pred_cell} |")


def _row_label(method: str, ensemble: int) -> str:
    """The table label of a row: the method's, then what the row changes (draws, members, smoothing)."""
    if method.endswith("_refit"):
        return f"{_row_label(method[: -len('_refit')], ensemble)}, refitted with the validation section"
    base, sep, weight = method.rpartition("_ridge")
    if sep and base and _is_weight(weight):
        return f"{_row_label(base, ensemble)}, blended with the ridge probe (MoLF weight {weight})"
    weight, sep, spread = weight.partition("s")
    if base and sep and _is_weight(weight):
        label = f"MoLF weight {weight}, gene-wise spread {spread}"
        return f"{_row_label(base, ensemble)}, blended with the ridge probe ({label})"
    for tag, weight in (("_ridgesel", "weight"), ("_ridgegene", "gene-wise weights")):
        base, sep, tol = method.rpartition(tag)
        if sep and base:
            what = "the best PCC" if float(tol) == 0 else f"PCC tolerance {tol}"
            return f"{_row_label(base, ensemble)}, blended with the ridge probe, {weight} chosen on validation ({what})"
    base, sep, tol = method.rpartition("_smgsel")
    if sep and base:
        what = "the best PCC" if float(tol) == 0 else f"PCC tolerance {tol}"
        return f"{_row_label(base, ensemble)}, smoothed gene-wise as chosen on validation ({what})"
    base, sep, pair = method.rpartition("_smg")
    if sep and base:
        weight, _, spread = pair.partition("s")
        return f"{_row_label(base, ensemble)}, smoothed gene-wise (self weight {weight}, spread {spread})"
    for suffix, what in (("_smsel", "as chosen on the validation section"), ("_sm", "with the defaults")):
        if method.endswith(suffix):
            return f"{_row_label(method[: -len(suffix)], ensemble)}, smoothed {what}"
    base, _, extra_row = method.partition("_")
    suffix = {
        "": f", ensemble of {ensemble}" if ensemble > 1 and base in MOLF_VARIANTS else "",
        "1draw": ", one draw",
        "stage1": ", Stage I reconstruction",
        "member": ", its first member alone",
    }.get(extra_row, _draws_label(extra_row, " per member" if ensemble > 1 else ""))
    return METHOD_LABELS.get(base, base) + suffix


def smoothed_rows(
    sdata,
    row: str,
    times: dict,
    choose: bool = True,
    gene_wise: list[tuple[float, float]] | None = None,
    tolerances: list[float] | None = None,
    spreads: list[float] | None = None,
    replay: list | None = None,
) -> list[str]:
    """``--smooth``: ``bench_{row}`` smoothed with ``tl.smooth_predictions``' defaults (row ``{row}_sm``) and, with
    ``choose``, with the weight and rings ``tl.select_smoothing`` chooses on the fold's validation section
    (``{row}_smsel``); ``--smooth-genes W:S``: with gene-wise weights, own weight ``clip(W − S × (r − 1/2), 0, 1)`` for
    the gene of rank ``r`` by Moran's I on the training sections (``{row}_smg{W}s{S}``); ``--select-smoothing T``
    (with ``choose``): with the weight, rings and spread (each of ``spreads``) ``tl.select_smoothing`` chooses on the
    validation section with PCC tolerance ``T`` (``{row}_smgsel{T}``). Their prediction times add the smoothing's to
    the row's (a row without its own time keeps the fold's). Each row's smoothing, with the weight, rings and spread
    chosen, is appended to ``replay`` (``--refit``: the same smoothing of the refitted model's predictions)."""
    table = sdata.tables["table"] if hasattr(sdata, "tables") else sdata
    plans = [("sm", {}, None)] + ([("smsel", {}, 0.0)] if choose else [])
    plans += [(f"smg{w:g}s{s:g}", {"self_weight": w, "spread": s}, None) for w, s in gene_wise or []]
    if choose:
        plans += [(f"smgsel{t:g}", {"spreads": spreads or SMOOTH_SPREADS, "tolerance": t}, t) for t in tolerances or []]
    out = []
    for suffix, kw, tol in plans:
        t = time.perf_counter()
        if tol is not None:  # chosen on the validation section
            hf.tl.select_smoothing(sdata, pred_key=f"bench_{row}", **kw)
            chosen = table.uns[f"bench_{row}_smoothing"]
            kw = {k: chosen[k] for k in ("self_weight", "n_rings", "spread")}
            print(f"    {row}: smoothing chosen on the validation section (PCC tolerance {tol:g}): self weight "
                  f"{kw['self_weight']:g}, {kw['n_rings']} ring(s), spread {kw['spread']:g}", flush=True)  # fmt: skip
        smooth = partial(
            hf.tl.smooth_predictions, sdata, pred_key=f"bench_{row}", key_added=f"bench_{row}_{suffix}", **kw
        )
        smooth()
        if replay is not None:
            replay.append(smooth)
        if row in times:
            times[f"{row}_{suffix}"] = times[row] + time.perf_counter() - t
        out.append(f"{row}_{suffix}")
    return out


def _is_weight(text: str) -> bool:
    """Whether ``text`` is a number strictly between 0 and 1 (a blend weight)."""
    try:
        return 0.0 < float(text) < 1.0
    except ValueError:
        return False


def blended_rows(
    sdata, row: str, weights: list[float | tuple[float, float]], times: dict, replay: list | None = None
) -> list[str]:
    """``--blend``: ``bench_{row}`` blended with the ridge probe's ``bench_ridge`` by ``tl.blend_predictions``,
    ``W`` × the row's prediction + (1 − ``W``) × the probe's for each ``W`` of ``weights`` (row ``{row}_ridge{W}``);
    for ``(W, S)``, gene-wise weights ``clip(W + S × (r − 1/2), 0, 1)`` with ``r`` the genes' rank by Moran's I on the
    training sections (``tl.select_blend`` with that one pair, so nothing is chosen; row ``{row}_ridge{W}s{S}``); their
    prediction times add the blend's to the row's (a row without its own time keeps the fold's). Each blend is
    appended to ``replay`` (``--refit``)."""
    out = []
    for w in weights:
        t = time.perf_counter()
        name = f"{row}_ridge{w[0]:g}s{w[1]:g}" if isinstance(w, tuple) else f"{row}_ridge{w:g}"
        blend = partial(_blend_with_probe, sdata, row, name, w)
        blend()
        if replay is not None:
            replay.append(blend)
        if row in times:
            times[name] = times[row] + time.perf_counter() - t
        out.append(name)
    return out


def _blend_with_probe(sdata, row: str, name: str, w: float | tuple[float, float]) -> None:
    """``obsm[f"bench_{name}"]``: ``bench_{row}`` blended with ``bench_ridge``, MoLF's weight ``w``, or for
    ``(w, spread)`` gene-wise weights from the genes' Moran's I on the training sections (``tl.select_blend`` with that
    one pair)."""
    if isinstance(w, tuple):
        table = sdata.tables["table"] if hasattr(sdata, "tables") else sdata
        (w, spread) = w
        hf.tl.select_blend(
            sdata, pred_key=f"bench_{row}", other_key="bench_ridge", weights=(w,), spreads=(spread,), split="train",
            key_added=f"bench_{name}",
        )  # fmt: skip
        blend = table.uns[f"bench_{name}_selection"]["weights"]
    else:
        blend = {f"bench_{row}": w, "bench_ridge": 1.0 - w}
    hf.tl.blend_predictions(sdata, blend, key_added=f"bench_{name}")


def _smooth_pair(value: str) -> tuple[float, float]:
    """A ``--smooth-genes`` pair ``W:S``: the own weight (0 to 1) and the gene-wise spread (at least 0)."""
    weight, sep, spread = value.partition(":")
    try:
        w, s = float(weight), float(spread)
    except ValueError:
        w, s = -1.0, -1.0
    if not sep or not (0.0 <= w <= 1.0 and np.isfinite(s) and s >= 0):
        raise argparse.ArgumentTypeError(
            f"a gene-wise smoothing is W:S, the own weight W from 0 to 1 and the spread S of at least 0, got {value!r}"
        )
    return w, s


def _tolerance(value: str) -> float:
    """A ``--select-blend`` tolerance: the validation PCC the choice may give up, at least 0."""
    try:
        tol = float(value)
    except ValueError:
        tol = -1.0
    if not 0.0 <= tol < 1.0:
        raise argparse.ArgumentTypeError(f"the PCC tolerance must be a number from 0 to below 1, got {value!r}")
    return tol


def selected_blend_rows(
    sdata,
    row: str,
    tolerances: list[float],
    times: dict,
    spreads: list[float] | None = None,
    replay: list | None = None,
) -> list[str]:
    """``--select-blend``: ``bench_{row}`` blended with the ridge probe's ``bench_ridge`` with the weight
    ``tl.select_blend`` chooses on the fold's validation section with each PCC tolerance of ``tolerances`` (row
    ``{row}_ridgesel{T}``); with ``spreads`` (``--blend-spreads``) also with gene-wise weights, every spread tried
    (row ``{row}_ridgegene{T}``); prediction times as in :func:`blended_rows`. The blend with the chosen weight and
    spread is appended to ``replay`` (``--refit``: the genes ranked again on the training sections then)."""
    table = sdata.tables["table"] if hasattr(sdata, "tables") else sdata
    out = []
    for tol in tolerances:
        for tag, tried in (("ridgesel", (0.0,)), ("ridgegene", spreads)):
            if not tried:
                continue
            t = time.perf_counter()
            name = f"{row}_{tag}{tol:g}"
            hf.tl.select_blend(
                sdata, pred_key=f"bench_{row}", other_key="bench_ridge", spreads=tried, tolerance=tol,
                key_added=f"bench_{name}",
            )  # fmt: skip
            chosen = table.uns[f"bench_{name}_selection"]
            hf.tl.blend_predictions(sdata, chosen["weights"], key_added=f"bench_{name}")
            print(f"    {row}: blend chosen on the validation section (PCC tolerance {tol:g}): MoLF weight "
                  f"{chosen['weight']:g}, spread {chosen['spread']:g}", flush=True)  # fmt: skip
            if replay is not None:
                pair = (chosen["weight"], chosen["spread"]) if chosen["spread"] > 0 else chosen["weight"]
                replay.append(partial(_blend_with_probe, sdata, row, name, pair))
            if row in times:
                times[name] = times[row] + time.perf_counter() - t
            out.append(name)
    return out


def _draws_label(extra_row: str, per: str = " per member") -> str:
    """``n4`` → ", 4 draws per member", ``anti4`` → ", 4 antithetic draws per member" (``--draws`` rows);
    ``distil_anti2`` → ", one student of the ensemble, 2 antithetic draws", ``distil_t0`` → "…, temperature 0"."""
    if extra_row.startswith("distil_"):
        rest = extra_row[len("distil_") :]
        return ", one student of the ensemble" + _draws_label(rest, "")
    if extra_row == "t0":
        return f", temperature 0{per}"
    for prefix, kind in (("anti", " antithetic"), ("n", "")):
        if extra_row.startswith(prefix) and extra_row[len(prefix) :].isdigit():
            n = extra_row[len(prefix) :]
            return f", {n}{kind} draw{'' if n == '1' else 's'}{per}"
    return f" {extra_row}"


def run_her2st(args: argparse.Namespace) -> pd.DataFrame:
    sdata, extra = load_her2st(args)
    table = sdata.tables["table"]
    gmt = DEFAULT_DATA / "genesets" / "h.all.v7.0.symbols.gmt"
    records = []
    folds = her2st_folds(args.sections)
    if args.folds:
        folds = [folds[i] for i in args.folds]
    for fold in folds:
        test = next(s for s, v in fold.items() if v == "test")
        for panel in args.panels:
            table.obs["split"] = pd.Categorical(table.obs["library_id"].astype(str).map(fold))
            genes = select_panel(sdata, panel, gmt, args.panel_with_validation)  # the fold's training sections
            if args.no_validation:  # then the validation section trains too
                table.obs["split"] = pd.Categorical(table.obs["split"].astype(str).replace("val", "train"))
            fit_times, replay, scored = {}, [], []  # --refit: the rows' post-processing and the rows, in order
            for method in args.methods:
                fit_s, pred_s = fit_method(sdata, method, args, extra)
                fit_times[method] = fit_s
                rows = [method]
                if args.stage_one and method in MOLF_VARIANTS:
                    rows += [f"{method}_1draw", f"{method}_stage1"]
                if args.ensemble > 1 and method in MOLF_VARIANTS:
                    rows.append(f"{method}_member")
                row_s = table.uns.pop("bench_predict_s", {})  # --draws: each extra row's own prediction time
                rows += [row for row, *_ in draw_rows(method, args.draws if method in MOLF_VARIANTS else None)]
                if getattr(args, "distil", None) is not None and method in MOLF_VARIANTS:
                    rows += [row for row, *_ in draw_rows(f"{method}_distil", DISTIL_DRAWS)]
                row_fit_s = table.uns.pop("bench_fit_s", {})  # --distil: the ensemble's fit time and the student's
                if args.smooth:  # every row again, averaged with its spatial neighbours
                    choose = not args.no_validation  # no validation section: nothing chosen
                    smooth = (args.smooth_genes, args.select_smoothing, args.smoothing_spreads)
                    rows += [
                        row
                        for base in list(rows)
                        for row in smoothed_rows(sdata, base, row_s, choose, *smooth, replay=replay)
                    ]
                if (args.blend or args.select_blend) and method in MOLF_VARIANTS:  # every MoLF row again, blended
                    for base in list(rows):  # each blend's fit time: its row's (a student's own) + the probe's
                        blends = blended_rows(sdata, base, args.blend or [], row_s, replay)
                        blends += selected_blend_rows(
                            sdata, base, args.select_blend or [], row_s, args.blend_spreads, replay
                        )
                        for row in blends:
                            row_fit_s[row] = row_fit_s.get(base, fit_s) + fit_times["ridge"]
                            rows.append(row)
                for row in rows:
                    scored.append((row, method, row_fit_s.get(row, fit_s), row_s.get(row, pred_s)))
                    records += _scored(sdata, row, test, panel, len(genes), *scored[-1][2:])
            if args.refit:  # every model again on the validation section too, every row with the same choices
                refit_s = refit_fold(sdata, args, extra, replay)
                for row, method, fit_s, pred_s in scored:
                    extra_s = refit_s[method] + (refit_s.get("ridge", 0.0) if "_ridge" in row else 0.0)
                    records += _scored(sdata, row, test, panel, len(genes), fit_s + extra_s, pred_s, "_refit")
    return pd.DataFrame.from_records(
        records, columns=["fold", "panel", "method", "gene_set", "metric", "value", "fit_s", "predict_s"]
    )


def _scored(sdata, row: str, test: str, panel: str, n_genes: int, fit_s: float, pred_s: float, suffix: str = ""):
    """The records of ``row`` scored on the test section (the row named ``row + suffix``), and its line printed."""
    vals = score(sdata, row)
    name = row + suffix
    print(
        f"  fold {test} {panel} ({n_genes} genes) {name}: PCC {vals.get(('all', 'pcc'), np.nan):.3f}"
        f" GSC {vals.get(('all', 'gsc'), np.nan):.3f} SSC {vals.get(('all', 'ssc'), np.nan):.3f} fit {fit_s:.0f} s",
        flush=True,
    )
    return [(test, panel, name, gs, m, v, fit_s, pred_s) for (gs, m), v in vals.items()]


def refit_fold(sdata, args: argparse.Namespace, extra, replay: list) -> dict[str, float]:
    """``--refit``: the fold's validation section becomes a training section; the baselines are fitted again (the MLP
    without early stopping), each MoLF variant's members are refitted (``MoLF.refit``: each stage for the epochs at
    which its validation loss was best, their guidance kept) and predict every row of the fold again
    (``bench_{method}``, ``--draws`` rows); then ``replay`` repeats every smoothing and blend with the weights chosen
    on the validation section before. The split is restored after. Returns each method's refit seconds."""
    table = sdata.tables["table"] if hasattr(sdata, "tables") else sdata
    split = table.obs["split"].copy()
    table.obs["split"] = pd.Categorical(split.astype(str).replace("val", "train"))
    seconds = {}
    try:
        for method in args.methods:
            t = time.perf_counter()
            if method in ("mlp", "ridge"):
                fit_method(sdata, method, argparse.Namespace(**{**vars(args), "no_validation": True}), extra)
            else:
                models = FITTED[method]
                for model in models:
                    model.refit()
                print(f"    {method} refitted: {_stage_times(models[0], shared=False)}", flush=True)
                device = accelerator_device(args.accelerator)
                sampling = {"temperature": args.temperature, "seed": args.seed, "device": device}
                hf.tl.predict(models, sdata, n_samples=args.n_samples, antithetic=args.antithetic, **sampling,
                              key_added=f"bench_{method}")  # fmt: skip
                if args.ensemble > 1:
                    hf.tl.predict(models[0], sdata, n_samples=args.n_samples, antithetic=args.antithetic, **sampling,
                                  key_added=f"bench_{method}_member")  # fmt: skip
                _predict_rows(models, sdata, draw_rows(method, args.draws), sampling, {})
            seconds[method] = time.perf_counter() - t
        for step in replay:
            step()
    finally:
        table.obs["split"] = split
    return seconds


# ----------------------------------------------------------------------------------------------------------------------
# HEST-Bench


def read_hest_bench_task(
    root: Path,
    task: str,
    *,
    features: Path | None,
    encoder: str,
    patch_px: int,
    scale_features: str = "none",
    dihedral: bool = False,
):
    """One HEST-Bench task as an AnnData table: raw counts, log1p, features, ``obs['library_id']``."""
    if dihedral and features is not None:
        raise ValueError("--dihedral needs the patches (it embeds them); it cannot apply to precomputed --features.")
    import anndata as ad
    import h5py

    tdir = root / task
    if not (tdir / "adata").is_dir():
        raise FileNotFoundError(f"{tdir} has no adata/ folder; point --hest-bench at the HEST-Bench root.")
    genes = json.loads((tdir / "var_50genes.json").read_text())
    genes = genes["genes"] if isinstance(genes, dict) else genes
    tables = []
    for f in sorted((tdir / "adata").glob("*.h5ad")):
        a = ad.read_h5ad(f)
        sid = f.stem
        missing = [g for g in genes if g not in a.var_names]
        if missing:
            raise ValueError(f"{f} lacks panel genes {missing[:5]}")
        a = a[:, genes].copy()
        a.obs_names = [f"{sid}:{b}" for b in a.obs_names]
        a.obs["library_id"] = sid
        if features is not None:
            with h5py.File(features / task / encoder / "fp32" / f"{sid}.h5") as h:
                emb = np.asarray(h["embeddings"], dtype=np.float32)
                bc = [b.decode() if isinstance(b, bytes) else str(b) for b in np.asarray(h["barcodes"]).ravel()]
        else:
            emb, bc = _embed_hest_patches(tdir / "patches" / f"{sid}.h5", encoder, patch_px, dihedral)
        pos = pd.Index([f"{sid}:{b}" for b in bc]).get_indexer(a.obs_names)
        if (pos < 0).any():
            raise ValueError(f"{sid}: {(pos < 0).sum()} spots have no features")
        a.obsm[f"X_{encoder}"] = emb[pos]
        tables.append(a)
    table = ad.concat(tables, merge="same")
    table.obs["library_id"] = pd.Categorical(table.obs["library_id"])
    table.obs["pixel_size_um"] = 0.5
    table.obs["technology"] = "Visium"
    table.obs["cancer_type"] = pd.Categorical([task] * table.n_obs)  # a HEST-Bench task is one cancer type
    hf.pp.normalize(table)
    table.var["histoflow_panel"] = True
    if scale_features == "slide":
        hf.pp.scale_features(table, f"X_{encoder}", key_added=f"X_{encoder}")
    return table


def _embed_hest_patches(
    path: Path, encoder: str, patch_px: int, dihedral: bool = False
) -> tuple[np.ndarray, list[str]]:
    import h5py
    import torch

    from histoflow.pp._patches import _Preprocess, encode

    enc = hf.pp.get_encoder(encoder)
    enc.model.eval()
    with h5py.File(path) as h:
        img = np.asarray(h["img"])
        bc = [b.decode() if isinstance(b, bytes) else str(b) for b in np.asarray(h["barcode"]).ravel()]
    prep = _Preprocess(enc, torch.device("cpu"), img.shape[1])
    with torch.inference_mode():
        out = [encode(enc, prep(img[s : s + 64]), dihedral).float().numpy() for s in range(0, len(img), 64)]
    return np.concatenate(out), bc


def run_hest_bench(args: argparse.Namespace) -> pd.DataFrame:
    if args.stage_one:
        raise SystemExit("--stage-one applies to the HER2ST mode only.")
    if args.context_um:
        raise SystemExit("--context-um needs the whole image; HEST-Bench ships only the 112 µm spot patches.")
    root = Path(args.hest_bench)
    feats = Path(args.features) if args.features else None
    table = read_hest_bench_task(
        root,
        args.task,
        features=feats,
        encoder=args.encoder,
        patch_px=args.patch_px,
        scale_features=args.scale_features,
        dihedral=args.dihedral,
    )
    splits = sorted((root / args.task / "splits").glob("train_*.csv"))
    records = []
    for tr in splits:
        k = tr.stem.split("_")[1]
        te = tr.with_name(f"test_{k}.csv")
        train_ids = set(pd.read_csv(tr)["sample_id"].astype(str))
        test_ids = set(pd.read_csv(te)["sample_id"].astype(str))
        lib = table.obs["library_id"].astype(str)
        train_sorted = sorted(train_ids)
        val_ids = {train_sorted[-1]} if len(train_sorted) >= 2 else set()  # early stopping needs a held-out sample
        table.obs["split"] = pd.Categorical(
            np.where(lib.isin(test_ids), "test", np.where(lib.isin(val_ids), "val", "train"))
        )
        for method in args.methods:
            fit_s, pred_s = fit_method(table, method, args, None)
            vals = score(table, method)
            for (gs, m), v in vals.items():
                records.append((f"split{k}", "hvg50", method, gs, m, v, fit_s, pred_s))
            print(f"  split {k} {method}: PCC {vals.get(('all', 'pcc'), np.nan):.3f} fit {fit_s:.0f} s", flush=True)
    return pd.DataFrame.from_records(
        records, columns=["fold", "panel", "method", "gene_set", "metric", "value", "fit_s", "predict_s"]
    )


# ----------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", default=str(DEFAULT_DATA / "her2st"), help="HER2ST data folder")
    p.add_argument("--sections", nargs="+", default=IMAGED)
    p.add_argument("--folds", nargs="+", type=int, help="run only these folds (0-based)")
    p.add_argument("--methods", nargs="+", default=["molf", "dense", "mlp", "ridge"], choices=list(METHOD_LABELS))
    p.add_argument("--panels", nargs="+", default=["hvg50", "hallmark"], choices=["hvg50", "hallmark"])
    p.add_argument("--encoder", default="efficientnet_lite0")
    p.add_argument("--patch-px", type=int, default=224)
    p.add_argument(
        "--dihedral", action="store_true", help="features averaged over the 8 rotations and flips of each patch"
    )
    p.add_argument(
        "--scale-features",
        choices=["none", "slide"],
        default="none",
        help="'slide': standardise the features within each slide (pp.scale_features) before every method",
    )
    p.add_argument(
        "--context-um",
        type=float,
        nargs="+",
        metavar="UM",
        help="multi-scale features: also embed context patches of these sides (µm) around each spot (concatenated)",
    )
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--patience", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--n-samples", type=int, default=4, help="MoLF draws per spot (the prediction is their mean)")
    p.add_argument(
        "--temperature", type=float, default=1.0, help="MoLF prior-noise scale (0: one deterministic point estimate)"
    )
    p.add_argument(
        "--no-guidance-selection",
        dest="select_guidance",
        action="store_false",
        help="keep guidance 1 instead of choosing it by filter-and-rank on the validation section",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="MoLF setting for every MoLF variant (as `histoflow fit --set`), e.g. --set cond_dim=128; repeatable",
    )
    p.add_argument(
        "--ensemble",
        type=int,
        default=1,
        metavar="N",
        help="MoLF rows average the predictions of N models trained with seeds --seed … --seed + N − 1 (fit time: "
        "their sum); a second row scores the first model alone",
    )
    p.add_argument(
        "--shared-stage-one",
        action="store_true",
        help="with --ensemble: the models after the first train only Stage II, on the first model's Stage I "
        "(MoLF.train(stage_one=...)); the fit time is one Stage I and N Stage IIs",
    )
    p.add_argument(
        "--rotate-validation",
        action="store_true",
        help="with --ensemble: member i validates on the i-th non-test section (the fold's validation section first) "
        "and trains on the others, so the ensemble trains on every section but the test section; the panel stays "
        "the fold's",
    )
    p.add_argument(
        "--api",
        action="store_true",
        help="MoLF rows through tl.fit_molf_ensemble (its members sample with seeds --seed + i; the prediction is "
        "timed again with tl.predict on the list of members)",
    )
    p.add_argument(
        "--draws",
        type=_draw_count,
        nargs="+",
        metavar="N",
        help="with --api: also score the members' mean with N independent and (N >= 2) N antithetic draws per member, "
        "each as a row with its own prediction time; t0: one draw per member at temperature 0",
    )
    p.add_argument(
        "--antithetic",
        action="store_true",
        help="MoLF draws the prior noise in antithetic pairs (z0, -z0) in guidance selection and prediction",
    )
    p.add_argument(
        "--no-validation",
        action="store_true",
        help="the fold's validation section trains too (the panel stays the fold's, chosen on its three training "
        "sections): no early stopping, Stage II trains for --epochs epochs; needs --no-guidance-selection",
    )
    p.add_argument(
        "--blend",
        type=_blend_weight,
        nargs="+",
        metavar="W",
        help="score every MoLF row also blended with the ridge probe (tl.blend_predictions): W × MoLF's prediction + "
        "(1 − W) × the probe's, for each W (between 0 and 1); W:S blends with gene-wise weights of spread S (the genes "
        "ranked by Moran's I on the training sections); needs ridge in --methods (fitted first, with an intercept)",
    )
    p.add_argument(
        "--select-blend",
        type=_tolerance,
        nargs="+",
        metavar="T",
        help="score every MoLF row also blended with the ridge probe with the weight tl.select_blend chooses on the "
        "fold's validation section: the most structure (mean of GSC and SSC) among the weights whose PCC is at most T "
        "below the best, for each T (0: the best PCC); needs ridge in --methods and the validation section",
    )
    p.add_argument(
        "--blend-spreads",
        type=float,
        nargs="+",
        metavar="S",
        help="with --select-blend: score every MoLF row also blended with gene-wise weights (tl.select_blend with "
        "spreads=S …, the genes ranked by Moran's I on the training sections), rows …_ridgegene{T}",
    )
    p.add_argument(
        "--panel-with-validation",
        action="store_true",
        help="choose the panel on the validation section too (four sections instead of the fold's three training "
        "sections)",
    )
    p.add_argument(
        "--distil",
        type=float,
        metavar="W",
        help="with --api and --ensemble: also train one student MoLF (same settings, seed --seed, the fold's split) on "
        "W × the ensemble's prediction + (1 − W) × the measured expression, scored with 1, 2 and 16 draws "
        "(independent and antithetic) and at temperature 0 (fit time: the ensemble's and the student's)",
    )
    p.add_argument(
        "--smooth",
        action="store_true",
        help="score every row also averaged with its spatial neighbours (tl.smooth_predictions with its defaults, "
        "and, unless --no-validation, with the weight and rings tl.select_smoothing chooses on the fold's validation "
        "section)",
    )
    p.add_argument(
        "--smooth-genes",
        type=_smooth_pair,
        nargs="+",
        metavar="W:S",
        help="with --smooth: score every row also smoothed with gene-wise weights (tl.smooth_predictions with "
        "self_weight=W, spread=S: the genes ranked by Moran's I on the training sections, the most structured "
        "smoothed most)",
    )
    p.add_argument(
        "--select-smoothing",
        type=_tolerance,
        nargs="+",
        metavar="T",
        help="with --smooth: score every row also smoothed with the weight, rings and gene-wise spread "
        "tl.select_smoothing chooses on the fold's validation section (the most structure among the choices whose "
        "PCC is at most T below the best), for each T; needs the validation section",
    )
    p.add_argument(
        "--smoothing-spreads",
        type=float,
        nargs="+",
        metavar="S",
        help=f"with --select-smoothing: the gene-wise spreads it tries (default {' '.join(map(str, SMOOTH_SPREADS))})",
    )
    p.add_argument(
        "--refit",
        action="store_true",
        help="with --api: after each fold's rows, refit every model on the validation section too (MoLF.refit: each "
        "stage for its best epochs, the guidance kept; the baselines fitted again) and score every row again with the "
        "smoothing and blend weights chosen on the validation section before (rows …_refit)",
    )
    p.add_argument("--vae-extra", action="store_true", help="train Stage I also on the count-only sections")
    p.add_argument(
        "--stage-one",
        action="store_true",
        help="MoLF rows also score one draw and Stage I's reconstruction of the measured expression (what a perfect "
        "prediction of the latent would give)",
    )
    p.add_argument("--quick", action="store_true", help="2 folds, HVG-50 only, 40 epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator of the fits (cpu, gpu); predictions too")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "histoflow" / "bench"))
    p.add_argument("--csv", help="write the per-fold results here")
    p.add_argument("--hest-bench", help="HEST-Bench root folder (HEST-Bench mode)")
    p.add_argument("--task", default="IDC", help="HEST-Bench task")
    p.add_argument("--features", help="HEST-Bench embedding root (<features>/<TASK>/<encoder>/fp32/<id>.h5)")
    args = p.parse_args(argv)
    args.molf_config, args.molf_train = _parse_settings(p, args.set, "molf")
    if args.ensemble < 1:
        p.error(f"argument --ensemble: must be at least 1, got {args.ensemble}")
    if args.shared_stage_one and args.ensemble < 2:
        p.error("argument --shared-stage-one: needs --ensemble N with N of at least 2")
    if args.rotate_validation and args.ensemble < 2:
        p.error("argument --rotate-validation: needs --ensemble N with N of at least 2")
    if args.api and (args.stage_one or args.shared_stage_one or args.vae_extra):
        p.error("argument --api: not with --stage-one, --shared-stage-one or --vae-extra")
    if args.no_validation and (args.select_guidance or args.rotate_validation or args.hest_bench):
        p.error("argument --no-validation: add --no-guidance-selection, and drop --rotate-validation and --hest-bench "
                "(they need the validation section)")  # fmt: skip
    if args.smooth and args.hest_bench:
        p.error("argument --smooth: HER2ST mode only; drop it with --hest-bench")
    if (args.smooth_genes or args.select_smoothing or args.smoothing_spreads) and not args.smooth:
        p.error("arguments --smooth-genes, --select-smoothing and --smoothing-spreads: add --smooth")
    if args.select_smoothing and args.no_validation:
        p.error("argument --select-smoothing: needs the validation section (drop --no-validation)")
    if args.smoothing_spreads and not args.select_smoothing:
        p.error("argument --smoothing-spreads: needs --select-smoothing T (the PCC tolerances of the choice)")
    if args.smoothing_spreads and any(not (np.isfinite(v) and v >= 0) for v in args.smoothing_spreads):
        p.error(f"argument --smoothing-spreads: each spread must be at least 0, got {args.smoothing_spreads}")
    if args.blend and (args.hest_bench or "ridge" not in args.methods):
        p.error("argument --blend: HER2ST mode only, and needs ridge in --methods (the probe MoLF is blended with)")
    if args.select_blend and (args.hest_bench or "ridge" not in args.methods or args.no_validation):
        p.error("argument --select-blend: HER2ST mode only, needs ridge in --methods (the probe MoLF is blended with) "
                "and the validation section (drop --no-validation)")  # fmt: skip
    if args.blend_spreads and not args.select_blend:
        p.error("argument --blend-spreads: needs --select-blend T (the PCC tolerances of the choice)")
    if args.blend_spreads and any(not (np.isfinite(v) and v >= 0) for v in args.blend_spreads):
        p.error(f"argument --blend-spreads: each spread must be a number of at least 0, got {args.blend_spreads}")
    if args.blend or args.select_blend:  # the probe (and the MLP) first, so that every MoLF row can be blended with it
        args.methods = sorted(args.methods, key=lambda m: m not in ("ridge", "mlp"))
    if args.molf_train.get("refit") and args.select_guidance:
        p.error("argument --set refit=true: add --no-guidance-selection (after the refit the validation section is a "
                "training section, so filter-and-rank on it would score training data)")  # fmt: skip
    if args.refit and (not args.api or args.no_validation or args.hest_bench or args.molf_train.get("refit")):
        p.error("argument --refit: needs --api and the validation section (drop --no-validation and --set refit=true; "
                "HER2ST mode only)")  # fmt: skip
    if args.refit and args.distil is not None:
        p.error("argument --refit: not with --distil (the student is not refitted); drop one of them")
    if args.distil is not None and not (args.api and args.ensemble > 1 and 0 <= args.distil <= 1):
        p.error(f"argument --distil: needs --api and --ensemble N with N of at least 2, and W between 0 and 1 (got "
                f"{args.distil:g})")  # fmt: skip
    if args.draws and not args.api:
        p.error("argument --draws: needs --api (it predicts again with the members tl.fit_molf_ensemble returns)")
    if (args.draws or args.distil is not None) and args.hest_bench:
        p.error(f"argument {'--draws' if args.draws else '--distil'}: HER2ST mode only; drop it with --hest-bench")
    if args.ensemble > 1 and args.stage_one:
        p.error("argument --stage-one: not with --ensemble (it describes one model); drop one of them")
    if args.quick:
        args.folds = args.folds or [0, 1]
        args.panels = ["hvg50"]
        args.epochs = min(args.epochs, 40)
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("histoflow").setLevel(logging.WARNING)
    t = time.perf_counter()
    results = run_hest_bench(args) if args.hest_bench else run_her2st(args)
    for panel in dict.fromkeys(results["panel"]):
        n_folds = results["fold"].nunique()
        print_table(
            results, panel, "all", f"### {panel}: all panel genes (mean ± std over {n_folds} folds)", args.ensemble
        )
        for gs in sorted(g for g in set(results.loc[results["panel"] == panel, "gene_set"]) if g.startswith("tier:")):
            print_table(results, panel, gs, f"### {panel}: Hallmark variance {gs}", args.ensemble)
    print(
        f"\nTotal {time.perf_counter() - t:.0f} s. Command: python benchmarks/her2st.py {' '.join(argv or [])}".rstrip()
    )
    if args.csv:
        results.to_csv(args.csv, index=False)
    return results


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
