"""benchmarks/train_speed.py: whole fits with the code paths histoflow used before, against today's."""

from __future__ import annotations

import torch
from _scripts import load_script

from histoflow.models import _molf, _train


def test_fit_baselines_restore_the_old_paths_and_give_the_same_model():
    mod = load_script("benchmarks/train_speed.py", "train_speed")
    table = mod._fit_table()
    assert table.shape == (910, 50) and table.obsm["X_feat"].shape == (910, 3 * 1280)
    assert table.obs["split"].value_counts().to_dict() == {"train": 546, "val": 182, "test": 182}
    current = _train.EpochMeanLogging.log_epoch_means, _molf.adamw
    with mod._before(log=True, loop=True):
        # inside: per-step logging and torch's per-tensor AdamW
        assert _train.EpochMeanLogging.log_epoch_means is mod._per_step_log
        opt = _molf.adamw(torch.nn.Linear(2, 2).parameters(), lr=1e-3, weight_decay=0.0)
        assert opt.defaults["foreach"] is False
    assert (_train.EpochMeanLogging.log_epoch_means, _molf.adamw) == current  # put back on leaving
    old = mod._fit(table, 1, log=True, loop=True)
    new = mod._fit(table, 1, log=False, loop=False)
    assert set(new[1]) == {"vae", "flow"} and "train_load_0" in new[1]["flow"]
    assert mod._same(old, new)  # same history (every loss, every epoch) and the same weights, bit for bit
    changed = {k: v + 1 for k, v in new[2].items()}
    assert not mod._same(old, (new[0], new[1], changed))
