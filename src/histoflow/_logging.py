"""histoflow's logger. The library never configures the root logger."""

from __future__ import annotations

import logging

logger = logging.getLogger("histoflow")
logger.addHandler(logging.NullHandler())

__all__ = ["logger"]
