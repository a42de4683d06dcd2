"""``univ ui`` in a real browser: the URL it prints opens the experiment's runs table (not MLflow 3's
empty GenAI overview), and a run's metric charts open on the headline section. Needs Chromium
(``apt-get install -y chromium``); skipped without it."""

from __future__ import annotations

import html
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient
from test_tracking import free_port

from universality.tracking import lookups, names, store

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=15000"]  # let the page's scripts fetch and render first
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs Chromium at {CHROMIUM}")]


def page_text(url: str, profile: Path) -> str:
    """The visible text of the page at ``url`` once its scripts have run (headless Chromium, fresh profile)."""
    dom = subprocess.run([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120).stdout
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text)))


@pytest.fixture(scope="module")
def univ_ui(tracked_tiny):
    """``univ ui`` on the tracked tiny run's results, on a free loopback port, shared by this module's tests:
    (printed URL, results folder)."""
    results, _ = tracked_tiny
    server = subprocess.Popen(
        [sys.executable, "-c", "from universality.cli import main; main()", "ui", "--port", str(free_port()),
         "--results-dir", str(results)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        url = re.search(r"MLflow UI: (\S+)", server.stdout.readline()).group(1)
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(url.split("#")[0] + "health", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("univ ui did not start") from None
                time.sleep(0.5)
        yield url, results
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and any workers it started
        server.wait(timeout=30)


def test_the_printed_url_opens_the_runs_table(univ_ui, tmp_path):
    url, _ = univ_ui
    text = page_text(url, tmp_path / "profile")
    assert "tiny-2-seeds" in text and "matching runs" in text, text  # the parent run's row in the runs table
    assert "No data available" not in text  # the GenAI overview's empty trace charts


def test_a_runs_metric_charts_open_on_the_headline_section(univ_ui, tmp_path):
    url, results = univ_ui
    parent = lookups.find_run(MlflowClient(store.embedded_uri(results)), "latest")
    server, query = url.split("/#/")[0], url.split("?")[1]
    text = page_text(f"{server}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}/model-metrics?{query}",
                     tmp_path / "profile")
    sections = re.findall(r"(\S+) \((\d+)\) Add chart", text)
    # a small first section: raw and contextual features and neurons, rotated neurons, the ceiling, the ratio, a control
    assert sections[0][0] == names.HEADLINE and int(sections[0][1]) <= 8, sections
    assert {"features", "neurons", "thresholds", "counts"} <= {name for name, _ in sections}


def test_the_run_link_univ_run_prints_opens_the_run_in_the_model_training_view(univ_ui, tracked_tiny, tmp_path):
    url, _ = univ_ui
    _, output = tracked_tiny
    printed = re.search(r"open it: (\S+)\s+\(after `univ ui`\)", output).group(1)
    link = f"{url.split('/#/')[0]}/#/{printed.split('/#/')[1]}"  # the same page on this test's port
    text = page_text(link, tmp_path / "profile")
    assert "tiny-2-seeds" in text and "Child runs" in text and "seed0-vs-seed1" in text, text  # the parent's page
    assert "Model metrics" in text, text  # the Model training view's tabs, not the GenAI view's
