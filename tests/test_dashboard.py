"""``univ features RUN SEED FEATURE --dashboard OUT.html``: the feature's page from sae-dashboard, on the run's
comparison tokens. The rendering tests need the optional extra (``pip install 'univ[dashboard]'``); the first test
runs without it."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from universality.cli import main
from universality.tracking import lookups, store


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_dashboard_without_sae_dashboard_is_a_one_line_error_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sae_dashboard", None)  # as in the core install: `import sae_dashboard` fails
    out = tmp_path / "feature.html"
    result = invoke("features", "latest", 0, 3, "--dashboard", out, "--results-dir", tmp_path / "results")
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "pip install 'univ[dashboard]'" in result.output, result.output
    assert list(tmp_path.iterdir()) == []  # nothing written, no results folder either


def _top_feature(results):
    """Seed 0's feature with the highest top activation, and its top activating token (univ's feature card)."""
    client = MlflowClient(store.embedded_uri(results))
    run = lookups.find_run(client, "latest")
    sources = lookups.seed_sources(client, run, 0, results)
    feature = int(np.argmax(sources.top_values[:, 0]))
    return run, sources, feature, sources.card(feature, lookups.load_tables(client, run.info.run_id)[0]).examples[0]


@pytest.mark.slow
def test_dashboard_renders_one_feature_offline(tracked_tiny, tmp_path):
    pytest.importorskip("sae_dashboard")
    results, _ = tracked_tiny
    run, _, feature, top = _top_feature(results)
    out = tmp_path / "feature.html"
    result = invoke("features", "latest", 0, feature, "--dashboard", out, "--results-dir", results)
    assert result.exit_code == 0, result.output
    html = out.read_text(encoding="utf-8")
    assert f"seed 0 · feature {feature}" in html and run.info.run_id in html
    assert json.dumps(top.token)[1:-1] in html  # the top activating token, in the page's data
    assert f'"{feature}"' in html  # sae-dashboard's own data is keyed by the feature index
    assert not re.search(r"""<script[^>]*\bsrc=["']?https?:""", html)  # works offline: no script fetched, all inlined
    assert [p.name for p in tmp_path.iterdir()] == ["feature.html"]  # no temporary files left beside it


@pytest.mark.slow
def test_dashboard_bad_inputs_are_one_line_errors_and_write_nothing(tracked_tiny, tmp_path):
    pytest.importorskip("sae_dashboard")
    results, _ = tracked_tiny
    _, sources, _, _ = _top_feature(results)
    cases = [(tmp_path / "missing" / "f.html", 3, "does not exist"), (tmp_path / "f.txt", 3, ".html"),
             (tmp_path / "f.html", sources.densities.size, "out of range")]
    dead = np.flatnonzero(sources.densities == 0)
    if dead.size:
        cases.append((tmp_path / "f.html", int(dead[0]), "dead"))
    for out, feature, message in cases:
        result = invoke("features", "latest", 0, feature, "--dashboard", out, "--results-dir", results)
        assert result.exit_code == 1 and result.output.count("\n") == 1 and message in result.output, result.output
    assert list(tmp_path.iterdir()) == []
