"""Plots of how a model was trained and tuned: loss history and expert load, guidance sweep."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from histoflow._constants import Key
from histoflow._docs import doc_params
from histoflow._utils import get_table, is_spatialdata
from histoflow.get._get import missing_key
from histoflow.pl._utils import PALETTE, PLOT_DOCS, check_sequence, finish, new_axes, new_grid, style

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

__all__ = ["guidance", "history"]

_SWEEP_COLUMNS = ("guidance", "w1", "cosine", "feasible", "chosen")


def _table_of(data: Any, table_key: str, arg: str) -> AnnData:
    """The AnnData table of a SpatialData/AnnData, or the table a model was built on."""
    from anndata import AnnData

    if isinstance(data, AnnData) or is_spatialdata(data):
        return get_table(data, table_key)
    table = getattr(data, "adata", None)
    if isinstance(table, AnnData):
        return table
    raise TypeError(
        f"`{arg}` must be a SpatialData, an AnnData or a trained model (e.g. `histoflow.models.MoLF`), got "
        f"{type(data).__name__}."
    )


def _guidance_entry(data: Any, key: str, table_key: str) -> dict[str, Any]:
    table = _table_of(data, table_key, "data")
    name = f"{key}_guidance"
    entry = table.uns.get(name)
    if not isinstance(entry, Mapping):
        raise missing_key("uns", name, "`histoflow.tl.select_guidance`", key_arg="key", found=list(table.uns))
    sweep = entry.get("sweep")
    if not isinstance(sweep, pd.DataFrame) or not set(_SWEEP_COLUMNS) <= set(sweep.columns):
        raise ValueError(
            f"`uns[{name!r}]['sweep']` must be a DataFrame with columns {list(_SWEEP_COLUMNS)} as written by "
            "`histoflow.tl.select_guidance`."
        )
    return dict(entry)


@doc_params(**PLOT_DOCS)
def guidance(
    data: SpatialData | AnnData | Any,
    key: str = "molf",
    *,
    table_key: str = Key.table,
    ax: Axes | None = None,
    figsize: tuple[float, float] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | Axes | None:
    """The guidance-scale sweep of the filter-and-rank protocol (MoLF appendix C).

    Draws ``D_W1`` (left axis) and the cosine distance (right axis) against the guidance scale ``w`` from
    ``uns[f"{key}_guidance"]`` (:func:`histoflow.tl.select_guidance`), shades the feasible scales
    (``D_W1 ≤ (1 + tau) · min D_W1``, dashed line) and marks the chosen one.

    Parameters
    ----------
    data
        A SpatialData or AnnData holding the sweep, or the trained model (its table is read).
    key
        ``key_added`` of :func:`histoflow.tl.select_guidance`.
    {doc_table_key}
    {doc_ax}
    {doc_plot}

    Returns
    -------
    The axes of ``D_W1`` (or the figure with ``return_fig=True``) when not shown; nothing is written.
    """
    entry = _guidance_entry(data, key, table_key)
    sweep = entry["sweep"].sort_values("guidance")
    w = sweep["guidance"].to_numpy(dtype=float)
    w1 = sweep["w1"].to_numpy(dtype=float)
    cos = sweep["cosine"].to_numpy(dtype=float)
    feasible = sweep["feasible"].to_numpy(dtype=bool)
    chosen = float(entry.get("chosen", w[sweep["chosen"].to_numpy(dtype=bool)][0]))
    tau = entry.get("tau")
    with style():
        ax = new_axes(ax, figsize, (4.0, 2.8))
        # shade each feasible scale's span (halfway to its neighbours)
        edges = np.r_[w[0] - 0.5 * (w[1] - w[0] if len(w) > 1 else 1.0), (w[1:] + w[:-1]) / 2,
                      w[-1] + 0.5 * (w[-1] - w[-2] if len(w) > 1 else 1.0)]  # fmt: skip
        for i in np.flatnonzero(feasible):
            ax.axvspan(edges[i], edges[i + 1], color=PALETTE[2], alpha=0.15, lw=0, label="feasible" if i ==
                       np.flatnonzero(feasible)[0] else None)  # fmt: skip
        ax.plot(w, w1, "-o", color=PALETTE[0], ms=4, label="$D_{W1}$")
        if tau is not None:
            ax.axhline((1 + float(tau)) * np.nanmin(w1), color=PALETTE[0], lw=0.8, ls="--",
                       label=f"(1 + τ) · min, τ = {float(tau):g}")  # fmt: skip
        ax.set_xlabel("guidance scale w")
        ax.set_ylabel("$D_{W1}$", color=PALETTE[0])
        ax2 = ax.twinx()
        ax2.spines["right"].set_visible(True)
        ax2.plot(w, cos, "-s", color=PALETTE[1], ms=4, label="$D_{cos}$")
        ax2.set_ylabel("$D_{cos}$", color=PALETTE[1])
        ax.axvline(chosen, color="0.2", lw=1.0, ls=":")
        ax2.plot([chosen], [cos[np.argmin(np.abs(w - chosen))]], marker="*", ms=12, color=PALETTE[3], ls="none",
                 label=f"chosen w = {chosen:g}")  # fmt: skip
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncols=2)
        split = entry.get("split")
        ax.set_title(f"guidance sweep ({split} spots)" if split else "guidance sweep")
        return finish(ax.figure, ax, show=show, save=save, return_fig=return_fig)


def _history_frames(data: Any, key: str, table_key: str) -> dict[str, pd.DataFrame]:
    """``{stage: DataFrame with an epoch column}`` from a model's ``.history`` or ``uns[key]["history"]``."""
    from anndata import AnnData

    if isinstance(data, AnnData) or is_spatialdata(data):
        table = get_table(data, table_key)
        entry = table.uns.get(key)
        if not isinstance(entry, Mapping) or "history" not in entry:
            raise missing_key("uns", key, "`histoflow.tl.fit_molf` (its `history` entry)", found=list(table.uns))
        raw = entry["history"]
    elif isinstance(getattr(data, "history", None), Mapping):
        raw = data.history
    else:
        raise TypeError(f"`data` must be a trained model, a SpatialData or an AnnData, got {type(data).__name__}.")
    out = {}
    for stage, frame in raw.items():
        if not isinstance(frame, pd.DataFrame):
            raise TypeError(f"The history of stage {stage!r} is a {type(frame).__name__}, not a DataFrame.")
        df = frame.reset_index() if "epoch" not in frame.columns else frame.copy()
        if "epoch" not in df.columns:
            df = df.rename(columns={df.columns[0]: "epoch"})
        out[str(stage)] = df
    if not out:
        raise ValueError("The history is empty; the model has not been trained.")
    return out


