"""The MLflow tracking store of a univ results folder: embedded by default (SQLite at ``<results>/mlflow.db``,
artifacts in ``<results>/mlartifacts``), or a server given by ``--tracking-uri`` / ``MLFLOW_TRACKING_URI``;
checked to work before any training, so an unreachable server or an unwritable store fails fast, in one line.
MLflow itself is imported only to open a client: the addresses here cost a re-run nothing."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from universality.core.config import UI_HOST, UI_PORT
from universality.core.errors import UnivError, first_line

if TYPE_CHECKING:
    from mlflow import MlflowClient

HEALTH_TIMEOUT_S = 5
logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines (creating the SQLite tables) are not univ's output


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


def is_finished_run(uri: str, run_id: str) -> bool:
    """Whether the SQLite store at ``uri`` holds run ``run_id``, finished and not deleted, asked of SQLite alone (a
    re-run's answer loads no MLflow); False for any other store, which only MLflow can ask, or a missing one."""
    if not uri.startswith("sqlite:///"):
        return False
    path = Path(uri[len("sqlite:///"):]).resolve()
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT status, lifecycle_stage FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
    except sqlite3.Error:
        return False
    return row == ("FINISHED", "active")


def open_client(results_dir: Path, tracking_uri: str | None, read_only: bool = False) -> MlflowClient:
    """A client of the tracking store (see ``resolve_uri``), checked to work; ``read_only``: for commands
    that only read results, which must then exist."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.tracking.registry import UnsupportedModelRegistryStoreURIException

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


MODEL_TRAINING = "workflowType=machine_learning"  # MLflow 3's UI opens in its GenAI mode unless asked for this view


def ui_url(server: str, experiment_id: str) -> str:
    """The experiment's runs table in the MLflow UI served at ``server``, in the Model training view (MLflow 3's UI
    opens in its GenAI mode, traces and evaluations, whatever the experiment's kind)."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?{MODEL_TRAINING}"


def run_url(server: str, experiment_id: str, run_id: str) -> str:
    """A run's page in the MLflow UI served at ``server``, in the Model training view."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING}"


def ui_server(tracking_uri: str) -> tuple[str, bool]:
    """(the UI address of a tracking store, whether it serves it already): a tracking server is its own UI;
    an embedded store is served by ``univ ui`` at its default address."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri, True
    return f"http://{UI_HOST}:{UI_PORT}", False
