"""Small helpers shared by every namespace: resolving the table, copy semantics, logging writes, seeding."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from histoflow._constants import Key
from histoflow._logging import logger

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = [
    "get_table",
    "is_spatialdata",
    "copy_data",
    "log_write",
    "as_rng",
    "table_keys",
    "torch_device",
    "accelerator_device",
]


def is_spatialdata(obj: Any) -> bool:
    """Whether ``obj`` is a :class:`spatialdata.SpatialData` (checked without importing spatialdata eagerly)."""
    return type(obj).__name__ == "SpatialData" and type(obj).__module__.startswith("spatialdata")


def get_table(sdata: SpatialData | AnnData, table_key: str | None = Key.table) -> AnnData:
    """Return the AnnData table of ``sdata``.

    Parameters
    ----------
    sdata
        A SpatialData object or an AnnData table.
    table_key
        Name of the table in ``sdata.tables``; ignored for AnnData input.
    """
    from anndata import AnnData

    if isinstance(sdata, AnnData):
        return sdata
    if is_spatialdata(sdata):
        tables = sdata.tables
        if table_key is None:
            if len(tables) == 1:
                return next(iter(tables.values()))
            raise ValueError(
                f"`table_key` is None but `sdata` has {len(tables)} tables ({sorted(tables)}); pass `table_key=`."
            )
        if table_key not in tables:
            raise KeyError(
                f"`table_key={table_key!r}` is not a table of `sdata`; available tables: {sorted(tables)}. "
                "Pass `table_key=` with one of them."
            )
        return tables[table_key]
    raise TypeError(f"`sdata` must be a SpatialData or an AnnData, got {type(sdata).__name__}.")


def copy_data(sdata: SpatialData | AnnData, table_key: str | None = Key.table) -> SpatialData | AnnData:
    """Copy ``sdata`` for ``copy=True``.

    An AnnData is copied; a SpatialData keeps its (read-only) images, shapes, points and labels and gets deep
    copies of its tables.
    """
    from anndata import AnnData

    if isinstance(sdata, AnnData):
        return sdata.copy()
    from spatialdata import SpatialData

    return SpatialData(
        images=dict(sdata.images),
        labels=dict(sdata.labels),
        points=dict(sdata.points),
        shapes=dict(sdata.shapes),
        tables={k: v.copy() for k, v in sdata.tables.items()},
        attrs=dict(getattr(sdata, "attrs", {}) or {}),
    )


def log_write(attr: str, key: str) -> None:
    """Log one write into the table, e.g. ``log_write("obsm", "X_uni")``."""
    logger.info("Adding `adata.%s[%r]`", attr, key)


def as_rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    """A numpy Generator from a seed, a Generator (returned as is) or None (fresh entropy)."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def table_keys(table: AnnData) -> tuple[list[str], str | None, str | None]:
    """``(regions, region_key, instance_key)`` of a SpatialData table, or ``([], None, None)`` without attrs."""
    attrs: Mapping[str, Any] = table.uns.get("spatialdata_attrs", {}) or {}
    region = attrs.get("region")
    if region is None:
        regions: list[str] = []
    elif isinstance(region, str):
        regions = [region]
    else:
        regions = [str(r) for r in region]
    return regions, attrs.get("region_key"), attrs.get("instance_key")


def torch_device(device: Any, arg: str = "device") -> Any:
    """A :class:`torch.device` from ``"auto"`` (CUDA, then MPS, then CPU), Lightning's ``"gpu"`` or a torch string.

    Refuses, naming ``arg``, a string torch does not know and a CUDA or MPS device this machine does not have.
    """
    import torch

    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if isinstance(device, torch.device):
        dev = device
    elif str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    else:
        text = "cuda" + str(device)[3:] if str(device).startswith("gpu") else str(device)
        try:
            dev = torch.device(text)
        except (RuntimeError, TypeError) as err:
            raise ValueError(
                f"`{arg}` must be 'auto', 'cpu', 'cuda', 'cuda:<index>', 'mps' or another torch device, got {device!r}."
            ) from err
    if dev.type == "cuda" and (
        not torch.cuda.is_available() or (dev.index is not None and dev.index >= torch.cuda.device_count())
    ):
        raise ValueError(
            f"`{arg}={device!r}` asks for a CUDA GPU, but this machine has "
            f"{torch.cuda.device_count() if torch.cuda.is_available() else 'none'}; use {arg}='auto' or 'cpu'."
        )
    if dev.type == "mps" and not mps:
        raise ValueError(f"`{arg}={device!r}` asks for Apple's MPS, which this machine lacks; use {arg}='auto', 'cpu'.")
    return dev


def accelerator_device(accelerator: Any) -> str:
    """The inference device that goes with a Lightning ``accelerator`` (the one training ran on, for one process)."""
    acc = str(accelerator).lower()
    if acc in ("gpu", "cuda"):
        return "cuda"
    if acc in ("auto", "mps", "cpu"):
        return acc
    return "cpu"
