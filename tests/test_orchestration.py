"""Where the per-run stages run — in process, worker processes, a Dask cluster — never changes the results."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fast_pipeline import run_fast, stage_checksums
from test_progress import check_reported

from universality.core.errors import ConfigError
from universality.runtime.engine import Engine, spread_devices

BIT_IDENTICAL = [("model", "model.safetensors"), ("sae", "sae_weights.safetensors"), ("activations", "neurons.npy")]


def metrics(result) -> dict[str, float]:
    """Every scalar the run reports: transformer and SAE metrics, pair statistics, the summary."""
    flat = {f"summary.{k}": v for k, v in result.summary.items()}
    for name, model in result.models.items():
        flat |= {f"{name}.model.{k}": v for k, v in model.metrics.items()}
    for name, sae in result.saes.items():
        flat |= {f"{name}.sae.{k}": v for k, v in sae.metrics.items() if isinstance(v, (int, float))}
    for pair in result.pairs:
        flat |= {f"{pair.run_a}-{pair.run_b}.{k}": v for k, v in pair.stats.items()}
    return flat


def assert_same_metrics(a: dict[str, float], b: dict[str, float]) -> None:
    """Equal up to the last bits of float sums: torch splits a full reduction (a mean over all
    tokens) across threads, so 1 thread and 2 threads may round it differently; weights and
    activations are bit-identical (checked separately)."""
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9, nan_ok=True), key


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    results = tmp_path_factory.mktemp("sequential") / "results"
    return results, run_fast(results, [0, 1])


def test_engine_rejects_inconsistent_options():
    with pytest.raises(ConfigError):
        Engine(backend="dask")
    with pytest.raises(ConfigError):
        Engine(scheduler="tcp://127.0.0.1:8786")
    with pytest.raises(ConfigError):
        Engine(backend="spark")
    assert Engine(jobs=1).in_process(4) and not Engine(jobs=2).in_process(4) and Engine(jobs=2).in_process(1)


def test_devices_spread_round_robin_over_gpus_only(monkeypatch):
    assert spread_devices("cpu", 3) == ["cpu"] * 3
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert spread_devices("cuda", 3) == ["cuda:0", "cuda:1", "cuda:0"]
    assert spread_devices("cpu", 2) == ["cpu", "cpu"]


def test_two_workers_give_the_same_results_as_one(sequential, tmp_path):
    results, reference = sequential
    parallel = run_fast(tmp_path / "results", [0, 1], jobs=2)
    for stage, name in BIT_IDENTICAL:
        assert stage_checksums(tmp_path / "results", stage, name) == stage_checksums(results, stage, name)
    assert_same_metrics(metrics(parallel), metrics(reference))


def test_cached_run_gives_exactly_the_fresh_metrics(sequential, tmp_path):
    """A run computed afresh in another folder, and a re-run served from the first run's cache, agree exactly."""
    results, _ = sequential
    fresh = metrics(run_fast(tmp_path / "fresh", [0, 1]))
    assert metrics(run_fast(results, [0, 1])) == pytest.approx(fresh, nan_ok=True, rel=0, abs=0)


@pytest.fixture()
def dask_cluster():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1",
                                       dashboard_address=None)
    yield cluster
    cluster.close()


@pytest.mark.slow
def test_dask_backend_on_a_local_cluster(sequential, dask_cluster, tmp_path, capsys):
    results, reference = sequential
    on_dask = run_fast(tmp_path / "results", [0, 1], jobs=None, progress=True, backend="dask",
                       scheduler=dask_cluster.scheduler_address)
    for stage, name in BIT_IDENTICAL:
        assert stage_checksums(tmp_path / "results", stage, name) == stage_checksums(results, stage, name)
    assert_same_metrics(metrics(on_dask), metrics(reference))
    check_reported(capsys.readouterr().err, list(on_dask.saes), ["seed0 vs seed1", "seed0 vs seed0-sae1"])


@pytest.mark.slow
def test_two_concurrent_runs_on_one_results_folder_both_succeed(tmp_path):
    """Both start at once: per-stage locks make one wait for the other's stages, then reuse them."""
    code = ("import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from fast_pipeline import run_fast; "
            f"r = run_fast(Path({str(tmp_path / 'results')!r}), [0, 1]); print(sorted(r.summary.items()))")
    runs = [subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    outputs = [r.communicate(timeout=600)[0] for r in runs]
    assert [r.returncode for r in runs] == [0, 0]
    assert outputs[0] == outputs[1]
    assert len(list((tmp_path / "results" / "cache" / "model").iterdir())) == 2  # one folder per seed
