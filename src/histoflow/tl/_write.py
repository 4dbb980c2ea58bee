"""Writing predictions into the table, as DESIGN.md specifies (shared by every model)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from histoflow._utils import log_write

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["write_predictions", "prediction_keys"]


def prediction_keys(key: str) -> dict[str, str]:
    """Every key a prediction run with ``key_added=key`` may write."""
    return {
        "obsm": key,
        "layer": key,
        "std": f"{key}_std",
        "latent": f"X_{key}_latent",
        "routing": f"{key}_routing",
        "uns": key,
    }


def write_predictions(
    table: AnnData,
    key: str,
    *,
    rows: np.ndarray,
    genes: Sequence[str],
    mean: np.ndarray,
    std: np.ndarray | None = None,
    latent: np.ndarray | None = None,
    routing: np.ndarray | None = None,
    routing_names: Sequence[str] | None = None,
    uns: Mapping[str, Any] | None = None,
) -> None:
    """Write predictions for the spots at positions ``rows`` of ``table``.

    - ``obsm[key]``: DataFrame (index = obs_names, columns = ``genes``); spots not in ``rows`` are NaN;
    - ``layers[key]`` when ``table.var_names`` equal ``genes`` exactly (same order);
    - ``obsm[f"{key}_std"]`` (DataFrame like the mean), ``obsm[f"X_{key}_latent"]`` (array),
      ``obsm[f"{key}_routing"]`` (DataFrame, one column per expert), when given;
    - ``uns[key]`` = ``uns``.

    Everything is assembled first and assigned at the end, so a failure writes nothing.
    """
    k = prediction_keys(key)
    n, g = table.n_obs, len(genes)
    rows = np.asarray(rows, dtype=np.int64)
    mean = np.asarray(mean, dtype=np.float32)
    if mean.shape != (len(rows), g):
        raise ValueError(f"Predictions have shape {mean.shape}; expected ({len(rows)}, {g}).")

    def frame(values: np.ndarray, columns: Sequence[str]) -> pd.DataFrame:
        full = np.full((n, values.shape[1]), np.nan, dtype=np.float32)
        full[rows] = values
        # a view of obs_names shares its identity: anndata checks each obsm DataFrame's index against obs_names at
        # every `table.obsm` access, and Index.equals on an identical index returns at once (on a copy it compares
        # every name: about 1 ms per DataFrame for 100,000 spots, each access)
        return pd.DataFrame(full, index=table.obs_names.view(), columns=pd.Index([str(c) for c in columns]))

    out_obsm: dict[str, Any] = {k["obsm"]: frame(mean, genes)}
    out_layers: dict[str, Any] = {}
    if list(table.var_names) == [str(x) for x in genes]:
        out_layers[k["layer"]] = out_obsm[k["obsm"]].to_numpy()
    if std is not None:
        out_obsm[k["std"]] = frame(np.asarray(std, dtype=np.float32), genes)
    if latent is not None:
        full = np.full((n, latent.shape[1]), np.nan, dtype=np.float32)
        full[rows] = latent
        out_obsm[k["latent"]] = full
    if routing is not None:
        names = routing_names or [f"expert_{i}" for i in range(routing.shape[1])]
        out_obsm[k["routing"]] = frame(np.asarray(routing, dtype=np.float32), names)

    for name, value in out_obsm.items():
        table.obsm[name] = value
        log_write("obsm", name)
    for name, value in out_layers.items():
        table.layers[name] = value
        log_write("layers", name)
    if uns is not None:
        table.uns[k["uns"]] = dict(uns)
        log_write("uns", k["uns"])
