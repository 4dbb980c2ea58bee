"""Datasets: HER2ST (downloaded and cached, or a local folder), a synthetic pan-cancer dataset, eight Gaussians."""

from __future__ import annotations

from histoflow.datasets._eight_gaussians import eight_gaussians
from histoflow.datasets._her2st import her2st
from histoflow.datasets._synthetic import synthetic

__all__ = ["her2st", "synthetic", "eight_gaussians"]
