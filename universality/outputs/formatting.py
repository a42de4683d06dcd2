"""How every univ output writes a statistic: one formatter for the reports, the terminal and the tables' captions."""

from __future__ import annotations

import numpy as np


def number(value: float | None, spec: str = ".3f") -> str:
    """A statistic as a report shows it: ``spec``-formatted, or "–" where it is missing (None, NaN) or not finite."""
    return "–" if value is None or not np.isfinite(value) else format(value, spec)
