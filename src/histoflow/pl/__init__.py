"""Plotting: figures of what a model predicted and how it did, read from stored keys only (nothing recomputed).

Every function draws with one look (white background, colour-blind-safe colours), takes ``show``, ``save`` and
``return_fig`` like scanpy, and ``ax`` where it draws a single panel.
"""

from __future__ import annotations

from histoflow.pl._evaluation import gsc, metrics, morans_i, ssc
from histoflow.pl._routing import expert_patches, routing, routing_similarity
from histoflow.pl._spatial import spatial
from histoflow.pl._training import guidance, history
from histoflow.pl._trajectories import trajectories

__all__ = [
    "routing",
    "routing_similarity",
    "expert_patches",
    "trajectories",
    "gsc",
    "ssc",
    "morans_i",
    "spatial",
    "guidance",
    "history",
    "metrics",
]
