"""Stage I of MoLF from scvi-tools (``latent="scvi"``): SCVI on the raw counts of the panel, slide as batch.

What this module does, and the choices it makes:

- **Training.** :func:`fit_scvi` trains :class:`scvi.model.SCVI` on the raw counts of the panel genes of the training
  spots, with the slide as ``batch_key`` (one batch per training slide), seeded through ``scvi.settings.seed``. Early
  stopping and the best weights use a validation split of the training spots (a seeded random 10 %, none below 20
  spots), by scvi's ``elbo_validation``. The validation *slides* are not given to scvi: the decoder has one one-hot
  batch input per slide, and the columns of slides never trained on would keep their random initial values, so a
  validation loss on them would measure an arbitrary batch offset. The validation slides are encoded afterwards (the
  encoder does not take the batch) and serve Stage II's early stopping. Spots with no count in the panel are left out
  of the fit (they hold no information on the composition) but are still encoded. Training runs on one device
  (``accelerator`` is passed through): scvi turns early stopping off under DDP, and Stage I over a gene panel is
  cheap.
- **Latent.** The manifold is the posterior mean of scvi's encoder, ``q(z | x)``, which reads ``log1p(counts)``
  without the batch (scvi's default ``encode_covariates=False``), so new slides are encoded without any batch
  label. :class:`ScviEncoder` computes it without scvi.
- **Decoder.** :class:`ScviDecoder` maps ``z`` to ``log1p`` of the *expected* count at a fixed library size
  ``library_size``: the generative mean ``library_size · ρ_b(z)`` (times ``1 − π_b(z)``, the probability of no
  zero-inflation, with ``gene_likelihood="zinb"``), averaged over the training slides ``b`` with equal weights.
  Predictions are for new slides, whose batch is unknown, so the decode is batch-free: the average over the
  training slides is the expression "as seen through an average training slide". The default library size is the
  median total count of the panel over the training spots, so decoded values sit on the scale of the targets
  (``log1p`` of raw counts). Depth differences between spots are not in the latent (scvi conditions on the
  observed library size), so the predictions carry none either.
- **Gene masks.** SCVI has no notion of an unmeasured gene: a slide that did not measure some panel genes
  (``uns["histoflow_gene_mask"]``) would enter the fit with zero counts for them, which the model would read as
  true absence. :func:`check_full_panel` therefore refuses such data and points to ``latent="vae"`` (which leaves
  unmeasured genes out of every loss) or to a panel measured on every slide.
- **Saving.** The trained encoder and decoder are copied into plain torch modules (:class:`ScviLatent`): the
  evaluation-mode batch normalisation is folded into the linear layers, so the modules are exact, frozen and
  differentiable, and a saved MoLF model loads and predicts without scvi-tools and without scvi's AnnData
  registration. scvi itself is imported only to train (:func:`import_scvi`).
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn

from histoflow._logging import logger
from histoflow._validate import check_counts

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "ScviDecoder",
    "ScviEncoder",
    "ScviLatent",
    "check_full_panel",
    "fit_scvi",
    "import_scvi",
    "panel_counts",
]

_INSTALL = 'pip install "histoflow[scvi]"'
_VAL_FRACTION = 0.1
_QUIET = (
    r".*does not have many workers.*",
    r".*smaller than the logging interval.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r".*Last batch will have a small size.*",
    r".*Make sure the registered X field in anndata contains unnormalized count data.*",
)


def import_scvi() -> Any:
    """Import scvi-tools, or fail with an error that says how to install it."""
    try:
        import scvi
    except ImportError as e:
        raise ImportError(
            f"`latent='scvi'` trains scvi-tools' SCVI, but scvi-tools is not installed. Install it with `{_INSTALL}`, "
            "or use the default `latent='vae'`."
        ) from e
    return scvi


# --------------------------------------------------------------------------------------------------------------------
# data


def panel_counts(table: AnnData, genes: list[str], layer: str | None, rows: np.ndarray) -> tuple[np.ndarray, str]:
    """Raw counts ``(len(rows), len(genes))`` of the panel, as ``float32``, and where they were read.

    ``layer`` (default ``"counts"``, where :func:`histoflow.pp.normalize` keeps the counts) when the table has it;
    otherwise ``X`` when ``X`` holds raw counts. Anything else raises an error that says where to put the counts.
    """
    idx = table.var_names.get_indexer(list(genes))
    if (idx < 0).any():
        missing = [g for g, i in zip(genes, idx) if i < 0][:5]
        raise KeyError(f"Panel genes missing from the table: {missing}; `latent='scvi'` needs their raw counts.")
    if layer is not None and layer in table.layers:
        X, where = table.layers[layer], f"adata.layers[{layer!r}]"
    else:
        X, where = table.X, "adata.X"
        if X is None:
            raise ValueError(_no_counts(layer, "has no X"))
    Y = X[rows][:, idx]
    Y = np.asarray(Y.toarray() if sp.issparse(Y) else Y, dtype=np.float32)
    try:
        check_counts(Y, where, warn_logged=False)
    except ValueError as e:
        if where == "adata.X":
            raise ValueError(_no_counts(layer, f"`adata.X` does not hold raw counts ({e})")) from None
        raise ValueError(f"`latent='scvi'` trains on raw counts: {e}") from None
    if where == "adata.X" and layer is not None:
        logger.info("No `layers[%r]`: scvi reads the raw counts from `X`.", layer)
    return Y, where


def _no_counts(layer: str | None, found: str) -> str:
    lay = "X" if layer is None else f"`layers[{layer!r}]`"
    return (
        f"`latent='scvi'` trains on raw counts, but the table has no {lay} and {found}. Keep the raw counts in "
        "`layers['counts']` (`histoflow.pp.normalize` does so when X holds counts) or pass `scvi_counts_layer=` "
        "naming the layer with raw counts; or use `latent='vae'`, which needs only log1p values."
    )


def check_full_panel(mask: np.ndarray, libraries: np.ndarray, genes: list[str]) -> None:
    """Refuse slides that did not measure every panel gene (scvi cannot leave unmeasured genes out of its loss)."""
    if mask.all():
        return
    bad_libs = sorted(pd.unique(libraries[~mask.all(axis=1)]).astype(str).tolist())
    bad_genes = [g for g, ok in zip(genes, mask.all(axis=0)) if not ok]
    raise ValueError(
        f"`latent='scvi'` cannot mask genes: slide(s) {bad_libs[:5]} did not measure {len(bad_genes)} panel gene(s), "
        f"e.g. {bad_genes[:5]} (`uns['histoflow_gene_mask']`); SCVI would read them as zero counts. Use "
        "`latent='vae'` (it leaves unmeasured genes out of every loss) or pass `genes=` measured on every slide."
    )


# --------------------------------------------------------------------------------------------------------------------
# plain torch copies of scvi's encoder mean and generative mean


class ScviEncoder(nn.Module):
    """Posterior mean of SCVI's encoder: ``log1p(counts)`` → ReLU layers → linear mean (batch norm folded in).

    Parameters
    ----------
    n_genes
        Panel size.
    n_hidden
        Width of the hidden layers.
    n_layers
        Number of hidden layers.
    n_latent
        Latent dimension.
    """

    def __init__(self, n_genes: int, n_hidden: int, n_layers: int, n_latent: int):
        super().__init__()
        dims = [n_genes] + [n_hidden] * n_layers
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.mean = nn.Linear(dims[-1], n_latent)

    def forward(self, counts: torch.Tensor) -> torch.Tensor:
        """Latent means ``(B, n_latent)`` of raw counts ``(B, n_genes)``."""
        h = torch.log1p(counts)
        for lin in self.layers:
            h = torch.relu(lin(h))
        return self.mean(h)


class ScviDecoder(nn.Module):
    """``z`` → ``log1p`` of SCVI's expected count at a fixed library size, averaged over the training slides.

    Each hidden layer is ``ReLU(W z + c_b)``, where ``c_b`` is the folded bias of slide ``b`` (scvi injects the
    one-hot batch into every layer). The expected count of slide ``b`` is ``library_size · softmax(...)`` (times
    ``sigmoid(−logit π)`` for zero-inflation); the output is ``log1p`` of its mean over slides (weights
    ``batch_weights``, equal by default). Frozen after training; differentiable in ``z``.

    Parameters
    ----------
    n_latent
        Latent dimension.
    n_hidden
        Width of the hidden layers.
    n_layers
        Number of hidden layers.
    n_genes
        Panel size.
    n_batch
        Number of training slides.
    zero_inflated
        Multiply by the probability of no zero-inflation (``gene_likelihood="zinb"``).
    library_size
        Total count at which expression is decoded.
    """

    def __init__(
        self,
        n_latent: int,
        n_hidden: int,
        n_layers: int,
        n_genes: int,
        n_batch: int,
        zero_inflated: bool,
        library_size: float,
    ):
        super().__init__()
        dims = [n_latent] + [n_hidden] * n_layers
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(dims[:-1], dims[1:]))
        self.batch_bias = nn.ParameterList(nn.Parameter(torch.zeros(n_batch, b)) for b in dims[1:])
        self.scale = nn.Linear(dims[-1], n_genes)
        self.dropout = nn.Linear(dims[-1], n_genes) if zero_inflated else None
        self.register_buffer("library_size", torch.tensor(float(library_size)))
        self.register_buffer("batch_weights", torch.full((n_batch,), 1.0 / n_batch))

    def expected(self, z: torch.Tensor) -> torch.Tensor:
        """Expected counts per training slide, ``(n_batch, B, n_genes)``, at ``library_size``."""
        h = z.unsqueeze(0)
        for lin, bias in zip(self.layers, self.batch_bias):
            h = torch.relu(lin(h) + bias[:, None, :])
        mu = self.library_size * torch.softmax(self.scale(h), dim=-1)
        if self.dropout is not None:
            mu = mu * torch.sigmoid(-self.dropout(h))
        return mu

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``log1p`` expression ``(B, n_genes)``: the slide-averaged expected count."""
        mu = torch.einsum("k,kbg->bg", self.batch_weights, self.expected(z))
        return torch.log1p(mu)


