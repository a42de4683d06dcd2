"""SAE features against the neurons of their own model (the paper's "invisible in the neuron basis"):
the max own-neuron correlation against a float64 brute force, planted neurons-in-disguise and evenly
spread decoder vectors, and a tracked tiny run that caches the stage, logs it and exports it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from fast_pipeline import fast_cfg, run_fast
from mlflow import MlflowClient

from universality.publish import publish
from universality.outputs.terminal import describe
from universality.outputs import export
from universality.analysis import own_neurons
from universality.tracking import lookups, names, store
from universality.tracking.tracker import tracked_run
from universality.analysis.heldout import FEATURES, NEURONS, HeldoutActivations
from universality.core.config import CompareConfig


def brute_force_max_corr(features: np.ndarray, neurons: np.ndarray, min_firings: int) -> tuple[np.ndarray, np.ndarray]:
    """Per feature, the max Pearson correlation (signed, as across seeds) with any neuron and which neuron,
    by explicit float64 loops over features that fire at least ``min_firings`` times and neurons that do."""
    def included(x):
        return ((x != 0).sum(axis=0) >= min_firings) & (x.std(axis=0) > 0)

    f_ok, n_ok = included(features), included(neurons)
    best, which = np.full(features.shape[1], np.nan), np.full(features.shape[1], -1)
    for i in np.flatnonzero(f_ok):
        a = features[:, i] - features[:, i].mean()
        for j in np.flatnonzero(n_ok):
            b = neurons[:, j] - neurons[:, j].mean()
            r = a @ b / np.sqrt((a @ a) * (b @ b))
            if np.isnan(best[i]) or r > best[i]:
                best[i], which[i] = r, j
    return best, which


def write_activations(folder: Path, features: np.ndarray, neurons: np.ndarray) -> HeldoutActivations:
    """Activations stored as the activations stage stores them (dense neurons, sparse features)."""
    folder.mkdir()
    np.save(folder / NEURONS, neurons.astype(np.float32))
    sp.save_npz(folder / FEATURES, sp.csr_matrix(features.astype(np.float32)))
    return HeldoutActivations(folder)


def planted_activations(n_tokens: int = 10_000, n_neurons: int = 16, seed: int = 0):
    """ReLU neurons; features that are a neuron (scaled), a sparse mix of neurons, random sparse noise,
    one too rare to correlate and one dead. More tokens than one streamed chunk (8192)."""
    rng = np.random.default_rng(seed)
    neurons = np.maximum(rng.standard_normal((n_tokens, n_neurons)) + 0.3 * rng.standard_normal((n_tokens, 1)), 0)
    mix = np.maximum(neurons[:, :4] @ rng.uniform(0.2, 1, 4) - 1.5, 0)
    noise = np.maximum(rng.standard_normal((n_tokens, 3)) - 1.5, 0)
    rare = np.zeros(n_tokens)
    rare[:3] = 1.0
    features = np.column_stack([2.5 * neurons[:, 3], mix, noise, rare, np.zeros(n_tokens), 0.5 * neurons[:, 7]])
    return features, neurons


def test_max_own_neuron_correlation_matches_brute_force(tmp_path):
    features, neurons = planted_activations()
    cfg = CompareConfig(min_firings=10, thresholds=(0.5, 0.7, 0.9))
    decoder = np.random.default_rng(1).standard_normal((features.shape[1], neurons.shape[1]))
    result = own_neurons.compare_own_neurons(write_activations(tmp_path / "acts", features, neurons), decoder, cfg)
    expected, which = brute_force_max_corr(features, neurons, cfg.min_firings)
    np.testing.assert_allclose(result.max_corr, expected, atol=1e-5)  # NaN where excluded, in both
    assert result.neuron.tolist() == which.tolist()
    assert result.max_corr[0] == pytest.approx(1.0, abs=1e-6) and result.neuron[0] == 3  # a neuron in disguise
    assert result.max_corr[-1] == pytest.approx(1.0, abs=1e-6) and result.neuron[-1] == 7
    assert np.isnan(result.max_corr[5]) and np.isnan(result.max_corr[6])  # too rare, dead: excluded
    assert result.max_corr[2:5].max() < 0.1  # noise resembles no neuron
    kept = expected[~np.isnan(expected)]
    assert result.stats["n_included"] == kept.size == 6
    assert result.stats["max_corr_median"] == pytest.approx(np.median(kept), abs=1e-6)
    assert result.stats["max_corr_mean"] == pytest.approx(kept.mean(), abs=1e-6)
    for t in cfg.thresholds:
        assert result.stats[f"frac_above_{t:g}"] == pytest.approx((kept > t).mean())
    included = ~np.isnan(expected)
    assert result.stats["neurons_for_90pct_median"] == np.median(result.neurons_for_90pct[included])


def test_neurons_for_90pct_of_the_norm_planted_and_brute_force():
    rng = np.random.default_rng(0)
    n = 64
    one_hot = np.zeros(n)
    one_hot[17] = -3.0
    planted = [one_hot]
    for k in (10, 20, 50):  # spread evenly (random signs, random neurons): 90% of the norm needs 0.9 k of them
        row = np.zeros(n)
        row[rng.choice(n, k, replace=False)] = rng.choice([-1, 1], k) / np.sqrt(k)
        planted.append(row)
    planted.append(np.zeros(n))  # a zero vector: carried by no neuron
    assert own_neurons.neurons_for_norm_share(np.array(planted)).tolist() == [1, 9, 18, 45, 0]
    decoder = rng.standard_normal((40, n)) * rng.uniform(0.01, 1, n)  # uneven
    for row, count in zip(decoder, own_neurons.neurons_for_norm_share(decoder.astype(np.float32))):
        squares = sorted((row.astype(np.float32).astype(np.float64) ** 2).tolist(), reverse=True)
        total = sum(squares)
        assert count == next(k for k in range(1, n + 1) if sum(squares[:k]) >= 0.9 * total)


@pytest.fixture(scope="module")
def tracked_fast(tmp_path_factory):
    """(results folder, RunResult, parent run id) of a tracked two-seed run on the fast tiny config."""
    results = tmp_path_factory.mktemp("own") / "results"
    cfg = fast_cfg()
    with tracked_run(results, None, "univ", cfg, [0, 1]) as tracker:
        result = run_fast(results, [0, 1], cfg)
        publish(tracker, result)
    return results, result, tracker.run_id


@pytest.mark.slow
def test_a_run_caches_logs_and_exports_features_vs_own_neurons(tracked_fast, monkeypatch):
    results, result, run_id = tracked_fast
    own = result.saes["seed0"].own_neurons
    acts = result.activations["seed0"]
    features, neurons = acts.features().toarray().astype(np.float64), np.asarray(acts.neurons(), np.float64)
    expected, _ = brute_force_max_corr(features, neurons, fast_cfg().compare.min_firings)
    np.testing.assert_allclose(own.max_corr, expected, atol=1e-5)
    decoder = result.saes["seed0"].sae.W_dec.detach().numpy()
    assert own.neurons_for_90pct.tolist() == own_neurons.neurons_for_norm_share(decoder).tolist()
    assert set(result.saes) == {"seed0", "seed1", "seed0-sae1"} and all(s.own_neurons for s in result.saes.values())
    for key in ("max_corr_median", "frac_above_0.5", "neurons_for_90pct_median"):
        values = [result.saes[name].own_neurons.stats[key] for name in ("seed0", "seed1")]
        assert result.summary[f"own_neurons.{key}_mean"] == pytest.approx(np.mean(values))
    assert "SAE features vs own neurons (mean over seeds)" in describe(result)

    calls = []
    monkeypatch.setattr(own_neurons, "compare_own_neurons", lambda *a: calls.append(a))
    again = run_fast(results, [0, 1])  # cached: the stage is only read back
    assert not calls and again.summary == pytest.approx(result.summary, rel=0, abs=0, nan_ok=True)  # NaN: an empty bin

    client = MlflowClient(store.embedded_uri(results))
    parent = client.get_run(run_id).data.metrics
    assert parent["own_neurons/max_corr_median_mean"] == pytest.approx(result.summary["own_neurons.max_corr_median_mean"])
    assert "own_neurons/frac_above_0.9_mean" in parent and "own_neurons/neurons_for_90pct_median_mean" in parent
    children = client.search_runs([client.get_run(run_id).info.experiment_id],
                                  filter_string=f"tags.`univ.run_name` = 'seed0' and tags.`{names.KIND}` = 'seed'")
    assert children[0].data.metrics["own_neurons/max_corr_median"] == pytest.approx(own.stats["max_corr_median"])
    report = results / "reports" / run_id / "report"
    assert (report / "own_neurons.png").is_file()
    assert "SAE features vs the neurons of their own model" in (report / "report.html").read_text()  # its caption

    matched, _ = lookups.load_tables(client, run_id)
    rows = matched[(matched.seed_a == 0) & (matched.sae_a == 0) & ~matched.same_model].sort_values("feature_a")
    pd.testing.assert_series_equal(rows.own_neuron_corr_a.reset_index(drop=True), pd.Series(own.max_corr, name="own_neuron_corr_a"))
    assert rows.own_neuron_a.tolist() == own.neuron.tolist()
    assert rows.neurons_for_90pct_a.tolist() == own.neurons_for_90pct.tolist()
    assert {c: str(t) for c, t in matched.dtypes.items()} == export.MATCHED_COLUMNS
