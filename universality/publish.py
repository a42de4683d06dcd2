"""A finished run made public: every file written (``outputs.run_files``), then logged to its MLflow runs
(``tracking.tracker``); the time both take is the run's tracking time.

A re-run whose outputs an earlier run of the same experiment logged already (the same fingerprint: stage
keys, config, results folder, code) writes and logs nothing twice: its parent run holds the summary and links
to that run (``univ.same_as``), which ``univ export``, ``features`` and ``steer`` then read."""

from __future__ import annotations

import time

from universality.tracking.names import FINGERPRINT
from universality.tracking.tracker import Tracker, fingerprint, logged_run


def publish(tracker: Tracker, result) -> str | None:
    """Write a ``pipeline.RunResult``'s reports and tables under ``<results>/reports/<run id>/`` and log them, or,
    for a re-run of a logged run, link to it; returns the id of the run linked to (None: logged in full)."""
    key = fingerprint(result, tracker.results_dir)
    original = logged_run(tracker.client, tracker.experiment_id, key)
    if original is not None:
        tracker.link(result, original, key)
        return original
    from universality.outputs.run_files import write_run_files  # here: a re-run draws no figure (matplotlib)

    start = time.perf_counter()
    files = write_run_files(result, tracker.results_dir / "reports" / tracker.run_id)
    tracker.seconds += time.perf_counter() - start
    tracker.log_result(result, files)
    tracker.log(tracker.run_id, tags={FINGERPRINT: key})
    return None
