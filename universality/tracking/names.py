"""What univ's runs, metrics and artifacts are called in MLflow: the kind tag, the metric names and their
sections (the headline first), the artifact paths of the tables, and statistics as MLflow ``Metric``s."""

from __future__ import annotations

import re
import time
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from mlflow.entities import Metric

KIND = "univ.kind"  # tag on every run univ makes: experiment | seed | sae-replicate | control-model | pair | replicate-pair | randomized-pair | untrained-pair | crosscoder | steer (univ steer --log)
TABLES = {"matched": "tables/matched_features.parquet", "families": "tables/matched_features.families.parquet"}
CROSSCODER_TABLE = "tables/crosscoder.parquet"  # the crosscoder's latents table on the parent (crosscoder.enabled)
DECILES = "tables/deciles.json"  # a parent's and each pair's statistics by feature-density decile
FINGERPRINT = "univ.fingerprint"  # on a logged parent run: what its logged outputs depend on (``tracker.fingerprint``)
SAME_AS = "univ.same_as"  # on a re-run's parent: the run that logged its children, reports and tables


# MLflow's UI groups a run's charts into sections by the name's prefix before a "/", in code-point
# order: the capitalized headline section comes before every lowercase one. It holds at most 8 charts: raw and
# contextual for features and neurons, rotated neurons, the ceiling, the ratio to it and the weight-shuffled
# control; the other contextual, control and null statistics chart under their own sections ("contextual/",
# "untrained/", "token_lookup/", "gap/", "token_share/").
HEADLINE = "Universality"
HEADLINE_NAMES = {  # internal key -> its name in the headline section
    **{f"{basis}.max_corr_median{over_pairs}": f"{HEADLINE}/{name}_median_max_corr"
       for basis, name in (("features", "features"), ("neurons", "neurons"), ("rotation", "rotated_neurons"))
       for over_pairs in ("", "_mean")},  # a pair's statistic; on the parent, its mean over pairs
    **{f"contextual.{basis}.max_corr_median{over_pairs}": f"{HEADLINE}/{basis}_contextual_median_max_corr"
       for basis in ("features", "neurons") for over_pairs in ("", "_mean")},  # the same, current-token means removed
    "randomized.features.max_corr_median": f"{HEADLINE}/randomized_features_median_max_corr",
    "ceiling.features.max_corr_median_mean": f"{HEADLINE}/ceiling_features_median_max_corr",
    "ceiling_ratio.features.max_corr_median": f"{HEADLINE}/features_over_ceiling",
}
SECTION_RULES = (  # (pattern in an internal key, its section); the first match wins, else the key's first part
    (re.compile(r"^own_neurons\."), "own_neurons"),  # features vs their own model's neurons, thresholds and counts too
    (re.compile(r"^splits\."), "splits"),  # feature splitting between dictionary sizes, its counts too
    (re.compile(r"^families\.|frac_features_partnered"), "families"),
    (re.compile(r"(^|\.)frac_(\w+_)?above_"), "thresholds"),
    (re.compile(r"(^|\.)n_"), "counts"),
    (re.compile(r"(^|\.)(cka|svcca)"), "similarity"),
    (re.compile(r"^ceiling_ratio\."), "ceiling"),
)
SIZE_SECTION = re.compile(r"^(size\d+)\.")  # a dictionary family's other sizes: a section per size ("size512/...")
DECILE = re.compile(r"(^|\.)decile(\d+)_")  # per-density-decile statistics: logged as a table, not as metrics
_NAME_DOT = re.compile(r"(?<!\d)\.|\.(?!\d)")  # dots between names, not decimal points ("frac_above_0.5")
_BAD_METRIC_CHARS = re.compile(r"[^A-Za-z0-9_\-./ ]")


def metric_name(key: str) -> str:
    """The MLflow name of an internal key (a dotted statistic such as ``features.max_corr_mean_mean``):
    ``section/name``. The headline numbers get a small first section of their own; the rest go by
    what they are (thresholds, counts, similarity, families) or by basis or scope (features, neurons,
    rotation, randomized, ceiling, decoder); another dictionary size's statistics go to that size's section
    (``size512.features.max_corr_median_mean`` -> ``size512/features_max_corr_median_mean``). A key with a "/" is
    already named. MLflow allows letters,
    digits, ``_-./`` and spaces; anything else becomes ``_``."""
    sized = SIZE_SECTION.match(key)
    if sized:
        key = f"{sized.group(1)}/{_NAME_DOT.sub('_', key[sized.end():])}"
    if "/" not in key:
        section = next((s for pattern, s in SECTION_RULES if pattern.search(key)), key.split(".")[0] if "." in key else "other")
        name = key.removeprefix(f"{section}.")
        key = HEADLINE_NAMES.get(key, f"{section}/{_NAME_DOT.sub('_', name)}")
    return _BAD_METRIC_CHARS.sub("_", key)


def metrics_from(values: Mapping[str, float], prefix: str = "", step: int = 0) -> list[Metric]:
    """Scalar entries of ``values`` as Metrics sorted by name, the headline first (lists, dicts, strings
    and per-decile statistics are left out)."""
    now = int(time.time() * 1000)
    metrics = [Metric(metric_name(prefix + k), float(v), now, step) for k, v in values.items()
               if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and not DECILE.search(k)]
    return sorted(metrics, key=lambda m: m.key)


def decile_table(values: Mapping[str, float]) -> pd.DataFrame:
    """The per-density-decile statistics among ``values`` as a table: a row per statistic (its key without
    the decile), a column per decile (``decile0`` ... ``decile9``)."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in values.items():
        found = DECILE.search(key)
        if found:
            statistic = key[: found.start()] + found.group(1) + key[found.end() :]
            rows.setdefault(statistic, {})[f"decile{found.group(2)}"] = float(value)
    table = pd.DataFrame.from_dict(rows, orient="index")
    return table[sorted(table.columns, key=lambda c: int(c.removeprefix("decile")))].rename_axis("statistic").reset_index()


def curves(history: Sequence[Mapping[str, float]], prefix: str, extra: Mapping[str, float] | None = None) -> list[Metric]:
    """Every numeric field of every history row at that row's ``step`` (plus constant ``extra`` lines)."""
    return [m for row in history
            for m in metrics_from({**{k: v for k, v in row.items() if k != "step"}, **(extra or {})}, prefix, int(row["step"]))]
