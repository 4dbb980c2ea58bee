"""Accessors: stored predictions as an AnnData, routing weights and metrics as frames (nothing is recomputed)."""

from __future__ import annotations

from histoflow.get._get import metrics, predictions, routing

__all__ = ["predictions", "routing", "metrics"]
