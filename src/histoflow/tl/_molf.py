"""Functional API of MoLF: fit, predict, select the guidance scale, record trajectories."""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from histoflow._constants import Key
from histoflow._docs import doc_params
from histoflow._logging import logger
from histoflow._utils import accelerator_device, copy_data, get_table, log_write, torch_device
from histoflow._validate import check_bool, check_temperature
from histoflow.tl._baseline import _rows_to_predict, baseline_kind, baseline_uns
from histoflow.tl._write import write_predictions

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from histoflow.models import FLAG, MLPBaseline, MoLF, RidgeProbe

__all__ = ["fit_molf", "predict", "select_guidance", "trajectories"]

#: Guidance scales swept by :func:`select_guidance` (and by :func:`fit_molf_ensemble` for each member).
GUIDANCE_SCALES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0)


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("histoflow", "torch", "lightning", "anndata", "spatialdata", "scvi-tools"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - a missing distribution is reported as unknown
            out[pkg] = "unknown"
    return out


def _history_frames(model: MoLF) -> dict[str, pd.DataFrame]:
    return {k: v.reset_index(drop=False) for k, v in model.history.items()}


def _write(table: AnnData, model: MoLF, key: str, rows: np.ndarray, res: dict[str, np.ndarray], params: dict) -> None:
    names = [f"expert_{i}" for i in range(res["routing"].shape[1])]
    uns = {
        "params": {k: v for k, v in params.items() if isinstance(v, (str, int, float, bool))},
        "config": {k: v for k, v in vars(model.config).items() if isinstance(v, (str, int, float, bool))},
        "genes": list(model.registry.genes),
        "history": _history_frames(model),
        "versions": _versions(),
        "train_libraries": {k: list(v) for k, v in getattr(model, "_train_libraries", {}).items()},
    }
    uns.update(model.uns_extra() if hasattr(model, "uns_extra") else {})  # model-specific reports (FLAG: alignment)
    write_predictions(
        table,
        key,
        rows=rows,
        genes=model.registry.genes,
        mean=res["mean"],
        std=res.get("std"),
        latent=res["latent"],
        routing=res["routing"],
        routing_names=names,
        uns=uns,
    )


@doc_params()
def fit_molf(
    sdata: SpatialData | AnnData,
    *,
    table_key: str = Key.table,
    embedding_key: str = "X_efficientnet_lite0",
    layer: str | None = Key.log1p,
    genes: Sequence[str] | None = None,
    cancer_type_key: str = Key.cancer_type,
    metadata_keys: Sequence[str] | None = None,
    library_key: str = Key.library,
    split_key: str = Key.split,
    max_epochs: int = 300,
    batch_size: int = 256,
    accelerator: str = "auto",
    devices: int | str | Sequence[int] = "auto",
    strategy: str | None = None,
    steps: int = 1,
    n_samples: int = 1,
    temperature: float = 1.0,
    antithetic: bool = False,
    seed: int = 0,
    key_added: str = "molf",
    train_kwargs: dict[str, Any] | None = None,
    copy: bool = False,
    **config: Any,
) -> MoLF | tuple[MoLF, SpatialData | AnnData]:
    """Fit MoLF and write its predictions for every spot.

    Stage I (Transformer VAE over the log1p expression of the panel) and Stage II (conditional flow matching with a
    mixture-of-experts velocity field conditioned on patch features, spatial context and cancer type) are trained on
    the ``train`` slides with early stopping on the ``val`` slides (``obs[split_key]``; made with
    :func:`histoflow.pp.split_slides` defaults when missing, without writing it). Then every spot with patch features
    is predicted with one Euler step (``steps``) at the model's guidance scale.

    ``latent="scvi"`` replaces the VAE by scvi-tools' SCVI (``pip install "histoflow[scvi]"``) trained on the raw
    counts of the panel (``layers["counts"]``, else ``X``) with the slide as batch: count-aware and batch-corrected,
    which matters when many slides and centres are pooled. Its encoder mean is the latent; predictions are log1p of
    its expected count at a fixed library size (``scvi_library_size``, default the median total panel count of the
    training spots), averaged over the training slides. Slides that did not measure every panel gene are refused
    (SCVI cannot mask genes; the VAE can).

    Parameters
    ----------
    {doc_sdata}
    embedding_key
        ``obsm`` key of the patch features (:func:`histoflow.pp.embed_patches`).
    layer
        Layer with log1p expression (:func:`histoflow.pp.normalize`).
    genes
        Panel genes; default ``var["histoflow_panel"]`` (:func:`histoflow.pp.select_genes`), else all genes.
    cancer_type_key
        ``obs`` column with the cancer type (a metadata token when present).
    metadata_keys
        ``obs`` columns used as metadata tokens (default ``[cancer_type_key]``).
    {doc_library_key}
    split_key
        ``obs`` column with ``train``/``val``/``test``.
    max_epochs
        Maximum epochs per stage.
    batch_size
        Spots per batch.
    accelerator, devices, strategy
        Lightning settings (several GPUs or CPU processes through DDP). The predictions are then computed in this
        process on the accelerator's device (``"auto"``: CUDA, then MPS, then CPU).
    steps
        Euler steps at prediction (1 = one velocity evaluation).
    n_samples
        Draws per spot at prediction (their mean is the prediction, their spread goes to
        ``obsm[f"{key_added}_std"]``). One draw is one sample of the model; for a point estimate scored by PCC,
        average several: on HER2ST 16 draws scored 0.239 against 0.227 with 4 (benchmarks page).
    temperature
        Scale of the prior noise at prediction (see :meth:`histoflow.models.MoLF.predict`): 1 samples the model, 0
        gives its deterministic point estimate in one draw.
    antithetic
        Draw the prior noise in antithetic pairs at prediction (see :meth:`histoflow.models.MoLF.predict`): a closer
        estimate of the mean prediction for the same number of draws.
    seed
        Seed for training and sampling; the same seed gives the same numbers on CPU.
    key_added
        Key of the predictions.
    train_kwargs
        More arguments for :meth:`histoflow.models.MoLF.train` (``lr``, ``patience``, ``refit``, ``checkpoint_dir``,
        ...).
    {doc_copy}
    **config
        Model settings (:class:`histoflow.models.MoLFConfig`): ``spatial_context`` (``"window"``, the default:
        Transformer over the spot and its neighbours; ``"graph"``: graph transformer with distance and
        visual-similarity edge features, ``graph_layers`` deep; None: the spot alone), ``context_radius_um``,
        ``max_context``, ``velocity``, ``n_experts``, ``top_k``, ``expert``, ``latent_dim``, ``guidance``,
        ``latent`` (``"vae"``, the default, or ``"scvi"``) with ``scvi_n_hidden``, ``scvi_n_layers``, ``scvi_epochs``,
        ``scvi_library_size``, ``scvi_gene_likelihood``, ``scvi_counts_layer``, ... ``router`` picks each spot's
        experts: ``"input"`` (MoLF's gate on the noisy latent, time and condition), ``"condition"`` (the condition
        only), ``"image+metadata"`` (HistoMoE: the condition next to learned embeddings of the ``metadata_keys``
        codes) or ``"cancer_type"`` (one expert per cancer type, hard routing, ``n_experts`` set from
        ``obs[cancer_type_key]``; an unknown type uses the uniform mixture of all experts).

    Returns
    -------
    The trained :class:`~histoflow.models.MoLF` (and the modified copy when ``copy=True``). Writes, on the table,
    ``obsm[key_added]`` (DataFrame spots × panel genes, log1p), ``layers[key_added]`` when the table's genes are
    exactly the panel, ``obsm[f"{key_added}_std"]`` when ``n_samples > 1``, ``obsm[f"X_{key_added}_latent"]``,
    ``obsm[f"{key_added}_routing"]`` (gate weights per expert) and ``uns[key_added]`` (parameters, loss history of both
    stages, ``"vae"`` or ``"scvi"`` then ``"flow"``, with every loss term and the expert load, versions).
    """
    from histoflow.models import MoLF

    target = copy_data(sdata, table_key) if copy else sdata
    table = get_table(target, table_key)
    model = MoLF(
        table,
        embedding_key=embedding_key,
        layer=layer,
        genes=genes,
        metadata_keys=metadata_keys,
        cancer_type_key=cancer_type_key,
        library_key=library_key,
        split_key=split_key,
        seed=seed,
        **config,
    )
    _train_predict_write(
        model,
        table,
        max_epochs=max_epochs,
        train={"batch_size": batch_size, "accelerator": accelerator, "devices": devices, "strategy": strategy},
        train_kwargs=train_kwargs,
        steps=steps,
        n_samples=n_samples,
        temperature=temperature,
        antithetic=antithetic,
        seed=seed,
        key_added=key_added,
        embedding_key=embedding_key,
    )
    return (model, target) if copy else model


def _train_predict_write(
    model: Any,
    table: AnnData,
    *,
    max_epochs: int,
    train: dict[str, Any],
    train_kwargs: dict[str, Any] | None,
    steps: int,
    n_samples: int,
    temperature: float,
    seed: int,
    key_added: str,
    embedding_key: str,
    antithetic: bool = False,
) -> None:
    """Train a flow model (MoLF, FLAG) on ``table``, predict every spot and write the predictions (``fit_*``)."""
    temperature = check_temperature(temperature)  # before training, not after it
    antithetic = check_bool(antithetic, "antithetic")
    model.train(max_epochs, seed=seed, **train, **(train_kwargs or {}))
    rows = np.arange(table.n_obs)
    device = accelerator_device(train.get("accelerator", "auto"))  # predict where training ran
    sampling = {"steps": steps, "n_samples": n_samples, "temperature": temperature, "antithetic": antithetic}
    res = model.predict(table, rows=rows, **sampling, seed=seed, device=device)
    params = {**sampling, "seed": seed, "guidance": model.config.guidance}
    _write(table, model, key_added, rows, res, {**params, "embedding_key": embedding_key})


@doc_params()
def predict(
    model: MoLF | FLAG | MLPBaseline | RidgeProbe | Sequence[MoLF | FLAG],
    sdata: SpatialData | AnnData,
    *,
    table_key: str = Key.table,
    steps: int = 1,
    guidance: float | None = None,
    n_samples: int = 1,
    temperature: float = 1.0,
    antithetic: bool = False,
    seed: int = 0,
    allow_unknown: bool = False,
    embed: bool = True,
    device: str = "auto",
    key_added: str | None = None,
    copy: bool = False,
) -> SpatialData | AnnData | None:
    """Predict expression with a trained model for every spot of ``sdata`` (expression is not needed).

    When ``obsm`` lacks the model's patch features and ``sdata`` has the H&E image, the patches are embedded first
    with the encoder the model was trained with (:func:`histoflow.pp.embed_patches`, same patch size and rotation
    averaging), and standardised per slide when the training features were (:func:`histoflow.pp.scale_features`).

    Parameters
    ----------
    model
        A trained :class:`~histoflow.models.MoLF` or :class:`~histoflow.models.FLAG`, or a list of them trained on
        the same genes and features (an ensemble, e.g. from :func:`fit_molf_ensemble`): the prediction is then the
        mean over the members (each with ``n_samples`` draws and seed ``seed + i``), the standard deviation that of
        all their draws together, and no latent or routing is written. The members' shared inputs (the features'
        check, the neighbour windows when their window settings agree) are built once.
        A trained baseline (:class:`~histoflow.models.RidgeProbe`, :class:`~histoflow.models.MLPBaseline`, from
        :func:`fit_baseline` or the class's ``load``) predicts every spot with finite features, one deterministic
        value each, and writes what :func:`fit_baseline` writes (``predict_on`` ``["all"]``); the sampling arguments
        below must then keep their defaults.
    {doc_sdata}
    steps
        Euler steps (1 = one velocity evaluation; with guidance that is two forward passes).
    guidance
        Guidance scale (default: the model's, see :func:`select_guidance`; each member's own in an ensemble).
    n_samples
        Draws per spot; mean and standard deviation are written. For a point estimate scored by PCC, average
        several (on HER2ST 16 draws scored 0.239 against 0.227 with 4); each draw costs one velocity evaluation and
        one decoder pass, the condition is encoded once.
    temperature
        Scale of the prior noise (see :meth:`histoflow.models.MoLF.predict`): 1 (default) samples the model as
        trained; 0 starts every spot at the prior mean, the model's deterministic point estimate in a single draw
        (on HER2ST, at guidance 1, between the means of 4 and 16 draws in PCC, at a fraction of their cost; three
        ensemble members at temperature 0 scored 0.316–0.319, as with 2 antithetic draws each, and predicted
        21,100 spots/s on two CPU cores against 12,000 with 2 antithetic draws each).
    antithetic
        Draw the prior noise in antithetic pairs, ``z0`` and ``-z0`` (see :meth:`histoflow.models.MoLF.predict`): the
        mean of the draws is then a closer estimate of the model's mean prediction. On HER2ST three rotated members
        with 2 antithetic draws each scored PCC 0.321, 0.315 and 0.319 on three seed triples, against 0.317, 0.313
        and 0.316 with 2 independent draws each and 0.320, 0.318 and 0.320 with 16 (benchmarks page).
    seed
        Seed of the prior noise.
    allow_unknown
        Predict metadata values unseen in training (e.g. a new cancer type) with the learned null token instead of
        raising an error.
    embed
        Embed missing patch features with the model's encoder (on ``device``).
    {doc_device}
    key_added
        Key of the predictions; default the default key of the model's ``fit_*`` function (``"molf"``, ``"flag"``,
        and for baselines their ``kind``, ``"ridge"`` or ``"mlp"``).
    {doc_copy}

    Returns
    -------
    Writes the same keys as :func:`fit_molf` (``uns[key_added]`` holds the prediction parameters), for a list of
    models those of :func:`fit_molf_ensemble` but the split columns, for a baseline those of :func:`fit_baseline`;
    returns the copy when ``copy=True``.
    """
    members = None
    if isinstance(model, Sequence) and not isinstance(model, str):
        from histoflow.tl._ensemble import check_members

        baselines = [_check_model(m, f"model[{i}]") for i, m in enumerate(model)]  # every member checked
        if any(baselines):
            raise TypeError(
                "`model` lists baselines; an ensemble averages MoLF or FLAG models. Predict one baseline at a time "
                "(and average predictions with `histoflow.tl.blend_predictions`)."
            )
        members = check_members(model)
        model = members[0]
    baseline = _check_model(model)
    key_added = (baseline_kind(model) if baseline else type(model).__name__.lower()) if key_added is None else key_added
    temperature = check_temperature(temperature)
    antithetic = check_bool(antithetic, "antithetic")
    if baseline:
        _check_deterministic(model, steps=steps, guidance=guidance, n_samples=n_samples, temperature=temperature,
                             antithetic=antithetic)  # fmt: skip
    torch_device(device)  # a bad device fails before anything is embedded or written
    target = copy_data(sdata, table_key) if copy else sdata
    table = get_table(target, table_key)
    reg = model.registry
    feats_table = _model_features(target, table, table_key, reg, embed=embed, device=device)
    if baseline:
        rows = _rows_to_predict(feats_table, reg.embedding_key, "all", Key.split)  # the spots with finite features
        mean = model._predict_rows(feats_table, rows, finite=True)
        write_predictions(table, key_added, rows=rows, genes=model.genes, mean=mean,
                          uns=baseline_uns(model, "all", rows))  # fmt: skip
        _keep_features(table, feats_table, reg.embedding_key)
        return target if copy else None
    for key in reg.categories:
        if key not in feats_table.obs:
            if not allow_unknown:
                raise KeyError(
                    f"The table has no `obs[{key!r}]`, which the model uses as metadata; add it, or pass "
                    "`allow_unknown=True` to use the learned null token."
                )
            feats_table = feats_table.copy() if feats_table is table else feats_table
            feats_table.obs[key] = "<unknown>"
    params = {
        "steps": steps,
        "n_samples": n_samples,
        "temperature": temperature,
        "antithetic": antithetic,
        "seed": seed,
    }
    sampling = {**params, "guidance": guidance, "allow_unknown": allow_unknown, "device": device}
    if members is not None:
        from histoflow.models._molf import shared_inputs
        from histoflow.tl._ensemble import _Moments, write_ensemble

        acc = _Moments()
        with shared_inputs():  # the members' features and neighbour windows are built once
            for i, m in enumerate(members):
                acc.add(m.predict(feats_table, **{**sampling, "seed": seed + i}))
        guidances = [m.config.guidance if guidance is None else float(guidance) for m in members]
        parts = {str(i): {"seed": seed + i, "guidance": float(g)} for i, g in enumerate(guidances)}
        write_ensemble(table, members, key_added, np.arange(table.n_obs), *acc.result(), params, parts)
    else:
        res = model.predict(feats_table, **sampling)
        params["guidance"] = model.config.guidance if guidance is None else float(guidance)
        _write(table, model, key_added, np.arange(table.n_obs), res, params)
    _keep_features(table, feats_table, reg.embedding_key)
    return target if copy else None


def _check_model(model: Any, arg: str = "model") -> bool:
    """Whether ``model`` is a baseline (a RidgeProbe or MLPBaseline).

    Anything but a model of histoflow, or an untrained baseline, raises.
    """
    from histoflow.models import FLAG, MLPBaseline, MoLF, RidgeProbe

    if not isinstance(model, (MoLF, FLAG, MLPBaseline, RidgeProbe)):
        raise TypeError(
            f"`{arg}` must be a trained MoLF, FLAG, RidgeProbe or MLPBaseline (from `histoflow.tl.fit_molf`, "
            f"`fit_flag`, `fit_baseline` or the class's `load`), or a list of MoLF or FLAG models; got "
            f"{type(model).__name__}."
        )
    baseline = isinstance(model, (MLPBaseline, RidgeProbe))
    if baseline and not model.is_trained:
        raise RuntimeError(f"The {type(model).__name__} is not trained; fit it with `histoflow.tl.fit_baseline`.")
    return baseline


def _check_deterministic(model: Any, **sampling: Any) -> None:
    """A baseline predicts one value per spot: the sampling arguments of the flow models must keep their defaults."""
    defaults = {"steps": 1, "guidance": None, "n_samples": 1, "temperature": 1.0, "antithetic": False}
    for name, value in sampling.items():
        if value != defaults[name]:
            raise ValueError(
                f"`{name}={value!r}` applies to the flow models (MoLF, FLAG); a {type(model).__name__} predicts one "
                f"deterministic value per spot. Leave `{name}` at its default ({defaults[name]!r})."
            )


def _model_features(
    target: SpatialData | AnnData, table: AnnData, table_key: str, reg: Any, *, embed: bool, device: str
) -> AnnData:
    """The table holding the model's patch features: ``table`` itself, or a copy with the patches embedded.

    The copy's patches are embedded by the model's encoder (and standardised per slide as the training features
    were); ``table`` is not modified.
    """
    if reg.embedding_key in table.obsm:
        return table
    if not embed or not reg.encoder.get("encoder"):
        raise KeyError(
            f"`adata.obsm[{reg.embedding_key!r}]` is missing; run `histoflow.pp.embed_patches` with the model's "
            f"encoder ({reg.encoder.get('encoder', 'unknown')}) first."
        )
    from histoflow.pp import embed_patches

    logger.info("Embedding patches with %r first.", reg.encoder["encoder"])
    probe = copy_data(target, table_key)
    embed_patches(
        probe,
        reg.encoder["encoder"],
        table_key=table_key,
        patch_size_um=float(reg.encoder["patch_size_um"]),
        patch_px=int(reg.encoder["patch_px"]),
        dihedral=bool(reg.encoder.get("dihedral", False)),
        context_size_um=list(reg.encoder.get("context_size_um", [])) or None,
        device=device,
        key_added=reg.embedding_key,
    )
    scaled = reg.encoder.get("scaled_groupby")
    if scaled:  # the model was trained on features standardised per slide (pp.scale_features)
        from histoflow.pp import scale_features

        groupby = None if scaled == "None" else str(scaled)
        scale_features(probe, reg.embedding_key, groupby=groupby, table_key=table_key, key_added=reg.embedding_key)
    return get_table(probe, table_key)


def _keep_features(table: AnnData, feats_table: AnnData, embedding_key: str) -> None:
    """Store the features embedded for the prediction in the user's table (after the predictions are written)."""
    if feats_table is not table and embedding_key in feats_table.obsm and embedding_key not in table.obsm:
        table.obsm[embedding_key] = feats_table.obsm[embedding_key]
        log_write("obsm", embedding_key)


def _filter_and_rank(sweep: pd.DataFrame, tau: float) -> float:
    best = sweep["w1"].min()
    feasible = sweep[sweep["w1"] <= (1 + tau) * best]
    return float(feasible.sort_values(["cosine", "guidance"]).iloc[0]["guidance"])


@doc_params()
def select_guidance(
    model: MoLF,
    sdata: SpatialData | AnnData,
    *,
    table_key: str = Key.table,
    scales: Sequence[float] = GUIDANCE_SCALES,
    tau: float = 0.05,
    split: str = "val",
    split_key: str = Key.split,
    steps: int = 1,
    n_samples: int = 1,
    temperature: float = 1.0,
    antithetic: bool = False,
    seed: int = 0,
    device: str = "auto",
    key_added: str = "molf",
) -> pd.DataFrame:
    """Choose the classifier-free guidance scale by MoLF's filter-and-rank protocol (appendix C).

    For each scale ``w`` the ``split`` spots are predicted and scored against their log1p expression with
    ``D_W1`` = mean over spots of the 1-Wasserstein distance between the spot's true and predicted values (the
    distribution of expression values within the spot) and ``D_cos`` = mean over spots of the cosine distance.
    Filter: keep the scales with ``D_W1 ≤ (1 + tau) · min_w D_W1``. Rank: choose the smallest ``D_cos`` among them
    (ties: the smaller ``w``). The chosen scale becomes the model's default (``model.config.guidance``).

    Parameters
    ----------
    model
        A trained :class:`~histoflow.models.MoLF`.
    {doc_sdata}
    scales
        Guidance scales to sweep.
    tau
        Tolerance over the best ``D_W1``.
    split
        Which ``obs[split_key]`` spots to score (validation slides by default).
    split_key
        ``obs`` column with the split.
    steps, n_samples, temperature, antithetic, seed
        Sampling settings, as in :func:`predict`. The criterion is the paper's (distributional), not PCC: on HER2ST,
        sweeping point estimates (``temperature=0``) chose 0.5 on most folds and scored a lower PCC than guidance 1
        (benchmarks page).
    {doc_device}
    key_added
        Writes ``uns[f"{key_added}_guidance"]``.

    Returns
    -------
    The sweep table (columns ``guidance``, ``w1``, ``cosine``, ``feasible``, ``chosen``); also stored in
    ``uns[f"{key_added}_guidance"]`` with ``tau`` and the chosen scale.
    """
    table = get_table(sdata, table_key)
    temperature = check_temperature(temperature)
    antithetic = check_bool(antithetic, "antithetic")
    torch_device(device)
    if tau < 0:
        raise ValueError(f"`tau` must be non-negative, got {tau}.")
    if not len(scales):
        raise ValueError("`scales` is empty; give at least one guidance scale.")
    if split_key not in table.obs:
        raise KeyError(f"`split_key={split_key!r}` is not a column of `adata.obs`; run `histoflow.pp.split_slides`.")
    rows = np.flatnonzero(table.obs[split_key].astype(str).to_numpy() == split)
    if rows.size == 0:
        raise ValueError(f"No spot has `obs[{split_key!r}] == {split!r}`; choose another `split=`.")
    if "flow_val" in getattr(model, "history", {}):
        logger.warning(
            "The model was refitted on its validation slides (`refit=True`): the sweep scores slides it trained on. "
            "Keep the default guidance, or choose it with a model trained without `refit`."
        )
    sweep, chosen = _guidance_sweep(
        model, table, rows, scales=scales, tau=tau, steps=steps, n_samples=n_samples, temperature=temperature,
        antithetic=antithetic, seed=seed, device=device,
    )  # fmt: skip
    model.config.guidance = chosen
    table.uns[f"{key_added}_guidance"] = {
        "sweep": sweep,
        "tau": float(tau),
        "chosen": chosen,
        "split": split,
        "temperature": temperature,
        "antithetic": antithetic,
    }
    log_write("uns", f"{key_added}_guidance")
    logger.info("Guidance scale %.2f chosen by filter-and-rank (tau %.2f).", chosen, tau)
    return sweep


def _guidance_sweep(
    model: MoLF,
    table: AnnData,
    rows: np.ndarray,
    *,
    scales: Sequence[float],
    tau: float,
    steps: int,
    n_samples: int,
    temperature: float,
    seed: int,
    device: str,
    antithetic: bool = False,
) -> tuple[pd.DataFrame, float]:
    """Filter-and-rank on the spots ``rows`` (see :func:`select_guidance`): the sweep table and the chosen scale."""
    from histoflow.models._data import targets
    from histoflow.tl._metrics import cosine_distance_per_spot, wasserstein_per_spot

    y, _ = targets(table, model.registry.genes, model.registry.layer, rows, model.keys["library_key"])
    records = []
    for w in scales:
        res = model.predict(
            table,
            rows=rows,
            steps=steps,
            guidance=float(w),
            n_samples=n_samples,
            temperature=temperature,
            antithetic=antithetic,
            seed=seed,
            device=device,
        )
        records.append(
            {
                "guidance": float(w),
                "w1": float(np.mean(wasserstein_per_spot(y, res["mean"]))),
                "cosine": float(np.nanmean(cosine_distance_per_spot(y, res["mean"]))),
            }
        )
    sweep = pd.DataFrame(records)
    chosen = _filter_and_rank(sweep, tau)
    sweep["feasible"] = sweep["w1"] <= (1 + tau) * sweep["w1"].min()
    sweep["chosen"] = sweep["guidance"] == chosen
    return sweep, chosen


@doc_params()
def trajectories(
    model: MoLF,
    sdata: SpatialData | AnnData,
    *,
    table_key: str = Key.table,
    steps: int = 10,
    guidance: float | None = None,
    seed: int = 0,
    n_spots: int | None = 500,
    device: str = "auto",
    key_added: str = "molf",
) -> dict[str, Any]:
    """Record flow trajectories from noise (t = 0) to the predicted latent (t = 1), with the true latents.

    Parameters
    ----------
    model
        A trained :class:`~histoflow.models.MoLF`.
    {doc_sdata}
    steps
        Euler steps recorded (``steps + 1`` points per spot).
    guidance
        Guidance scale (default: the model's).
    seed
        Seed of the noise and of the spot subsample.
    n_spots
        Spots recorded (a seeded random subset; None = all).
    {doc_device}
    key_added
        Writes ``uns[f"{key_added}_trajectories"]``.

    Returns
    -------
    Dict with ``obs_names``, ``times`` (steps + 1), ``trajectory`` (times × spots × latent), ``z0``, ``z1_pred``
    and, when the table has the panel's expression, ``z1_true`` (Stage I posterior means); also stored in
    ``uns[f"{key_added}_trajectories"]`` for plotting (``histoflow.pl.trajectories``, coming with the plots).
    """
    table = get_table(sdata, table_key)
    rng = np.random.default_rng(seed)
    rows = np.arange(table.n_obs)
    if n_spots is not None and n_spots < table.n_obs:
        rows = np.sort(rng.choice(table.n_obs, size=n_spots, replace=False))
    res = model.predict(
        table, rows=rows, steps=steps, guidance=guidance, seed=seed, record_trajectories=True, device=device
    )
    out: dict[str, Any] = {
        "obs_names": [str(x) for x in table.obs_names[rows]],
        "times": np.linspace(0.0, 1.0, steps + 1),
        "trajectory": res["trajectory"],
        "z0": res["trajectory"][0],
        "z1_pred": res["trajectory"][-1],
    }
    if all(g in table.var_names for g in model.registry.genes):
        out["z1_true"] = model.get_latent(table, rows)
    table.uns[f"{key_added}_trajectories"] = out
    log_write("uns", f"{key_added}_trajectories")
    return out
