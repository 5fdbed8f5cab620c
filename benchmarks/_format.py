"""Cell formatting shared by the README tables."""

from __future__ import annotations

import math
from typing import Any

from _forms import FORMS
from _scenarios import CLIENTS

__all__ = ["f", "label", "ratio", "state_of"]


def f(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def ratio(a: float | None, b: float | None) -> float:
    return a / b if a is not None and b and not math.isnan(a) and not math.isnan(b) else math.nan


def state_of(row: dict[str, Any]) -> str:
    return "warm" if row.get("warmup") else "cold"


def label(r: dict[str, Any]) -> str:
    if r["client"] != "novita":
        return CLIENTS.get(r["client"], r["client"])
    return f"novita_async, {FORMS[r['form']]} ({r['backend']})"
