"""Options more than one ``univ`` command takes (click decorators), importing nothing heavy."""

from __future__ import annotations

from pathlib import Path

import click

from universality.core.config import DEFAULT_EXPERIMENT

RESULTS_DIR = click.option("--results-dir", type=click.Path(path_type=Path), default=Path("results"), show_default=True,
                           help="Results folder: stage cache, and the embedded MLflow store unless a tracking URI is given.")
TRACKING_URI = click.option("--tracking-uri", default=None,
                            help="MLflow tracking server (default: $MLFLOW_TRACKING_URI, else SQLite in the results folder).")
EXPERIMENT = click.option("--experiment", default=DEFAULT_EXPERIMENT, show_default=True, help="MLflow experiment name.")
MAX_SEED = 2**63 - 1  # seeds go to torch.manual_seed, NumPy and int64 table columns: all take this range
DEVICE = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
