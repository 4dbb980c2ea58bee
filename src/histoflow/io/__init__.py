"""Reading spatial transcriptomics with H&E into SpatialData: HEST-1k, HER2ST, scanpy-style AnnData."""

from __future__ import annotations

from histoflow.io._anndata import from_anndata
from histoflow.io._build import SlideParts, build_spatialdata
from histoflow.io._her2st import read_her2st
from histoflow.io._hest import read_hest

__all__ = ["read_hest", "read_her2st", "from_anndata", "build_spatialdata", "SlideParts"]