class ScviLatent(nn.Module):
    """The frozen Stage I of ``latent="scvi"``: :class:`ScviEncoder` and :class:`ScviDecoder`, rebuilt from ``spec``.

    Parameters
    ----------
    spec
        ``n_genes``, ``n_hidden``, ``n_layers``, ``n_latent``, ``n_batch``, ``gene_likelihood``, ``library_size``,
        ``batches`` (training slides, in the decoder's order); saved with the model.
    """

    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        self.spec = dict(spec)
        s = self.spec
        self.encoder = ScviEncoder(s["n_genes"], s["n_hidden"], s["n_layers"], s["n_latent"])
        self.decoder = ScviDecoder(
            s["n_latent"],
            s["n_hidden"],
            s["n_layers"],
            s["n_genes"],
            s["n_batch"],
            s["gene_likelihood"] == "zinb",
            s["library_size"],
        )
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def encode(self, counts: np.ndarray | torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """Latent means ``(n, n_latent)`` of raw counts ``(n, n_genes)``."""
        x = torch.as_tensor(counts, dtype=torch.float32)
        out = [self.encoder(x[s : s + batch_size]) for s in range(0, len(x), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.spec["n_latent"])

    @classmethod
    def from_scvi(cls, module: nn.Module, batches: list[str], library_size: float) -> ScviLatent:
        """Copy a trained :class:`scvi.module.VAE` (evaluation mode) into plain torch modules.

        Parameters
        ----------
        module
            ``SCVI(...).module`` after training.
        batches
            The batch categories, in scvi's code order.
        library_size
            Total count at which the decoder reports expression.
        """
        if getattr(module, "latent_distribution", "normal") != "normal" or getattr(module, "encode_covariates", False):
            raise ValueError("Only SCVI with latent_distribution='normal' and encode_covariates=False is supported.")
        enc_layers = _fold(module.z_encoder.encoder, n_cat=0)
        dec_layers = _fold(module.decoder.px_decoder, n_cat=len(batches) if len(batches) > 1 else 0)
        spec = {
            "n_genes": int(module.n_input),
            "n_hidden": int(module.n_hidden),
            "n_layers": len(enc_layers),
            "n_latent": int(module.n_latent),
            "n_batch": len(batches),
            "gene_likelihood": str(module.gene_likelihood),
            "library_size": float(library_size),
            "batches": [str(b) for b in batches],
        }
        if len(dec_layers) != len(enc_layers):
            raise ValueError("SCVI encoder and decoder have different depths; cannot copy them.")
        out = cls(spec)
        with torch.no_grad():
            for lin, (w, b) in zip(out.encoder.layers, enc_layers):
                lin.weight.copy_(w)
                lin.bias.copy_(b[0])
            out.encoder.mean.load_state_dict(_cpu(module.z_encoder.mean_encoder.state_dict()))
            for lin, bias, (w, b) in zip(out.decoder.layers, out.decoder.batch_bias, dec_layers):
                lin.weight.copy_(w)
                bias.copy_(b.expand_as(bias))
            out.decoder.scale.load_state_dict(_cpu(module.decoder.px_scale_decoder[0].state_dict()))
            if out.decoder.dropout is not None:
                out.decoder.dropout.load_state_dict(_cpu(module.decoder.px_dropout_decoder.state_dict()))
        return out


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


def _fold(fc: nn.Module, n_cat: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fold scvi's ``FCLayers`` (evaluation mode) into per-layer weights and per-batch biases.

    Per layer: the weight on the previous layer's output and the bias for every batch category
    ``(max(n_cat, 1), width)``, batch norm folded in; the one-hot batch columns (after the input) become biases.
    """
    out = []
    for i, block in enumerate(fc.fc_layers):
        lin, bn = None, None
        for layer in block:
            if layer is None or isinstance(layer, (nn.Dropout, nn.ReLU)):
                continue
            if isinstance(layer, nn.Linear):
                lin = layer
            elif isinstance(layer, nn.BatchNorm1d):
                bn = layer
            else:
                raise ValueError(f"Unsupported layer {type(layer).__name__} in SCVI; use the default architecture.")
        if lin is None or not any(isinstance(layer, nn.ReLU) for layer in block if layer is not None):
            raise ValueError("Unexpected SCVI layer structure (expected Linear → BatchNorm → ReLU).")
        W = lin.weight.detach().cpu().double()
        c = lin.bias.detach().cpu().double() if lin.bias is not None else torch.zeros(W.shape[0], dtype=W.dtype)
        cat = n_cat if (i == 0 or fc.inject_covariates) else 0
        if sum(getattr(fc, "n_cat_list", [])) != n_cat:
            raise ValueError(f"SCVI layer expects {getattr(fc, 'n_cat_list', [])} categories, not {n_cat} batches.")
        n_in = W.shape[1] - cat
        Wh, Wb = W[:, :n_in], W[:, n_in:]
        bias = c[None, :] + (Wb.T if cat else torch.zeros(1, W.shape[0], dtype=W.dtype))
        if bn is not None:
            s = bn.weight.detach().cpu().double() / torch.sqrt(bn.running_var.detach().cpu().double() + bn.eps)
            Wh = Wh * s[:, None]
            bias = (bias - bn.running_mean.detach().cpu().double()) * s + bn.bias.detach().cpu().double()
        out.append((Wh.float(), bias.float()))
    return out


# --------------------------------------------------------------------------------------------------------------------
# training


def fit_scvi(
    counts: np.ndarray,
    batches: np.ndarray,
    genes: list[str],
    *,
    n_latent: int,
    n_hidden: int = 128,
    n_layers: int = 1,
    gene_likelihood: Literal["zinb", "nb", "poisson"] = "zinb",
    library_size: float | None = None,
    max_epochs: int = 300,
    batch_size: int = 256,
    lr: float = 1e-3,
    accelerator: str = "auto",
    devices: Any = "auto",
    early_stopping: bool = True,
    patience: int = 20,
    show_progress_bar: bool = True,
    seed: int = 0,
) -> tuple[ScviLatent, pd.DataFrame, Any]:
    """Train SCVI on the raw counts of the training spots (one batch per slide) and copy it into a :class:`ScviLatent`.

    Returns the frozen :class:`ScviLatent`, the training history (one row per epoch: ``train_loss``, ``val_loss``,
    ``train_elbo``, ``val_elbo``, ``train_reconstruction_loss``, ``train_kl_local``, ``kl_weight``, ...,
    ``time_s``) and the trained :class:`scvi.model.SCVI`.
    """
    scvi = import_scvi()
    import anndata as ad

    from histoflow.models._train import BestWeightsCallback, HistoryCallback, count_devices

    batches = np.asarray(batches).astype(str)
    totals = counts.sum(1)
    if library_size is None:
        library_size = float(np.median(totals))
        if library_size <= 0:
            raise ValueError(
                "The median total count of the panel over the training spots is 0; pass `scvi_library_size=` "
                "(the total count at which scvi decodes expression)."
            )
    keep = totals > 0
    if not keep.any():
        raise ValueError("Every training spot has zero counts in the panel genes; nothing for scvi to fit.")
    if not keep.all():
        logger.info("scvi: %d training spots with no count in the panel are left out of the fit.", int((~keep).sum()))
    cats = sorted(pd.unique(batches[keep]).tolist())
    fit = ad.AnnData(
        X=counts[keep],
        obs=pd.DataFrame(
            {"batch": pd.Categorical(batches[keep], categories=cats)}, index=np.arange(keep.sum()).astype(str)
        ),
        var=pd.DataFrame(index=list(genes)),
    )
    n = fit.n_obs
    n_val = math.floor(n * _VAL_FRACTION) if n >= 20 else 0
    if count_devices(accelerator, devices) > 1:
        logger.info("scvi: Stage I trains on one device (scvi turns early stopping off under DDP).")
        if isinstance(devices, (list, tuple)):
            devices = [devices[0]]
        elif isinstance(devices, str) and "," in devices:
            devices = [int(devices.split(",")[0])]
        else:
            devices = 1
    hist, best = HistoryCallback(), BestWeightsCallback(monitor="elbo_validation")
    scvi.settings.seed = int(seed)
    with warnings.catch_warnings():
        for pattern in _QUIET:
            warnings.filterwarnings("ignore", message=pattern)
        scvi.model.SCVI.setup_anndata(fit, batch_key="batch")
        model = scvi.model.SCVI(
            fit, n_hidden=n_hidden, n_latent=n_latent, n_layers=n_layers, gene_likelihood=gene_likelihood
        )
        perm = np.random.default_rng(seed).permutation(n)
        val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        model.train(
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            batch_size=batch_size,
            early_stopping=early_stopping and n_val > 0,
            early_stopping_patience=patience,
            early_stopping_monitor="elbo_validation",
            datasplitter_kwargs={
                "external_indexing": [train_idx, val_idx],
                # a last batch of 1-2 spots breaks batch normalisation; the shuffle drops other spots every epoch
                "drop_last": len(train_idx) > batch_size and len(train_idx) % batch_size < 3,
            },
            plan_kwargs={"lr": lr},
            callbacks=[hist, best],
            enable_progress_bar=show_progress_bar,
        )
    model.module.cpu().eval()
    latent = ScviLatent.from_scvi(model.module, cats, library_size)
    return latent, _rename(hist.history), model


def _rename(df: pd.DataFrame) -> pd.DataFrame:
    """Rename scvi's metrics to histoflow's (``elbo_validation`` → ``val_elbo``, ``validation_loss`` → ``val_loss``)."""

    def name(c: str) -> str:
        if c == "validation_loss":
            return "val_loss"
        if c.endswith("_validation"):
            return "val_" + c.removesuffix("_validation")
        if c.endswith("_train"):
            return "train_" + c.removesuffix("_train")
        return c

    out = df.rename(columns=name)
    first = [c for c in out.columns if c.startswith("train")]
    val = [c for c in out.columns if c.startswith("val")]
    rest = [c for c in out.columns if c not in first and c not in val]
    return out[first + val + rest]
