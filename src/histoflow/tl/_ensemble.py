"""Seed ensembles of MoLF: members with their own seeds (and validation slides), their predictions averaged."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from histoflow._constants import Key
from histoflow._docs import doc_params
from histoflow._utils import accelerator_device, copy_data, get_table, log_write
from histoflow._validate import check_bool, check_temperature
from histoflow.tl._molf import GUIDANCE_SCALES, _guidance_sweep, _history_frames, _versions
from histoflow.tl._write import write_predictions

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from histoflow.models import FLAG, MoLF

__all__ = ["fit_molf_ensemble"]


class _Moments:
    """Running mean and variance over the members' predictions (Welford), with each member's own draws' variance.

    Three float32 accumulators of the predictions' size, whatever the number of members.
    """

    def __init__(self) -> None:
        self.n, self.mean, self.m2, self.within = 0, None, None, None

    def add(self, res: dict[str, np.ndarray]) -> None:
        x = np.asarray(res["mean"], dtype=np.float32)
        self.n += 1
        if self.mean is None:
            self.mean, self.m2 = x.copy(), np.zeros_like(x)
            self.within = np.zeros_like(x) if res.get("std") is not None else None
        else:
            delta = x - self.mean
            self.mean += delta / self.n
            self.m2 += delta * (x - self.mean)
        if self.within is not None:
            self.within += np.square(np.asarray(res["std"], dtype=np.float32))

    def result(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The mean over members and the standard deviation over all their draws.

        The variance is the mean of the members' variances plus the variance of their means (the law of total
        variance); None for one member with one draw.
        """
        var = self.m2 / self.n
        if self.within is not None:
            var = var + self.within / self.n
        elif self.n == 1:
            return self.mean, None
        return self.mean, np.sqrt(var)


def check_members(models: Sequence[MoLF | FLAG]) -> list[MoLF | FLAG]:
    """The members of an ensemble as a list: at least one, of one class, on the same genes and features."""
    models = list(models)
    if not models:
        raise ValueError("`model` is an empty sequence; pass a trained model or a list of trained models.")
    first = models[0]
    for i, m in enumerate(models[1:], start=1):
        if type(m) is not type(first):
            raise TypeError(f"`model[{i}]` is a {type(m).__name__}, `model[0]` a {type(first).__name__}; an ensemble "
                            "averages models of one kind.")  # fmt: skip
        if list(m.registry.genes) != list(first.registry.genes):
            raise ValueError(f"`model[{i}]` predicts other genes than `model[0]`; an ensemble averages models trained "
                             "on the same panel.")  # fmt: skip
        if m.registry.embedding_key != first.registry.embedding_key or m.registry.encoder != first.registry.encoder:
            raise ValueError(f"`model[{i}]` reads other patch features than `model[0]` (`embedding_key` or encoder); "
                             "an ensemble's members must share their features.")  # fmt: skip
    return models


def write_ensemble(
    table: AnnData,
    models: Sequence[MoLF | FLAG],
    key: str,
    rows: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray | None,
    params: dict[str, Any],
    members: dict[str, dict[str, Any]],
) -> None:
    """Write an ensemble's predictions: the mean (and standard deviation) and ``uns[key]`` with every member's part."""
    first = models[0]
    uns = {
        "params": {k: v for k, v in params.items() if isinstance(v, (str, int, float, bool))},
        "config": {k: v for k, v in vars(first.config).items() if isinstance(v, (str, int, float, bool))},
        "genes": list(first.registry.genes),
        "n_models": len(models),
        "members": members,
        "versions": _versions(),
    }
    write_predictions(table, key, rows=rows, genes=first.registry.genes, mean=mean, std=std, uns=uns)


