"""MLflow tracking: run structure on the embedded store and on a real tracking server, batching,
fail-fast on an unreachable server, FAILED / KILLED statuses."""

from __future__ import annotations

import ast
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from universality.tracking import lookups, names, reruns, store
from universality.tracking.tracker import Tracker, tracked_run
from universality.cli import main
from universality.core.config import DEFAULT_EXPERIMENT, load_preset

REPORT_FILES = {"report/universality.png", "report/density_vs_corr.png", "report/logit_vs_activation.png",
                "report/top_block.png", "report/report.html"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def univ_runs(client: MlflowClient) -> dict[str, list]:
    """Runs of the univ experiment by their univ.kind tag, newest first."""
    exp = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    by_kind: dict[str, list] = {}
    for run in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"]):
        by_kind.setdefault(run.data.tags[names.KIND], []).append(run)
    return by_kind


def check_run_structure(client: MlflowClient) -> None:
    runs = univ_runs(client)
    parent = runs["experiment"][0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["seeds"] == "0,1" and parent.data.params["sae.dict_size"] == "256"
    assert {"version.torch", "version.mlflow", "corpus.fingerprint"} <= set(parent.data.params)
    assert parent.data.metrics["tracking/seconds"] > 0
    digest = parent.inputs.dataset_inputs[0].dataset.digest
    assert parent.data.params["corpus.fingerprint"].startswith(digest)
    assert {"report/report.html", "report/universality.png", names.TABLES["matched"]} <= artifacts(client, parent.info.run_id)

    children = {r.info.run_name: r for kind in ("seed", "pair") for r in runs[kind]
                if r.data.tags["mlflow.parentRunId"] == parent.info.run_id}
    assert set(children) == {"seed0", "seed1", "seed0-vs-seed1"}
    seed = children["seed0"].info.run_id
    assert len(client.get_metric_history(seed, "transformer/eval_loss")) >= 3
    assert len(client.get_metric_history(seed, "sae/mse")) >= 10
    assert [m.step for m in client.get_metric_history(seed, "sae/n_resampled")] == [8, 16]
    assert 0 < client.get_run(seed).data.metrics["sae_eval/fvu"] < 1
    seed_metrics = client.get_run(seed).data.metrics
    for share in ("token_share/features_median", "token_share/neurons_median", "position_share/features_median"):
        assert 0 <= seed_metrics[share] <= 1, share  # each SAE's run: its features' and its model's neurons' shares
    per_seed = [client.get_run(children[n].info.run_id).data.metrics["token_share/features_median"] for n in ("seed0", "seed1")]
    assert parent.data.metrics["token_share/features_median_mean"] == pytest.approx(np.mean(per_seed))  # the mean over seeds
    assert {"model/model.safetensors", "model/config.json", "tokenizer/tokenizer.json", "sae/cfg.json",
            "sae/sae_weights.safetensors", "figures/density_histogram.png"} <= artifacts(client, seed)
    pair = children["seed0-vs-seed1"]
    matched, _ = lookups.load_tables(client, parent.info.run_id)
    forward = matched[(matched.seed_a == 0) & (matched.seed_b == 1) & (matched.sae_a == 0) & (matched.sae_b == 0)]
    logged = pair.data.metrics["Universality/features_median_max_corr"]
    assert logged == pytest.approx(forward["corr"].median(), abs=1e-6)  # the median over the table's partners
    assert parent.data.metrics["Universality/features_median_max_corr"] == pytest.approx(logged)  # one pair's mean
    assert REPORT_FILES <= artifacts(client, pair.info.run_id)
    context = forward["corr_context"].fillna(0.0)[forward.feature_b >= 0]  # the table's contextual max partners
    assert 0 <= pair.data.metrics["Universality/features_contextual_median_max_corr"] <= 1
    assert pair.data.metrics["Universality/features_contextual_median_max_corr"] <= context.max()
    assert {"token_lookup/features_max_corr_median", "by_token_share/features_share_lt_050_contextual_max_corr_median",
            "Universality/neurons_contextual_median_max_corr"} <= set(pair.data.metrics)
    check_metric_sections(client, parent, pair, ceiling="replicate-pair" in runs)


HEADLINE_BASES = {f"Universality/{basis}_median_max_corr" for basis in
                  ("features", "neurons", "rotated_neurons", "features_contextual", "neurons_contextual")}


def check_metric_sections(client: MlflowClient, parent, pair, ceiling: bool) -> None:
    """MLflow charts a run's metrics in sections named by the prefix before a "/": every metric has one;
    the headline section sorts first and holds the few answers (the parent's are means over its pairs);
    per-decile statistics are a table, not metrics."""
    expected = {parent.info.run_id: HEADLINE_BASES | ({"Universality/ceiling_features_median_max_corr",
                                                      "Universality/features_over_ceiling"} if ceiling else set()),
                pair.info.run_id: HEADLINE_BASES}
    for run_id, headline in expected.items():
        logged = set(client.get_run(run_id).data.metrics)  # not ``names``: that is the module
        assert all("/" in name for name in logged)
        assert sorted(logged)[0].startswith("Universality/") and {n for n in logged if n.startswith("Universality/")} == headline
        assert not [n for n in logged if "decile" in n]
        assert names.DECILES in artifacts(client, run_id)
    assert parent.data.metrics["Universality/features_median_max_corr"] == pair.data.metrics["Universality/features_median_max_corr"]


@pytest.mark.slow
def test_embedded_store_holds_parent_seed_and_pair_runs(tracked_tiny):
    results, output = tracked_tiny
    assert "tracking took" in output
    client = MlflowClient(store.embedded_uri(results))
    assert client.get_experiment_by_name("univ").tags["mlflow.experimentKind"] == "custom_model_development"
    check_run_structure(client)
    assert (results / "mlartifacts").is_dir()


@pytest.fixture()
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on a free loopback port with a SQLite backend in tmp_path."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mlflow server did not start") from None
                time.sleep(0.5)
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_tracking_server_run_and_export(tracked_tiny, mlflow_server, tmp_path):
    results, _ = tracked_tiny  # the stage cache is reused: only tracking runs again
    runner = CliRunner()
    out = runner.invoke(main, ["run", "--seeds", "2", "--preset", "tiny", "--results-dir", str(results),
                               "--tracking-uri", mlflow_server])
    assert out.exit_code == 0, out.output
    check_run_structure(MlflowClient(mlflow_server))
    exported = runner.invoke(main, ["export", "--tracking-uri", mlflow_server, "--format", "parquet",
                                    "--out", str(tmp_path / "m.parquet")])
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "m.families.parquet").exists()


