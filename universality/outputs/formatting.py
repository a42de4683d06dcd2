"""How every univ output writes a statistic: one formatter for the reports, the terminal and the tables' captions."""

from __future__ import annotations

import numpy as np

COUNT = ",.0f"  # a count, or a mean or median of counts over pairs or features: a whole number


def number(value: float | None, spec: str = ".3f") -> str:
    """A statistic as a report shows it: ``spec``-formatted, or "–" where it is missing (None, NaN) or not finite."""
    return "–" if value is None or not np.isfinite(value) else format(value, spec)


def statistic_spec(key: str) -> str:
    """The format of the statistic named ``key``: ``COUNT`` for counts (``n_...``, ``neurons_for_...``: also their
    means and medians, e.g. ``features.n_mutual``'s mean over pairs), three decimals for the rest."""
    return COUNT if key.rsplit(".", 1)[-1].startswith(("n_", "neurons_for_")) else ".3f"
