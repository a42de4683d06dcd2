"""Reports: figures are real PNGs with the paper's reference lines; HTML pages stand alone."""

from __future__ import annotations

import base64
import json
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from mlflow import MlflowClient

from universality.outputs import formatting, report_tables, reports
from universality.tracking import lookups, store
from universality.core.errors import DataError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_universality_histogram_is_a_png_and_tolerates_excluded_features():
    rng = np.random.default_rng(0)
    max_corr = {"features": np.append(rng.uniform(0, 1, 100), np.nan), "neurons": rng.uniform(0, 1, 20),
                "rotation": np.full(5, np.nan)}
    figure = reports.universality_histogram(max_corr, "test")
    assert figure.png.startswith(PNG_MAGIC) and figure.name == "universality.png"
    assert base64.b64encode(figure.png).decode() in figure.html()


def test_scatter_figures_plot_only_features_with_a_partner(monkeypatch):
    points = {}  # figure name -> the (x, y) offsets of each scatter series, read before the figure is rendered
    render = reports.render
    def recording_render(fig, name, caption):
        points[name] = [np.asarray(c.get_offsets()) for c in fig.axes[0].collections]
        return render(fig, name, caption)
    monkeypatch.setattr(reports, "render", recording_render)
    table = pd.DataFrame({"feature_b": [3, -1, 0], "corr": [0.8, np.nan, 0.2], "mutual": [True, False, False],
                          "density_a": [1e-3, 0.0, 1e-2], "logit_corr": [0.3, np.nan, -0.1]})
    for figure in (reports.density_scatter(table, "t"), reports.logit_scatter(table, "t")):
        assert figure.png.startswith(PNG_MAGIC)
    density, *legend_only = points["density_vs_corr.png"]
    np.testing.assert_array_equal(density, [[1e-3, 0.8], [1e-2, 0.2]])  # feature 1 (no partner) is not drawn
    assert all(series.size == 0 for series in legend_only)
    matched_only, mutual = points["logit_vs_activation.png"]
    np.testing.assert_array_equal(matched_only, [[0.2, -0.1]])
    np.testing.assert_array_equal(mutual, [[0.8, 0.3]])


@pytest.mark.parametrize("name", ["../outside.png", "/etc/hostname", "..", "sub/dir.png"])
def test_cached_figure_index_naming_a_path_is_rejected(tmp_path, name):
    """A tampered figure index (a cache on a shared filesystem) must not make univ read files outside it."""
    (tmp_path / "outside.png").write_bytes(PNG_MAGIC + b"not ours")
    stage = tmp_path / "stage"
    (stage / "figures").mkdir(parents=True)
    (stage / "figures" / reports.FIGURE_INDEX).write_text(json.dumps({name: "caption"}))
    with pytest.raises(DataError, match="not a plain figure file name"):
        reports.drawn_once(stage, lambda: [])


def test_cached_figures_are_read_back_by_name(tmp_path):
    drawn = [reports.Figure("a.png", "caption a", PNG_MAGIC + b"a")]
    assert reports.drawn_once(tmp_path, lambda: drawn) == drawn
    assert reports.drawn_once(tmp_path, lambda: []) == drawn  # the second call reads the cache


@pytest.mark.slow
def test_run_and_pair_reports_are_self_contained(tracked_tiny):
    results, _ = tracked_tiny
    client = MlflowClient(store.embedded_uri(results))
    folder = results / "reports" / lookups.find_run(client, "latest").info.run_id
    pair = folder / "pairs" / "seed0-vs-seed1"
    assert {p.name for p in pair.iterdir()} == {"universality.png", "density_vs_corr.png", "logit_vs_activation.png",
                                                 "top_block.png", "report.html"}
    for page, n_figures in ((pair / "report.html", 4), (folder / "report" / "report.html", 3)):  # run: pooled, token share, own neurons
        text = page.read_text()
        images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)
        assert len(images) == n_figures and all(base64.b64decode(i).startswith(PNG_MAGIC) for i in images)
        assert "0.72" in text and "0.46" in text  # the paper's reference medians
        assert text.count("<div class='card'>") == 2 * reports.N_CARDS and "<mark>" in text
        assert "src='http" not in text and "href='http" not in text  # nothing fetched from elsewhere
        assert "token share" in text and "contextual" in text  # the cards' token share, raw beside contextual
    run_page = (folder / "report" / "report.html").read_text()
    assert "<h2>Token share</h2>" in run_page and "by contextual correlation" in run_page
    assert "SAE features, token lookup (null: per-token means alone)" in run_page


def test_most_universal_ranks_by_contextual_correlation_with_raw_beside():
    """A token feature (raw 0.99, nothing left given the token) ranks below context features; raw stays a column."""
    matched = pd.DataFrame({"seed_a": 0, "sae_a": 0, "seed_b": [1, 1, 1, 2, 2, 2], "sae_b": 0, "same_model": False,
                            "feature_a": [0, 1, 2, 0, 1, 2], "feature_b": [5, 6, 7, 5, 6, 7],
                            "corr": [0.99, 0.6, 0.5, 0.97, 0.6, 0.7], "corr_context": [np.nan, 0.5, 0.3, np.nan, 0.7, 0.1]})
    ranked = reports.ranked_features(matched, 0)
    assert ranked.feature_a.tolist() == [1, 2, 0]
    assert ranked["corr"].tolist() == pytest.approx([0.6, 0.6, 0.98]) and ranked.corr_context.tolist() == pytest.approx([0.6, 0.2, 0.0])
    assert reports.ranked_features(matched, 0, seed_b=1).feature_a.tolist() == [1, 2, 0]


def test_counts_and_their_means_and_medians_print_as_whole_numbers():
    headline = report_tables.headline_table({"features.n_mutual": 417.833, "features.max_corr_median": 0.61234})
    assert "<td>mutual matches</td><td>418</td>" in headline and "<td>0.612</td>" in headline
    assert "<td>linear CKA of the MLP spaces</td><td>–</td>" in headline  # missing, not 'None'
    own = report_tables.own_neurons_table({"seed0": SimpleNamespace(stats={"max_corr_median": 0.41, "neurons_for_90pct_median": 1252.0})})
    assert "<td>0.410</td><td>1,252</td>" in own
    counts = ("features.n_mutual", "neurons_for_90pct_median", "families.n_all_runs", "own_neurons.n_included")
    assert {formatting.statistic_spec(k) for k in counts} == {formatting.COUNT}
    assert {formatting.statistic_spec(k) for k in ("max_corr_median", "features.frac_above_0.5", "cka")} == {".3f"}
