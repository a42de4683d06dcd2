"""MLflow tracking of a ``univ run``: one parent run, a child per run (seed, replicate SAE, other dictionary size,
control), per pair and per crosscoder.

``tracked_run`` checks the store and creates the parent run *before* any training (an unreachable server
fails fast), the pipeline runs, ``outputs.run_files`` writes the reports and tables, then
``Tracker.log_result`` logs the statistics and those files in batches (one ``log_batch`` per 1000 metrics,
never one call per step). An exception marks the open runs FAILED, Ctrl-C marks them KILLED; every
``univ run`` that runs the pipeline makes a new parent run (one answered by its record, ``tracking.reruns``,
makes none). Logging writes no file of its own (it never imports ``outputs``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

from mlflow import MlflowClient
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID

from universality.analysis.crosscoder import crosscoder_statistics
from universality.core.config import ExperimentConfig
from universality.core.run_names import is_control, pair_name, size_of
from universality.runtime import cache
from universality.tracking.names import DECILES, FINGERPRINT, KIND, SAME_AS, curves, decile_table, metrics_from
from universality.tracking.store import experiment_id, open_client

METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
PARAMS_PER_BATCH = 100


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


def fingerprint(result, results_dir: Path) -> str:
    """What a finished run logs depends on: every stage folder it read (their keys), its runs' names, the whole
    config (reporting settings too), the results folder and the code's versions. Two runs with the same
    fingerprint log the same statistics, reports and tables."""
    payload = {"stages": [cache.folder_name(f) for f in result.stage_folders], "runs": list(result.models),
               "config": result.cfg.flat(), "results_dir": str(Path(results_dir).resolve()),
               "versions": package_versions(), "revision": git_revision()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def logged_run(client: MlflowClient, experiment: str, key: str) -> str | None:
    """The id of a finished run of ``experiment`` that logged everything for fingerprint ``key`` itself (not a link)."""
    runs = client.search_runs([experiment], filter_string=f"tags.`{FINGERPRINT}` = '{key}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time ASC"])
    return next((run.info.run_id for run in runs if SAME_AS not in run.data.tags), None)


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

    def log_result(self, result, files) -> None:
        """A finished ``pipeline.RunResult``: a child run per run and per pair with their statistics and the files
        ``files`` (an ``outputs.run_files.RunFiles``) holds for them; aggregates and tables on the parent."""
        start = time.perf_counter()
        for name in result.models:
            self._log_model_run(result, name, files.figures[name])
        for written in files.pairs:
            tags = {} if written.size is None else {"univ.dict_size": str(written.size)}
            self._log_pair(written.pair, written.kind, written.folder, tags)
        for name, folder in files.crosscoders.items():
            self._log_crosscoder(result.crosscoders[name], folder)
        for folder, artifact_path in files.parent_folders:
            self.client.log_artifacts(self.run_id, str(folder), artifact_path)
        dataset = result.dataset
        _log_dataset(self.client, self.run_id, dataset.corpus_source, dataset.corpus_fingerprint)
        self._log_statistics(self.run_id, result.summary,
                             params={"corpus.source": dataset.corpus_source, "corpus.fingerprint": dataset.corpus_fingerprint},
                             tags={"univ.data_dir": str(dataset.directory.resolve())})  # absolute: usable from any folder
        self.seconds += time.perf_counter() - start
        self.log(self.run_id, metrics_from({"tracking.seconds": self.seconds}))

    def link(self, result, original: str, key: str) -> None:
        """A re-run whose every output ``original`` has logged already: the parent gets the summary statistics
        (so it charts beside the others) and a link to ``original``, whose children, reports and tables hold the
        rest; nothing is logged twice."""
        start = time.perf_counter()
        self._log_statistics(self.run_id, result.summary, tags={SAME_AS: original, FINGERPRINT: key,
                                                                "univ.data_dir": str(result.dataset.directory.resolve())})
        self.seconds += time.perf_counter() - start
        self.log(self.run_id, metrics_from({"tracking.seconds": self.seconds}))

    def _log_statistics(self, run_id: str, values: Mapping[str, float], **extra) -> None:
        """Statistics under their MLflow names (``metric_name``); the per-decile ones as the table ``DECILES``."""
        self.log(run_id, metrics_from(values), **extra)
        deciles = decile_table(values)
        if len(deciles):
            self.client.log_table(run_id, deciles, DECILES)

    def _log_model_run(self, result, name: str, figures: Path) -> None:
        model, sae = result.models[name], result.saes[name]
        size = size_of(name)
        kind = "sae-replicate" if sae.replicate else "sae-size" if size else "control-model" if is_control(name) else "seed"
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
                          *metrics_from(sae.own_neurons.stats, "own_neurons/"),
                          *metrics_from(sae.token_shares.stats if sae.token_shares else {})],
                 params={"seed": model.seed, "model_key": model.key, "sae_key": sae.key, "sae_replicate": sae.replicate})
        self.client.log_artifacts(run_id, str(figures), "figures")
        if trained:
            for file in ("model.safetensors", "config.json"):
                self.client.log_artifact(run_id, str(model.directory / file), "model")
            self.client.log_artifact(run_id, str(result.dataset.tokenizer_path), "tokenizer")
        for file in ("cfg.json", "sae_weights.safetensors"):
            self.client.log_artifact(run_id, str(sae.directory / file), "sae")
        self.finish(run_id)

    def _log_crosscoder(self, cc, folder: Path) -> None:
        """A crosscoder's child run: its training curves, its evaluation (FVU per model, L0, dead, class fractions and
        counts), its latents table and figure (``folder``) and its checkpoint."""
        run_id = self.child(cc.name, "crosscoder", {"univ.run_name": cc.name, "univ.crosscoder_models": ",".join(cc.models),
                                                    "univ.crosscoder_dir": str(cc.directory.resolve()),
                                                    "univ.crosscoder_eval_dir": str(cc.evaluation.resolve())})
        counts = {f"count_{cls}": n for cls, n in cc.metrics["class_counts"].items()}
        self.log(run_id, [*curves(cc.history, "crosscoder/"),
                          *metrics_from({**crosscoder_statistics(cc), **counts}, "crosscoder_eval/")],
                 params={"crosscoder_key": cc.key, "models": ",".join(cc.models)})
        self.client.log_artifacts(run_id, str(folder), "latents")
        for file in ("crosscoder.safetensors", "cfg.json"):
            self.client.log_artifact(run_id, str(cc.directory / file), "crosscoder")
        self.finish(run_id)

    def _log_pair(self, pair, kind: str, folder: Path, tags: Mapping[str, str] | None = None) -> None:
        run_id = self.child(pair_name(pair.run_a, pair.run_b), kind, {"univ.run_a": pair.run_a, "univ.run_b": pair.run_b, **(tags or {})})
        self._log_statistics(run_id, pair.stats)
        self.client.log_artifacts(run_id, str(folder), "report")
        self.finish(run_id)


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
