"""``univ sweep``: grid specs parsed, coerced and validated before any work; a tiny 2 x 2 sweep with its
MLflow structure (sweep -> grid points -> seeds and pairs), summary table and figure, exports, and
transformers reused across SAE settings."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from fast_pipeline import fast_cfg
from universality.runtime import cache
from universality.core import grid
from universality import pipeline, sweep
from universality.stages import model as model_stage
from universality.tracking import names, store
from universality.cli import main
from universality.core.config import load_preset
from universality.core.errors import ConfigError


def test_parse_axis_coerces_values_to_the_field_type():
    assert grid.parse_axis("sae.samples=819200, 3276800").values == (819200, 3276800)
    assert grid.parse_axis("sae.lr=1e-3,3e-3").values == (1e-3, 3e-3)
    assert grid.parse_axis("sae.l1_coeff=1").values == (1.0,) and isinstance(grid.parse_axis("sae.l1_coeff=1").values[0], float)
    assert grid.parse_axis("compare.randomized_baseline=true,False").values == (True, False)
    assert grid.parse_axis("sae.arch=relu,topk").values == ("relu", "topk")
    axis = grid.parse_axis("sae.resample_fractions=[0.2,0.4],[0.5],[]")
    assert axis.values == ((0.2, 0.4), (0.5,), ()) and axis.name == "sae.resample_fractions"
    assert [grid.format_value(v) for v in axis.values] == ["[0.2,0.4]", "[0.5]", "[]"]
    assert axis.dtype == "string" and grid.parse_axis("sae.samples=1").dtype == "int64"


@pytest.mark.parametrize("spec, message", [
    ("sae.samples", "expected section.field=v1,v2"),
    ("samples=1", "expected section.field=v1,v2"),
    ("saes.samples=1", "unknown config section 'saes'"),
    ("sae.sampels=1", "unknown field 'sampels' in [sae]"),
    ("sae.samples=", "empty list of values"),
    ("sae.samples=1,,2", "empty value"),
    ("sae.samples=1.5", "expected an integer, not '1.5'"),
    ("sae.lr=fast", "expected a number, not 'fast'"),
    ("sae.lr=nan", "expected a finite number"),
    ("compare.randomized_baseline=maybe", "expected true or false"),
    ("sae.resample_fractions=0.2", "expected a bracketed list"),
    ("sae.resample_fractions=[0.2,0.4", "unbalanced '['"),
    ("sae.resample_fractions=[0.2,x]", "expected a number, not 'x'"),
    ("sae.dict_size=128,128", "a value is repeated"),
])
def test_bad_specs_are_one_line_config_errors(spec, message):
    with pytest.raises(ConfigError) as info:
        grid.parse_axis(spec)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_grid_points_are_the_validated_cartesian_product():
    base = load_preset("tiny")
    axes = grid.parse_grid(["sae.samples=20480,40960", "sae.dict_size=128,256,512"])
    points = grid.grid_points(base, axes)
    assert [(p.cfg.sae.samples, p.cfg.sae.dict_size) for p in points] == [
        (20480, 128), (20480, 256), (20480, 512), (40960, 128), (40960, 256), (40960, 512)]
    assert points[1].label == "sae.samples=20480 sae.dict_size=256"
    assert all(p.cfg.train == base.train and p.cfg.sae.lr == base.sae.lr for p in points)
    with pytest.raises(ConfigError, match="more than once"):
        grid.parse_grid(["sae.samples=1", "sae.samples=2"])
    with pytest.raises(ConfigError, match=r"^grid point sae.samples=100: sae.samples must be >= sae.batch_size$"):
        grid.grid_points(base, grid.parse_grid(["sae.samples=100,40960"]))


def _fake_result(summary: dict, sae_metrics: list[dict]):
    """The parts of a RunResult a summary row reads (no stage folders: no recorded build time)."""
    saes = {f"seed{i}": SimpleNamespace(metrics=m) for i, m in enumerate(sae_metrics)}
    return SimpleNamespace(summary=summary, saes=saes, stage_folders=())


def test_summary_rows_take_missing_statistics_as_nan_and_average_the_seeds():
    axes = grid.parse_grid(["sae.dict_size=128,256", "sae.arch=relu,topk"])
    points = grid.grid_points(load_preset("tiny"), axes)
    stats = ("features.max_corr_median_mean", "ceiling.features.max_corr_median_mean")
    rows = [sweep.summary_row(point, _fake_result({"features.max_corr_median_mean": 0.1 * i},
                                                  [{"dead_fraction": 0.1}, {"dead_fraction": 0.3, "convergence_corr_median": 0.9}]),
                              [0, 1], stats, wall_seconds=2.0, run_id=f"run{i}")
            for i, point in enumerate(points)]
    table = sweep.summary_table(axes, rows, stats)
    assert list(table.columns) == ["sae.dict_size", "sae.arch", *stats, "dead_fraction", "convergence_corr_median",
                                   "wall_seconds", "stage_seconds", "run_id"]
    assert table.dtypes["sae.dict_size"] == "int64" and table.dtypes["sae.arch"] == "string"
    assert table["features.max_corr_median_mean"].tolist() == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert table["ceiling.features.max_corr_median_mean"].isna().all()
    assert table["dead_fraction"].tolist() == pytest.approx([0.2] * 4)
    assert table["convergence_corr_median"].isna().all()  # absent for one seed: no mean
    figure = sweep.summary_figure(table, axes, stats)
    assert figure.name == "sweep.png" and figure.png.startswith(b"\x89PNG")
    assert sweep.summary_figure(table.iloc[:1], axes, stats).png.startswith(b"\x89PNG")  # drawn after the first point too
    text = sweep.format_table(table)
    assert "features.max_corr_median " in text and "run3" in text


def test_a_statistic_is_found_by_its_key_or_its_mlflow_name():
    summary = {"features.max_corr_median_mean": 0.4, "neurons.frac_above_0.5_mean": 0.3}
    assert sweep.summary_value(summary, "features.max_corr_median_mean") == 0.4
    assert sweep.summary_value(summary, names.metric_name("features.max_corr_median_mean")) == 0.4
    assert sweep.summary_value(summary, names.metric_name("neurons.frac_above_0.5_mean")) == 0.3
    assert np.isnan(sweep.summary_value(summary, "ceiling.features.max_corr_median_mean"))


def invoke(args: list[str]):
    return CliRunner().invoke(main, args)


@pytest.mark.parametrize("grid, code, message", [
    (["sae.sampels=1,2"], 2, "unknown field 'sampels' in [sae]"),
    (["sae.samples=abc"], 2, "expected an integer, not 'abc'"),
    (["sae.samples="], 2, "empty list of values"),
    (["sae.samples=20480", "sae.samples=40960"], 2, "given more than once"),
    (["sae.samples=20480,100"], 1, "Error: grid point sae.samples=100: sae.samples must be >= sae.batch_size"),
    (["sae.arch=relu,topk", "sae.k=8,512"], 1, "Error: grid point sae.arch=topk sae.k=512: sae.k must be in [1, sae.dict_size)"),
])
def test_cli_rejects_a_bad_grid_before_any_work(tmp_path, grid, code, message):
    results = tmp_path / "results"
    out = invoke(["sweep", "--preset", "tiny", "--results-dir", str(results), *(a for g in grid for a in ("--grid", g))])
    assert out.exit_code == code, out.output
    last = out.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and message in last and "Traceback" not in out.output
    assert not results.exists()  # no MLflow store, no cache: nothing was started


def test_cli_needs_a_grid(tmp_path):
    out = invoke(["sweep", "--preset", "tiny", "--results-dir", str(tmp_path / "r")])
    assert out.exit_code == 2 and "Missing option '--grid'" in out.output


@pytest.mark.slow
def test_tiny_sweep_nests_point_runs_reuses_transformers_and_exports(tmp_path, monkeypatch):
    config = tmp_path / "fast.json"
    config.write_text(json.dumps(fast_cfg().to_dict()))
    results = tmp_path / "results"
    real_run = pipeline.run

    def run_then_forbid_training(*args, **kwargs):
        """After the first grid point, training a transformer raises: later points must reuse the cache."""
        result = real_run(*args, **kwargs)
        monkeypatch.setattr(model_stage, "train_transformer", _no_training)
        return result

    monkeypatch.setattr(pipeline, "run", run_then_forbid_training)
    out = invoke(["sweep", "--config", str(config), "--seeds", "2", "--jobs", "1", "--device", "cpu",
                  "--results-dir", str(results), "--grid", "sae.samples=8192,16384", "--grid", "sae.dict_size=128,256"])
    assert out.exit_code == 0, out.output
    assert "[4/4] sae.samples=16384 sae.dict_size=256: features.max_corr_median" in out.output

    client = MlflowClient(store.embedded_uri(results))
    exp = client.get_experiment_by_name("univ").experiment_id
    runs = client.search_runs([exp])
    by_parent: dict[str, list] = {}
    for run in runs:
        by_parent.setdefault(run.data.tags.get(MLFLOW_PARENT_RUN_ID), []).append(run)
    [sweep_run] = by_parent[None]
    assert sweep_run.data.tags[names.KIND] == "sweep" and sweep_run.info.status == "FINISHED"
    assert sweep_run.data.params["grid.sae.samples"] == "8192,16384" and sweep_run.data.params["seeds"] == "0,1"
    assert f"MLflow sweep run {sweep_run.info.run_id}" in out.output
    points = by_parent[sweep_run.info.run_id]
    assert {p.data.tags[names.KIND] for p in points} == {"experiment"}
    assert sorted(p.data.tags["univ.grid_point"] for p in points) == [
        f"sae.samples={s} sae.dict_size={d}" for s in (16384, 8192) for d in (128, 256)]
    for point in points:
        assert point.data.params["sae.dict_size"] == point.data.tags["univ.grid.sae.dict_size"]
        children = {r.info.run_name for r in by_parent[point.info.run_id]}
        assert {"seed0", "seed1", "seed0-vs-seed1"} <= children

    folder = results / "reports" / sweep_run.info.run_id
    assert {"sweep_summary.parquet", "sweep_summary.csv", "sweep.png"} <= {p.name for p in folder.iterdir()}
    assert {f"summary/{name}" for name in ("sweep_summary.parquet", "sweep_summary.csv", "sweep.png")} <= {
        a.path for a in client.list_artifacts(sweep_run.info.run_id, "summary")}
    table = pd.read_parquet(folder / "sweep_summary.parquet")
    assert table[["sae.samples", "sae.dict_size"]].values.tolist() == [[8192, 128], [8192, 256], [16384, 128], [16384, 256]]
    assert set(table.run_id) == {p.info.run_id for p in points}
    assert table["features.max_corr_median_mean"].between(-1, 1).all()
    assert table["neurons.max_corr_median_mean"].between(-1, 1).all()
    assert table["dead_fraction"].between(0, 1).all() and (table["wall_seconds"] > 0).all()
    shared = sum(e.seconds for e in cache.entries(results) if e.stage in ("data", "model"))
    assert shared > 0 and (table["stage_seconds"] > shared).all()  # every point counts the transformers it shares

    exported = tmp_path / "sweep.csv"
    done = invoke(["export", sweep_run.info.run_id, "--format", "csv", "--out", str(exported), "--results-dir", str(results)])
    assert done.exit_code == 0, done.output
    pd.testing.assert_frame_equal(pd.read_csv(exported), pd.read_csv(folder / "sweep_summary.csv"))
    point_id = table.run_id.iloc[0]
    done = invoke(["export", point_id, "--format", "parquet", "--out", str(tmp_path / "m.parquet"), "--results-dir", str(results)])
    assert done.exit_code == 0, done.output
    matched = pd.read_parquet(tmp_path / "m.parquet")
    assert set(matched.seed_a) == {0, 1} and (tmp_path / "m.families.parquet").exists()
    card = invoke(["features", sweep_run.info.run_id, "0", "0", "--results-dir", str(results)])
    assert card.exit_code == 1 and "not a univ run of kind experiment (its univ.kind tag is 'sweep')" in card.output
    latest = invoke(["export", "latest", "--out", str(tmp_path / "l.csv"), "--results-dir", str(results)])
    assert latest.exit_code == 0 and table.run_id.iloc[-1] in latest.output  # latest: the last univ run, not the sweep


def _no_training(*args, **kwargs):
    raise AssertionError("a transformer was trained again: the sweep did not reuse the cached one")
