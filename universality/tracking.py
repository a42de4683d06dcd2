"""MLflow tracking of a ``univ run``: one parent run, a child per seed and per pair of seeds.

The store is embedded by default: SQLite at ``<results>/mlflow.db`` with artifacts in
``<results>/mlartifacts``; ``--tracking-uri`` (or ``MLFLOW_TRACKING_URI``) points at a server
instead. ``tracked_run`` checks the store and creates the parent run *before* any training (an
unreachable server fails fast), the pipeline runs, then ``Tracker.log_result`` logs everything
in batches (one ``log_batch`` per 1000 metrics, never one call per step). An exception marks
the open runs FAILED, Ctrl-C marks them KILLED; every ``univ run`` makes a new parent run.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import os
import re
import sqlite3
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking.registry import UnsupportedModelRegistryStoreURIException
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID

from universality import by_size, export, reports, split_report, splitting
from universality.config import ExperimentConfig
from universality.errors import UnivError, first_line
from universality.feature_cards import RunSources, load_run_sources, vocab_strings
from universality.run_names import size_of

KIND = "univ.kind"  # tag on every run univ makes: experiment | seed | sae-replicate | control-model | pair | replicate-pair | randomized-pair | steer (univ steer --log)
METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
PARAMS_PER_BATCH = 100
TABLES = {"matched": "tables/matched_features.parquet", "families": "tables/matched_features.families.parquet"}
HEALTH_TIMEOUT_S = 5
logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines (creating the SQLite tables) are not univ's output
DECILES = "tables/deciles.json"  # a parent's and each pair's statistics by feature-density decile


def embedded_uri(results_dir: Path) -> str:
    return f"sqlite:///{Path(results_dir).resolve() / 'mlflow.db'}"


def resolve_uri(results_dir: Path, tracking_uri: str | None) -> str:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else the embedded store of ``results_dir``."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or embedded_uri(results_dir)


def check_store(uri: str, results_dir: Path, read_only: bool = False) -> None:
    """Fail fast, in one line, when the store cannot be used: a tracking server that does not answer, an
    SQLite file that cannot be opened (MLflow would retry for minutes), or, for a read-only command, an
    embedded store that does not exist (a mistyped ``--results-dir`` then creates nothing)."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=HEALTH_TIMEOUT_S) as response:
                response.read()
        except (urllib.error.URLError, OSError) as exc:
            raise UnivError(f"MLflow tracking server {uri} is unreachable ({getattr(exc, 'reason', exc)})") from None
    elif uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if read_only and uri == embedded_uri(results_dir) and not path.is_file():
            raise UnivError(f"no results at {results_dir}")
        check_sqlite(path, write=not read_only)


def check_sqlite(path: Path, write: bool) -> None:
    """Open the SQLite file once (creating it and its folder when ``write``), and when ``write`` take and
    roll back a write lock with a no-op write, so an unwritable store is an error now, not after training."""
    try:
        if write:
            path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(path if write else f"{path.resolve().as_uri()}?mode=ro",
                                                uri=not write, isolation_level=None)) as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if write:
                db.execute("BEGIN IMMEDIATE")
                db.execute(f"PRAGMA user_version = {int(version)}")
                db.execute("ROLLBACK")
    except (OSError, sqlite3.Error) as exc:
        raise UnivError(f"cannot {'write' if write else 'read'} the MLflow store {path} ({exc})") from None


def open_client(results_dir: Path, tracking_uri: str | None, read_only: bool = False) -> MlflowClient:
    """A client of the tracking store (see ``resolve_uri``), checked to work; ``read_only``: for commands
    that only read results, which must then exist."""
    uri = resolve_uri(results_dir, tracking_uri)
    check_store(uri, results_dir, read_only)
    try:
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # opens the store now: a bad URI fails here, in one line
    except UnsupportedModelRegistryStoreURIException:
        raise UnivError(f"unsupported MLflow tracking URI {uri!r} (expected http(s)://HOST:PORT, sqlite:///PATH "
                        "or another store MLflow knows)") from None
    except (MlflowException, ImportError) as exc:
        raise UnivError(f"cannot use the MLflow tracking store {uri}: {first_line(exc)}") from None
    return client


