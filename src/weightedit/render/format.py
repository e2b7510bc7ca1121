"""How numbers are written in tables, reports and cards."""

from __future__ import annotations

__all__ = ["percent"]


def percent(x: float | None) -> str:
    """A share as a whole percentage (``0.754`` → ``75%``); ``—`` when it was not measured."""
    return "—" if x is None else f"{100 * x:.0f}%"
