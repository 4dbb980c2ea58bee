"""models namespace (filled by later work)."""

from __future__ import annotations

__all__: list[str] = []
