"""Flow trajectories in latent space: from noise (t = 0) to the predicted latent (t = 1)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from histoflow._constants import Key
from histoflow._docs import doc_params
from histoflow._logging import logger
from histoflow._utils import as_rng, get_table
from histoflow._validate import check_choice
from histoflow.get._get import missing_key
from histoflow.pl._utils import PALETTE, PLOT_DOCS, finish, new_grid, style

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

__all__ = ["trajectories"]

_REQUIRED = ("obs_names", "times", "trajectory", "z0", "z1_pred")


def _entry(table: AnnData, key: str) -> dict[str, Any]:
    name = f"{key}_trajectories"
    entry = table.uns.get(name)
    if not isinstance(entry, Mapping):
        raise missing_key("uns", name, "`histoflow.tl.trajectories`", found=list(table.uns))
    absent = [k for k in _REQUIRED if k not in entry]
    if absent:
        raise KeyError(f"`uns[{name!r}]` lacks {absent}; write it again with `histoflow.tl.trajectories`.")
    return dict(entry)


class _Embedding:
    """A 2-D map fitted once (UMAP or PCA) that places any further latent points."""

    def __init__(self, fit_on: np.ndarray, basis: str, seed: int, n_neighbors: int):
        self.basis = basis
        if basis == "umap":
            import umap

            self.model = umap.UMAP(
                n_components=2, n_neighbors=min(n_neighbors, len(fit_on) - 1), random_state=seed, n_jobs=1
            )
        else:
            from sklearn.decomposition import PCA

            self.model = PCA(n_components=2, random_state=seed)
        self.fitted = self.model.fit_transform(fit_on)

    def __call__(self, points: np.ndarray) -> np.ndarray:
        shape = points.shape
        flat = points.reshape(-1, shape[-1])
        return self.model.transform(flat).reshape(*shape[:-1], 2)


def _basis(basis: str) -> str:
    check_choice(basis, ("auto", "umap", "pca"), "basis")
    if basis != "auto":
        if basis == "umap":
            try:
                import umap
            except ImportError as e:
                raise ImportError("`basis='umap'` needs umap-learn (`pip install umap-learn`); or pass 'pca'.") from e
        return basis
    try:
        import umap  # noqa: F401
    except ImportError:
        logger.info("umap-learn is not installed; the trajectories are drawn on the first two principal components.")
        return "pca"
    return "umap"


@doc_params(**PLOT_DOCS)
def trajectories(
    sdata: SpatialData | AnnData,
    key: str = "molf",
    *,
    view: Literal["both", "macro", "micro"] = "both",
    spots: int | Sequence[str] = 5,
    basis: Literal["auto", "umap", "pca"] = "auto",
    n_neighbors: int = 15,
    seed: int = 0,
    table_key: str = Key.table,
    figsize: tuple[float, float] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | np.ndarray | None:
    """How the flow moves noise to expression latents: the macro view (MoLF Figure 3) and the micro view (Figure 4).

    Reads ``uns[f"{key}_trajectories"]`` (:func:`histoflow.tl.trajectories`). A 2-D map (UMAP, or PCA) is fitted on
    the ground-truth latents together with the noise (t = 0); predictions (t = 1) and every intermediate point are
    placed on it with the fitted map. Macro: noise, true and predicted latents of all recorded spots. Micro: the
    paths of a few spots from their noise (circle) to their prediction (triangle), with their true latent (star).
    Without true latents the map is fitted on noise and predictions.

    Parameters
    ----------
    {doc_sdata_only}
    key
        ``key_added`` of :func:`histoflow.tl.trajectories`.
    view
        ``"macro"``, ``"micro"`` or ``"both"`` (two panels).
    spots
        Micro view: the number of recorded spots to draw (chosen with ``seed``) or their ``obs_names``.
    basis
        ``"umap"`` (umap-learn), ``"pca"``, or ``"auto"`` (UMAP when umap-learn is installed, else PCA, logged).
    n_neighbors
        Neighbours of the UMAP graph.
    seed
        Seed of the map and of the spots chosen.
    {doc_table_key}
    {doc_plot}

    Returns
    -------
    The axes (or the figure with ``return_fig=True``) when not shown; nothing is written.
    """
    check_choice(view, ("both", "macro", "micro"), "view")
    table = get_table(sdata, table_key)
    entry = _entry(table, key)
    basis = _basis(basis)
    names = [str(x) for x in entry["obs_names"]]
    traj = np.asarray(entry["trajectory"], dtype=np.float64)  # T × n × L
    z0 = np.asarray(entry["z0"], dtype=np.float64)
    z1 = np.asarray(entry["z1_pred"], dtype=np.float64)
    z_true = entry.get("z1_true")
    z_true = None if z_true is None else np.asarray(z_true, dtype=np.float64)
    if traj.ndim != 3 or traj.shape[1] != len(names) or z0.shape != traj.shape[1:]:
        raise ValueError(
            f"`uns[{key + '_trajectories'!r}]` is inconsistent: trajectory {traj.shape}, z0 {z0.shape}, "
            f"{len(names)} obs_names; write it again with `histoflow.tl.trajectories`."
        )
    if view != "macro":
        if isinstance(spots, int | np.integer) and not isinstance(spots, bool):
            if spots < 1:
                raise ValueError(f"`spots` must be at least 1, got {spots}.")
            picked = np.sort(as_rng(seed).choice(len(names), size=min(int(spots), len(names)), replace=False))
        else:
            pos = {n: i for i, n in enumerate(names)}
            unknown = [s for s in spots if str(s) not in pos]
            if unknown:
                raise KeyError(
                    f"`spots` contains {unknown[:5]}, whose trajectories were not recorded; recorded spots: "
                    f"{names[:5]} ... (pass `n_spots=None` to `histoflow.tl.trajectories` to record all)."
                )
            picked = np.array([pos[str(s)] for s in spots], dtype=np.int64)
    target = z_true if z_true is not None else z1
    emb = _Embedding(np.concatenate([target, z0]), basis, seed, n_neighbors)
    n = len(names)
    e_target, e_noise = emb.fitted[:n], emb.fitted[n:]
    e_pred = emb(z1) if z_true is not None else e_target
    panels = ["macro", "micro"] if view == "both" else [view]
    label = "UMAP" if basis == "umap" else "PC"
    with style():
        fig, axes = new_grid(1, len(panels), figsize, (3.6, 3.3))
        axes = axes.ravel()
        for ax, panel in zip(axes, panels):
            kw = {"s": 8, "linewidths": 0, "alpha": 0.7}
            if panel == "macro":
                ax.scatter(*e_noise.T, color="0.55", label="noise (t = 0)", **kw)
                if z_true is not None:
                    ax.scatter(*e_target.T, color=PALETTE[0], label="true latent", **kw)
                ax.scatter(*e_pred.T, color=PALETTE[1], label="prediction (t = 1)", **kw)
                ax.set_title("macro view: latents")
            else:
                ax.scatter(*e_noise.T, color="0.88", s=4, linewidths=0)
                ax.scatter(*e_target.T, color="0.75", s=4, linewidths=0)
                paths = emb(traj[:, picked])  # T × k × 2
                for j, i in enumerate(picked):
                    color = PALETTE[(j + 2) % len(PALETTE)]
                    ax.plot(paths[:, j, 0], paths[:, j, 1], "-", color=color, lw=1.2, alpha=0.9)
                    ax.plot(*paths[0, j], "o", color=color, ms=5)
                    ax.plot(*paths[-1, j], "^", color=color, ms=6)
                    if z_true is not None:
                        ax.plot(*e_target[i], "*", color=color, ms=10, mec="k", mew=0.5)
                marks = [("o", "noise (t = 0)"), ("^", "prediction (t = 1)")]
                marks += [("*", "true latent")] if z_true is not None else []
                for marker, text in marks:
                    ax.plot([], [], marker, color="0.3", ms=6, label=text)
                ax.set_title(f"micro view: {len(picked)} spots, {traj.shape[0] - 1} steps")
            ax.set_xlabel(f"{label} 1")
            ax.set_ylabel(f"{label} 2")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.legend(loc="best", markerscale=1.5 if panel == "macro" else 1.0)
        return finish(fig, axes, show=show, save=save, return_fig=return_fig)
