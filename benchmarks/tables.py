"""Cells that the benchmark reports' Markdown tables share."""

from __future__ import annotations

from typing import Any


def ratio(value: float | None) -> str:
    """A ratio as "1.23x", or an empty cell where there is none."""
    return "" if value is None else f"{value:.2f}x"


def target_cells(row: dict[str, Any]) -> str:
    """The last three cells of a row, "| target | measured | met |": empty
    for a row without a target."""
    measured = ratio(row["measured"]) if "measured" in row else ""
    met = ("yes" if row["met"] else "**no**") if "met" in row else ""
    return f"| {row.get('target', '')} | {measured} | {met} |"
