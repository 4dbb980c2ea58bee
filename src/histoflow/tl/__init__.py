"""Tools: fit models, predict, choose the guidance scale, evaluate. Torch loads on first model use."""

from __future__ import annotations

# metrics and evaluation (issue 4)
from histoflow.tl import metrics

# baselines
from histoflow.tl._baseline import fit_baseline

# post-processing: blending predictions
from histoflow.tl._blend import blend_predictions, select_blend

# MoLF seed ensembles
from histoflow.tl._ensemble import fit_molf_ensemble

# evaluation
from histoflow.tl._evaluate import evaluate

# FLAG-style gene-token flow
from histoflow.tl._flag import fit_flag

# MoLF
from histoflow.tl._molf import fit_molf, predict, select_guidance, trajectories

# post-processing: smoothing
from histoflow.tl._smooth import select_smoothing, smooth_predictions

__all__ = [
    "blend_predictions",
    "select_blend",
    "evaluate",
    "metrics",
    "fit_baseline",
    "fit_molf",
    "fit_molf_ensemble",
    "fit_flag",
    "predict",
    "select_guidance",
    "select_smoothing",
    "smooth_predictions",
    "trajectories",
]