def experiment_id(client: MlflowClient, name: str, results_dir: Path) -> str:
    """The experiment's id, creating it on first use (kind: model development; artifacts beside an embedded store)."""
    existing = client.get_experiment_by_name(name)
    if existing is not None and existing.lifecycle_stage == "deleted":
        raise UnivError(f"MLflow experiment {name!r} is deleted: restore it (mlflow experiments restore "
                        f"--experiment-id {existing.experiment_id}) or choose another with --experiment")
    if existing is not None:
        return existing.experiment_id
    embedded = client.tracking_uri == embedded_uri(results_dir)
    location = (Path(results_dir).resolve() / "mlartifacts").as_uri() if embedded else None
    return client.create_experiment(name, artifact_location=location,
                                    tags={"mlflow.experimentKind": "custom_model_development"})


def ui_url(server: str, experiment_id: str) -> str:
    """The experiment's runs table in the MLflow UI served at ``server``. MLflow 3's UI opens in its GenAI
    mode (traces, evaluations) whatever the experiment's kind; the query selects model training."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


# MLflow's UI groups a run's charts into sections by the name's prefix before a "/", in code-point
# order: the capitalized headline section comes before every lowercase one.
HEADLINE = "Universality"
HEADLINE_NAMES = {  # internal key -> its name in the headline section
    **{f"{basis}.max_corr_median{over_pairs}": f"{HEADLINE}/{name}_median_max_corr"
       for basis, name in (("features", "features"), ("neurons", "neurons"), ("rotation", "rotated_neurons"))
       for over_pairs in ("", "_mean")},  # a pair's statistic; on the parent, its mean over pairs
    "randomized.features.max_corr_median": f"{HEADLINE}/randomized_features_median_max_corr",
    "ceiling.features.max_corr_median_mean": f"{HEADLINE}/ceiling_features_median_max_corr",
    "ceiling_ratio.features.max_corr_median": f"{HEADLINE}/features_over_ceiling",
}
SECTION_RULES = (  # (pattern in an internal key, its section); the first match wins, else the key's first part
    (re.compile(r"^own_neurons\."), "own_neurons"),  # features vs their own model's neurons, thresholds and counts too
    (re.compile(r"^splits\."), "splits"),  # feature splitting between dictionary sizes, its counts too
    (re.compile(r"^families\.|frac_features_partnered"), "families"),
    (re.compile(r"(^|\.)frac_(\w+_)?above_"), "thresholds"),
    (re.compile(r"(^|\.)n_"), "counts"),
    (re.compile(r"(^|\.)(cka|svcca)"), "similarity"),
    (re.compile(r"^ceiling_ratio\."), "ceiling"),
)
SIZE_SECTION = re.compile(r"^(size\d+)\.")  # a dictionary family's other sizes: a section per size ("size512/...")
DECILE = re.compile(r"(^|\.)decile(\d+)_")  # per-density-decile statistics: logged as a table, not as metrics
_NAME_DOT = re.compile(r"(?<!\d)\.|\.(?!\d)")  # dots between names, not decimal points ("frac_above_0.5")
_BAD_METRIC_CHARS = re.compile(r"[^A-Za-z0-9_\-./ ]")


def metric_name(key: str) -> str:
    """The MLflow name of an internal key (a dotted statistic such as ``features.max_corr_mean_mean``):
    ``section/name``. The headline numbers get a small first section of their own; the rest go by
    what they are (thresholds, counts, similarity, families) or by basis or scope (features, neurons,
    rotation, randomized, ceiling, decoder); another dictionary size's statistics go to that size's section
    (``size512.features.max_corr_median_mean`` -> ``size512/features_max_corr_median_mean``). A key with a "/" is
    already named. MLflow allows letters,
    digits, ``_-./`` and spaces; anything else becomes ``_``."""
    sized = SIZE_SECTION.match(key)
    if sized:
        key = f"{sized.group(1)}/{_NAME_DOT.sub('_', key[sized.end():])}"
    if "/" not in key:
        section = next((s for pattern, s in SECTION_RULES if pattern.search(key)), key.split(".")[0] if "." in key else "other")
        name = key.removeprefix(f"{section}.")
        key = HEADLINE_NAMES.get(key, f"{section}/{_NAME_DOT.sub('_', name)}")
    return _BAD_METRIC_CHARS.sub("_", key)


def metrics_from(values: Mapping[str, float], prefix: str = "", step: int = 0) -> list[Metric]:
    """Scalar entries of ``values`` as Metrics sorted by name, the headline first (lists, dicts, strings
    and per-decile statistics are left out)."""
    now = int(time.time() * 1000)
    metrics = [Metric(metric_name(prefix + k), float(v), now, step) for k, v in values.items()
               if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and not DECILE.search(k)]
    return sorted(metrics, key=lambda m: m.key)


def decile_table(values: Mapping[str, float]) -> pd.DataFrame:
    """The per-density-decile statistics among ``values`` as a table: a row per statistic (its key without
    the decile), a column per decile (``decile0`` ... ``decile9``)."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in values.items():
        found = DECILE.search(key)
        if found:
            statistic = key[: found.start()] + found.group(1) + key[found.end() :]
            rows.setdefault(statistic, {})[f"decile{found.group(2)}"] = float(value)
    table = pd.DataFrame.from_dict(rows, orient="index")
    return table[sorted(table.columns, key=lambda c: int(c.removeprefix("decile")))].rename_axis("statistic").reset_index()