def _terms(df: pd.DataFrame) -> list[str]:
    """Loss terms (``rec`` for ``train_rec``/``val_rec``), in the order they first appear; no expert loads."""
    names: list[str] = []
    for col in df.columns:
        for prefix in ("train_", "val_"):
            if col.startswith(prefix) and not col.startswith("train_load_"):
                term = col[len(prefix) :]
                if term not in names:
                    names.append(term)
    return names


@doc_params(**PLOT_DOCS)
def history(
    data: Any,
    key: str = "molf",
    *,
    stages: str | Sequence[str] | None = None,
    table_key: str = Key.table,
    log: bool | None = None,
    figsize: tuple[float, float] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | np.ndarray | None:
    """Every loss term per epoch, training (solid) and validation (dashed), and the expert load.

    One panel per training stage (for MoLF: ``vae`` with reconstruction and KL, ``flow`` with flow matching, gene
    consistency and load balancing), then one panel with each expert's share of the routing per epoch
    (``train_load_<e>``) when recorded.

    Parameters
    ----------
    data
        A trained model (its ``.history``) or a SpatialData/AnnData holding ``uns[key]["history"]``
        (:func:`histoflow.tl.fit_molf`).
    key
        Key of the predictions (for SpatialData/AnnData input).
    stages
        Stages to show (default all).
    {doc_table_key}
    log
        Logarithmic loss axis; default when every loss value is positive.
    {doc_plot}

    Returns
    -------
    The axes (or the figure with ``return_fig=True``) when not shown; nothing is written.
    """
    frames = _history_frames(data, key, table_key)
    if stages is not None:
        names = check_sequence(stages, "stages")
        unknown = [s for s in names if s not in frames]
        if unknown:
            raise ValueError(f"`stages` contains {unknown}; the history has stages {list(frames)}.")
        frames = {s: frames[s] for s in names}
    loads = [(s, df, sorted((c for c in df.columns if c.startswith("train_load_")), key=lambda c: int(c[11:])
              if c[11:].isdigit() else 0)) for s, df in frames.items()]  # fmt: skip
    loads = [x for x in loads if x[2]]
    n_panels = len(frames) + len(loads)
    import matplotlib.ticker as mticker

    with style():
        fig, axes = new_grid(1, n_panels, figsize, (3.3, 2.7))
        axes = axes.ravel()
        for ax, (stage, df) in zip(axes, frames.items()):
            terms = _terms(df)
            values = [df[f"{p}_{t}"].to_numpy(dtype=float) for t in terms for p in ("train", "val") if f"{p}_{t}" in df]
            finite = np.concatenate(values) if values else np.array([1.0])
            finite = finite[np.isfinite(finite)]
            use_log = bool(finite.size and (finite > 0).all()) if log is None else bool(log)
            for i, term in enumerate(terms):
                color = PALETTE[i % len(PALETTE)]
                for prefix, ls in (("train", "-"), ("val", "--")):
                    col = f"{prefix}_{term}"
                    if col in df:
                        ax.plot(df["epoch"], df[col], ls=ls, color=color, lw=1.2,
                                label=term if prefix == "train" or f"train_{term}" not in df else None)  # fmt: skip
            if use_log:
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(mticker.LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(mticker.FormatStrFormatter("%g"))
                ax.yaxis.set_minor_formatter(mticker.NullFormatter())
            ax.set_xlabel("epoch")
            ax.set_ylabel("loss")
            ax.set_title(f"{stage}: train (solid), val (dashed)", fontsize=9)
            ax.legend(loc="best", ncols=1 + len(terms) // 4)
        for ax, (stage, df, cols) in zip(axes[len(frames) :], loads):
            for i, col in enumerate(cols):
                ax.plot(df["epoch"], df[col], color=PALETTE[i % len(PALETTE)], lw=1.2, label=col.replace("train_load_",
                        "expert "))  # fmt: skip
            ax.axhline(1.0 / len(cols), color="0.5", lw=0.8, ls=":", label="uniform")
            ax.set_xlabel("epoch")
            ax.set_ylabel("share of routing")
            ax.set_ylim(bottom=0)
            ax.set_title(f"{stage}: expert load", fontsize=9)
            ax.legend(loc="best", ncols=1 + len(cols) // 5)
        return finish(fig, axes, show=show, save=save, return_fig=return_fig)
