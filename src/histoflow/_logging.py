"""histoflow's logger. The library never configures the root logger."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger("histoflow")
logger.addHandler(logging.NullHandler())

__all__ = ["logger", "quiet"]


@contextmanager
def quiet(name: str, level: int = logging.WARNING) -> Iterator[None]:
    """Raise the level of another library's logger to ``level`` for the block, then restore it.

    For library calls whose INFO lines histoflow reports itself (e.g. squidpy's "Creating graph ..." through the
    ``spatialdata._logging`` logger, printed once per call by a handler that logging configuration cannot reach).
    """
    other = logging.getLogger(name)
    before = other.level
    other.setLevel(max(level, before))
    try:
        yield
    finally:
        other.setLevel(before)
