"""Input checks that fail early with a message naming the argument, what was found and how to fix it."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "check_obs_key",
    "check_obsm_key",
    "check_layer",
    "get_matrix",
    "check_counts",
    "check_finite",
    "check_choice",
    "check_positive",
]


def check_obs_key(adata: AnnData, key: str, arg: str, *, hint: str = "") -> None:
    """Raise a KeyError naming ``arg`` when ``key`` is not an ``obs`` column."""
    if key not in adata.obs.columns:
        cols = list(adata.obs.columns)
        shown = cols[:20] + (["..."] if len(cols) > 20 else [])
        msg = f"`{arg}={key!r}` is not a column of `adata.obs` (columns: {shown})."
        raise KeyError(msg + (f" {hint}" if hint else f" Pass `{arg}=` with the name of the column to use."))


def check_obsm_key(adata: AnnData, key: str, arg: str, *, hint: str = "") -> None:
    """Raise a KeyError naming ``arg`` when ``key`` is not in ``obsm``."""
    if key not in adata.obsm:
        msg = f"`{arg}={key!r}` is not in `adata.obsm` (keys: {sorted(adata.obsm)})."
        raise KeyError(msg + (f" {hint}" if hint else ""))


def check_layer(adata: AnnData, layer: str | None, arg: str = "layer") -> None:
    """Raise a KeyError naming ``arg`` when ``layer`` is not a layer (``None`` means ``X``)."""
    if layer is not None and layer not in adata.layers:
        raise KeyError(
            f"`{arg}={layer!r}` is not in `adata.layers` (layers: {sorted(adata.layers)}). "
            f"Pass `{arg}=None` to use `adata.X`, or the name of an existing layer."
        )


def get_matrix(adata: AnnData, layer: str | None, arg: str = "layer") -> np.ndarray | sp.spmatrix:
    """``adata.X`` or ``adata.layers[layer]``, after checking that the layer exists."""
    check_layer(adata, layer, arg)
    X = adata.X if layer is None else adata.layers[layer]
    if X is None:
        raise ValueError(f"`adata.X` is empty; pass `{arg}=` with the name of a layer that holds the data.")
    return X


def _values(X: Any) -> np.ndarray:
    if sp.issparse(X):
        return np.asarray(X.data)
    return np.asarray(X)


def check_finite(X: Any, arg: str) -> None:
    """Raise a ValueError naming ``arg`` when ``X`` holds NaN or inf."""
    v = _values(X)
    if v.dtype.kind not in "fc":
        return
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(v.sum()):  # NaN and inf make any sum non-finite: a finite one clears every value in one read
            return
    if not np.isfinite(v).all():  # the sum may also overflow with finite values only
        n = int((~np.isfinite(v)).sum())
        raise ValueError(f"`{arg}` contains {n} NaN or infinite value(s); remove or impute them first.")


def check_counts(X: Any, arg: str, *, warn_logged: bool = True) -> None:
    """Check that ``X`` holds raw counts: finite, non-negative, integer-valued.

    Warns (instead of failing) when the values look already log-transformed.
    """
    check_finite(X, arg)
    v = _values(X)
    if v.size == 0:
        return
    if v.min() < 0:
        raise ValueError(
            f"`{arg}` contains negative values (min {v.min():.3g}); raw counts are expected. "
            "Pass the layer that holds raw counts."
        )
    frac = v.dtype.kind == "f" and not np.all(np.equal(np.mod(v, 1), 0))
    if frac:
        if warn_logged and v.max() < 30:
            warnings.warn(
                f"`{arg}` looks already log-transformed (non-integer values, max {v.max():.3g}); "
                "histoflow expects raw counts here. Pass the layer that holds raw counts.",
                UserWarning,
                stacklevel=3,
            )
        else:
            raise ValueError(
                f"`{arg}` contains non-integer values; raw counts are expected. Pass the layer that holds raw counts."
            )


def check_choice(value: Any, choices: Sequence[Any], arg: str) -> None:
    """Raise a ValueError naming ``arg`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"`{arg}={value!r}` is not valid; choose one of {list(choices)}.")


def check_positive(value: float, arg: str, *, allow_zero: bool = False) -> None:
    """Raise a ValueError naming ``arg`` unless ``value`` is a positive (or non-negative) finite number."""
    ok = np.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"`{arg}` must be {'non-negative' if allow_zero else 'positive'} and finite, got {value!r}.")


def check_dropout(value: Any, arg: str = "dropout") -> float:
    """A dropout probability as a float; a ValueError naming ``arg`` unless it is a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating) or not 0 <= value < 1:
        raise ValueError(f"`{arg}` must be a number in [0, 1), got {value!r}.")
    return float(value)


def check_temperature(temperature: Any) -> float:
    """The prior-noise scale of a flow model's sampling as a float; a ValueError unless finite and at least 0."""
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float | np.integer | np.floating)
        or not (0 <= temperature < float("inf"))
    ):
        raise ValueError(
            f"`temperature` must be a finite number of at least 0 (1 samples the model as trained, 0 gives its "
            f"point estimate), got {temperature!r}."
        )
    return float(temperature)


def check_bool(value: Any, arg: str) -> bool:
    """``value`` as a bool; a TypeError naming ``arg`` unless it is True or False (NumPy's bools included)."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"`{arg}` must be True or False, got {value!r}.")
    return bool(value)
