"""Model classes (scvi-style API on plain Lightning) and the torch/Lightning pieces they share.

Importing this namespace does not import torch: every name loads its module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> module that defines it (loaded lazily, so `import histoflow.models` stays light)
_LAZY: dict[str, str] = {
    # MoLF
    "MoLF": "histoflow.models._molf",
    "MoLFConfig": "histoflow.models._molf",
    # FLAG-style gene-token flow with representation alignment
    "FLAG": "histoflow.models._flag",
    "FLAGConfig": "histoflow.models._flag",
    # building blocks (torch modules)
    "GeneVAE": "histoflow.models._vae",
    "ConditionEncoder": "histoflow.models._velocity",
    "GraphContextEncoder": "histoflow.models._graph",
    "VelocityField": "histoflow.models._velocity",
    "MixtureOfExperts": "histoflow.models._moe",
    "LatentFlow": "histoflow.models._flow",
    # baselines and training utilities
    "RidgeProbe": "histoflow.models._baselines",
    "MLPBaseline": "histoflow.models._baselines",
    "make_trainer": "histoflow.models._train",
    "fit_module": "histoflow.models._train",
    "HistoryCallback": "histoflow.models._train",
    "EMAWeightsCallback": "histoflow.models._train",
    "seed_everything": "histoflow.models._train",
    "tensor_loaders": "histoflow.models._train",
    "SeededSampler": "histoflow.models._train",
    "EpochMeanLogging": "histoflow.models._train",
}

__all__: list[str] = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'histoflow.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