@doc_params()
def fit_molf_ensemble(
    sdata: SpatialData | AnnData,
    n_models: int = 3,
    *,
    rotate_validation: bool = True,
    select_guidance: bool = True,
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
) -> list[MoLF] | tuple[list[MoLF], SpatialData | AnnData]:
    """Fit ``n_models`` MoLF models with seeds ``seed``, ``seed + 1``, … and write the mean of their predictions.

    Each member is a :func:`fit_molf` model. With ``rotate_validation`` (the default) member ``i`` validates on
    other slides than member 0: within each cancer type the non-test slides are ordered validation slides first, then
    training slides, and member ``i`` validates on the block of as many slides ``i`` places further along (cyclically)
    and trains on the rest. No member sees a ``test`` slide, and together they train on every other slide, each
    member with its own early stopping. With ``select_guidance`` each member chooses its guidance scale by
    filter-and-rank (:func:`select_guidance`) on its own validation slides. Members predict every spot with
    ``n_samples`` draws each; the prediction is the mean over members and the standard deviation is that of all the
    members' draws together.

    On HER2ST (leave one section out over five sections, the benchmarks page) three members with rotated
    validation scored PCC 0.317–0.322 over three seed triples, against 0.309–0.311 for three members with the same
    validation section and 0.295–0.304 for one model; training takes the members' time together.

    Parameters
    ----------
    {doc_sdata}
    n_models
        Number of members.
    rotate_validation
        Give each member other validation slides (see above); False: every member uses ``obs[split_key]``.
    select_guidance
        Choose each member's guidance scale by filter-and-rank on its validation slides (sampled with ``steps``,
        ``n_samples``, ``temperature``, ``antithetic``); False keeps the configured scale. Refused with
        ``train_kwargs={"refit": True}``, which trains each member on its validation slides too.
    embedding_key, layer, genes, cancer_type_key, metadata_keys, library_key, split_key
        As in :func:`fit_molf`. ``cancer_type_key`` also groups the slides whose validation turn rotates.
    max_epochs, batch_size, accelerator, devices, strategy, train_kwargs
        As in :func:`fit_molf`, for every member.
    steps, n_samples, temperature, antithetic
        Sampling settings of every member, as in :func:`fit_molf`. On HER2ST three members with ``n_samples=2`` and
        ``antithetic=True`` scored PCC 0.315–0.321 over three seed triples, against 0.318–0.320 with 16 independent
        draws each, in a fifth of the prediction time; predicted again with ``temperature=0`` (one draw per member
        from the prior mean) 0.316–0.319, in about a tenth (benchmarks page).
    **config
        Model settings of every member (:class:`histoflow.models.MoLFConfig`), as in :func:`fit_molf`.
    seed
        Seed of member 0; member ``i`` trains and samples with ``seed + i``.
    key_added
        Key of the predictions.
    {doc_copy}

    Returns
    -------
    The trained members (and the modified copy when ``copy=True``); :func:`predict` takes the list to predict new
    slides, and each member saves and loads as any model (:meth:`~histoflow.models.MoLF.save`, one folder each).
    Writes ``obsm[key_added]`` (mean over members), ``layers[key_added]`` when the table's genes are exactly the
    panel, ``obsm[f"{key_added}_std"]`` (spread of all the members' draws; when there is more than one draw in all),
    ``uns[key_added]`` (parameters, the shared model settings, ``members``: each member's seed, guidance scale,
    training and validation slides, loss history and guidance sweep) and, with ``rotate_validation``, each member's
    split as ``obs[f"{key_added}_split_{i}"]``. No member's latent or expert routing is written (they differ
    between members); use a member with :func:`predict` for those. A failure leaves the table as it was.
    """
    from histoflow.models import MoLF
    from histoflow.pp._split import _rotated_split

    if isinstance(n_models, bool) or not isinstance(n_models, int | np.integer) or n_models < 1:
        raise ValueError(f"`n_models` must be a positive integer, got {n_models!r}.")
    temperature = check_temperature(temperature)
    antithetic = check_bool(antithetic, "antithetic")
    if select_guidance and (train_kwargs or {}).get("refit"):
        raise ValueError(
            "`train_kwargs={'refit': True}` trains each member on its validation slides too, so choosing its guidance "
            "scale on them would score training data; pass `select_guidance=False` (and `guidance=` to fix a scale)."
        )
    target = copy_data(sdata, table_key) if copy else sdata
    table = get_table(target, table_key)
    split_keys = [split_key] * n_models
    if rotate_validation:
        if split_key not in table.obs:
            raise KeyError(f"`split_key={split_key!r}` is not a column of `adata.obs`; `rotate_validation` moves its "
                           "validation slides: run `histoflow.pp.split_slides` first.")  # fmt: skip
        if library_key not in table.obs:
            raise KeyError(f"`library_key={library_key!r}` is not a column of `adata.obs`; it names the slides.")
        split = table.obs[split_key].astype(str).to_numpy()
        strata = table.obs[cancer_type_key].astype(str).to_numpy() if cancer_type_key in table.obs else None
        libs = table.obs[library_key].astype(str).to_numpy()
        member_splits = [_rotated_split(split, libs, strata, i) for i in range(n_models)]  # fails before writing
        split_keys = [f"{key_added}_split_{i}" for i in range(n_models)]
        taken = [k for k in split_keys if k in table.obs]
        if taken:
            raise ValueError(f"`obs` already has {taken}; choose another `key_added` or drop them first.")
    device = accelerator_device(accelerator)
    train = {"batch_size": batch_size, "accelerator": accelerator, "devices": devices, "strategy": strategy}
    rows = np.arange(table.n_obs)
    models, members, acc = [], {}, _Moments()
    try:
        if rotate_validation:
            for k, labels in zip(split_keys, member_splits, strict=True):
                table.obs[k] = pd.Categorical(labels, categories=["train", "val", "test"])
                log_write("obs", k)
        for i in range(n_models):
            model = MoLF(
                table,
                embedding_key=embedding_key,
                layer=layer,
                genes=genes,
                metadata_keys=metadata_keys,
                cancer_type_key=cancer_type_key,
                library_key=library_key,
                split_key=split_keys[i],
                seed=seed + i,
                **config,
            )
            model.train(max_epochs, seed=seed + i, **train, **(train_kwargs or {}))
            part: dict[str, Any] = {"seed": seed + i, "split_key": split_keys[i]}
            val_rows = np.flatnonzero(table.obs[split_keys[i]].astype(str).to_numpy() == "val")
            if select_guidance and val_rows.size:
                sweep, chosen = _guidance_sweep(
                    model, table, val_rows, scales=GUIDANCE_SCALES, tau=0.05, steps=steps,
                    n_samples=n_samples, temperature=temperature, antithetic=antithetic, seed=seed + i,
                    device=device,
                )  # fmt: skip
                model.config.guidance = chosen
                part["guidance_sweep"] = sweep
            acc.add(
                model.predict(
                    table, rows=rows, steps=steps, n_samples=n_samples, temperature=temperature,
                    antithetic=antithetic, seed=seed + i, device=device,
                )
            )  # fmt: skip
            part["guidance"] = float(model.config.guidance)
            part["train_libraries"] = {k: list(v) for k, v in getattr(model, "_train_libraries", {}).items()}
            part["history"] = _history_frames(model)
            members[str(i)] = part
            models.append(model)
        mean, std = acc.result()
        params = {"steps": steps, "n_samples": n_samples, "temperature": temperature, "antithetic": antithetic,
                  "seed": seed, "rotate_validation": rotate_validation, "select_guidance": select_guidance,
                  "embedding_key": embedding_key}  # fmt: skip
        write_ensemble(table, models, key_added, rows, mean, std, params, members)
    except BaseException:
        if rotate_validation:
            for k in split_keys:
                if k in table.obs:
                    del table.obs[k]
        raise
    return (models, target) if copy else models
