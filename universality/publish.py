"""A finished run made public: every file written (``outputs.run_files``), then logged to its MLflow runs
(``tracking.tracker``); the time both take is the run's tracking time."""

from __future__ import annotations

import time

from universality.outputs.run_files import RunFiles, write_run_files
from universality.tracking.tracker import Tracker


def publish(tracker: Tracker, result) -> RunFiles:
    """Write a ``pipeline.RunResult``'s reports and tables under ``<results>/reports/<run id>/`` and log them."""
    start = time.perf_counter()
    files = write_run_files(result, tracker.results_dir / "reports" / tracker.run_id)
    tracker.seconds += time.perf_counter() - start
    tracker.log_result(result, files)
    return files
