"""FLAG-style model: flow matching over gene tokens (DiT with adaLN) with REPA alignment to per-gene embeddings.

Each gene of a spot is a token (learned gene identity + an embedding of its noisy value ``x_t``); DiT blocks with
adaptive layer norm (shift, scale and gate from the spot's condition + the flow time, zero-initialised) attend over the
gene tokens; a final adaLN layer gives one velocity per gene. The condition is ``ConditionEncoder``'s output
(patch features, spatial context, metadata, learned null for classifier-free guidance). Training is conditional flow
matching in log1p expression space (``x_t = (1 - t) x0 + t x1``, ``x0 ~ N(0, I)``, target ``x1 - x0``) plus, REPA-style,
``lambda_align`` times the alignment loss: the gene tokens after block ``align_layer`` go through a small MLP projector
and are pulled, by cosine similarity, towards a fixed per-gene embedding (scGPT, Geneformer, or a knowledge-derived one
from :func:`histoflow.pp.gene_embeddings_from_gene_sets`).
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch import nn

from histoflow._constants import Key
from histoflow._logging import logger
from histoflow._utils import torch_device
from histoflow._validate import check_dropout
from histoflow.models._data import (
    Registry,
    check_compatible,
    encoder_record,
    features,
    metadata_codes,
    panel_genes,
    split_rows,
    targets,
)
from histoflow.models._flow import draw_path, one_start
from histoflow.models._molf import (
    MoLF,
    _draw,
    _load_folder,
    _loader,
    _prediction_inputs,
    _save_folder,
    _saved_meta,
    _spot_conditions,
    _Subset,
)
from histoflow.models._train import EpochMeanLogging, adamw, seed_everything
from histoflow.models._vae import masked_mse
from histoflow.models._velocity import ConditionEncoder, timestep_embedding

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["FLAG", "FLAGConfig", "GeneTokenDenoiser", "GeneTokenFlow", "alignment_loss"]


@dataclass
class FLAGConfig:
    """Every architectural and objective setting of a :class:`~histoflow.models.FLAG` model (saved with it).

    Attention runs over the gene tokens of each spot, so memory and time grow as ``genes²`` per spot: fine for
    50–300 genes; ``max_genes`` guards against accidentally passing a whole transcriptome (raise it knowingly, and
    lower ``batch_size`` accordingly).
    """

    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.0
    time_dim: int = 64
    cond_dim: int = 256
    spatial_context: str | None = "window"
    context_radius_um: float = 250.0
    max_context: int = 8
    graph_layers: int = 2
    tokens_per_value: int = 4
    p_uncond: float = 0.1
    p_meta_drop: float = 0.1
    align_layer: int = 2
    lambda_align: float = 0.5
    align_hidden: int = 256
    max_genes: int = 512
    guidance: float = 1.0
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------------
# torch modules


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class _DiTBlock(nn.Module):
    """Pre-norm Transformer block over tokens whose norms are modulated by the condition (adaLN-Zero)."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float, cond_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        hidden = max(1, int(round(d_model * mlp_ratio)))
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d_model))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * d_model))
        nn.init.zeros_(self.ada[-1].weight)
        nn.init.zeros_(self.ada[-1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        s1, g1_scale, g1, s2, g2_scale, g2 = self.ada(c).chunk(6, dim=-1)
        h = _modulate(self.norm1(x), s1, g1_scale)
        a, _ = self.attn(h, h, h, key_padding_mask=pad, need_weights=False)
        x = x + g1[:, None] * a
        return x + g2[:, None] * self.mlp(_modulate(self.norm2(x), s2, g2_scale))


class GeneTokenDenoiser(nn.Module):
    """Velocity over gene tokens: ``v(x_t, t, c)`` ``(B, G)``, plus the hidden gene tokens used for alignment.

    Parameters
    ----------
    n_genes
        Panel size (number of tokens).
    cond_dim
        Width of the condition vector.
    d_model
        Token width.
    n_heads
        Attention heads.
    n_layers
        DiT blocks.
    mlp_ratio
        Feed-forward width over ``d_model``.
    dropout
        Attention dropout.
    time_dim
        Width of the sinusoidal time embedding.
    align_layer
        Block (1-based) whose output tokens are returned for alignment.
    align_dim
        Width of the alignment targets; 0 builds no projector.
    align_hidden
        Hidden width of the projector MLP.
    """

    def __init__(
        self,
        n_genes: int,
        cond_dim: int,
        *,
        d_model: int = 128,
        n_heads: int = 4,
        n_layers: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
        time_dim: int = 64,
        align_layer: int = 2,
        align_dim: int = 0,
        align_hidden: int = 256,
    ):
        super().__init__()
        self.n_genes, self.time_dim, self.align_layer = n_genes, time_dim, align_layer
        self.gene_id = nn.Parameter(torch.randn(n_genes, d_model) * 0.02)
        self.value = nn.Sequential(nn.Linear(1, d_model), nn.SiLU(), nn.Linear(d_model, d_model))
        self.time = nn.Sequential(nn.Linear(time_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.blocks = nn.ModuleList(_DiTBlock(d_model, n_heads, mlp_ratio, cond_dim, dropout) for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * d_model))
        self.out = nn.Linear(d_model, 1)
        for m in (self.final_ada[-1], self.out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        self.projector = (
            nn.Sequential(
                nn.Linear(d_model, align_hidden),
                nn.SiLU(),
                nn.Linear(align_hidden, align_hidden),
                nn.SiLU(),
                nn.Linear(align_hidden, align_dim),
            )
            if align_dim > 0
            else None
        )

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, pad: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Velocity ``(B, G)``, the tokens after block ``align_layer`` ``(B, G, d)`` and the final tokens."""
        b = x.shape[0]
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t.reshape(-1)
        cc = c + self.time(timestep_embedding(t, self.time_dim))
        h = self.gene_id[None] + self.value(x[..., None])
        aligned = None
        for i, block in enumerate(self.blocks):
            h = block(h, cc, pad)
            if i + 1 == self.align_layer:
                aligned = h
        shift, scale = self.final_ada(cc).chunk(2, dim=-1)
        v = self.out(_modulate(self.final_norm(h), shift, scale)).squeeze(-1)
        return v, aligned, h


def alignment_loss(projected: torch.Tensor, target: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """REPA alignment: mean of ``1 − cos(projected token, target embedding)`` over spots and known genes.

    ``projected`` is ``(B, G, E)``, ``target`` ``(G, E)``, ``known`` ``(G,)`` bool (genes without a target embedding
    are left out). 0 means perfectly aligned, 1 orthogonal (FLAG's ``−cos`` up to the constant 1).
    """
    p = nn.functional.normalize(projected[:, known], dim=-1)
    tgt = nn.functional.normalize(target[known], dim=-1)
    return (1.0 - (p * tgt[None]).sum(-1)).mean()


class GeneTokenFlow(nn.Module):
    """Condition encoder + gene-token denoiser, with the flow-matching + alignment objective and a guided sampler.

    ``align_target`` ``(G, E)`` and ``align_known`` ``(G,)`` are buffers (saved with the weights).
    """

    def __init__(
        self,
        condition: ConditionEncoder,
        denoiser: GeneTokenDenoiser,
        align_target: torch.Tensor | None = None,
        align_known: torch.Tensor | None = None,
    ):
        super().__init__()
        self.condition, self.denoiser = condition, denoiser
        self.aligned = align_target is not None
        if self.aligned:
            self.register_buffer("align_target", align_target.float())
            self.register_buffer("align_known", align_known.bool())

    def loss(
        self,
        batch: dict[str, torch.Tensor],
        *,
        p_uncond: float = 0.1,
        p_meta_drop: float = 0.1,
        lambda_align: float = 0.5,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss terms for one batch (keys ``loss``, ``flow``, ``align``).

        The flow term is the masked MSE of the velocity (genes a slide did not measure are left out of it, and their
        tokens are masked out of attention); ``generator`` fixes noise, times and dropout draws (validation).
        """
        x1 = batch["x"]
        mask = batch.get("mask")
        c, _, _, x0, t, xt = draw_path(self.condition, batch, x1, p_uncond, p_meta_drop, generator)
        pad = None
        if mask is not None and not bool(mask.all()):
            pad = ~mask.bool()
            pad[pad.all(dim=1)] = False  # a spot with no measured gene: attend normally (its loss is zero anyway)
        v, hidden, _ = self.denoiser(xt, t, c, pad)
        flow = masked_mse(v, x1 - x0, mask)
        if self.aligned and lambda_align > 0 and hidden is not None:
            align = alignment_loss(self.denoiser.projector(hidden), self.align_target, self.align_known)
        else:
            align = flow.new_zeros(())
        return {"loss": flow + lambda_align * align, "flow": flow, "align": align}

    @torch.no_grad()
    def sample(
        self, c: torch.Tensor, x0: torch.Tensor, *, steps: int = 1, guidance: float = 1.0, record: bool = False
    ) -> dict[str, Any]:
        """Euler from noise ``x0`` ``(B, G)`` to log1p expression under conditions ``c``; guided by ``guidance``.

        Returns ``x1`` ``(B, G)``, ``latent`` (final gene tokens of the last evaluation, mean over genes, ``(B, d)``)
        and, with ``record``, ``trajectory`` ``(steps + 1, B, G)``.
        """
        if steps < 1:
            raise ValueError(f"`steps` must be at least 1, got {steps}.")
        guided = guidance != 1.0
        null = self.condition.null[None]
        x = x0
        traj = [x0] if record else None
        dt = 1.0 / steps
        latent = None
        for s in range(steps):
            t = torch.full((1,), s * dt, device=x.device)
            if guided and one_start(x):  # the null branch from one point: one row for all (see LatentFlow)
                v, _, h = self.denoiser(x, t, c)
                v_u = self.denoiser(x[:1], t, null)[0]
                v = v_u + guidance * (v - v_u)
            elif guided:
                v, _, h = self.denoiser(torch.cat([x, x]), t, torch.cat([c, null.expand_as(c)]))
                v_c, v_u = v.chunk(2)
                v = v_u + guidance * (v_c - v_u)
            else:
                v, _, h = self.denoiser(x, t, c)
            latent = h[: x.shape[0]].mean(dim=1)
            x = x + dt * v
            if record:
                traj.append(x)
        out: dict[str, Any] = {"x1": x, "latent": latent}
        if record:
            out["trajectory"] = torch.stack(traj)
        return out


# --------------------------------------------------------------------------------------------------------------------
# Lightning module


class _FLAGModule(EpochMeanLogging, L.LightningModule):
    def __init__(self, flow: GeneTokenFlow, cfg: FLAGConfig, lr: float, wd: float):
        super().__init__()
        self.flow, self.cfg, self.lr, self.wd = flow, cfg, lr, wd

    def _loss(self, batch: dict[str, torch.Tensor], train: bool, generator: Any = None) -> dict[str, torch.Tensor]:
        c = self.cfg
        return self.flow.loss(
            batch,
            p_uncond=c.p_uncond if train else 0.0,
            p_meta_drop=c.p_meta_drop if train else 0.0,
            lambda_align=c.lambda_align,
            generator=generator,
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        out = self._loss(batch, True)
        self.log_epoch_means({k: out[k] for k in ("loss", "flow", "align")}, batch["x"].shape[0])
        return out["loss"]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        gen = torch.Generator(device=batch["x"].device).manual_seed(1_000_003 + batch_idx)
        out = self._loss(batch, False, gen)
        b = batch["x"].shape[0]
        # early stopping watches the flow term (alignment is a regulariser)
        self.log("val_loss", out["flow"], on_step=False, on_epoch=True, batch_size=b, sync_dist=True)
        for k in ("flow", "align"):
            self.log(f"val_{k}", out[k], on_step=False, on_epoch=True, batch_size=b, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return adamw(self.flow.parameters(), lr=self.lr, weight_decay=self.wd)


# --------------------------------------------------------------------------------------------------------------------
# alignment targets


def _alignment_targets(
    gene_embeddings: pd.DataFrame | str | os.PathLike[str], genes: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Targets ``(G, E)`` (zero rows for genes without one), the known-gene mask and a report."""
    from histoflow.pp._gene_embeddings import check_gene_embeddings, read_gene_embeddings

    if isinstance(gene_embeddings, (str, os.PathLike)):
        table = read_gene_embeddings(gene_embeddings)
    elif isinstance(gene_embeddings, pd.DataFrame):
        table = check_gene_embeddings(gene_embeddings)
    else:
        raise TypeError(
            "`gene_embeddings` must be a DataFrame (index = genes, columns = dimensions), a path to a table or a "
            f"scGPT/Geneformer model folder, or None; got {type(gene_embeddings).__name__}."
        )
    idx = table.index.get_indexer(list(genes))
    values = table.to_numpy(dtype=np.float32)
    target = np.zeros((len(genes), values.shape[1]), dtype=np.float32)
    target[idx >= 0] = values[idx[idx >= 0]]
    known = (idx >= 0) & (np.linalg.norm(target, axis=1) > 0)
    if not known.any():
        hint = ""
        if len(set(map(str, table.columns)) & set(genes)):
            hint = " Its columns are panel genes: transpose it (`df.T`) so that genes are rows."
        raise ValueError(
            f"`gene_embeddings` covers none of the {len(genes)} panel genes (panel e.g. {list(genes)[:3]}; table "
            f"index e.g. {table.index[:3].tolist()}).{hint} Index it by the panel's gene names; map other identifiers "
            "with `histoflow.pp.read_gene_embeddings(..., gene_map=)`, or build one with "
            "`histoflow.pp.gene_embeddings_from_gene_sets`."
        )
    missing = [g for g, k in zip(genes, known) if not k]
    if missing:
        logger.warning(
            "%d of %d panel genes have no embedding in `gene_embeddings` and are left out of the alignment loss, "
            "e.g. %s.",
            len(missing),
            len(genes),
            missing[:10],
        )
    info = {
        "enabled": True,
        "source": str(table.attrs.get("source", "DataFrame")),
        "dim": int(values.shape[1]),
        "n_genes": len(genes),
        "n_known": int(known.sum()),
        "n_missing": len(missing),
        "missing": missing,
    }
    return target, known, info


# --------------------------------------------------------------------------------------------------------------------
# the model class


class FLAG:
    """FLAG-style generative model: flow matching over gene tokens with alignment to per-gene embeddings.

    A DiT over the genes of each spot (gene identity embedding + value embedding of the noisy expression, adaLN
    conditioning on the spot's patch features, spatial context and metadata through
    ``ConditionEncoder`` (shared with MoLF), and the flow time) is trained by conditional flow matching in
    log1p expression space, so that it samples in a few Euler steps; classifier-free guidance through a learned null
    condition. REPA-style alignment: the gene tokens after block ``align_layer`` are projected by an MLP and aligned by
    cosine similarity to per-gene embeddings (``gene_embeddings``); genes missing from that table are left out of the
    alignment loss and reported (attribute ``alignment``). See :func:`histoflow.tl.fit_flag` for the usual entry point.

    Differences from the FLAG paper's code (documented in ``reference/anchors.md``): flow matching with a Gaussian
    prior instead of a VE-SDE score model; static per-gene embeddings instead of per-spot contextual Geneformer
    embeddings; the spatial context is ``ConditionEncoder``'s (``spatial_context``).

    Parameters
    ----------
    adata
        The AnnData table with patch features, log1p targets, slides and metadata.
    gene_embeddings
        Alignment targets: a DataFrame (index = genes, columns = dimensions), a path read with
        :func:`histoflow.pp.read_gene_embeddings` (table, ``{gene: vector}`` pickle/torch file, scGPT or Geneformer
        model folder), or None (no alignment).
    embedding_key
        ``obsm`` key of the patch features.
    layer
        Layer with log1p expression.
    genes
        Panel genes; default ``var["histoflow_panel"]``, else all genes.
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
        ``obs`` column with ``train``/``val``/``test``.
    **config
        Any :class:`~histoflow.models.FLAGConfig` field (``d_model``, ``n_layers``, ``align_layer``, ``lambda_align``).
    """

    # table → arrays, neighbours, compatibility checks and Lightning fitting are the same as MoLF's
    _coords_um = MoLF._coords_um
    _arrays = MoLF._arrays
    _input_signature = MoLF._input_signature
    _check_table = MoLF._check_table
    _fit = MoLF._fit
    _libraries_by_split = MoLF._libraries_by_split

    def __init__(
        self,
        adata: AnnData,
        *,
        gene_embeddings: pd.DataFrame | str | os.PathLike[str] | None = None,
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
        unknown = set(config) - set(FLAGConfig.__dataclass_fields__)
        if unknown:
            raise TypeError(f"Unknown FLAG settings {sorted(unknown)}; see `histoflow.models.FLAGConfig`.")
        self.config = FLAGConfig(**config)
        self._check_config()
        if metadata_keys is None:
            metadata_keys = [cancer_type_key] if cancer_type_key in adata.obs else []
        self.keys = {
            "library_key": library_key,
            "spatial_key": spatial_key,
            "pixel_size_key": pixel_size_key,
            "split_key": split_key,
            "metadata_keys": list(metadata_keys),
        }
        rows = np.arange(adata.n_obs)
        gene_list = panel_genes(adata, genes)
        if len(gene_list) > self.config.max_genes:
            raise ValueError(
                f"The panel has {len(gene_list)} genes, more than `max_genes={self.config.max_genes}`. FLAG attends "
                "over gene tokens (memory and time grow as genes² per spot): select fewer genes "
                "(`histoflow.pp.select_genes`) or raise `max_genes` knowingly and lower `batch_size`."
            )
        feats = features(adata, embedding_key, rows[:1])
        _, cats = metadata_codes(adata, self.keys["metadata_keys"], rows)
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
        target = known = None
        if gene_embeddings is not None:
            target, known, self.alignment = _alignment_targets(gene_embeddings, gene_list)
            if self.config.lambda_align == 0:
                logger.info("`lambda_align=0`: the gene embeddings are stored but not used in the loss.")
        else:
            self.alignment = {"enabled": False, "n_genes": len(gene_list)}
            logger.info("No `gene_embeddings`: training without representation alignment.")
        self.adata = adata
        with torch.random.fork_rng(devices=[]):  # same seed, same initial weights; the global RNG is left alone
            torch.manual_seed(self.config.seed)
            self._build(
                0 if target is None else target.shape[1],
                None if target is None else torch.from_numpy(target),
                None if known is None else torch.from_numpy(known),
            )
        self.history: dict[str, pd.DataFrame] = {}
        self.is_trained = False

    def _check_config(self) -> None:
        c = self.config
        for name in ("d_model", "n_heads", "n_layers", "cond_dim", "time_dim", "align_hidden", "max_genes"):
            v = getattr(c, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {v!r}.")
        if c.d_model % c.n_heads:
            raise ValueError(f"`d_model={c.d_model}` must be divisible by `n_heads={c.n_heads}`.")
        if not 1 <= c.align_layer <= c.n_layers:
            raise ValueError(f"`align_layer` must be between 1 and `n_layers={c.n_layers}`, got {c.align_layer}.")
        if not (math.isfinite(c.lambda_align) and c.lambda_align >= 0):
            raise ValueError(f"`lambda_align` must be non-negative and finite, got {c.lambda_align!r}.")
        for name in ("p_uncond", "p_meta_drop"):
            check_dropout(getattr(c, name), name)

    # ---------------------------------------------------------------- modules
    def _build(self, align_dim: int, target: torch.Tensor | None = None, known: torch.Tensor | None = None) -> None:
        c, r = self.config, self.registry
        accepted = inspect.signature(ConditionEncoder).parameters
        # the graph context's settings, for ConditionEncoder versions that have them
        extra = {k: getattr(c, k) for k in ("graph_layers", "context_radius_um") if k in accepted}
        cond = ConditionEncoder(
            r.embedding_dim,
            c.cond_dim,
            spatial_context=c.spatial_context,
            metadata_sizes=[len(r.categories[k]) for k in self.keys["metadata_keys"]],
            tokens_per_value=c.tokens_per_value,
            **extra,
        )
        den = GeneTokenDenoiser(
            len(r.genes),
            c.cond_dim,
            d_model=c.d_model,
            n_heads=c.n_heads,
            n_layers=c.n_layers,
            mlp_ratio=c.mlp_ratio,
            dropout=c.dropout,
            time_dim=c.time_dim,
            align_layer=c.align_layer,
            align_dim=align_dim,
            align_hidden=c.align_hidden,
        )
        if align_dim and target is None:  # shapes for load_state_dict
            target = torch.zeros(len(r.genes), align_dim)
            known = torch.zeros(len(r.genes), dtype=torch.bool)
        self.flow = GeneTokenFlow(cond, den, target, known)

    @property
    def n_experts(self) -> int:
        """The number of experts, always 1 (a dense model; routing is a column of ones)."""
        return 1

    def uns_extra(self) -> dict[str, Any]:
        """Model-specific entries written into ``uns[key_added]`` with the predictions (the alignment report)."""
        return {"alignment": dict(self.alignment)}

    # ---------------------------------------------------------------- training
    def train(
        self,
        max_epochs: int = 300,
        *,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        gradient_clip_val: float | None = 1.0,
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
    ) -> FLAG:
        """Fit on the ``train`` slides, validating (early stopping, best weights) on the ``val`` slides.

        Parameters
        ----------
        max_epochs
            Maximum epochs.
        batch_size
            Spots per batch.
        lr
            Learning rate (AdamW).
        weight_decay
            AdamW weight decay.
        gradient_clip_val
            Clip gradients to this norm (None: no clipping).
        accelerator, devices, strategy, num_nodes
            Passed to :class:`lightning.pytorch.Trainer` (several devices through DDP, as for MoLF).
        early_stopping
            Stop when the validation flow loss has not improved for ``patience`` epochs.
        patience
            Epochs without improvement before stopping.
        checkpoint_dir
            Folder for Lightning checkpoints (best and last).
        resume
            Resume from ``checkpoint_dir``'s last checkpoint.
        show_progress_bar
            Lightning's progress bar.
        seed
            Seed (default: the model's ``seed``); the same seed gives the same numbers on CPU.

        Returns
        -------
        The model itself; ``history["flow"]`` holds per epoch ``train_loss``, ``train_flow``, ``train_align`` and the
        validation terms.
        """
        cfg = self.config
        seed = cfg.seed if seed is None else int(seed)
        seed_everything(seed)
        adata = self.adata
        split = split_rows(adata, split_key=self.keys["split_key"], library_key=self.keys["library_key"], seed=seed)
        tr, va = split["train"], split["val"]
        if va.size == 0:
            logger.warning("No validation slides: training without early stopping.")
        all_rows = np.concatenate([tr, va])
        arrays, nbr, off = self._arrays(adata, all_rows, with_targets=True)
        n_tr = len(tr)
        common = {
            "accelerator": accelerator,
            "devices": devices,
            "strategy": strategy,
            "num_nodes": num_nodes,
            "early_stopping": early_stopping and va.size > 0,
            "patience": patience,
            "enable_progress_bar": show_progress_bar,
            "gradient_clip_val": gradient_clip_val,
        }
        seed_everything(seed + 1)
        module = _FLAGModule(self.flow, cfg, lr, weight_decay)
        train_dl = _loader(n_tr, _Subset(arrays, 0, nbr, off), batch_size, True, seed)
        val_dl = _loader(len(va), _Subset(arrays, n_tr, nbr, off), batch_size, False, seed) if va.size else None
        ckpt = None if checkpoint_dir is None else Path(checkpoint_dir) / "flow"
        self.history["flow"] = self._fit(module, train_dl, val_dl, max_epochs, ckpt, resume, common)
        self.flow = module.flow.cpu().eval()
        self.is_trained = True
        self._train_libraries = self._libraries_by_split(adata, split)
        return self

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
        batch_size: int = 1024,
        allow_unknown: bool = False,
        record_trajectories: bool = False,
        device: str = "auto",
    ) -> dict[str, np.ndarray]:
        """Sample expression for spots of ``adata`` (default: the training table); same keys as ``MoLF.predict``.

        Parameters
        ----------
        adata
            A table with the same kind of patch features (expression is not needed).
        rows
            Row positions to predict (default all).
        steps
            Euler steps from noise (t = 0) to expression (t = 1); 1 = one velocity evaluation (the conditional mean
            under the linear path), a few steps give sharper samples.
        guidance
            Classifier-free guidance scale (default: the model's).
        n_samples
            Draws per spot; their mean is the prediction and their standard deviation the spread.
        temperature
            Scale of the prior noise, ``x0 ~ N(0, temperature² I)``: 1 (default) samples the model as trained, 0
            starts every spot at the prior mean (one deterministic draw, the model's point estimate).
        antithetic
            Draw the prior noise in antithetic pairs, ``x0`` and ``-x0`` (see ``MoLF.predict``).
        seed
            Seed of the prior noise; the same seed gives the same numbers.
        batch_size
            Spots per forward pass (attention over genes: memory grows as ``batch_size × genes²``).
        allow_unknown
            Predict metadata values unseen in training with the learned null token.
        record_trajectories
            Keep the expression path of every spot (``steps + 1`` points, first sample).
        device
            Torch device for inference: ``"auto"`` (default: CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``,
            ``"cuda:1"``, ... The prior noise is drawn on the CPU, so every device starts from the same noise.

        Returns
        -------
        Dict with ``mean`` (spots × genes, log1p, clipped at 0), ``std`` (when ``n_samples > 1``), ``latent`` (final
        gene tokens pooled over genes, spots × ``d_model``, mean over samples), ``z0`` (the first sample's noise,
        spots × genes), ``routing`` (spots × 1, ones: a dense model), ``metadata_attention`` (with metadata) and
        ``trajectory`` (``steps + 1`` × spots × genes, when recorded).
        """
        dev = torch_device(device)  # a device this machine lacks fails before any work
        adata, rows = _prediction_inputs(self, adata, rows, steps, n_samples, temperature, antithetic)
        w = self.config.guidance if guidance is None else float(guidance)
        arrays, nbr, off = self._arrays(adata, rows, with_targets=False, allow_unknown=allow_unknown)
        n, g = len(rows), len(self.registry.genes)
        draws = {"n_samples": n_samples, "seed": seed, "batch_size": batch_size, "record": record_trajectories}
        draws["antithetic"] = bool(antithetic)
        try:
            flow = self.flow.to(dev).eval()
            cond, attns = _spot_conditions(flow.condition, arrays, nbr, off, batch_size, dev)

            def sample(sl: slice, x0: torch.Tensor, record: bool) -> dict[str, torch.Tensor]:
                out = flow.sample(cond[sl], x0.to(dev), steps=steps, guidance=w, record=record)
                return {**out, "x": out["x1"]}

            res = _draw(sample, n, g, (g, self.config.d_model, 1), temperature=float(temperature), **draws)
        finally:  # the model lives on the CPU between calls, also after a failure
            self.flow.cpu()
        if attns:
            res["metadata_attention"] = torch.cat(attns).numpy()
        return res

    def get_latent(self, adata: AnnData | None = None, rows: np.ndarray | None = None) -> np.ndarray:
        """The flow's target for measured spots: their log1p expression of the panel (spots × genes).

        FLAG flows in expression space, so this is what :func:`histoflow.tl.trajectories` compares paths with.
        """
        adata = self.adata if adata is None else adata
        rows = np.arange(adata.n_obs) if rows is None else np.asarray(rows)
        check_compatible(self.registry, adata, genes_needed=True)
        return targets(adata, self.registry.genes, self.registry.layer, rows, self.keys["library_key"])[0]

    def decode(self, z: np.ndarray) -> np.ndarray:
        """Identity (the flow's space is log1p expression), clipped at 0 like predictions."""
        return np.clip(np.asarray(z, dtype=np.float32), 0, None)

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
            "alignment": self.alignment,
            "align_dim": int(self.flow.align_target.shape[1]) if self.flow.aligned else 0,
        }
        _save_folder(self, dir_path, overwrite, meta, {})

    @classmethod
    def load(cls, dir_path: str | Path, adata: AnnData | None = None) -> FLAG:
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
        self.config = FLAGConfig(**meta["config"])
        self.registry = Registry.from_dict(meta["registry"])
        self.keys = meta["keys"]
        self.alignment = dict(meta["alignment"])
        self._train_libraries = meta.get("train_libraries", {})
        self._build(int(meta["align_dim"]))
        self.flow.load_state_dict(blob["flow"])
        self.flow.eval()
        self.history = dict(blob["history"])
        self.is_trained = bool(meta["is_trained"])
        self.adata = adata
        if adata is not None:
            self._check_table(adata)
        return self