def test_unreachable_server_fails_fast_before_training(tmp_path):
    out = CliRunner().invoke(main, ["run", "--preset", "tiny", "--results-dir", str(tmp_path / "r"),
                                    "--tracking-uri", f"http://127.0.0.1:{free_port()}"])
    assert out.exit_code == 1
    assert "unreachable" in out.output and len(out.output.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "cache").exists()


def test_interrupted_runs_are_closed_and_reruns_make_new_parents(tmp_path):
    cfg = load_preset("tiny")
    children = {}
    for error, status in ((RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")):
        with pytest.raises(type(error)):
            with tracked_run(tmp_path, None, "univ", cfg, [0, 1]) as tracker:
                children[status] = tracker.child("seed0", "seed")
                raise error
    with tracked_run(tmp_path, None, "univ", cfg, [0, 1]):
        pass
    client = MlflowClient(store.embedded_uri(tmp_path))
    assert {status: client.get_run(run_id).info.status for status, run_id in children.items()} == {
        "FAILED": "FAILED", "KILLED": "KILLED"}
    assert [p.info.status for p in univ_runs(client)["experiment"]] == ["FINISHED", "KILLED", "FAILED"]


class RecordingClient:
    def __init__(self):
        self.batches = []

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self.batches.append((len(metrics), len(params), len(tags)))


def test_logging_is_batched_within_mlflow_limits():
    client = RecordingClient()
    tracker = Tracker(client, "0", "run", Path("."))
    metrics = names.metrics_from({f"m{i}": i for i in range(2500)})
    tracker.log("run", metrics, params={f"p{i}": i for i in range(150)}, tags={"t": "x"})
    assert client.batches == [(1000, 100, 1), (1000, 0, 0), (500, 0, 0), (0, 50, 0)]


def test_metric_names_are_sanitized_and_non_scalars_skipped():
    assert names.metric_name("features.frac_above_0.5 (x)=1") == "thresholds/features_frac_above_0.5 _x__1"
    logged = names.metrics_from({"a": 1, "b": [1, 2], "c": {"x": 1}, "d": float("nan"), "e": True})
    assert [m.key for m in logged] == ["other/a", "other/d"]


def test_metric_names_put_the_answer_first_and_every_statistic_in_a_section():
    expected = {
        "features.max_corr_median_mean": "Universality/features_median_max_corr",  # the mean over pairs
        "contextual.features.max_corr_median_mean": "Universality/features_contextual_median_max_corr",
        "contextual.neurons.max_corr_median": "Universality/neurons_contextual_median_max_corr",
        "contextual.rotation.max_corr_median": "contextual/rotation_max_corr_median",
        "ceiling.contextual.features.max_corr_median_mean": "ceiling/contextual_features_max_corr_median_mean",
        "untrained.contextual.features.max_corr_median": "untrained/contextual_features_max_corr_median",
        "token_lookup.features.max_corr_median_mean": "token_lookup/features_max_corr_median_mean",
        "by_token_share.features.share_ge_080.raw.max_corr_median": "by_token_share/features_share_ge_080_raw_max_corr_median",
        "gap.contextual.untrained": "gap/contextual_untrained",
        "token_share.features_median": "token_share/features_median",
        "features.max_corr_median": "Universality/features_median_max_corr",  # one pair's
        "rotation.max_corr_median_mean": "Universality/rotated_neurons_median_max_corr",
        "randomized.features.max_corr_median": "Universality/randomized_features_median_max_corr",
        "ceiling.features.max_corr_median_mean": "Universality/ceiling_features_median_max_corr",
        "ceiling_ratio.features.max_corr_median": "Universality/features_over_ceiling",
        "features.max_corr_median_ci_low": "features/max_corr_median_ci_low",
        "randomized.neurons.max_corr_mean": "randomized/neurons_max_corr_mean",
        "ceiling.decoder.cos_hungarian_median_mean": "ceiling/decoder_cos_hungarian_median_mean",
        "ceiling_ratio.features.max_corr_mean": "ceiling/ceiling_ratio_features_max_corr_mean",
        "features.frac_above_0.5_mean": "thresholds/features_frac_above_0.5_mean",
        "ceiling.decoder.frac_shared_above_0.7_std": "thresholds/ceiling_decoder_frac_shared_above_0.7_std",
        "neurons.n_dead_a": "counts/neurons_n_dead_a",
        "families.n_multi_run": "families/n_multi_run",
        "seed0.frac_features_partnered_all_runs": "families/seed0_frac_features_partnered_all_runs",
        "cka_mean": "similarity/cka_mean",
        "randomized.svcca": "similarity/randomized_svcca",
        "tracking.seconds": "tracking/seconds",
        "transformer/eval_loss": "transformer/eval_loss",  # already named
    }
    assert {key: names.metric_name(key) for key in expected} == expected
    headline = {names.metric_name(k) for k in names.HEADLINE_NAMES}
    assert len(headline) <= 8  # a small first section: what the answer is, raw and given the token
    values = {"features.decile3_max_corr_median_mean": 0.25, "features.decile0_max_corr_median_mean": 0.125,
              "randomized.neurons.decile0_n": 7, "neurons.n_dead_a": 2, "features.max_corr_median_mean": 0.5}
    assert [m.key for m in names.metrics_from(values)] == ["Universality/features_median_max_corr", "counts/neurons_n_dead_a"]
    table = names.decile_table(values)
    assert table.to_dict("records") == [
        {"statistic": "features.max_corr_median_mean", "decile0": 0.125, "decile3": 0.25},
        {"statistic": "randomized.neurons.n", "decile0": 7.0, "decile3": pytest.approx(float("nan"), nan_ok=True)}]


def loaded_by(args: list[str]) -> list[str]:
    """Which of torch and MLflow ``univ ARGS`` imports, run in a fresh interpreter."""
    probe = ("import atexit, sys; atexit.register(lambda: print('loaded:', sorted({'torch', 'mlflow'} & set(sys.modules))));"
             "from universality.cli import main; main(sys.argv[1:])")
    done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return ast.literal_eval(done.stdout.rsplit("loaded:", 1)[1].strip())


@pytest.mark.slow
def test_a_cached_rerun_answers_with_its_run_and_without_its_record_links_to_it(tmp_path):
    args = ["run", "--seeds", "2", "--preset", "tiny", "--sae-replicates", "0", "--results-dir", str(tmp_path / "r")]
    runner = CliRunner()
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    client = MlflowClient(store.embedded_uri(tmp_path / "r"))
    [original] = univ_runs(client)["experiment"]
    summary = lambda output: output.split("MLflow run")[0]  # noqa: E731  (the terminal summary before the run line)
    again = runner.invoke(main, args)  # the same command: its run is the answer, nothing is run or logged
    assert again.exit_code == 0 and f"MLflow run {original.info.run_id}" in again.output, again.output
    assert "finished before" in again.output and summary(first.output).endswith(summary(again.output))  # less its progress
    assert [r.info.run_id for r in univ_runs(client)["experiment"]] == [original.info.run_id]
    assert loaded_by(args) == []  # answered without torch or MLflow

    shutil.rmtree(tmp_path / "r" / reruns.COMMANDS)  # no record (as after an edit of the code): the cache is read
    again = runner.invoke(main, args)
    assert again.exit_code == 0 and f"a re-run of {original.info.run_id}" in again.output, again.output
    rerun = univ_runs(client)["experiment"][0]
    assert rerun.info.status == "FINISHED" and rerun.data.tags[names.SAME_AS] == original.info.run_id
    assert not client.search_runs([rerun.info.experiment_id], f"tags.`mlflow.parentRunId` = '{rerun.info.run_id}'")
    assert artifacts(client, rerun.info.run_id) == {names.DECILES}  # its statistics by density decile; no report, no table
    statistics = lambda run: {k: v for k, v in run.data.metrics.items() if k != "tracking/seconds"}  # noqa: E731
    assert statistics(rerun) == statistics(original) and statistics(rerun)
    assert lookups.find_run(client, "latest").info.run_id == original.info.run_id  # what export, features, steer read
    assert lookups.find_run(client, rerun.info.run_id).info.run_id == original.info.run_id
    assert f"MLflow run {original.info.run_id}" in runner.invoke(main, args).output  # recorded again: the original

    client.delete_run(original.info.run_id)  # deleted in the UI: no answer, and logged in full again
    again = runner.invoke(main, args)
    assert again.exit_code == 0 and "finished before" not in again.output and "a re-run" not in again.output
    assert names.TABLES["matched"] in artifacts(client, univ_runs(client)["experiment"][0].info.run_id)

    settings = tmp_path / "fewer_bootstraps.toml"
    settings.write_text("[compare]\nn_bootstrap = 50\n")  # a reporting setting: every stage cached, the summary not
    changed = runner.invoke(main, [*args, "--config", str(settings)])
    assert changed.exit_code == 0 and "a re-run" not in changed.output, changed.output
    newest = univ_runs(client)["experiment"][0]
    assert names.SAME_AS not in newest.data.tags and names.TABLES["matched"] in artifacts(client, newest.info.run_id)
