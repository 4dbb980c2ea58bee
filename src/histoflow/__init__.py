"""histoflow: predict spatial gene expression from H&E histology, scverse-style.

Submodules are imported lazily, so ``import histoflow`` stays light (no torch, no lightning):
``histoflow.pp``, ``histoflow.tl``, ``histoflow.pl``, ``histoflow.io``, ``histoflow.datasets``,
``histoflow.models`` and ``histoflow.get`` load on first use.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("histoflow")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without installation
    __version__ = "0.0.0"

_SUBMODULES = ("datasets", "get", "io", "models", "pl", "pp", "tl")

__all__ = [*_SUBMODULES, "__version__"]

if TYPE_CHECKING:
    from histoflow import datasets, get, io, models, pl, pp, tl


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        module = importlib.import_module(f"histoflow.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'histoflow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
