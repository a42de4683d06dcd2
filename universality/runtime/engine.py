"""Where independent pipeline tasks run: in this process, in worker processes on this machine
(joblib's loky backend), or on a Dask cluster (joblib's Dask backend).

Tasks are plain functions of picklable arguments that write their outputs into the stage cache and
return plain values (paths, metrics); the driving process loads and logs them, so workers never
touch the tracking store. Each worker gets ``cores // jobs`` torch threads, so parallel seeds do
not oversubscribe the CPU; with several GPUs, tasks are spread round-robin over them. Workers draw
no progress bars: theirs become records that the driving process shows (``universality.runtime.progress``).

With ``backend="dask"`` every worker must see the results folder at the same path: put it on a
shared filesystem (NFS, Lustre, ...) and use an MLflow tracking server rather than a local file store.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import joblib
import torch

from universality.runtime import progress
from universality.core.errors import ConfigError, UnivError

BACKENDS = ("loky", "dask")


def cores() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class Engine:
    """How to run independent tasks (seeds, pairs of seeds)."""

    jobs: int | None = None  # tasks at once; None: min(tasks, cores) locally, every worker thread on Dask
    backend: str = "loky"  # "loky": worker processes on this machine | "dask": a Dask distributed cluster
    scheduler: str | None = None  # the Dask scheduler's address, tcp://HOST:PORT (backend "dask" only)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r} (choose from {', '.join(BACKENDS)})")
        if (self.backend == "dask") != (self.scheduler is not None):
            raise ConfigError("--scheduler tcp://HOST:PORT goes with --backend dask, and only with it")
        if self.jobs is not None and self.jobs < 1:
            raise ConfigError("--jobs must be at least 1")

    def local_jobs(self, n_tasks: int) -> int:
        return min(n_tasks, self.jobs or cores())

    def in_process(self, n_tasks: int) -> bool:
        """Whether tasks run one after another in this process (their bars draw on this terminal directly)."""
        return self.backend == "loky" and self.local_jobs(n_tasks) <= 1

    def map(self, fn: Callable[..., Any], tasks: Sequence[tuple], board: progress.Board | None = None) -> list[Any]:
        """``[fn(*task) for task in tasks]``, possibly in parallel; results in the order of ``tasks``.
        Workers report the progress of ``board``'s tasks (one label per task) to this process's terminal."""
        if self.in_process(len(tasks)):
            return [fn(*task) for task in tasks]
        with progress.shown(board) as records:
            calls = [(fn, task, records, i) for i, task in enumerate(tasks)]
            if self.backend == "dask":
                return _map_dask(calls, self)
            jobs = self.local_jobs(len(tasks))
            threads = max(1, cores() // jobs)
            return joblib.Parallel(n_jobs=jobs, backend="loky")(joblib.delayed(_in_worker)(threads, *call) for call in calls)

    def map_cached(self, fn: Callable[..., Any], tasks: Sequence[tuple], is_done: Callable[..., bool],
                   board: progress.Board | None = None) -> list[Any]:
        """``map`` for cached stages: the tasks not yet done go through the engine (the work, maybe in
        parallel), then every task runs here, where it only looks its outputs up. No worker starts
        when everything is cached."""
        todo = [i for i, task in enumerate(tasks) if not is_done(*task)]
        self.map(fn, [tasks[i] for i in todo], board and board.only(todo))
        return [fn(*task) for task in tasks]


def _in_worker(threads: int, fn: Callable[..., Any], task: tuple, records: Path | None, index: int) -> Any:
    """One task in a worker: its share of the cores, its bars written as records (or off)."""
    torch.set_num_threads(threads)
    with progress.reporting(records, index):
        return fn(*task)


def _map_dask(calls: Sequence[tuple], engine: Engine) -> list[Any]:
    from distributed import Client

    try:
        client = Client(engine.scheduler, timeout="15s")
    except (OSError, TimeoutError, ValueError, TypeError) as exc:  # TypeError: a tls:// address without certificates
        raise UnivError(f"cannot reach the Dask scheduler at {engine.scheduler}: {exc}") from None
    with client:
        threads = _dask_threads(client)
        with joblib.parallel_config(backend="dask"):
            return joblib.Parallel(n_jobs=engine.jobs or -1)(joblib.delayed(_in_worker)(threads, *call) for call in calls)


def _dask_threads(client) -> int:
    """Torch threads per task so that each host's cores are shared by the tasks it runs at once."""
    cpus = client.run(os.cpu_count)  # worker address -> its machine's cores
    per_host: dict[str, int] = defaultdict(int)
    for address, n in client.nthreads().items():
        per_host[address.rsplit(":", 1)[0]] += n
    return min((max(1, cpus[a] // per_host[a.rsplit(":", 1)[0]]) for a in cpus), default=1)


def resolve_device(device: str) -> str:
    """"auto" -> CUDA when torch sees it, else CPU; "cuda" without a CUDA device is a user error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UnivError("--device cuda asked for, but torch sees no CUDA device")
    return device


def spread_devices(device: str, n_tasks: int) -> list[str]:
    """One device per task: ``cuda:i`` round-robin over the visible GPUs, else ``device`` for all."""
    n_gpus = torch.cuda.device_count() if device == "cuda" else 0
    return [f"cuda:{i % n_gpus}" for i in range(n_tasks)] if n_gpus > 1 else [device] * n_tasks
