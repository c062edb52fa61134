"""One row of the table `make bench` prints (bench/summary.py): every bench script writes its rows
through this, so the table has one shape (not a bench itself)."""

from __future__ import annotations

from typing import Any


def table_row(
    item: str, measure: str, value: float, unit: str, target: str | None = None, met: bool | None = None
) -> dict[str, Any]:
    """item: the row's group in the table ("DP step"); target: the goal as text, met: whether this run met it."""
    return {"item": item, "measure": measure, "value": value, "unit": unit, "target": target,
            "met": None if met is None else bool(met)}  # fmt: skip
