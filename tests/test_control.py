"""The controls end to end on the fast tiny config: the randomized transformer (weight shuffling, the control
pair, the randomized.* statistics, its MLflow child run and report) and the untrained transformer (a seed's
initial weights, untrained.*), the gaps to each null, in a run started from a relative results folder that
``univ features`` then reads from another folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fast_pipeline import fast_cfg, run_fast

from universality.publish import publish
from universality.tracking import names, store
from universality.tracking.tracker import tracked_run
from universality.cli import main
from universality.outputs.terminal import describe

CONTROLS = ("shuffled-seed0-1", "shuffled-seed0-2")
UNTRAINED = ("untrained-seed0", "untrained-seed1")


@pytest.fixture(scope="module")
def control_run(tmp_path_factory):
    """(results folder, RunResult, parent run id) of a tracked two-seed run with the control, started as
    ``univ run --results-dir results`` would be from the folder above it."""
    base = tmp_path_factory.mktemp("control")
    cfg = fast_cfg().replace(compare={"randomized_baseline": True}, sae={"replicates": 0})
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(base)
        with tracked_run(Path("results"), None, "univ", cfg, [0, 1]) as tracker:
            result = run_fast(Path("results"), [0, 1], cfg)
            publish(tracker, result)
    return base / "results", result, tracker.run_id


@pytest.mark.slow
def test_control_models_are_weight_shuffled_copies_of_seed0(control_run):
    _, result, _ = control_run
    original = result.models["seed0"].model.state_dict()
    for name in CONTROLS:
        shuffled = result.models[name].model.state_dict()
        for key, weights in original.items():
            assert torch.equal(shuffled[key].flatten().sort().values, weights.flatten().sort().values), (name, key)
        assert all(not torch.equal(shuffled[key], w) for key, w in original.items() if w.unique().numel() > 1), name


@pytest.mark.slow
def test_control_pair_and_its_statistics(control_run):
    _, result, _ = control_run
    control = result.randomized
    assert (control.run_a, control.run_b) == CONTROLS
    assert [(p.run_a, p.run_b) for p in result.pairs] == [("seed0", "seed1")]  # the control is not a seed pair
    for key, value in control.stats.items():
        assert result.summary[f"randomized.{key}"] == value or np.isnan(value) and np.isnan(result.summary[f"randomized.{key}"])
    assert result.summary["features.excess_over_randomized"] == pytest.approx(
        result.summary["features.max_corr_mean_mean"] - control.stats["features.max_corr_mean"])
    assert 0 < control.stats["features.max_corr_median"] <= 1 and control.stats["features.n_mutual"] > 0


@pytest.mark.slow
def test_untrained_controls_are_the_seeds_initial_weights(control_run):
    from models.training import build_model

    _, result, _ = control_run
    for name, seed in zip(UNTRAINED, (0, 1)):
        control = result.models[name]
        initial = build_model(control.model.cfg, seed).state_dict()
        assert control.seed == seed and control.history == [] and control.metrics == {}
        assert all(torch.equal(control.model.state_dict()[k], v) for k, v in initial.items()), name
    trained = result.models["seed0"].model.state_dict()
    assert not all(torch.equal(result.models[UNTRAINED[0]].model.state_dict()[k], v) for k, v in trained.items())


@pytest.mark.slow
def test_untrained_pair_contextual_statistics_and_gaps(control_run):
    _, result, _ = control_run
    untrained, randomized, summary = result.untrained, result.randomized, result.summary
    assert (untrained.run_a, untrained.run_b) == UNTRAINED
    assert [(p.run_a, p.run_b) for p in result.pairs] == [("seed0", "seed1")]  # the controls are no seed pair
    for key, value in untrained.stats.items():
        assert summary[f"untrained.{key}"] == value or np.isnan(value) and np.isnan(summary[f"untrained.{key}"])
    for control in (untrained, randomized):  # both controls are compared given the token too
        assert 0 <= control.stats["contextual.features.max_corr_median"] <= 1
        assert {"token_lookup.features.max_corr_median", "by_token_share.features.share_lt_050.n"} <= set(control.stats)
    trained_raw, trained_context = summary["features.max_corr_median_mean"], summary["contextual.features.max_corr_median_mean"]
    for null, stats in (("randomized", randomized.stats), ("untrained", untrained.stats)):
        assert summary[f"gap.raw.{null}"] == pytest.approx(trained_raw - stats["features.max_corr_median"])
        assert summary[f"gap.contextual.{null}"] == pytest.approx(trained_context - stats["contextual.features.max_corr_median"])
    assert summary["gap.raw.token_lookup"] == pytest.approx(trained_raw - summary["token_lookup.features.max_corr_median_mean"])
    assert "gap.contextual.token_lookup" not in summary  # given the token, a per-token mean is constant
    shown = describe(result)
    assert "SAE features, untrained models" in shown and "SAE features, weight-shuffled models" in shown
    assert f"untrained {summary['gap.raw.untrained']:.3f} | {summary['gap.contextual.untrained']:.3f}" in shown


@pytest.mark.slow
def test_control_is_tracked_with_its_own_runs_and_report(control_run):
    results, result, run_id = control_run
    client = store.open_client(results, None, read_only=True)
    children = client.search_runs([client.get_run(run_id).info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'")
    kinds = {r.info.run_name: r.data.tags[names.KIND] for r in children}
    assert {name: kinds.get(name) for name in CONTROLS + UNTRAINED} == dict.fromkeys(CONTROLS + UNTRAINED, "control-model")
    assert kinds[f"{UNTRAINED[0]}-vs-{UNTRAINED[1]}"] == "untrained-pair"
    pair_name = f"{CONTROLS[0]}-vs-{CONTROLS[1]}"
    assert kinds[pair_name] == "randomized-pair"
    pair = next(r for r in children if r.info.run_name == pair_name)
    expected = {m.key: m.value for m in names.metrics_from(result.randomized.stats)}
    assert expected and {k: pair.data.metrics.get(k) for k in expected} == pytest.approx(expected, nan_ok=True)
    parent_metrics = client.get_run(run_id).data.metrics
    assert parent_metrics[names.metric_name("randomized.features.max_corr_median")] == pytest.approx(
        result.randomized.stats["features.max_corr_median"])
    logged = {a.path for a in client.list_artifacts(pair.info.run_id, "report")}
    assert "report/report.html" in logged and "report/universality.png" in logged
    page = (results / "reports" / run_id / "pairs" / pair_name / "report.html").read_text()
    assert "Randomized-transformer control" in page and page.count("<img") == 4
    untrained_page = (results / "reports" / run_id / "pairs" / f"{UNTRAINED[0]}-vs-{UNTRAINED[1]}" / "report.html").read_text()
    assert "Untrained control" in untrained_page
    run_page = (results / "reports" / run_id / "report" / "report.html").read_text()
    assert "SAE features, untrained models (control)" in run_page and "SAE features, weight-shuffled models (control)" in run_page


@pytest.mark.slow
def test_features_from_another_folder_finds_the_stage_folders(control_run, tmp_path, monkeypatch):
    results, _, run_id = control_run
    monkeypatch.chdir(tmp_path)  # not where the run was started: recorded stage paths must not depend on it
    shown = CliRunner().invoke(main, ["features", run_id, "0", "3", "--results-dir", str(results)])
    assert shown.exit_code == 0, shown.output
    assert "seed0 feature 3" in shown.output
    client = store.open_client(results, None, read_only=True)
    seed0 = client.search_runs([client.get_run(run_id).info.experiment_id],
                               filter_string=f"tags.`mlflow.parentRunId` = '{run_id}' and tags.`univ.seed` = '0' "
                                             f"and tags.`{names.KIND}` = 'seed'")[0]
    recorded = [seed0.data.tags[f"univ.{k}_dir"] for k in ("model", "sae", "activations")]
    assert all(os.path.isabs(path) for path in [*recorded, client.get_run(run_id).data.tags["univ.data_dir"]])
    for key in ("model", "sae", "activations"):  # a run recorded by an older univ: paths relative to its start folder
        client.set_tag(seed0.info.run_id, f"univ.{key}_dir", str(Path("results", *Path(seed0.data.tags[f"univ.{key}_dir"]).parts[-3:])))
    data_dir = Path(client.get_run(run_id).data.tags["univ.data_dir"])
    client.set_tag(run_id, "univ.data_dir", str(Path("results", *data_dir.parts[-3:])))
    again = CliRunner().invoke(main, ["features", run_id, "0", "3", "--results-dir", str(results)])
    assert again.exit_code == 0 and again.output == shown.output, again.output
