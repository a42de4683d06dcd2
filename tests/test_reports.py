"""Reports: figures are real PNGs with the paper's reference lines; HTML pages stand alone."""

from __future__ import annotations

import base64
import re

import numpy as np
import pandas as pd
import pytest

from mlflow import MlflowClient

from universality import reports, tracking

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_universality_histogram_is_a_png_and_tolerates_excluded_features():
    rng = np.random.default_rng(0)
    max_corr = {"features": np.append(rng.uniform(0, 1, 100), np.nan), "neurons": rng.uniform(0, 1, 20),
                "rotation": np.full(5, np.nan)}
    figure = reports.universality_histogram(max_corr, "test")
    assert figure.png.startswith(PNG_MAGIC) and figure.name == "universality.png"
    assert base64.b64encode(figure.png).decode() in figure.html()


def test_scatter_figures_skip_features_without_partner():
    table = pd.DataFrame({"feature_b": [3, -1, 0], "corr": [0.8, np.nan, 0.2], "mutual": [True, False, False],
                          "density_a": [1e-3, 0.0, 1e-2], "logit_corr": [0.3, np.nan, -0.1]})
    for figure in (reports.density_scatter(table, "t"), reports.logit_scatter(table, "t")):
        assert figure.png.startswith(PNG_MAGIC)


@pytest.mark.slow
def test_run_and_pair_reports_are_self_contained(tracked_tiny):
    results, _ = tracked_tiny
    client = MlflowClient(tracking.embedded_uri(results))
    folder = results / "reports" / tracking.find_run(client, "latest").info.run_id
    pair = folder / "pairs" / "seed0-vs-seed1"
    assert {p.name for p in pair.iterdir()} == {"universality.png", "density_vs_corr.png", "logit_vs_activation.png",
                                                 "top_block.png", "report.html"}
    for page, n_figures in ((pair / "report.html", 4), (folder / "report" / "report.html", 1)):
        text = page.read_text()
        images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)
        assert len(images) == n_figures and all(base64.b64decode(i).startswith(PNG_MAGIC) for i in images)
        assert "0.72" in text and "0.46" in text  # the paper's reference medians
        assert text.count("<div class='card'>") == 2 * reports.N_CARDS and "<mark>" in text
        assert "src='http" not in text and "href='http" not in text  # nothing fetched from elsewhere
