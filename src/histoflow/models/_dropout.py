"""Dropout whose masks are cheap to draw on a CPU (torch only)."""

from __future__ import annotations

import torch
from torch import nn

from histoflow._validate import check_dropout

__all__ = ["FastDropout", "use_fast_dropout"]

_LEVELS = 1 << 16  # a mask entry is one 16-bit uniform integer


class FastDropout(nn.Module):
    """Dropout with the same distribution as :class:`torch.nn.Dropout`, drawn faster on a CPU.

    On a CPU, :func:`torch.nn.functional.dropout` draws one random number per entry (``bernoulli_``); with it a
    training step of MoLF's Stage I took 1.2–1.3 times as long (``benchmarks/train_speed.py``). Here one 64-bit draw
    of the seeded generator gives the masks of four entries (16 bits each): an entry is kept when its 16-bit integer
    is at least a threshold, so the drop probability is ``p`` rounded to a multiple of 2⁻¹⁶, and kept entries are
    scaled by the inverse of the exact keep probability (the output's expectation is the input). Same seed, same
    masks. On other devices (CUDA, MPS) it is :func:`torch.nn.functional.dropout`, whose masks are already fast there.

    Parameters
    ----------
    p
        Probability of dropping an entry, in [0, 1).
    """

    def __init__(self, p: float = 0.1):
        super().__init__()
        self.p = check_dropout(p, "p")
        # entries whose 16-bit value (offset to 0..65535) is below this are dropped; at least one level is kept
        dropped = min(round(self.p * _LEVELS), _LEVELS - 1)
        self.threshold = dropped - _LEVELS // 2
        self.scale = _LEVELS / (_LEVELS - dropped)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return nn.functional.dropout(x, self.p, training=True)
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
        keep = bits.view(torch.int16)[:n].view(x.shape) >= self.threshold
        return x * keep.to(x.dtype).mul_(self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(module: nn.Module) -> nn.Module:
    """Replace every :class:`torch.nn.Dropout` inside ``module`` by a :class:`FastDropout` of the same ``p``.

    Attention-weight dropout inside :class:`torch.nn.MultiheadAttention` is left as it is. Returns ``module``.
    """
    for name, child in list(module.named_children()):
        if type(child) is nn.Dropout:
            setattr(module, name, FastDropout(child.p))
        else:
            use_fast_dropout(child)
    return module