def curves(history: Sequence[Mapping[str, float]], prefix: str, extra: Mapping[str, float] | None = None) -> list[Metric]:
    """Every numeric field of every history row at that row's ``step`` (plus constant ``extra`` lines)."""
    return [m for row in history
            for m in metrics_from({**{k: v for k, v in row.items() if k != "step"}, **(extra or {})}, prefix, int(row["step"]))]


def package_versions() -> dict[str, str]:
    return {f"version.{name}": version(dist) for name, dist in
            (("torch", "torch"), ("numpy", "numpy"), ("mlflow", "mlflow"), ("univ", "univ"))}


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@dataclass
class Tracker:
    """The open parent run of one ``univ run`` and the child runs made under it."""

    client: MlflowClient
    experiment_id: str
    run_id: str
    results_dir: Path
    seconds: float = 0.0  # wall time spent tracking: creating runs, logging, writing reports
    open_runs: list[str] = field(default_factory=list)

    def log(self, run_id: str, metrics: Iterable[Metric] = (), params: Mapping[str, object] | None = None,
            tags: Mapping[str, str] | None = None) -> None:
        """Everything in as few ``log_batch`` calls as MLflow's limits allow."""
        metrics = list(metrics)
        param_list = [Param(k, str(v)) for k, v in (params or {}).items()]
        tag_list = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        self.client.log_batch(run_id, metrics=metrics[:METRICS_PER_BATCH], params=param_list[:PARAMS_PER_BATCH], tags=tag_list)
        for start in range(METRICS_PER_BATCH, len(metrics), METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=metrics[start : start + METRICS_PER_BATCH])
        for start in range(PARAMS_PER_BATCH, len(param_list), PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=param_list[start : start + PARAMS_PER_BATCH])

    def child(self, name: str, kind: str, tags: Mapping[str, str] | None = None) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={MLFLOW_PARENT_RUN_ID: self.run_id, KIND: kind, **(tags or {})})
        self.open_runs.append(run.info.run_id)
        return run.info.run_id

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)
        self.open_runs.remove(run_id)

    def finish_all(self, status: str) -> None:
        """Close every open run, children first, so none is left RUNNING."""
        for run_id in reversed(list(self.open_runs)):
            self.finish(run_id, status)

    def log_result(self, result) -> None:
        """Child runs, reports and tables of a finished ``pipeline.RunResult``; aggregates on the parent."""
        start = time.perf_counter()
        folder = self.results_dir / "reports" / self.run_id
        sources = export.run_sources(result)
        own = {name: sae.own_neurons for name, sae in result.saes.items()}
        matched, families = export.matched_table(result.pairs, sources, result.replicate_pairs, own_neurons=own)
        for name in result.models:
            self._log_model_run(result, name, folder / "runs" / name)
        control = [(result.randomized, "randomized-pair")] if result.randomized is not None else []
        for pair, kind in [*((p, "pair") for p in result.pairs), *((p, "replicate-pair") for p in result.replicate_pairs),
                           *control]:
            self._log_pair(pair, kind, reports.write_pair_report(pair, matched, sources, folder / "pairs" / _pair_name(pair)))
        self._log_other_sizes(result, folder / "pairs")
        self._log_tables(matched, families, folder / "tables")
        sizes_html = self._log_size_table(result, folder) if len(result.cfg.sae.sizes) > 1 else ""
        sizes_html += self._log_splits(result, folder) if result.splits else ""
        if result.pairs:
            self.client.log_artifacts(self.run_id, str(reports.write_run_report(
                result.pairs, result.replicate_pairs, result.randomized, result.summary, matched, sources,
                {name: sae.metrics for name, sae in result.saes.items()}, folder / "report", own_neurons=own,
                n_neurons=result.cfg.model.d_mlp, by_size=sizes_html)), "report")
        dataset = result.dataset
        _log_dataset(self.client, self.run_id, dataset.corpus_source, dataset.corpus_fingerprint)
        self._log_statistics(self.run_id, result.summary,
                             params={"corpus.source": dataset.corpus_source, "corpus.fingerprint": dataset.corpus_fingerprint},
                             tags={"univ.data_dir": str(dataset.directory.resolve())})  # absolute: usable from any folder
        self.seconds += time.perf_counter() - start
        self.log(self.run_id, metrics_from({"tracking.seconds": self.seconds}))

    def _log_statistics(self, run_id: str, values: Mapping[str, float], **extra) -> None:
        """Statistics under their MLflow names (``metric_name``); the per-decile ones as the table ``DECILES``."""
        self.log(run_id, metrics_from(values), **extra)
        deciles = decile_table(values)
        if len(deciles):
            self.client.log_table(run_id, deciles, DECILES)

    def _log_model_run(self, result, name: str, folder: Path) -> None:
        model, sae = result.models[name], result.saes[name]
        size = size_of(name)
        kind = ("sae-replicate" if sae.replicate else "sae-size" if size else "seed" if name.startswith("seed")
                else "control-model")
        trained = not sae.replicate and not size  # other SAEs share the seed run's model: log only the SAE
        run_id = self.child(name, kind, {"univ.run_name": name, "univ.seed": str(model.seed),
                                         "univ.dict_size": str(size or result.cfg.sae.dict_size),
                                         "univ.model_dir": str(model.directory.resolve()),
                                         "univ.sae_dir": str(sae.directory.resolve()),
                                         "univ.activations_dir": str(result.activations[name].directory.resolve())})
        sae_final = {k: v for k, v in sae.metrics.items() if k not in ("densities", "log10_density_hist")}
        transformer = [*curves(model.history, "transformer/", model.metrics and
                                 {k: model.metrics[k] for k in ("unigram_ce", "bigram_ce")}),
                       *metrics_from(model.metrics, "transformer/final_")] if trained else []
        self.log(run_id, [*transformer,
                          *curves(sae.history, "sae/"),
                          *[m for e in sae.resampling_events for m in metrics_from({"n_resampled": e["n_resampled"]}, "sae/", e["step"])],
                          *metrics_from(sae_final, "sae_eval/"),
                          *metrics_from(sae.own_neurons.stats, "own_neurons/")],
                 params={"seed": model.seed, "model_key": model.key, "sae_key": sae.key, "sae_replicate": sae.replicate})
        folder.mkdir(parents=True, exist_ok=True)
        for figure in reports.drawn_once(sae.evaluation, lambda: [reports.density_histogram(sae.metrics["log10_density_hist"], name)]):
            reports.write_figure(figure, folder)
        self.client.log_artifacts(run_id, str(folder), "figures")
        if trained:
            for file in ("model.safetensors", "config.json"):
                self.client.log_artifact(run_id, str(model.directory / file), "model")
            self.client.log_artifact(run_id, str(result.dataset.tokenizer_path), "tokenizer")
        for file in ("cfg.json", "sae_weights.safetensors"):
            self.client.log_artifact(run_id, str(sae.directory / file), "sae")
        self.finish(run_id)

    def _log_other_sizes(self, result, folder: Path) -> None:
        """The pairs of a dictionary family's other sizes (not the primary): statistics and figures, tagged with
        their size (their features are in no matched table: no feature cards)."""
        for size in result.cfg.sae.sizes:
            if size == result.cfg.sae.dict_size:
                continue
            for pair, kind in [*((p, "pair") for p in result.size_pairs[size]),
                               *((p, "replicate-pair") for p in result.size_replicate_pairs[size])]:
                pair_folder = folder / _pair_name(pair)
                pair_folder.mkdir(parents=True, exist_ok=True)
                for figure in reports.pair_figures(pair):
                    reports.write_figure(figure, pair_folder)
                self._log_pair(pair, kind, pair_folder, {"univ.dict_size": str(size)})

    def _log_size_table(self, result, folder: Path) -> str:
        """A dictionary family's universality by size: the table in ``tables/`` and the figure in ``report/`` of the
        parent run; returns the run report's section."""
        table = by_size.size_table(result)
        figure = by_size.size_figure(table)
        self._log_table_and_figure(table, by_size.TABLE_FILE, figure, folder)
        return by_size.size_section(table, figure)

    def _log_table_and_figure(self, table: pd.DataFrame, name: str, figure: reports.Figure, folder: Path) -> None:
        """A table of the parent run as ``tables/<name>.parquet`` and ``.csv``, and a figure in ``report/``, written
        under ``folder`` and logged."""
        tables, report = folder / "tables", folder / "report"
        for path in (tables, report):
            path.mkdir(parents=True, exist_ok=True)
        for fmt in ("parquet", "csv"):
            export.write_table(table, tables / f"{name}.{fmt}", fmt)
            self.client.log_artifact(self.run_id, str(tables / f"{name}.{fmt}"), "tables")
        self.client.log_artifact(self.run_id, str(reports.write_figure(figure, report)), "report")

    def _log_splits(self, result, folder: Path) -> str:
        """A dictionary family's feature splitting: every parent -> child edge in ``tables/``, the split trees of the
        first model's largest families in ``report/``; returns the run report's section."""
        table = splitting.splits_table(result.splits)
        model, levels = next(iter(result.splits.items()))
        figure = split_report.tree_figure(model, levels)
        self._log_table_and_figure(table, split_report.TABLE_FILE, figure, folder)
        return split_report.split_section(result.summary, [(level.size_a, level.size_b) for level in levels], figure)

    def _log_pair(self, pair, kind: str, folder: Path, tags: Mapping[str, str] | None = None) -> None:
        run_id = self.child(_pair_name(pair), kind, {"univ.run_a": pair.run_a, "univ.run_b": pair.run_b, **(tags or {})})
        self._log_statistics(run_id, pair.stats)
        self.client.log_artifacts(run_id, str(folder), "report")
        self.finish(run_id)

    def _log_tables(self, matched: pd.DataFrame, families: pd.DataFrame, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for fmt in ("parquet", "csv"):
            export.write_tables(matched, families, folder / f"matched_features.{fmt}", fmt)
        self.client.log_artifacts(self.run_id, str(folder), "tables")


def _pair_name(pair) -> str:
    return f"{pair.run_a}-vs-{pair.run_b}"


def _log_dataset(client: MlflowClient, run_id: str, source: str, fingerprint: str) -> None:
    """The corpus as an MLflow dataset input: its source and fingerprint (digest: MLflow keeps 36 chars)."""
    dataset = MetaDataset(CodeDatasetSource({"corpus": source}), name="corpus", digest=fingerprint[:32])
    client.log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", "training")])])


@contextlib.contextmanager
def tracked_run(results_dir: Path, tracking_uri: str | None, experiment: str, cfg: ExperimentConfig,
                seeds: Sequence[int], parent_run_id: str | None = None, run_name: str | None = None,
                tags: Mapping[str, str] | None = None) -> Iterator[Tracker]:
    """Open a univ run's parent run (failing fast if the store is unreachable); close every run on the way
    out. ``parent_run_id`` nests it under another run (a sweep's), ``tags`` are added to its own."""
    run_tags = {KIND: "experiment", "univ.preset": cfg.name, **(tags or {})}
    if parent_run_id is not None:
        run_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    params = {**cfg.flat(), "seeds": ",".join(map(str, seeds))}
    with _open_run(results_dir, tracking_uri, experiment, run_name or f"{cfg.name}-{len(seeds)}-seeds",
                   run_tags, params) as tracker:
        yield tracker


@contextlib.contextmanager
def tracked_sweep(results_dir: Path, tracking_uri: str | None, experiment: str, cfg: ExperimentConfig,
                  seeds: Sequence[int], params: Mapping[str, str]) -> Iterator[Tracker]:
    """Open a ``univ sweep``'s parent run (its grid points are ``tracked_run`` parents nested under it)."""
    tags = {KIND: "sweep", "univ.preset": cfg.name}
    with _open_run(results_dir, tracking_uri, experiment, f"sweep-{cfg.name}-{len(seeds)}-seeds", tags,
                   {"preset": cfg.name, "seeds": ",".join(map(str, seeds)), **params}) as tracker:
        yield tracker


@contextlib.contextmanager
def _open_run(results_dir: Path, tracking_uri: str | None, experiment: str, run_name: str,
              tags: Mapping[str, str], params: Mapping[str, object]) -> Iterator[Tracker]:
    """Create a univ parent run with ``tags`` and ``params`` (and the results folder, git revision and
    package versions); mark it and its open children FINISHED, FAILED or KILLED on the way out."""
    start = time.perf_counter()
    results_dir = Path(results_dir)
    client = open_client(results_dir, tracking_uri)
    exp = experiment_id(client, experiment, results_dir)
    tags = {"univ.results_dir": str(results_dir.resolve()), **tags}
    revision = git_revision()
    if revision:
        tags[MLFLOW_GIT_COMMIT] = revision
    run = client.create_run(exp, run_name=run_name, tags=tags)
    tracker = Tracker(client, exp, run.info.run_id, results_dir, open_runs=[run.info.run_id])
    tracker.log(tracker.run_id, params={**params, **package_versions()})
    tracker.seconds += time.perf_counter() - start
    try:
        yield tracker
    except KeyboardInterrupt:
        tracker.finish_all("KILLED")
        raise
    except BaseException:
        tracker.finish_all("FAILED")
        raise
    tracker.finish_all("FINISHED")


def find_run(client: MlflowClient, run: str, kinds: Sequence[str] = ("experiment",)):
    """A univ run of one of ``kinds`` by id, or ``latest``: the newest finished univ run (an
    ``experiment``, whatever ``kinds`` allows) in any experiment."""
    if run == "latest":
        ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(ids, filter_string=f"tags.`{KIND}` = 'experiment' and attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=1) if ids else []
        if not runs:
            raise UnivError(f"no finished univ run in {client.tracking_uri}")
        return runs[0]
    try:
        found = client.get_run(run)
    except MlflowException:
        raise UnivError(f"unknown run id {run!r} in {client.tracking_uri}") from None
    if found.data.tags.get(KIND) not in kinds:
        raise UnivError(f"run {run} is not a univ run of kind {' or '.join(kinds)} (its {KIND} tag is {found.data.tags.get(KIND)!r})")
    return found


def load_tables(client: MlflowClient, run_id: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The (matched features, families) tables logged on a univ parent run, downloaded from its artifacts."""
    with downloaded(client, run_id, TABLES, "matched feature tables") as paths:
        try:
            return (export.read_table(paths["matched"], "parquet", export.MATCHED_COLUMNS),
                    export.read_table(paths["families"], "parquet", export.FAMILY_COLUMNS))
        except KeyError as exc:  # a column this version names differently or added since
            raise UnivError(f"run {run_id}'s tables have no column {exc}: an older univ wrote them; run it again") from None


def load_splits(client: MlflowClient, run_id: str) -> pd.DataFrame | None:
    """The feature-splitting table of a dictionary-family run (``splitting.SPLIT_COLUMNS``); None for one size."""
    artifact = f"tables/{split_report.TABLE_FILE}.parquet"
    if artifact not in {a.path for a in client.list_artifacts(run_id, "tables")}:
        return None
    with downloaded(client, run_id, {"splits": artifact}, "feature-splitting table") as paths:
        return export.read_table(paths["splits"], "parquet", splitting.SPLIT_COLUMNS)


@contextlib.contextmanager
def downloaded(client: MlflowClient, run_id: str, artifacts: Mapping[str, str], what: str) -> Iterator[dict[str, str]]:
    """name -> local path of each of a run's ``artifacts`` (name -> artifact path), in a temporary folder
    removed on the way out; a missing one is a one-line error naming ``what``."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep the CLI's output to its own lines
    with tempfile.TemporaryDirectory() as tmp:
        try:
            paths = {name: client.download_artifacts(run_id, path, tmp) for name, path in artifacts.items()}
        except (MlflowException, OSError):
            raise UnivError(f"run {run_id} has no {what} (did it finish?)") from None
        yield paths


def stage_folder(recorded: str, results_dir: Path) -> Path:
    """A stage folder recorded on a run: absolute as univ records them, or, from an older run, a relative
    ``<results>/cache/<stage>/<key>`` (relative to where that run was started), found under ``results_dir``."""
    path = Path(recorded)
    return path if path.is_absolute() else Path(results_dir) / "cache" / path.parent.name / path.name


def seed_sources(client: MlflowClient, parent, seed: int, results_dir: Path, size: int | None = None) -> RunSources:
    """A seed's card sources, from the stage folders its child run recorded (they must be on this machine);
    ``size``: of its SAE of that dictionary size (a family run), default the primary one."""
    from universality.tokenization import load_tokenizer

    folders = seed_folders(client, parent, seed, results_dir, size)
    params = parent.data.params
    return load_run_sources(seed, *folders, int(params["data.ctx_len"]), int(params["compare.tokens"]),
                            int(params["compare.context_tokens"]), vocab_strings(load_tokenizer(folders[0] / "tokenizer.json")))


def run_sizes(parent) -> tuple[int, ...]:
    """The dictionary sizes of a univ run, ascending (one, the primary, unless it fitted a family)."""
    params = parent.data.params
    return tuple(ast.literal_eval(params.get("sae.dict_sizes", "()"))) or (int(params["sae.dict_size"]),)


def seed_folders(client: MlflowClient, parent, seed: int, results_dir: Path, size: int | None = None) -> list[Path]:
    """The data, model, SAE and activations stage folders of a univ run's seed, as its child run recorded them
    (they must be on this machine); ``size``: its SAE of that dictionary size, default the primary one."""
    parent_id = parent.info.run_id
    sized = "" if size is None else f" and tags.`univ.dict_size` = '{size}'"
    kinds = ("seed",) if size is None else ("seed", "sae-size")  # the primary size's SAE is the seed's own run
    children = [run for run in client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}' and tags.`univ.seed` = '{seed}'{sized}")
        if run.data.tags.get(KIND) in kinds]
    if not children:
        raise UnivError(f"run {parent_id} has no seed {seed} (its seeds: {parent.data.params.get('seeds')})")
    tags = children[0].data.tags
    data_dir = stage_folder(parent.data.tags["univ.data_dir"], results_dir)
    folders = [data_dir, *(stage_folder(tags[f"univ.{k}_dir"], results_dir) for k in ("model", "sae", "activations"))]
    missing = [f for f in folders if not f.is_dir()]
    if missing:
        raise UnivError(f"stage folder {missing[0]} of run {parent_id} is not on this machine")
    return folders
