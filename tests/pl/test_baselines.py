"""Image comparisons of the stable plots on constructed stored keys (no training).

Rewrite the baselines with ``HISTOFLOW_UPDATE_BASELINES=1 pytest tests/pl/test_baselines.py``.
"""

from __future__ import annotations

import pytest

import histoflow as hf

FIG = {"show": False, "return_fig": True}

CASES = {
    "routing": lambda a: hf.pl.routing(a, "pred", figsize=(4.0, 2.2), **FIG),
    "routing_top1_by_slide": lambda a: hf.pl.routing(
        a, "pred", groupby="library_id", stat="top1", figsize=(4, 3), **FIG
    ),
    "routing_similarity": lambda a: hf.pl.routing_similarity(a, "pred", groupby="library_id", figsize=(4, 3.2), **FIG),
    "gsc": lambda a: hf.pl.gsc(a, "pred", figsize=(9, 3), **FIG),
    "ssc": lambda a: hf.pl.ssc(a, "pred", figsize=(3.4, 3.2), **FIG),
    "morans_i": lambda a: hf.pl.morans_i(a, "pred", n_genes=8, figsize=(3.6, 2.6), **FIG),
    "metrics_per_group": lambda a: hf.pl.metrics(a, "pcc", key="pred", figsize=(3, 2.8), **FIG),
    "metrics_multi_pooled": lambda a: hf.pl.metrics(
        a, ["pcc", "gsc", "ssc"], key="pred", aggregation="pooled", figsize=(4.5, 2.8), **FIG
    ),
    "guidance": lambda a: hf.pl.guidance(a, "pred", figsize=(4, 3.2), **FIG),
    "history": lambda a: hf.pl.history(a, "pred", figsize=(10, 2.8), **FIG),
    "spatial_spots_only": lambda a: hf.pl.spatial(a, "G00", "pred", library_id="S1", figsize=(4.4, 2.2), **FIG),
}


@pytest.mark.parametrize("name", list(CASES))
def test_baseline(name, constructed, compare_figure):
    compare_figure(CASES[name](constructed), name)
