"""MoLF: latent flow matching with a mixture-of-experts velocity field (model class, Lightning modules, data)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch import nn

from histoflow._constants import Key
from histoflow._logging import logger
from histoflow._utils import torch_device
from histoflow._validate import check_bool, check_choice, check_dropout, check_positive, check_temperature
from histoflow.models._data import (
    Registry,
    check_compatible,
    encoder_record,
    feature_chunk_rows,
    features,
    metadata_codes,
    panel_genes,
    split_rows,
    targets,
)
from histoflow.models._flow import PREDICTIONS, LatentFlow
from histoflow.models._scvi import ScviLatent, check_full_panel, fit_scvi, import_scvi, panel_counts
from histoflow.models._train import (
    EpochMeanLogging,
    SeededSampler,
    adamw,
    atomic_dir,
    check_ema_decay,
    fit_module,
    seed_everything,
)
from histoflow.models._vae import GeneVAE
from histoflow.models._velocity import ConditionEncoder, VelocityField

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["MoLF", "MoLFConfig"]

_FORMAT_VERSION = 1

#: Prediction inputs built inside :func:`shared_inputs`, by table, rows and what the inputs depend on.
_SHARED_INPUTS: ContextVar[dict[tuple, Any] | None] = ContextVar("histoflow_shared_inputs", default=None)


@contextmanager
def shared_inputs() -> Iterator[None]:
    """Inside the block, models that read the same inputs of the same table build them once.

    An ensemble's members predict the same spots from the same features (checked by the ensemble) and, with the same
    window settings, the same neighbour windows: the features' check and the neighbour search then run for the first
    member only. The inputs are never written to, and are dropped when the block ends.
    """
    token = _SHARED_INPUTS.set({})
    try:
        yield
    finally:
        _SHARED_INPUTS.reset(token)


@dataclass
class MoLFConfig:
    """Every architectural and objective setting of a :class:`~histoflow.models.MoLF` model (saved with it).

    Stage I: ``latent="vae"`` (default, the paper's Transformer VAE over log1p expression; ``vae_*``, ``beta``;
    ``vae_decoder_hidden`` are the hidden widths of its MLP decoder; ``vae_value_path=True`` adds a linear path from
    the values to the posterior, which reconstructs far better and keeps more structure, see
    :class:`~histoflow.models.GeneVAE` and the HER2ST benchmark; ``vae_dropout`` is the dropout of its encoder) or
    ``latent="scvi"`` (scvi-tools' :class:`~scvi.model.SCVI` on the raw counts of the panel with the slide as batch;
    ``scvi_n_hidden``, ``scvi_n_layers``, ``scvi_epochs`` (default: the Stage I
    epochs of :meth:`~histoflow.models.MoLF.train`), ``scvi_library_size`` (total count at which the decoder reports
    expression; default the median total panel count of the training spots), ``scvi_gene_likelihood``,
    ``scvi_counts_layer`` (layer with raw counts; ``X`` when that layer is absent and ``X`` holds counts)). The
    latent size is ``latent_dim`` for both (scvi's own default is 10; 16-32 suits a 50-gene panel).

    Stage II: ``prediction="velocity"`` (default, the paper's) has the network output the velocity ``z1 − z0``;
    ``"endpoint"`` has it output the endpoint ``ẑ1`` and derives the velocity ``(ẑ1 − z_t) / (1 − t)`` (same path,
    sampler and guidance; see :class:`~histoflow.models.LatentFlow`), so one-step draws depend less on the prior noise.
    """

    latent: Literal["vae", "scvi"] = "vae"
    latent_dim: int = 128
    vae_d_model: int = 64
    vae_heads: int = 4
    vae_layers: int = 1
    vae_ff_dim: int = 512
    vae_max_tokens: int = 32
    vae_decoder_hidden: tuple[int, ...] = (512, 1024)
    vae_value_path: bool = False
    vae_dropout: float = 0.1
    beta: float = 1e-3
    scvi_n_hidden: int = 128
    scvi_n_layers: int = 1
    scvi_epochs: int | None = None
    scvi_library_size: float | None = None
    scvi_gene_likelihood: Literal["zinb", "nb", "poisson"] = "zinb"
    scvi_counts_layer: str | None = Key.counts
    cond_dim: int = 256
    spatial_context: Literal["window", "graph"] | None = "window"
    context_radius_um: float = 250.0
    max_context: int = 8
    graph_layers: int = 2
    tokens_per_value: int = 4
    velocity: Literal["moe", "dense"] = "moe"
    n_experts: int = 6
    top_k: int = 2
    expert: Literal["mlp", "transformer"] = "mlp"
    expert_width: int = 256
    expert_heads: int = 4
    gate_noise: float = 1e-2
    router: Literal["input", "condition", "image+metadata", "cancer_type"] = "input"
    p_uncond: float = 0.1
    p_meta_drop: float = 0.1
    lambda_flow: float = 1.0
    lambda_gene: float = 1.0
    lambda_aux: float = 1.0
    guidance: float = 1.0
    prediction: Literal["velocity", "endpoint"] = "velocity"
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------------
# data


def _neighbours(coords_um: np.ndarray, libs: np.ndarray, radius_um: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``k`` nearest spots of the same slide within ``radius_um`` for every spot, nearest first.

    Returns indices ``(n, k)`` (−1 = none) and offsets ``(n, k, 2)`` in µm. A k-d tree per slide, queried on as many
    threads as torch uses; among spots at the same distance, the tree's (deterministic) order decides which fill the
    last places of a window.
    """
    from scipy.spatial import cKDTree

    n = len(coords_um)
    idx = np.full((n, k), -1, dtype=np.int64)
    off = np.zeros((n, k, 2), dtype=np.float32)
    if k == 0:
        return idx, off
    codes, _ = pd.factorize(libs)
    order = np.argsort(codes, kind="stable")
    bound = np.nextafter(float(radius_um), np.inf)  # the tree keeps distances strictly below its bound
    for rows in np.split(order, np.cumsum(np.bincount(codes))[:-1]):
        m = min(k + 1, len(rows))
        if m < 2:
            continue
        xy = coords_um[rows]
        dist, ind = cKDTree(xy).query(xy, k=m, distance_upper_bound=bound, workers=torch.get_num_threads())
        dist, ind = dist[:, 1:], ind[:, 1:]  # drop the spot itself
        ok = np.isfinite(dist)  # a missing neighbour has distance inf and index len(rows)
        ind = np.where(ok, ind, 0)
        idx[rows, : m - 1] = np.where(ok, rows[ind], -1)
        off[rows, : m - 1] = np.where(ok[..., None], xy[ind] - xy[:, None, :], 0.0)
    return idx, off


class _Gather:
    """Collate function: batch of spot indices → dict of tensors (spot + neighbour features gathered at once)."""

    def __init__(self, arrays: dict[str, torch.Tensor], nbr: torch.Tensor | None, off: torch.Tensor | None):
        self.arrays, self.nbr, self.off = arrays, nbr, off

    def __call__(self, items: list[Any] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Batch of the spots ``items``: dataset items (``(index,)`` tuples or ints) or a tensor of indices."""
        if isinstance(items, torch.Tensor):
            i = items
        else:
            i = torch.as_tensor([int(it[0]) if isinstance(it, (tuple, list)) else int(it) for it in items])
        out = {k: v[i] for k, v in self.arrays.items() if k != "feats"}
        feats = self.arrays.get("feats")
        if feats is None:
            return out
        if self.nbr is None:
            out["feats"] = feats[i]
            return out
        nb = self.nbr[i]  # (B, K)
        valid = torch.cat([torch.ones_like(nb[:, :1], dtype=torch.bool), nb >= 0], dim=1)
        ids = torch.cat([i[:, None], nb.clamp_min(0)], dim=1)
        out["feats"] = feats[ids]
        out["offsets"] = torch.cat([torch.zeros_like(self.off[i][:, :1]), self.off[i]], dim=1)
        out["valid"] = valid
        return out


def _loader(n: int, collate: Any, batch_size: int, shuffle: bool, seed: int) -> torch.utils.data.DataLoader:
    ds = torch.utils.data.TensorDataset(torch.arange(n))
    sampler = SeededSampler(ds, seed) if shuffle else None  # picklable for ddp_spawn, unlike a held Generator
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate)


# --------------------------------------------------------------------------------------------------------------------
# Lightning modules


class _VAEModule(EpochMeanLogging, L.LightningModule):
    def __init__(self, vae: GeneVAE, beta: float, lr: float, weight_decay: float):
        super().__init__()
        self.vae, self.beta, self.lr, self.wd = vae, beta, lr, weight_decay

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        out = self.vae.loss(batch["x"], batch["mask"], self.beta)
        self.log_epoch_means({k: out[k] for k in ("loss", "rec", "kl")}, batch["x"].shape[0])
        return out["loss"]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        out = self.vae.loss(batch["x"], batch["mask"], self.beta, sample=False)
        b = batch["x"].shape[0]
        for k in ("loss", "rec", "kl"):
            self.log(f"val_{k}", out[k], on_step=False, on_epoch=True, batch_size=b, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return adamw(self.vae.parameters(), lr=self.lr, weight_decay=self.wd)


class _FlowModule(EpochMeanLogging, L.LightningModule):
    def __init__(self, flow: LatentFlow, decoder: nn.Module, cfg: MoLFConfig, lr: float, gate_lr: float, wd: float):
        super().__init__()
        self.flow, self.decoder = flow, decoder
        self.decoder.requires_grad_(False)
        self.cfg, self.lr, self.gate_lr, self.wd = cfg, lr, gate_lr, wd

    def _loss(self, batch: dict[str, torch.Tensor], train: bool, generator: Any = None) -> dict[str, torch.Tensor]:
        c = self.cfg
        return self.flow.loss(
            batch,
            self.decoder,
            p_uncond=c.p_uncond if train else 0.0,
            p_meta_drop=c.p_meta_drop if train else 0.0,
            lambda_flow=c.lambda_flow,
            lambda_gene=c.lambda_gene,
            lambda_aux=c.lambda_aux,
            generator=generator,
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        out = self._loss(batch, True)
        values = {k: out[k] for k in ("loss", "flow", "gene", "aux")}
        values.update({f"load_{e}": v for e, v in enumerate(out["load"])})
        self.log_epoch_means(values, batch["z1"].shape[0])
        return out["loss"]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        # the same noise and times every epoch, so the validation loss (early stopping) does not jitter
        gen = torch.Generator(device=batch["z1"].device).manual_seed(1_000_003 + batch_idx)
        out = self._loss(batch, False, gen)
        b = batch["z1"].shape[0]
        # early stopping watches flow + gene consistency (the load-balancing term is a regulariser)
        self.log("val_loss", out["flow"] + out["gene"], on_step=False, on_epoch=True, batch_size=b, sync_dist=True)
        for k in ("flow", "gene"):
            self.log(f"val_{k}", out[k], on_step=False, on_epoch=True, batch_size=b, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        gate, rest = [], []
        for name, p in self.flow.named_parameters():
            (gate if ".gate." in name or ".meta_embed." in name else rest).append(p)  # router parameters
        groups = [{"params": rest, "lr": self.lr}]
        if gate:
            groups.append({"params": gate, "lr": self.gate_lr})
        return adamw(groups, weight_decay=self.wd)


# --------------------------------------------------------------------------------------------------------------------
# the model class


class MoLF:
    """Mixture-of-Latent-Flow model (MoLF) for spatial gene expression from H&E.

    Stage I compresses the log1p expression of the gene panel into a latent space with a Transformer VAE (frozen
    afterwards), or, with ``latent="scvi"``, with scvi-tools' SCVI on the raw counts with the slide as batch (latent =
    encoder mean; decoder = log1p of the expected count at a fixed library size, averaged over the training slides).
    Stage II learns a conditional flow from N(0, I) to that latent, with a top-k
    mixture-of-experts velocity field conditioned on the spot's patch features, optionally its spatial neighbourhood
    (up to ``max_context`` spots within ``context_radius_um``: ``spatial_context="window"``, a Transformer with a 2-D
    sinusoidal encoding of their physical offsets; ``"graph"``, a graph transformer whose attention uses pairwise
    distances in µm and visual similarities as edge features, ``graph_layers`` deep), and metadata such as the cancer
    type (cross-attention over learned metadata tokens). See :func:`histoflow.tl.fit_molf` for the usual entry point.

    The default sizes are the paper's (Stage I latent 128, Stage II width 256). On small cohorts with small panels a
    lighter model is as accurate and faster: on HER2ST (three training sections, 50 genes) ``cond_dim=128,
    latent_dim=32`` scored the same PCC, trained in two thirds of the time and predicts about twice as fast (see the
    benchmarks page). ``prediction="endpoint"`` (the network outputs the endpoint, the velocity follows) makes single
    draws less noisy; with lighter sizes it gave the best PCC on HER2ST, with less gene–gene and spatial structure.

    Parameters
    ----------
    adata
        The AnnData table (``sdata.tables["table"]``) with patch features, log1p targets, slides and metadata.
    embedding_key
        ``obsm`` key of the patch features (from :func:`histoflow.pp.embed_patches`).
    layer
        Layer with log1p expression (from :func:`histoflow.pp.normalize`).
    genes
        Panel genes; default ``var["histoflow_panel"]`` (from :func:`histoflow.pp.select_genes`), else all genes.
    metadata_keys
        ``obs`` columns injected as metadata tokens; default ``[cancer_type_key]`` when that column exists.
    cancer_type_key
        ``obs`` column with the cancer type.
    library_key
        ``obs`` column naming slides.
    spatial_key
        ``obsm`` key of spot centres in full-resolution pixels.
    pixel_size_key
        ``obs`` column with micrometres per full-resolution pixel.
    split_key
        ``obs`` column with ``train``/``val``/``test`` (from :func:`histoflow.pp.split_slides`).
    **config
        Any :class:`MoLFConfig` field (``spatial_context``, ``velocity``, ``n_experts``, ``top_k``, ...).
    """

    def __init__(
        self,
        adata: AnnData,
        *,
        embedding_key: str = "X_efficientnet_lite0",
        layer: str | None = Key.log1p,
        genes: Sequence[str] | None = None,
        metadata_keys: Sequence[str] | None = None,
        cancer_type_key: str = Key.cancer_type,
        library_key: str = Key.library,
        spatial_key: str = Key.spatial,
        pixel_size_key: str = Key.pixel_size,
        split_key: str = Key.split,
        **config: Any,
    ):
        unknown = set(config) - set(MoLFConfig.__dataclass_fields__)
        if unknown:
            raise TypeError(f"Unknown MoLF settings {sorted(unknown)}; see `histoflow.models.MoLFConfig`.")
        self.config = MoLFConfig(**config)
        check_choice(self.config.latent, ("vae", "scvi"), "latent")
        check_choice(self.config.prediction, PREDICTIONS, "prediction")
        hidden = self.config.vae_decoder_hidden
        if isinstance(hidden, (str, bytes, int)) or not all(
            isinstance(h, int | np.integer) and not isinstance(h, bool) and h > 0 for h in hidden
        ):
            raise ValueError(
                "`vae_decoder_hidden` must be a sequence of positive integers (the hidden widths of Stage I's decoder, "
                f"e.g. (512, 1024); () for a linear decoder), got {hidden!r}."
            )
        self.config.vae_decoder_hidden = tuple(int(h) for h in hidden)
        if not isinstance(self.config.vae_value_path, bool | np.bool_):
            raise TypeError(f"`vae_value_path` must be True or False, got {self.config.vae_value_path!r}.")
        self.config.vae_value_path = bool(self.config.vae_value_path)
        self.config.vae_dropout = check_dropout(self.config.vae_dropout, "vae_dropout")
        if self.config.latent == "scvi":
            check_choice(self.config.scvi_gene_likelihood, ("zinb", "nb", "poisson"), "scvi_gene_likelihood")
            if self.config.scvi_library_size is not None:
                check_positive(self.config.scvi_library_size, "scvi_library_size")
            import_scvi()  # fail now, with the install hint, rather than after building everything
        if metadata_keys is None:
            metadata_keys = [cancer_type_key] if cancer_type_key in adata.obs else []
        self.keys = {
            "library_key": library_key,
            "spatial_key": spatial_key,
            "pixel_size_key": pixel_size_key,
            "split_key": split_key,
            "metadata_keys": list(metadata_keys),
            "cancer_type_key": cancer_type_key,
        }
        rows = np.arange(adata.n_obs)
        gene_list = panel_genes(adata, genes)
        feats = features(adata, embedding_key, rows[:1])
        _, cats = metadata_codes(adata, self.keys["metadata_keys"], rows)
        if self.config.router == "cancer_type":  # one expert per cancer type
            if cancer_type_key not in self.keys["metadata_keys"]:
                raise ValueError(
                    f"`router='cancer_type'` needs the cancer type as metadata, but `{cancer_type_key!r}` is not among "
                    f"the metadata keys {self.keys['metadata_keys']} (is `obs[{cancer_type_key!r}]` missing?); add the "
                    "column, pass `cancer_type_key`/`metadata_keys`, or use another router."
                )
            n_types = len(cats[cancer_type_key])
            if "n_experts" in config and config["n_experts"] != n_types:
                raise ValueError(
                    f"`router='cancer_type'` uses one expert per cancer type ({n_types} in "
                    f"`obs[{cancer_type_key!r}]`), but `n_experts={config['n_experts']}` was given; "
                    "leave `n_experts` unset."
                )
            self.config.n_experts = n_types
        enc = adata.uns.get(embedding_key, {})
        self.registry = Registry(
            genes=gene_list,
            embedding_key=embedding_key,
            embedding_dim=int(feats.shape[1]),
            layer=layer,
            categories=cats,
            library_key=library_key,
            encoder=encoder_record(enc),
        )
        self.adata = adata
        with torch.random.fork_rng(devices=[]):  # same seed, same initial weights; the global RNG is left alone
            torch.manual_seed(self.config.seed)
            self._build()
        self.history: dict[str, pd.DataFrame] = {}
        self.is_trained = False

    # ---------------------------------------------------------------- modules
    def _build(self) -> None:
        c, r = self.config, self.registry
        meta_keys, ct_key = self.keys["metadata_keys"], self.keys.get("cancer_type_key", Key.cancer_type)
        # Stage I: the VAE is built here; scvi's frozen copy (`self.scvi`) only exists once trained or loaded
        self.vae: GeneVAE | None = None
        self.scvi: ScviLatent | None = None
        self.scvi_model: Any = None  # the trained scvi.model.SCVI (not saved; None after `load`)
        if c.latent == "vae":
            self.vae = GeneVAE(
                len(r.genes),
                latent_dim=c.latent_dim,
                d_model=c.vae_d_model,
                n_heads=c.vae_heads,
                n_layers=c.vae_layers,
                ff_dim=c.vae_ff_dim,
                max_tokens=c.vae_max_tokens,
                decoder_hidden=c.vae_decoder_hidden,
                value_path=c.vae_value_path,
                dropout=c.vae_dropout,
            )
        cond = ConditionEncoder(
            r.embedding_dim,
            c.cond_dim,
            spatial_context=c.spatial_context,
            graph_layers=c.graph_layers,
            context_radius_um=c.context_radius_um,
            metadata_sizes=[len(r.categories[k]) for k in self.keys["metadata_keys"]],
            tokens_per_value=c.tokens_per_value,
        )
        vel = VelocityField(
            c.latent_dim,
            c.cond_dim,
            velocity=c.velocity,
            n_experts=c.n_experts,
            top_k=c.top_k,
            expert=c.expert,
            expert_width=c.expert_width,
            expert_heads=c.expert_heads,
            gate_noise=c.gate_noise,
            router=c.router,
            metadata_sizes=[len(r.categories[k]) for k in self.keys["metadata_keys"]],
            cancer_type_field=meta_keys.index(ct_key) if ct_key in meta_keys else 0,
        )
        self.flow = LatentFlow(cond, vel, prediction=c.prediction)

    def _decoder(self) -> nn.Module:
        """Stage I decoder, latent → log1p expression (frozen; differentiable for the gene-consistency loss)."""
        if self.config.latent == "scvi":
            if self.scvi is None:
                raise RuntimeError("The scvi Stage I is not trained; call `.train()` first or load a trained model.")
            return self.scvi.decoder
        return self.vae.decoder

    @property
    def n_experts(self) -> int:
        """Number of experts (1 for the dense ablation)."""
        return self.flow.velocity.block.n_experts

    # ---------------------------------------------------------------- arrays from the table
    def _coords_um(self, adata: AnnData, rows: np.ndarray) -> np.ndarray:
        from histoflow.io._resolve import resolve_slides

        slides = resolve_slides(
            adata,
            adata,
            library_key=self.keys["library_key"],
            spatial_key=self.keys["spatial_key"],
            pixel_size_key=self.keys["pixel_size_key"],
            need_image=False,
        )
        out = np.zeros((adata.n_obs, 2), dtype=np.float64)
        for s in slides:
            out[s.rows] = s.centers * s.pixel_size_um
        return out[rows]

    def _arrays(
        self, adata: AnnData, rows: np.ndarray, *, with_targets: bool, allow_unknown: bool = False
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        cache = None if with_targets else _SHARED_INPUTS.get()
        key = None
        if cache is not None:
            key = (id(adata), np.asarray(rows).tobytes(), *self._input_signature(allow_unknown))
            if key in cache:
                return cache[key]
        r = self.registry
        arrays: dict[str, torch.Tensor] = {
            "feats": torch.from_numpy(features(adata, r.embedding_key, rows, r.embedding_dim)),
        }
        if self.keys["metadata_keys"]:
            codes, _ = metadata_codes(
                adata, self.keys["metadata_keys"], rows, r.categories, allow_unknown=allow_unknown
            )
            arrays["meta"] = torch.from_numpy(codes)
        if with_targets:
            Y, M = targets(adata, r.genes, r.layer, rows, self.keys["library_key"])
            arrays["x"], arrays["mask"] = torch.from_numpy(Y), torch.from_numpy(M)
        nbr = off = None
        if self.config.spatial_context in ("window", "graph"):  # the same neighbour window for both encoders
            libs = (
                adata.obs[self.keys["library_key"]].astype(str).to_numpy()[rows]
                if self.keys["library_key"] in adata.obs
                else np.zeros(len(rows), dtype=str)
            )
            idx, o = _neighbours(
                self._coords_um(adata, rows), libs, self.config.context_radius_um, self.config.max_context
            )
            nbr, off = torch.from_numpy(idx), torch.from_numpy(o)
        if key is not None:
            cache[key] = (arrays, nbr, off)
        return arrays, nbr, off

    def _input_signature(self, allow_unknown: bool) -> tuple:
        """What :meth:`_arrays` builds from a table besides the rows (see :func:`shared_inputs`)."""
        r, k = self.registry, self.keys
        window = self.config.spatial_context in ("window", "graph")
        return (
            r.embedding_key,
            r.embedding_dim,
            tuple(k["metadata_keys"]),
            repr(sorted(r.categories.items())) if k["metadata_keys"] else None,
            bool(allow_unknown),
            (self.config.context_radius_um, self.config.max_context, k["library_key"], k["spatial_key"],
             k["pixel_size_key"]) if window else None,
        )  # fmt: skip

    # ---------------------------------------------------------------- training
    def train(
        self,
        max_epochs: int = 300,
        *,
        vae_epochs: int | None = None,
        batch_size: int = 256,
        lr: float = 1e-3,
        gate_lr: float | None = None,
        vae_lr: float = 1e-3,
        weight_decay: float = 0.01,
        ema_decay: float | None = None,
        accelerator: str = "auto",
        devices: int | str | Sequence[int] = "auto",
        strategy: str | None = None,
        num_nodes: int = 1,
        early_stopping: bool = True,
        patience: int = 20,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        show_progress_bar: bool = True,
        seed: int | None = None,
        vae_extra: AnnData | None = None,
        stage_one: MoLF | None = None,
        refit: bool = False,
    ) -> MoLF:
        """Fit Stage I (VAE, or scvi's SCVI) then Stage II (flow) on the ``train`` slides, validating on ``val`` slides.

        With ``latent="scvi"``, Stage I is scvi-tools' :class:`~scvi.model.SCVI` on the raw counts of the
        training slides (one batch per slide), validated on a seeded 10 % of the training spots (the validation
        slides are not batches scvi was trained on), with ``vae_lr``, ``batch_size``, ``early_stopping`` and
        ``patience``, on one device; ``checkpoint_dir``/``resume`` apply to Stage II only.

        Parameters
        ----------
        max_epochs
            Epochs of Stage II (and of Stage I unless ``vae_epochs`` is given).
        vae_epochs
            Epochs of Stage I (``scvi_epochs`` of the config takes precedence with ``latent="scvi"``).
        batch_size
            Spots per batch.
        lr
            Learning rate of Stage II (AdamW).
        gate_lr
            Learning rate of the gating network (default ``lr / 5``, MoLF's ratio).
        vae_lr
            Learning rate of Stage I (the VAE, or scvi's training plan).
        weight_decay
            AdamW weight decay.
        ema_decay
            Keep an exponential moving average of Stage II's weights with this decay per step (e.g. 0.99: about the
            last 100 steps) and use it for validation, early stopping and prediction; common practice for flow and
            diffusion models, not part of the MoLF paper. Choose it against the steps per epoch: with long averages
            early stopping waits for the average (on HER2ST, about 9 steps per epoch, 0.999 trained about three
            times as long as no average). None (default): the raw weights.
        accelerator, devices, strategy, num_nodes
            Passed to :class:`lightning.pytorch.Trainer` (``strategy`` defaults to ``ddp_notebook`` in Jupyter and
            ``ddp_spawn`` elsewhere when several devices are used).
        early_stopping
            Stop each stage when the validation loss has not improved for ``patience`` epochs.
        patience
            Epochs without improvement before stopping.
        checkpoint_dir
            Folder for Lightning checkpoints (best and last of each stage).
        resume
            Resume each stage from ``checkpoint_dir``'s last checkpoint.
        show_progress_bar
            Lightning's progress bar.
        seed
            Seed (default: the model's ``seed``); the same seed gives the same numbers on CPU.
        vae_extra
            More expression-only spots for Stage I (``latent="vae"``): a table with the model's ``layer`` (log1p),
            e.g. count-only sections without an image. Its spots join the VAE's training set (panel genes it lacks
            are masked, never counted as zeros); Stage II still trains on the ``train`` slides only.
        stage_one
            A trained MoLF whose Stage I (the frozen VAE, or scvi's SCVI) this model takes instead of training its
            own: only Stage II trains. It must have the same panel and the same Stage I settings (``latent``,
            ``latent_dim``, and ``beta`` and every ``vae_*`` setting, or every ``scvi_*`` setting); Stage II settings
            may differ. Use it to compare Stage II variants on one latent (MoE against dense, guidance, sizes), or
            to train several Stage II models on one Stage I for a seed ensemble at less than the cost of training
            each whole. Stage I should have been trained on the same training slides (a warning says when not).
            ``vae_epochs``, ``vae_lr`` and ``vae_extra`` do not apply. The model's own history of Stage I is a copy
            of ``stage_one``'s.
        refit
            After training with early stopping on the validation slides, train again from the same initial weights on
            the training and validation slides together, each stage for the epochs at which its validation loss was
            best (as scikit-learn refits on all the data after model selection): the validation slides then add to
            the training data instead of only choosing when to stop. The first run's histories stay as
            ``history["vae_val"]`` and ``history["flow_val"]``; ``history["vae"]`` and ``history["flow"]`` are the
            second run's (training losses only). Training takes the two runs' time. ``latent="vae"`` only. On HER2ST,
            where three sections train and one validates, this added 0.005–0.010 to one model's PCC (0.309 against
            0.304 and 0.299 with two seeds; benchmarks page). To choose guidance, smoothing or a blend on the
            validation slides first, train without it and call :meth:`refit` after choosing.

        Returns
        -------
        The model itself.
        """
        cfg = self.config
        refit = check_bool(refit, "refit")
        if ema_decay is not None:
            check_ema_decay(ema_decay)
        if stage_one is not None:
            self._check_stage_one(stage_one)
            if vae_extra is not None:
                raise ValueError("`vae_extra` trains Stage I, which `stage_one` provides; drop one of the two.")
        extra = None
        if vae_extra is not None:
            if cfg.latent != "vae":
                raise ValueError("`vae_extra` is only used with `latent='vae'`; drop it or use the Transformer VAE.")
            extra = _extra_targets(vae_extra, self.registry.genes, self.registry.layer, self.keys["library_key"])
        seed = cfg.seed if seed is None else int(seed)
        seed_everything(seed)
        adata = self.adata
        split = split_rows(adata, split_key=self.keys["split_key"], library_key=self.keys["library_key"], seed=seed)
        tr, va = split["train"], split["val"]
        if refit:
            if cfg.latent != "vae":
                raise ValueError("`refit` needs Stage I's validation loss per epoch: use it with `latent='vae'`.")
            if va.size == 0:
                raise ValueError(
                    "`refit` trains again for the epochs at which the validation loss was best, but there are no "
                    f"validation slides (`obs[{self.keys['split_key']!r}] == 'val'`); add some or drop `refit`."
                )
            if resume:
                raise ValueError("`resume` continues one training run; `refit` starts a second one. Drop one.")
        if va.size == 0:
            logger.warning("No validation slides: training without early stopping.")
        common = {
            "accelerator": accelerator,
            "devices": devices,
            "strategy": strategy,
            "num_nodes": num_nodes,
            "early_stopping": early_stopping and va.size > 0,
            "patience": patience,
            "enable_progress_bar": show_progress_bar,
        }
        run = {
            "batch_size": batch_size,
            "lr": lr,
            "gate_lr": gate_lr,
            "vae_lr": vae_lr,
            "weight_decay": weight_decay,
            "ema_decay": ema_decay,
            "checkpoint_dir": checkpoint_dir,
            "resume": resume,
            "seed": seed,
            "extra": extra,
            "stage_one": stage_one,
            "split": split,
            "common": common,
            "early_stopping": early_stopping,
        }
        self._stages(tr, va, vae_epochs or max_epochs, max_epochs, **run)
        self.is_trained = True
        self._train_libraries = self._libraries_by_split(adata, split)
        # what refit() needs to train again: the rows and settings of this run (kept in memory, not saved)
        self._last_run = {"tr": tr, "va": va, "seed": seed, "run": run} if cfg.latent == "vae" and va.size else None
        if refit:
            self.refit()
        return self

    def refit(self) -> MoLF:
        """Train again on the training and validation slides, each stage for its best epochs on validation.

        Each stage trains for the epochs at which its validation loss was best. This is ``train(refit=True)`` in two
        steps: call :meth:`train` (early stopping on the validation slides), choose what the validation slides should
        choose with the model as trained (its guidance with :func:`~histoflow.tl.select_guidance`, the smoothing with
        :func:`~histoflow.tl.select_smoothing`, a blend with :func:`~histoflow.tl.select_blend`), then call
        ``refit()`` and predict with those choices, as scikit-learn's searches refit the chosen model on all the
        data. The network restarts from the same initial weights and trains with the same settings and seed as the
        :meth:`train` call (so ``train(refit=True)`` and ``train()`` then ``refit()`` give the same weights); the
        configuration, including the chosen guidance, is kept. The first run's histories become
        ``history["vae_val"]`` and ``history["flow_val"]``. On HER2ST (benchmarks page, *Larger tolerances, then
        refitting*), the smoothing and a blend with the ridge probe chosen with a PCC tolerance of 0.01 each, then
        the refit, scored PCC 0.317–0.324 with SSC 0.808–0.833 over six seeds (0.297–0.306 before the refit).

        Returns
        -------
        The model itself.
        """
        last = getattr(self, "_last_run", None)
        if last is None:
            if "flow_val" in self.history:
                raise RuntimeError("The model was already refitted on its validation slides; refit it only once.")
            raise RuntimeError(
                "`refit` trains again for the epochs at which the validation loss of the last `train` call was best, "
                "and needs that call's rows and settings: call `train` (with validation slides and `latent='vae'`) "
                "first, in this session (a loaded model has no training run to repeat)."
            )
        tr, va, seed, run = last["tr"], last["va"], last["seed"], dict(last["run"])
        # again from the same initial weights, on the training and validation slides, for the best epochs
        best = {k: int(self.history[k]["val_loss"].idxmin()) + 1 for k in ("vae", "flow") if k in self.history}
        for k in list(best):
            self.history[f"{k}_val"] = self.history.pop(k)
        logger.info("Training again on the training and validation slides for %s epochs.", best)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self._build()
        seed_everything(seed)
        both = np.sort(np.concatenate([tr, va]))  # as if every one of these slides were a training slide
        checkpoint_dir = run["checkpoint_dir"]
        run["common"] = {**run["common"], "early_stopping": False}
        run["checkpoint_dir"] = None if checkpoint_dir is None else Path(checkpoint_dir) / "refit"
        self._last_run = None
        self._stages(both, va[:0], best.get("vae", 1), best["flow"], **run)
        self.is_trained = True
        self._train_libraries = self._libraries_by_split(self.adata, {**run["split"], "train": both, "val": va[:0]})
        return self

    def _stages(
        self,
        tr: np.ndarray,
        va: np.ndarray,
        vae_epochs: int,
        flow_epochs: int,
        *,
        batch_size: int,
        lr: float,
        gate_lr: float | None,
        vae_lr: float,
        weight_decay: float,
        ema_decay: float | None,
        checkpoint_dir: str | Path | None,
        resume: bool,
        seed: int,
        extra: dict[str, np.ndarray] | None,
        stage_one: MoLF | None,
        split: dict[str, np.ndarray],
        common: dict[str, Any],
        early_stopping: bool,
    ) -> None:
        """Train Stage I (unless ``stage_one`` gives it) and Stage II on the rows ``tr``, validating on ``va``."""
        cfg, adata = self.config, self.adata
        all_rows = np.concatenate([tr, va])
        arrays, nbr, off = self._arrays(adata, all_rows, with_targets=True)
        n_tr = len(tr)

        def stage_dir(name: str) -> Path | None:
            return None if checkpoint_dir is None else Path(checkpoint_dir) / name

        # Stage I -------------------------------------------------------------
        if cfg.latent == "scvi":
            # raw counts of the panel (train then val rows), checked before anything is trained
            counts, _ = panel_counts(adata, self.registry.genes, cfg.scvi_counts_layer, all_rows)
            lk = self.keys["library_key"]
            libs = adata.obs[lk].astype(str).to_numpy()[all_rows] if lk in adata.obs else np.full(len(all_rows), "0")
            check_full_panel(arrays["mask"].numpy(), libs, self.registry.genes)
            if stage_one is None:
                self.scvi, self.history["scvi"], self.scvi_model = fit_scvi(
                    counts[:n_tr],
                    libs[:n_tr],
                    self.registry.genes,
                    n_latent=cfg.latent_dim,
                    n_hidden=cfg.scvi_n_hidden,
                    n_layers=cfg.scvi_n_layers,
                    gene_likelihood=cfg.scvi_gene_likelihood,
                    library_size=cfg.scvi_library_size,
                    max_epochs=cfg.scvi_epochs or vae_epochs,
                    batch_size=batch_size,
                    lr=vae_lr,
                    accelerator=common["accelerator"],
                    devices=common["devices"],
                    early_stopping=early_stopping,
                    patience=common["patience"],
                    show_progress_bar=common["enable_progress_bar"],
                    seed=seed,
                )
            else:
                self._adopt_stage_one(stage_one, split)
            z1 = self.scvi.encode(counts)  # posterior means (equal to scvi's get_latent_representation)
        else:
            if stage_one is None:
                vae_mod = _VAEModule(self.vae, cfg.beta, vae_lr, weight_decay)
                x_all = {"x": arrays["x"], "mask": arrays["mask"]}
                n_vae = n_tr
                if extra is not None:  # train rows, then the extra spots, then the validation rows
                    x_all = {
                        k: torch.cat([x_all[k][:n_tr], torch.from_numpy(e), x_all[k][n_tr:]]) for k, e in extra.items()
                    }
                    n_vae = n_tr + len(extra["x"])
                    logger.info("Stage I also trains on %d expression-only spots (`vae_extra`).", len(extra["x"]))
                vae_train = _loader(n_vae, _Subset(x_all, 0), batch_size, True, seed)
                vae_val = _loader(len(va), _Subset(x_all, n_vae), batch_size, False, seed) if va.size else None
                self.history["vae"] = self._fit(
                    vae_mod, vae_train, vae_val, vae_epochs, stage_dir("vae"), resume, common
                )
                self.vae = vae_mod.vae.cpu().eval()
                self.vae.requires_grad_(False)
            else:
                self._adopt_stage_one(stage_one, split)

            # latent targets from the frozen encoder (posterior means)
            with torch.no_grad():
                z1 = torch.cat(
                    [
                        self.vae.encode(arrays["x"][s : s + 4096], arrays["mask"][s : s + 4096])[0]
                        for s in range(0, len(all_rows), 4096)
                    ]
                )
        arrays["z1"] = z1

        # Stage II ------------------------------------------------------------
        seed_everything(seed + 1)
        flow_mod = _FlowModule(self.flow, self._decoder(), cfg, lr, gate_lr or lr / 5, weight_decay)
        flow_train = _loader(n_tr, _Subset(arrays, 0, nbr, off), batch_size, True, seed)
        flow_val = _loader(len(va), _Subset(arrays, n_tr, nbr, off), batch_size, False, seed) if va.size else None
        self.history["flow"] = self._fit(
            flow_mod, flow_train, flow_val, flow_epochs, stage_dir("flow"), resume, {**common, "ema_decay": ema_decay}
        )
        self.flow = flow_mod.flow.cpu().eval()

    def _check_stage_one(self, other: Any) -> None:
        """Refuse a ``stage_one`` model this model cannot take Stage I from (before anything trains)."""
        if not isinstance(other, MoLF):
            raise TypeError(f"`stage_one` must be a trained MoLF model, got {type(other).__name__}.")
        if not other.is_trained:
            raise ValueError("`stage_one` is not trained; train it first (or drop `stage_one` to train Stage I here).")
        if list(other.registry.genes) != list(self.registry.genes) or other.registry.layer != self.registry.layer:
            raise ValueError(
                f"`stage_one` was trained on another panel ({len(other.registry.genes)} genes, layer "
                f"{other.registry.layer!r}) than this model's ({len(self.registry.genes)} genes, layer "
                f"{self.registry.layer!r}); Stage I can only be shared between models of the same genes, in order."
            )
        mine, theirs = asdict(self.config), asdict(other.config)
        keys = STAGE_ONE_SETTINGS["common"] + STAGE_ONE_SETTINGS[theirs["latent"]]
        differ = [k for k in keys if mine[k] != theirs[k]]
        if differ:
            pairs = ", ".join(f"{k}={theirs[k]!r} (here {mine[k]!r})" for k in differ)
            raise ValueError(
                f"`stage_one` has other Stage I settings: {pairs}. Build this model with the same Stage I settings."
            )

    def _adopt_stage_one(self, other: MoLF, split: dict[str, np.ndarray]) -> None:
        """Take a frozen copy of ``other``'s Stage I and of its history."""
        theirs = getattr(other, "_train_libraries", {}).get("train")
        mine = self._libraries_by_split(self.adata, split)["train"]
        if theirs is not None and sorted(theirs) != sorted(mine):
            logger.warning(
                "`stage_one` trained Stage I on the slides %s, this model trains on %s: Stage I may have seen slides "
                "this model validates or tests on.",
                theirs,
                mine,
            )
        for name in ("vae", "scvi"):
            module = getattr(other, name)
            setattr(self, name, None if module is None else copy.deepcopy(module).cpu().eval().requires_grad_(False))
            if name in other.history:
                self.history[name] = other.history[name].copy()
        self.scvi_model = other.scvi_model

    def _libraries_by_split(self, adata: AnnData, split: dict[str, np.ndarray]) -> dict[str, list[str]]:
        """The slides of each split (saved with the model, written to ``uns``)."""
        key = self.keys["library_key"]
        if key not in adata.obs:
            return {k: [] for k in split}
        libs = adata.obs[key].astype(str).to_numpy()
        return {k: sorted(pd.unique(libs[v]).tolist()) for k, v in split.items()}

    def _fit(
        self,
        module: L.LightningModule,
        train: Any,
        val: Any,
        max_epochs: int,
        ckpt: Path | None,
        resume: bool,
        common: dict[str, Any],
    ) -> pd.DataFrame:
        ckpt_path = None
        if resume and ckpt is not None:
            last = sorted(ckpt.rglob("last*.ckpt"))
            ckpt_path = str(last[-1]) if last else None
            if ckpt_path is None:
                logger.warning("`resume=True` but no last checkpoint in %s; starting fresh.", ckpt)
        return fit_module(
            module,
            train,
            val,
            ckpt_path=ckpt_path,
            max_epochs=max_epochs,
            checkpoint=ckpt is not None,
            default_root_dir=str(ckpt) if ckpt is not None else None,
            restore_best=val is not None,
            **common,
        )

    # ---------------------------------------------------------------- prediction
    @torch.no_grad()
    def predict(
        self,
        adata: AnnData | None = None,
        *,
        rows: np.ndarray | None = None,
        steps: int = 1,
        guidance: float | None = None,
        n_samples: int = 1,
        temperature: float = 1.0,
        antithetic: bool = False,
        seed: int = 0,
        batch_size: int = 4096,
        allow_unknown: bool = False,
        record_trajectories: bool = False,
        device: str = "auto",
    ) -> dict[str, np.ndarray]:
        """Sample expression for spots of ``adata`` (default: the training table).

        Parameters
        ----------
        adata
            A table with the same kind of patch features (expression is not needed).
        rows
            Row positions to predict (default all).
        steps
            Euler steps; 1 = exactly one velocity evaluation from t = 0 to 1 (two forward passes with guidance).
        guidance
            Classifier-free guidance scale ``w`` (default: the model's, set by :func:`histoflow.tl.select_guidance`).
        n_samples
            Draws per spot; their mean is the prediction and their standard deviation the spread.
        temperature
            Scale of the prior noise, ``z0 ~ N(0, temperature² I)``. 1 (default) samples the model as trained. 0
            starts every spot at the prior mean: one deterministic draw, the model's point estimate of the spot's
            expression (with one Euler step, the flow at ``z0 = 0`` is its estimate of the conditional mean
            latent); one draw is then enough and the spread is 0. On HER2ST, at guidance 1, it scored a PCC between
            the means of 4 and of 16 draws (0.231 against 0.227 and 0.239) at a fraction of their cost, with a higher
            GSC and SSC than either (benchmarks page). With guidance it is also the cheaper draw: the null branch of
            the first step starts every spot at the same point under the same null condition, so it is evaluated once.
        antithetic
            Draw the prior noise in antithetic pairs, ``z0`` and ``-z0`` (with ``n_samples`` of at least 2): each
            draw is still a sample of the model, but the mean of the draws is a closer estimate of the model's mean
            prediction for the same number of draws (what is linear in the noise cancels within a pair). On HER2ST
            a three-model ensemble with 2 antithetic draws per model scored a higher PCC than with 2 independent
            ones on the three seed triples tried, and on one of them as high as with 32 (benchmarks page).
        seed
            Seed of the prior noise; the same seed gives the same numbers.
        batch_size
            Spots per forward pass.
        allow_unknown
            Predict metadata values unseen in training (e.g. a new cancer type) with the learned null token.
        record_trajectories
            Keep the latent path of every spot (``steps + 1`` points, first sample).
        device
            Torch device for inference: ``"auto"`` (default: CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``,
            ``"cuda:1"``, ... The prior noise is drawn on the CPU, so every device starts from the same noise.

        Returns
        -------
        Dict with ``mean`` (spots × genes, log1p), ``std`` (when ``n_samples > 1``), ``latent`` (mean final latent),
        ``z0`` (the first sample's noise), ``routing`` (mean gate weights, spots × experts), ``metadata_attention``,
        ``trajectory`` (when recorded).
        """
        dev = torch_device(device)  # a device this machine lacks fails before any work
        adata, rows = _prediction_inputs(self, adata, rows, steps, n_samples, temperature, antithetic)
        w = self.config.guidance if guidance is None else float(guidance)
        arrays, nbr, off = self._arrays(adata, rows, with_targets=False, allow_unknown=allow_unknown)
        draws = {"n_samples": n_samples, "seed": seed, "batch_size": batch_size, "record": record_trajectories}
        draws["antithetic"] = bool(antithetic)
        dims = (len(self.registry.genes), self.config.latent_dim, self.n_experts)
        dec = self._decoder()
        try:
            flow, dec = self.flow.to(dev).eval(), dec.to(dev).eval()
            cond, attns = _spot_conditions(flow.condition, arrays, nbr, off, batch_size, dev)

            def sample(sl: slice, z0: torch.Tensor, record: bool) -> dict[str, torch.Tensor]:
                meta = arrays["meta"][sl].to(dev) if "meta" in arrays else None  # for the metadata routers
                out = flow.sample(cond[sl], z0.to(dev), meta=meta, steps=steps, guidance=w, record=record)
                return {**out, "x": dec(out["z1"]), "latent": out["z1"]}

            res = _draw(sample, len(rows), self.config.latent_dim, dims, temperature=float(temperature), **draws)
        finally:  # the model lives on the CPU between calls, also after a failure
            self.flow.cpu()
            dec.cpu()
        if attns:
            res["metadata_attention"] = torch.cat(attns).numpy()
        return res

    def get_latent(self, adata: AnnData | None = None, rows: np.ndarray | None = None) -> np.ndarray:
        """Stage I posterior means of measured expression (spots × latent).

        With ``latent="scvi"`` these are scvi's encoder means of the raw counts (``scvi_counts_layer``, else ``X``).
        """
        adata = self.adata if adata is None else adata
        rows = np.arange(adata.n_obs) if rows is None else np.asarray(rows)
        check_compatible(self.registry, adata, genes_needed=True)
        if self.config.latent == "scvi":
            self._decoder()  # raises when Stage I is not trained
            counts, _ = panel_counts(adata, self.registry.genes, self.config.scvi_counts_layer, rows)
            return self.scvi.encode(counts).numpy()
        Y, M = targets(adata, self.registry.genes, self.registry.layer, rows, self.keys["library_key"])
        with torch.no_grad():
            return self.vae.eval().encode(torch.from_numpy(Y), torch.from_numpy(M))[0].numpy()

    def decode(self, z: np.ndarray) -> np.ndarray:
        """log1p expression from latents (with ``latent="scvi"``: at ``scvi_library_size``, averaged over slides)."""
        with torch.no_grad():
            return self._decoder().eval()(torch.as_tensor(z, dtype=torch.float32)).numpy()

    # ---------------------------------------------------------------- save / load
    def save(self, dir_path: str | Path, overwrite: bool = False) -> None:
        """Save to a folder (``model.pt`` + ``model.json``), atomically: written to a temporary folder, then renamed.

        Parameters
        ----------
        dir_path
            Target folder.
        overwrite
            Replace an existing folder.
        """
        meta = {
            **_saved_meta(self),
            "scvi": None if self.scvi is None else self.scvi.spec,  # rebuilds the scvi Stage I without scvi
        }
        state = {
            "vae": None if self.vae is None else self.vae.state_dict(),
            "scvi": None if self.scvi is None else self.scvi.state_dict(),
        }
        _save_folder(self, dir_path, overwrite, meta, state)

    @classmethod
    def load(cls, dir_path: str | Path, adata: AnnData | None = None) -> MoLF:
        """Load a saved model; with ``adata``, check that it has the model's features and metadata categories.

        Parameters
        ----------
        dir_path
            Folder written by :meth:`save`.
        adata
            Table to attach (for prediction or further training); checked for compatibility.
        """
        blob = _load_folder(cls, dir_path)
        meta = blob["meta"]
        self = cls.__new__(cls)
        self.config = MoLFConfig(**meta["config"])
        self.registry = Registry.from_dict(meta["registry"])
        self.keys = meta["keys"]
        self._train_libraries = meta.get("train_libraries", {})
        self._build()
        if self.vae is not None:
            self.vae.load_state_dict(blob["vae"])
            self.vae.eval().requires_grad_(False)
        if meta.get("scvi") is not None:
            self.scvi = ScviLatent(meta["scvi"])
            self.scvi.load_state_dict(blob["scvi"])
        self.flow.load_state_dict(blob["flow"])
        self.flow.eval()
        self.history = dict(blob["history"])
        self.is_trained = bool(meta["is_trained"])
        self.adata = adata
        if adata is not None:
            self._check_table(adata)
        return self

    def _check_table(self, adata: AnnData) -> None:
        check_compatible(self.registry, adata)
        for key, known in self.registry.categories.items():
            if key not in adata.obs:
                raise KeyError(f"The table has no `obs[{key!r}]`, which the model uses as metadata.")
            values = set(adata.obs[key].dropna().astype(str).unique())
            unseen = sorted(values - set(known))
            if unseen:
                raise ValueError(
                    f"`obs[{key!r}]` has categories the model was not trained on: {unseen[:5]} (known: {known}). "
                    "Predict them with `allow_unknown=True` (null token) or train on them."
                )
        if self.registry.layer is not None and all(g in adata.var_names for g in self.registry.genes):
            return
        present = [g for g in self.registry.genes if g in adata.var_names]
        if present and len(present) != len(self.registry.genes):
            raise ValueError(
                f"The table has {len(present)} of the model's {len(self.registry.genes)} genes; a table with other "
                "genes cannot be used with this model (an image-only table with no panel genes can)."
            )


#: Settings that define Stage I (shared, then per kind of latent): a model takes Stage I from another
#: (``train(stage_one=...)``) only if they all agree.
STAGE_ONE_SETTINGS = {
    "common": ("latent", "latent_dim"),
    "vae": ("beta", *(k for k in MoLFConfig.__dataclass_fields__ if k.startswith("vae_"))),
    "scvi": tuple(k for k in MoLFConfig.__dataclass_fields__ if k.startswith("scvi_")),
}


def _saved_meta(model: Any) -> dict[str, Any]:
    """The metadata MoLF and FLAG both save: format, class, config, registry, keys, state, training slides."""
    return {
        "format": _FORMAT_VERSION,
        "class": type(model).__name__,
        "config": asdict(model.config),
        "registry": model.registry.to_dict(),
        "keys": model.keys,
        "is_trained": model.is_trained,
        "train_libraries": getattr(model, "_train_libraries", {}),
    }


def _save_folder(
    model: Any, dir_path: str | Path, overwrite: bool, meta: dict[str, Any], state: dict[str, Any]
) -> None:
    """Write ``model.pt`` (meta, the flow's weights, ``state``, history) and ``model.json`` atomically."""
    with atomic_dir(dir_path, overwrite=overwrite) as tmp:
        blob = {"meta": meta, **state, "flow": model.flow.state_dict(), "history": dict(model.history)}
        torch.save(blob, tmp / "model.pt")
        (tmp / "model.json").write_text(json.dumps(meta, indent=1, default=str))


def _load_folder(cls: type, dir_path: str | Path) -> dict[str, Any]:
    """Read a folder written by :func:`_save_folder`; refuses a missing file and a model of another class."""
    path = Path(dir_path) / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"No saved model at {str(dir_path)!r} (missing model.pt).")
    blob = torch.load(path, map_location="cpu", weights_only=False)
    found = blob["meta"].get("class")
    if found != cls.__name__:
        raise ValueError(f"{str(dir_path)!r} holds a {found}, not a {cls.__name__}.")
    return blob


def _prediction_inputs(
    model: Any,
    adata: AnnData | None,
    rows: np.ndarray | None,
    steps: int,
    n_samples: int,
    temperature: float = 1.0,
    antithetic: bool = False,
) -> tuple[AnnData, np.ndarray]:
    """Checks shared by ``predict`` of MoLF and FLAG; returns the table to predict and the row positions."""
    name = type(model).__name__
    if not model.is_trained:
        raise RuntimeError("The model is not trained; call `.train()` first or load a trained model.")
    adata = model.adata if adata is None else adata
    if adata is None:
        raise ValueError(f"No table: pass `adata`, or load the model with `{name}.load(path, adata=...)`.")
    check_compatible(model.registry, adata)
    if isinstance(n_samples, bool) or not isinstance(n_samples, int | np.integer) or n_samples < 1:
        raise ValueError(f"`n_samples` must be an integer of at least 1, got {n_samples!r}.")
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
        raise ValueError(f"`steps` must be an integer of at least 1, got {steps!r}.")
    check_temperature(temperature)
    check_bool(antithetic, "antithetic")
    rows = np.arange(adata.n_obs) if rows is None else np.asarray(rows)
    if rows.size == 0:
        raise ValueError("Nothing to predict: the table has no spots, or `rows` selects none.")
    return adata, rows


def _spot_conditions(
    condition: nn.Module,
    arrays: dict[str, torch.Tensor],
    nbr: torch.Tensor | None,
    off: torch.Tensor | None,
    batch_size: int,
    device: torch.device,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The condition of every spot (computed once for all draws and steps) and the metadata attention weights.

    Every spot's features are projected once; the neighbour tokens of the spatial context are then gathered from the
    projections, not projected again per window.
    """
    n, width = arrays["feats"].shape
    step = feature_chunk_rows(batch_size, width, device.type == "cpu")
    proj = torch.cat([condition.project(arrays["feats"][s : s + step].to(device)) for s in range(0, n, step)])
    gather = _Gather({**arrays, "feats": proj}, nbr, off)
    conds, attns = [], []
    for s in range(0, n, batch_size):
        b = {k: v.to(device) for k, v in gather(torch.arange(s, min(s + batch_size, n))).items()}
        c, a = condition.forward_projected(b["feats"], b.get("offsets"), b.get("valid"), b.get("meta"))
        conds.append(c)
        if a is not None:
            attns.append(a.cpu())
    return torch.cat(conds), attns


def _draw(
    sample: Any,
    n: int,
    noise_dim: int,
    dims: tuple[int, int, int],
    *,
    n_samples: int,
    seed: int,
    batch_size: int,
    record: bool,
    temperature: float = 1.0,
    antithetic: bool = False,
) -> dict[str, np.ndarray]:
    """``n_samples`` draws for ``n`` spots from seeded prior noise, in batches; their mean, spread and summaries.

    ``sample(rows, z0, record)`` maps a slice of spots and its prior noise (``len × noise_dim``) to ``x`` (log1p
    expression), ``latent`` and, optionally, ``routing`` and ``trajectory`` (when ``record``); ``dims`` are the widths
    of ``x``, ``latent`` and ``routing``. Returns ``mean``
    (clipped at 0), ``std`` (``n_samples > 1``), ``latent`` and ``routing`` (means over draws; routing is a column
    of ones when ``sample`` gives none: a dense model), ``z0`` (the first draw's noise) and ``trajectory`` (the first
    draw's, when recorded). The same ``seed`` gives the same noise, hence the same numbers; the noise is
    ``temperature`` times a standard normal draw (0: every draw starts at the prior mean). With ``antithetic`` the
    draws come in pairs: every odd draw starts from the negated noise of the draw before it (the first draw's noise
    is that of independent draws; an odd ``n_samples`` ends with an unpaired draw).
    """
    gen = torch.Generator().manual_seed(int(seed))
    many = n_samples > 1  # one draw: its values are the results, no sums to keep
    alloc = torch.zeros if many else torch.empty  # one draw fills every row
    total, lat, routing = alloc(n, dims[0]), alloc(n, dims[1]), alloc(n, dims[2])
    total_sq = torch.zeros(n, dims[0]) if many else None
    z0_first = traj = None
    z0 = None
    for k in range(n_samples):
        if antithetic and k % 2 == 1:
            z0 = -z0  # the pair of the draw before: its noise mirrored through the prior mean
        else:
            if temperature == 0:  # every draw starts at the prior mean: no noise to draw
                z0 = torch.zeros(n, noise_dim)
            else:
                z0 = torch.randn(n, noise_dim, generator=gen)
                if temperature != 1.0:
                    z0 = z0 * temperature
        if k == 0:
            z0_first = z0
        trajs = []
        for s in range(0, n, batch_size):
            sl = slice(s, min(s + batch_size, n))
            out = sample(sl, z0[sl], record and k == 0)
            x = out["x"].clamp_min(0).cpu()
            r = out["routing"].cpu() if "routing" in out else 1.0
            if many:
                total[sl] += x
                total_sq[sl] += x**2
                lat[sl] += out["latent"].cpu()
                routing[sl] += r
            else:
                total[sl], lat[sl], routing[sl] = x, out["latent"].cpu(), r
            if record and k == 0:
                trajs.append(out["trajectory"].cpu())
        if trajs:
            traj = torch.cat(trajs, dim=1)
    mean = total / n_samples if many else total
    res: dict[str, np.ndarray] = {
        "mean": mean.numpy(),
        "latent": (lat / n_samples if many else lat).numpy(),
        "z0": z0_first.numpy(),
        "routing": (routing / n_samples if many else routing).numpy(),
    }
    if many:
        res["std"] = (total_sq / n_samples - mean**2).clamp_min(0).sqrt().numpy()
    if traj is not None:
        res["trajectory"] = traj.numpy()
    return res


def _extra_targets(table: AnnData, genes: Sequence[str], layer: str | None, library_key: str) -> dict[str, np.ndarray]:
    """log1p targets and gene mask of an expression-only table for Stage I (genes it lacks are masked)."""
    from anndata import AnnData as _AnnData

    if not isinstance(table, _AnnData):
        raise TypeError(f"`vae_extra` must be an AnnData table, got {type(table).__name__}.")
    present = [g for g in genes if g in table.var_names]
    if not present:
        raise ValueError(
            "`vae_extra` has none of the model's panel genes; give a table with the same gene names (e.g. symbols)."
        )
    rows = np.arange(table.n_obs)
    Y = np.zeros((table.n_obs, len(genes)), dtype=np.float32)
    M = np.zeros_like(Y, dtype=bool)
    cols = [i for i, g in enumerate(genes) if g in table.var_names]
    y, m = targets(table, present, layer, rows, library_key)
    Y[:, cols], M[:, cols] = y, m
    return {"x": Y, "mask": M}


class _Subset:
    """Collate for a contiguous block of the stacked train+val arrays (train first, then val)."""

    def __init__(
        self,
        arrays: dict[str, torch.Tensor],
        start: int,
        nbr: torch.Tensor | None = None,
        off: torch.Tensor | None = None,
    ):
        self.gather = _Gather(arrays, nbr, off)
        self.start = start

    def __call__(self, items: list[Any]) -> dict[str, torch.Tensor]:
        return self.gather([int(it[0]) + self.start for it in items])
