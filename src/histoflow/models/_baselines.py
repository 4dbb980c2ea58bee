"""Baselines on patch features: the HEST-benchmark ridge probe and a two-layer MLP.

:class:`RidgeProbe` and :class:`MLPBaseline` follow the scvi-tools user API on plain Lightning/scikit-learn:
``Model(adata, embedding_key=..., layer=..., genes=...)``, ``.train(...)``, ``.predict(adata)`` (spots × genes),
``.save(dir)``, ``Model.load(dir, adata)``, ``.history``, ``.is_trained``. They fit on the ``train`` spots of
``obs["split"]``; the MLP stops early on the ``val`` spots. Use :func:`histoflow.tl.fit_baseline` to fit one and
write its predictions into the table.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch import nn

from histoflow._constants import Key
from histoflow._logging import logger
from histoflow._utils import get_table
from histoflow._validate import check_dropout, check_layer
from histoflow.models._data import (
    Registry,
    check_compatible,
    feature_chunk_rows,
    features,
    panel_genes,
    split_rows,
    targets,
)
from histoflow.models._train import EpochMeanLogging, adamw, atomic_dir, fit_module, seed_everything, tensor_loaders

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["RidgeProbe", "MLPBaseline"]

_META = "model.json"


def _histoflow_version() -> str:
    try:
        return version("histoflow")
    except PackageNotFoundError:  # pragma: no cover
        return "0.0.0"


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, pd.DataFrame):
        return o.to_dict(orient="list")
    return str(o)


def _jsonable(o: Any) -> Any:
    return json.loads(json.dumps(o, default=_json_default))


def _as_rows(rows: Any, n_obs: int) -> np.ndarray:
    """Row positions from None (all), a boolean mask or integer positions."""
    if rows is None:
        return np.arange(n_obs)
    r = np.asarray(rows)
    if r.dtype == bool:
        if r.shape != (n_obs,):
            raise ValueError(f"A boolean `rows` mask must have length {n_obs} (one per spot), got shape {r.shape}.")
        return np.flatnonzero(r)
    if r.dtype.kind not in "iu":
        raise TypeError(f"`rows` must be integer positions or a boolean mask, got dtype {r.dtype}.")
    if r.size and (r.min() < -n_obs or r.max() >= n_obs):
        raise IndexError(f"`rows` holds positions outside 0..{n_obs - 1}.")
    return r.astype(np.int64)


def _masked_mse(pred: np.ndarray, y: np.ndarray, mask: np.ndarray) -> float:
    n = mask.sum()
    return float(np.where(mask, (pred - y) ** 2, 0.0).sum() / max(n, 1))


def _mean_pcc(pred: np.ndarray, y: np.ndarray, mask: np.ndarray) -> float:
    """Mean over genes of the Pearson correlation over (measured) spots; genes with no variance are skipped."""
    out = []
    for j in range(y.shape[1]):
        m = mask[:, j]
        if m.sum() < 2:
            continue
        a, b = pred[m, j] - pred[m, j].mean(), y[m, j] - y[m, j].mean()
        den = np.sqrt((a * a).sum() * (b * b).sum())
        if den > 0:
            out.append(float((a * b).sum() / den))
    return float(np.mean(out)) if out else float("nan")


class _BaselineModel:
    """Shared user API of the baselines: registry, predict, save/load, history."""

    _hyper: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        adata: AnnData | SpatialData,
        *,
        table_key: str = Key.table,
        embedding_key: str = Key.embedding("efficientnet_lite0"),
        layer: str | None = Key.log1p,
        genes: Sequence[str] | None = None,
        library_key: str = Key.library,
        seed: int = 0,
    ):
        table = get_table(adata, table_key)
        gene_list = panel_genes(table, genes)
        check_layer(table, layer)
        dim = features(table, embedding_key, np.arange(0)).shape[1]
        enc = table.uns.get(embedding_key)
        self.registry = Registry(
            genes=gene_list,
            embedding_key=embedding_key,
            embedding_dim=int(dim),
            layer=layer,
            library_key=library_key,
            encoder=_jsonable(dict(enc)) if isinstance(enc, Mapping) else {},
        )
        self.adata: AnnData | None = table
        self.seed = int(seed)
        self.train_params: dict[str, Any] = {}
        self._history = pd.DataFrame(index=pd.Index([], name="epoch", dtype=np.int64))
        self._trained = False

    # ------------------------------------------------------------------ properties
    @property
    def genes(self) -> list[str]:
        """Genes the model predicts, in column order of :meth:`predict`."""
        return list(self.registry.genes)

    @property
    def is_trained(self) -> bool:
        """Whether the model has been trained (or loaded trained)."""
        return self._trained

    @property
    def history(self) -> pd.DataFrame:
        """Training metrics per epoch (index ``epoch``)."""
        return self._history.copy()

    @property
    def params(self) -> dict[str, Any]:
        """Hyperparameters, training parameters and keys (what ``uns[key]["params"]`` records)."""
        base = {
            "embedding_key": self.registry.embedding_key,
            "embedding_dim": self.registry.embedding_dim,
            "layer": self.registry.layer,
            "library_key": self.registry.library_key,
            "genes": self.genes,
            "seed": self.seed,
        }
        return {**base, **{k: getattr(self, k) for k in self._hyper}, **self.train_params}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(genes={len(self.genes)}, embedding_key={self.registry.embedding_key!r}, "
            f"layer={self.registry.layer!r}, trained={self.is_trained})"
        )

    # ------------------------------------------------------------------ data
    def _table(self, adata: AnnData | SpatialData | None, table_key: str) -> AnnData:
        if adata is None:
            if self.adata is None:
                raise ValueError("This model holds no data (it was loaded without `adata`); pass `adata=`.")
            return self.adata
        return get_table(adata, table_key)

    def _train_data(
        self, split_key: str, seed: int
    ) -> tuple[dict[str, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]:
        table = self._table(None, Key.table)
        rows = split_rows(table, split_key=split_key, library_key=self.registry.library_key, seed=seed)
        tr = rows["train"]
        X = features(table, self.registry.embedding_key, tr, dim=self.registry.embedding_dim)
        Y, M = targets(table, self.genes, self.registry.layer, tr, self.registry.library_key)
        return rows, (X, Y, M)

    def _val_data(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        table = self._table(None, Key.table)
        X = features(table, self.registry.embedding_key, rows, dim=self.registry.embedding_dim)
        Y, M = targets(table, self.genes, self.registry.layer, rows, self.registry.library_key)
        return X, Y, M

    # ------------------------------------------------------------------ predict
    def predict(
        self,
        adata: AnnData | SpatialData | None = None,
        *,
        table_key: str = Key.table,
        rows: np.ndarray | Sequence[int] | None = None,
        batch_size: int = 4096,
    ) -> np.ndarray:
        """Predicted expression (in the space of the training ``layer``, e.g. log1p) of the model's genes.

        Only the patch features ``obsm[embedding_key]`` are read, so slides without measured expression work.

        Parameters
        ----------
        adata
            Table (or SpatialData) to predict; the training table by default.
        table_key
            Table of a SpatialData ``adata``.
        rows
            Spots to predict (integer positions or a boolean mask); all by default.
        batch_size
            Spots per forward pass.

        Returns
        -------
        ``float32`` array of shape ``(n_spots, n_genes)``, columns in the order of :attr:`genes`.
        """
        if not self.is_trained:
            raise RuntimeError(f"The {type(self).__name__} is not trained; call `.train()` first.")
        table = self._table(adata, table_key)
        return self._predict_rows(table, _as_rows(rows, table.n_obs), batch_size=batch_size)

    def _predict_rows(
        self, table: AnnData, rows: np.ndarray, *, batch_size: int = 4096, finite: bool = False
    ) -> np.ndarray:
        """:meth:`predict` of a table's ``rows`` (positions).

        ``finite``: the caller has found their features free of NaN and inf (:func:`histoflow.tl.predict`), so they
        are not read once more for that.
        """
        check_compatible(self.registry, table)
        X = features(table, self.registry.embedding_key, rows, dim=self.registry.embedding_dim, finite=finite)
        return np.asarray(self._predict_features(X, batch_size=batch_size), dtype=np.float32)

    def _predict_features(self, X: np.ndarray, *, batch_size: int) -> np.ndarray:
        raise NotImplementedError

    # ------------------------------------------------------------------ save / load
    def save(self, dir_path: str | Path, overwrite: bool = False) -> None:
        """Save the model into the folder ``dir_path`` (``model.json`` + weights), atomically.

        Parameters
        ----------
        dir_path
            Target folder; written into a temporary folder next to it, then renamed.
        overwrite
            Replace an existing folder.
        """
        if not self.is_trained:
            raise RuntimeError(f"The {type(self).__name__} is not trained; there is nothing to save.")
        meta = {
            "model": type(self).__name__,
            "histoflow_version": _histoflow_version(),
            "registry": self.registry.to_dict(),
            "hyper": {k: getattr(self, k) for k in self._hyper},
            "train_params": self.train_params,
            "seed": self.seed,
            "history": self._history.reset_index().to_dict(orient="list"),
        }
        with atomic_dir(dir_path, overwrite=overwrite) as tmp:
            (tmp / _META).write_text(json.dumps(meta, indent=1, default=_json_default))
            self._save_weights(tmp)
        logger.info("Saved the %s to %s.", type(self).__name__, dir_path)

    @classmethod
    def load(cls, dir_path: str | Path, adata: AnnData | SpatialData | None = None, *, table_key: str = Key.table):
        """Load a model saved with ``save``.

        Parameters
        ----------
        dir_path
            Folder written by :meth:`save`.
        adata
            Table (or SpatialData) to attach; it must hold every gene of the model and features of the same size
            (hard errors otherwise). Without it, pass data to :meth:`predict`.
        table_key
            Table of a SpatialData ``adata``.

        Returns
        -------
        The trained model.
        """
        path = Path(dir_path)
        if not (path / _META).is_file():
            raise FileNotFoundError(f"`{path}` holds no saved histoflow model (no {_META}).")
        meta = json.loads((path / _META).read_text())
        if meta.get("model") != cls.__name__:
            raise ValueError(
                f"`{path}` holds a {meta.get('model')}, not a {cls.__name__}; "
                f"use `histoflow.models.{meta.get('model')}.load`."
            )
        registry = Registry.from_dict(meta["registry"])
        table = None
        if adata is not None:
            table = get_table(adata, table_key)
            check_compatible(registry, table, genes_needed=True)
        obj = cls.__new__(cls)
        obj.registry = registry
        obj.adata = table
        obj.seed = int(meta["seed"])
        for k, v in meta["hyper"].items():
            setattr(obj, k, tuple(v) if isinstance(v, list) else v)
        obj.train_params = dict(meta["train_params"])
        hist = pd.DataFrame(meta["history"])
        obj._history = hist.set_index("epoch") if "epoch" in hist else pd.DataFrame(index=pd.Index([], name="epoch"))
        obj._load_weights(path)
        obj._trained = True
        return obj

    def _save_weights(self, folder: Path) -> None:
        raise NotImplementedError

    def _load_weights(self, folder: Path) -> None:
        raise NotImplementedError


# ====================================================================== ridge
class RidgeProbe(_BaselineModel):
    """The HEST-benchmark linear probe: ``StandardScaler`` → ``PCA`` → ``Ridge`` on patch features.

    Reproduces ``hest.bench`` (``benchmark.py`` + ``trainer.py``, README protocol with PCA): the scaler and PCA are
    fitted on the training spots, ``PCA(n_components=256, random_state=seed)`` (scikit-learn's default solver), then
    ``Ridge(solver="lsqr", alpha=100 / (n_components * n_genes), fit_intercept=False, max_iter=1000,
    random_state=seed)`` with one output per gene. With fewer training spots or features than ``n_components``, the
    PCA keeps ``min(n_components, n_spots, n_features)`` components and ``alpha`` uses that number (HEST divides by
    the width of the PCA output). Differences from HEST: the fit is in float64 (HEST casts the PCA output to
    float32); prediction folds scaler, PCA and ridge into one affine map of the features (in float64), applied in
    float32; and genes that some slides did not measure (gene mask) are fitted on the spots that measured them.

    Because of ``fit_intercept=False`` on centred PCA scores, predictions are centred near zero while log1p targets
    are not: **the probe's MSE (and any error in absolute units) is not meaningful; compare it by PCC only**, as the
    HEST benchmark does. ``fit_intercept=True`` adds each gene's mean over its training spots: the coefficients, and
    so every correlation-based score (PCC, GSC, SSC), stay the same up to the solver's tolerance (the PCA scores of
    the training spots are centred), and the predictions are on the targets' scale, e.g. to blend them with another
    model's (:func:`histoflow.tl.blend_predictions`).

    Parameters
    ----------
    adata
        Table (AnnData) or SpatialData with patch features in ``obsm[embedding_key]`` and targets in ``layer``.
    table_key
        Table of a SpatialData ``adata``.
    embedding_key
        ``obsm`` key of the patch features (from :func:`histoflow.pp.embed_patches`).
    layer
        Layer with the targets (log1p of raw counts, :func:`histoflow.pp.normalize`); None reads ``X``.
    genes
        Genes to predict; by default the panel ``var["histoflow_panel"]`` (:func:`histoflow.pp.select_genes`), else
        all genes.
    library_key
        ``obs`` column naming slides (for the gene mask and an automatic split).
    n_components
        PCA components (HEST: 256).
    alpha
        Ridge penalty; None uses HEST's ``100 / (n_components * n_genes)``.
    max_iter
        Iterations of the ``lsqr`` solver (HEST: 1000).
    fit_intercept
        Fit each gene's intercept (HEST: no).
    seed
        Random state of the PCA (randomized SVD) and the solver.
    """

    _hyper = ("n_components", "alpha", "max_iter", "fit_intercept")
    fit_intercept = False  # models saved before the option existed

    def __init__(
        self,
        adata: AnnData | SpatialData,
        *,
        table_key: str = Key.table,
        embedding_key: str = Key.embedding("efficientnet_lite0"),
        layer: str | None = Key.log1p,
        genes: Sequence[str] | None = None,
        library_key: str = Key.library,
        n_components: int = 256,
        alpha: float | None = None,
        max_iter: int = 1000,
        fit_intercept: bool = False,
        seed: int = 0,
    ):
        if int(n_components) < 1:
            raise ValueError(f"`n_components` must be at least 1, got {n_components}.")
        if alpha is not None and not (np.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"`alpha` must be a non-negative number or None, got {alpha!r}.")
        super().__init__(
            adata, table_key=table_key, embedding_key=embedding_key, layer=layer, genes=genes,
            library_key=library_key, seed=seed,
        )  # fmt: skip
        if not isinstance(fit_intercept, bool | np.bool_):
            raise TypeError(f"`fit_intercept` must be True or False, got {fit_intercept!r}.")
        self.n_components, self.alpha, self.max_iter = int(n_components), alpha, int(max_iter)
        self.fit_intercept = bool(fit_intercept)
        self._arrays: dict[str, np.ndarray] = {}

    def train(self, *, split_key: str = Key.split, seed: int | None = None) -> RidgeProbe:
        """Fit on the ``train`` spots of ``obs[split_key]``.

        Parameters
        ----------
        split_key
            ``obs`` column with ``train``/``val``/``test`` (:func:`histoflow.pp.split_slides`); without it, slides
            are split into train/val with ``seed``. ``val`` spots are only scored (``history``).
        seed
            Overrides the model's ``seed``.

        Returns
        -------
        The model, trained; :attr:`history` holds one row (epoch 0) with ``train_loss``/``val_loss`` (MSE, not
        meaningful, see the class notes) and ``val_pcc`` (mean per-gene Pearson r on the ``val`` spots).
        """
        from sklearn.decomposition import PCA
        from sklearn.linear_model import Ridge
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        seed = self.seed if seed is None else int(seed)
        rows, (X, Y, M) = self._train_data(split_key, seed)
        n, d = X.shape
        if n < 2:
            raise ValueError(f"The ridge probe needs at least 2 training spots; `obs[{split_key!r}]` marks {n}.")
        g = len(self.genes)
        n_pc = min(self.n_components, n, d)
        if n_pc < self.n_components:
            logger.info("PCA keeps %d components (%d training spots, %d features).", n_pc, n, d)
        alpha = 100.0 / (n_pc * g) if self.alpha is None else float(self.alpha)
        pre = Pipeline([("scaler", StandardScaler()), ("pca", PCA(n_components=n_pc, random_state=seed))])
        Z = pre.fit_transform(X.astype(np.float64))
        Yd = Y.astype(np.float64)
        coef, intercept = np.zeros((g, n_pc)), np.zeros(g)
        # genes measured on the same spots are fitted together (lsqr solves each output on its own anyway)
        groups: dict[bytes, list[int]] = {}
        for j in range(g):
            groups.setdefault(M[:, j].tobytes(), []).append(j)
        for cols in groups.values():
            r = M[:, cols[0]]
            if r.sum() == 0:
                logger.warning("Genes %s are measured on no training spot; they are predicted as 0.", cols[:5])
                continue
            reg = Ridge(
                solver="lsqr", alpha=alpha, fit_intercept=self.fit_intercept, max_iter=self.max_iter, random_state=seed
            )
            reg.fit(Z[r], Yd[r][:, cols])
            coef[cols] = reg.coef_.reshape(len(cols), n_pc)
            intercept[cols] = reg.intercept_ if self.fit_intercept else 0.0
        scaler, pca = pre.named_steps["scaler"], pre.named_steps["pca"]
        self._arrays = {
            "scaler_mean": np.asarray(scaler.mean_, dtype=np.float64),
            "scaler_scale": np.asarray(scaler.scale_, dtype=np.float64),
            "pca_mean": np.asarray(pca.mean_, dtype=np.float64),
            "pca_components": np.asarray(pca.components_, dtype=np.float64),
            "coef": coef,
            "intercept": intercept,
        }
        self._trained = True
        self.train_params = {"split_key": split_key, "n_components_fitted": int(n_pc), "alpha_fitted": alpha}
        record = {"train_loss": _masked_mse(self._predict_features(X, batch_size=4096), Y, M)}
        if rows["val"].size:
            Xv, Yv, Mv = self._val_data(rows["val"])
            pv = self._predict_features(Xv, batch_size=4096)
            record.update(val_loss=_masked_mse(pv, Yv, Mv), val_pcc=_mean_pcc(pv, Yv, Mv))
        self._history = pd.DataFrame([record], index=pd.Index([0], name="epoch"))
        logger.info("Fitted the ridge probe on %d spots (%d components, alpha %.3g).", n, n_pc, alpha)
        return self

    def _predict_features(self, X: np.ndarray, *, batch_size: int) -> np.ndarray:
        # scaler, PCA and ridge are one affine map, features @ weight + bias: folded here in float64 (a product of
        # features × components × genes, small), so that each spot costs a row of features × genes instead of
        # features × components; the product itself in float32, as the features and the predictions are (it differs
        # from float64 by about 1e-6 of the largest prediction), batch by batch
        a = self._arrays
        proj = a["pca_components"].T @ a["coef"].T  # features × genes
        weight = (proj / a["scaler_scale"][:, None]).astype(np.float32)
        bias = a.get("intercept", 0.0) - (a["scaler_mean"] / a["scaler_scale"] + a["pca_mean"]) @ proj
        bias = np.asarray(bias, dtype=np.float32)
        X = np.asarray(X)
        out = np.empty((X.shape[0], weight.shape[1]), dtype=np.float32)
        step = max(int(batch_size), 1)
        for start in range(0, X.shape[0], step):
            out[start : start + step] = X[start : start + step].astype(np.float32, copy=False) @ weight + bias
        return out

    def _save_weights(self, folder: Path) -> None:
        np.savez(folder / "ridge.npz", **self._arrays)

    def _load_weights(self, folder: Path) -> None:
        with np.load(folder / "ridge.npz") as z:
            self._arrays = {k: z[k] for k in z.files}


# ====================================================================== MLP
_ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU}


class _MLPModule(EpochMeanLogging, L.LightningModule):
    """Standardised features → [Linear → activation → dropout] × len(hidden) → Linear; masked MSE loss."""

    def __init__(
        self,
        n_features: int,
        n_genes: int,
        hidden_dims: Sequence[int] = (512, 512),
        dropout: float = 0.1,
        activation: str = "gelu",
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
    ):
        super().__init__()
        self.lr, self.weight_decay = lr, weight_decay
        self.register_buffer("x_mean", torch.zeros(n_features))
        self.register_buffer("x_std", torch.ones(n_features))
        layers: list[nn.Module] = []
        d = n_features
        for h in hidden_dims:
            layers += [nn.Linear(d, int(h)), _ACTIVATIONS[activation](), nn.Dropout(dropout)]
            d = int(h)
        layers.append(nn.Linear(d, n_genes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.x_mean) / self.x_std)

    @staticmethod
    def masked_mse(pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over measured entries only; masked entries never enter the loss (not as zeros)."""
        diff = torch.where(mask, pred - torch.where(mask, y, torch.zeros_like(y)), torch.zeros_like(pred))
        return diff.pow(2).sum() / mask.sum().clamp_min(1)

    def _loss(self, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        x, y, m = batch
        return self.masked_mse(self(x), y, m)

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log_epoch_means({"loss": loss}, len(batch[0]), prog_bar=True)
        return loss

    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, b = self._loss(batch), len(batch[0])
        self.log("val_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=b)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return adamw(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class MLPBaseline(_BaselineModel):
    """A multilayer perceptron from patch features to log1p expression, trained with Lightning.

    Features are standardised with the training spots' mean and standard deviation (stored in the model), then go
    through ``len(hidden_dims)`` hidden layers (Linear → activation → dropout) and a linear output per gene whose
    bias starts at the genes' training means. The loss is the MSE over measured entries: genes that a slide did not
    measure (gene mask, ``uns["histoflow_gene_mask"]``) are left out of the loss, never counted as zeros. AdamW,
    early stopping on the ``val`` spots' loss, and by default the weights of the best validation epoch are kept.

    Parameters
    ----------
    adata
        Table (AnnData) or SpatialData with patch features in ``obsm[embedding_key]`` and targets in ``layer``.
    table_key
        Table of a SpatialData ``adata``.
    embedding_key
        ``obsm`` key of the patch features (from :func:`histoflow.pp.embed_patches`).
    layer
        Layer with the targets (log1p of raw counts, :func:`histoflow.pp.normalize`); None reads ``X``.
    genes
        Genes to predict; by default the panel ``var["histoflow_panel"]`` (:func:`histoflow.pp.select_genes`), else
        all genes.
    library_key
        ``obs`` column naming slides (for the gene mask and an automatic split).
    hidden_dims
        Widths of the hidden layers.
    dropout
        Dropout after each hidden layer.
    activation
        ``"gelu"`` or ``"relu"``.
    seed
        Seed of the initial weights, the batch order and dropout.
    """

    _hyper = ("hidden_dims", "dropout", "activation")

    def __init__(
        self,
        adata: AnnData | SpatialData,
        *,
        table_key: str = Key.table,
        embedding_key: str = Key.embedding("efficientnet_lite0"),
        layer: str | None = Key.log1p,
        genes: Sequence[str] | None = None,
        library_key: str = Key.library,
        hidden_dims: Sequence[int] = (512, 512),
        dropout: float = 0.1,
        activation: Literal["gelu", "relu"] = "gelu",
        seed: int = 0,
    ):
        if activation not in _ACTIVATIONS:
            raise ValueError(f"`activation={activation!r}` is not valid; choose one of {sorted(_ACTIVATIONS)}.")
        check_dropout(dropout)
        if any(int(h) < 1 for h in hidden_dims):
            raise ValueError(f"`hidden_dims` must be positive widths, got {list(hidden_dims)}.")
        super().__init__(
            adata, table_key=table_key, embedding_key=embedding_key, layer=layer, genes=genes,
            library_key=library_key, seed=seed,
        )  # fmt: skip
        self.hidden_dims = tuple(int(h) for h in hidden_dims)
        self.dropout, self.activation = float(dropout), activation
        self.module: _MLPModule | None = None

    def _build(self) -> _MLPModule:
        return _MLPModule(
            self.registry.embedding_dim, len(self.genes), self.hidden_dims, self.dropout, self.activation,
            self.train_params.get("lr", 1e-3), self.train_params.get("weight_decay", 1e-2),
        )  # fmt: skip

    def train(
        self,
        max_epochs: int = 100,
        *,
        accelerator: str = "auto",
        devices: int | str | Sequence[int] = "auto",
        strategy: str | None = None,
        num_nodes: int = 1,
        batch_size: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        early_stopping: bool = True,
        patience: int = 10,
        restore_best: bool = True,
        split_key: str = Key.split,
        seed: int | None = None,
        enable_progress_bar: bool = True,
        default_root_dir: str | Path | None = None,
        checkpoint: bool = False,
        **trainer_kwargs: Any,
    ) -> MLPBaseline:
        """Train on the ``train`` spots of ``obs[split_key]``, stopping early on the ``val`` spots.

        Parameters
        ----------
        max_epochs
            Maximum number of epochs.
        accelerator
            ``"auto"``, ``"cpu"``, ``"gpu"``, ... (Lightning).
        devices
            Number of devices or ``"auto"``; several devices train with DDP (``ddp_spawn``, or ``ddp_notebook`` in
            Jupyter).
        strategy
            Lightning strategy; None picks one (as :func:`~histoflow.models.make_trainer` does).
        num_nodes
            Number of nodes.
        batch_size
            Spots per batch (per device).
        lr
            AdamW learning rate.
        weight_decay
            AdamW weight decay.
        early_stopping
            Stop when the validation loss has not improved for ``patience`` epochs; needs ``val`` spots.
        patience
            Epochs without improvement before stopping.
        restore_best
            Keep the weights of the epoch with the lowest validation loss.
        split_key
            ``obs`` column with ``train``/``val``/``test`` (:func:`histoflow.pp.split_slides`); without it, slides
            are split into train/val with ``seed``.
        seed
            Overrides the model's ``seed``.
        enable_progress_bar
            Show Lightning's progress bar.
        default_root_dir
            Folder for checkpoints.
        checkpoint
            Write checkpoints (best and ``last.ckpt``) into ``default_root_dir/checkpoints``.
        trainer_kwargs
            Passed to :class:`lightning.Trainer`.

        Returns
        -------
        The model, trained; :attr:`history` holds ``train_loss`` and ``val_loss`` (masked MSE) per epoch.
        """
        seed = self.seed if seed is None else int(seed)
        rows, (X, Y, M) = self._train_data(split_key, seed)
        has_val = rows["val"].size > 0
        if early_stopping and not has_val:
            raise ValueError(
                f"`obs[{split_key!r}]` marks no spot as 'val', but early stopping needs validation spots. Mark "
                "validation slides (`histoflow.pp.split_slides`) or pass `early_stopping=False`."
            )
        val = self._val_data(rows["val"]) if has_val else None
        mean = X.mean(0, dtype=np.float64)
        std = X.std(0, dtype=np.float64)
        std[~(std > 1e-6)] = 1.0
        counts = M.sum(0)
        y_mean = np.where(M, Y, 0.0).sum(0, dtype=np.float64) / np.maximum(counts, 1)

        self.train_params = {
            "max_epochs": int(max_epochs), "batch_size": int(batch_size), "lr": float(lr),
            "weight_decay": float(weight_decay), "early_stopping": bool(early_stopping), "patience": int(patience),
            "restore_best": bool(restore_best), "split_key": split_key,
        }  # fmt: skip
        seed_everything(seed)
        module = self._build()
        with torch.no_grad():
            module.x_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
            module.x_std.copy_(torch.as_tensor(std, dtype=torch.float32))
            module.net[-1].bias.copy_(torch.as_tensor(y_mean, dtype=torch.float32))
        train_dl, val_dl = tensor_loaders([X, Y, M], val, batch_size=batch_size, shuffle=True, seed=seed)
        history = fit_module(
            module, train_dl, val_dl,
            max_epochs=max_epochs, accelerator=accelerator, devices=devices, strategy=strategy, num_nodes=num_nodes,
            early_stopping=early_stopping, patience=patience, monitor="val_loss", restore_best=restore_best,
            enable_progress_bar=enable_progress_bar, default_root_dir=default_root_dir, checkpoint=checkpoint,
            **trainer_kwargs,
        )  # fmt: skip
        module.eval()
        self.module, self._history, self._trained = module, history, True
        self.train_params["epochs_trained"] = len(history)
        logger.info("Trained the MLP for %d epochs on %d spots.", len(history), len(X))
        return self

    def _predict_features(self, X: np.ndarray, *, batch_size: int) -> np.ndarray:
        assert self.module is not None
        self.module.eval()
        device = next(self.module.parameters()).device
        out = []
        step = feature_chunk_rows(batch_size, X.shape[1], device.type == "cpu")
        with torch.no_grad():
            for i in range(0, len(X), step):
                x = torch.as_tensor(X[i : i + step], dtype=torch.float32, device=device)
                out.append(self.module(x).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.genes)), dtype=np.float32)

    def _save_weights(self, folder: Path) -> None:
        assert self.module is not None
        torch.save(self.module.state_dict(), folder / "mlp.pt")

    def _load_weights(self, folder: Path) -> None:
        self.module = self._build()
        self.module.load_state_dict(torch.load(folder / "mlp.pt", map_location="cpu", weights_only=True))
        self.module.eval()
