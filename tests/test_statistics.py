"""Pair statistics, baselines, model-level similarity and the across-seed aggregates."""

import itertools

import numpy as np
import pytest

from universality.measures.across_seeds import feature_families, partner_counts, resampled_means, summarize, summarize_pairs
from universality.measures.matching import match
from universality.measures.similarity import decoder_cosines, decoder_statistics, linear_cka, logit_weight_similarity, svcca
from universality.measures.statistics import (
    FeatureCensus,
    density_deciles,
    excess_statistics,
    pair_statistics,
    random_rotation,
)


def test_census_counts_dead_ultralow_and_included():
    counts = np.array([0, 3, 10, 500, 0])
    dead = np.array([True, False, False, False, True])
    census = FeatureCensus(counts, dead, n_tokens=20_000_000, min_firings=5)
    # 10 firings in 20M tokens is below one in a million; 3 is below min_firings
    assert census.ultralow.tolist() == [False, True, True, False, False]
    assert census.included.tolist() == [False, False, False, True, False]
    assert census.summary("a") == {"n_features_a": 5, "n_dead_a": 2, "n_ultralow_a": 2, "n_included_a": 1}


def test_density_deciles_partition_included_features_by_density():
    rng = np.random.default_rng(0)
    density = rng.random(103)
    included = rng.random(103) > 0.2
    decile = density_deciles(density, included)
    assert (decile[~included] == -1).all()
    sizes = np.bincount(decile[included], minlength=10)
    assert sizes.sum() == included.sum() and sizes.max() - sizes.min() <= 1
    for d in range(9):  # ordered: every feature of decile d is sparser than every one of d + 1
        assert density[decile == d].max() <= density[decile == d + 1].min()


def test_pair_statistics_leave_excluded_features_out():
    corr = np.array([[0.95, 0.1, 0.0], [0.2, 0.6, 0.0], [0.99, 0.0, 0.0], [0.0, 0.0, 0.0]])
    census_a = FeatureCensus(np.array([50, 40, 2, 0]), np.array([False, False, False, True]), 1000, 10)
    census_b = FeatureCensus(np.array([50, 40, 0]), np.array([False, False, True]), 1000, 10)
    m = match(corr, census_a.included, census_b.included)
    stats = pair_statistics(m, census_a, census_b, thresholds=(0.5, 0.9))
    assert stats["max_corr_mean"] == pytest.approx((0.95 + 0.6) / 2)  # the ultralow 0.99 is left out
    assert stats["frac_above_0.9"] == 0.5 and stats["frac_above_0.5"] == 1.0
    assert stats["hungarian_mean"] == pytest.approx((0.95 + 0.6) / 2) and stats["n_mutual"] == 2
    assert (stats["n_dead_a"], stats["n_ultralow_a"], stats["n_dead_b"]) == (1, 1, 1)
    assert sum(stats[f"decile{d}_n"] for d in range(10)) == 2
    assert all(isinstance(v, (int, float)) for v in stats.values())


def test_random_rotation_is_orthogonal_seeded_and_not_signed_by_qr():
    q = random_rotation(64, seed=3)
    np.testing.assert_allclose(q @ q.T, np.eye(64), atol=1e-12)
    np.testing.assert_array_equal(q, random_rotation(64, seed=3))
    assert not np.allclose(q, random_rotation(64, seed=4))
    # Haar: the diagonal has no preferred sign (plain QR would bias it)
    diag = np.concatenate([np.diag(random_rotation(64, seed=s)) for s in range(20)])
    assert 0.4 < (diag > 0).mean() < 0.6


def test_rotation_destroys_neuron_matches_and_excess_measures_it():
    rng = np.random.default_rng(1)
    neurons = np.maximum(rng.normal(size=(4000, 16)), 0)
    rotated = neurons @ random_rotation(16, seed=0)
    same = match(np.corrcoef(neurons, neurons, rowvar=False)[:16, 16:]).best_b_corr
    baseline = match(np.corrcoef(neurons, rotated, rowvar=False)[:16, 16:]).best_b_corr
    stats = excess_statistics(same, np.append(baseline[:-1], np.nan))
    assert stats["n_comparable"] == 15 and baseline.mean() < 0.8
    assert stats["excess_corr_mean"] == pytest.approx(1.0 - baseline[:-1].mean())
    assert stats["frac_universal"] == np.mean(1.0 - baseline[:-1] > 0.5)


def test_logit_weight_similarity_of_pairs_ignores_median_shift():
    rng = np.random.default_rng(2)
    w_a = rng.normal(size=(5, 50))
    w_b = np.vstack([3 * w_a[2] + 1.0, rng.normal(size=(2, 50)), -w_a[0]])
    sim = logit_weight_similarity(w_a, w_b - np.median(w_b, axis=1, keepdims=True), np.array([2, 0, 1]), np.array([0, 3, 1]))
    assert sim[0] == pytest.approx(1.0) and sim[1] == pytest.approx(-1.0) and abs(sim[2]) < 0.5


def test_cka_and_svcca_are_one_for_rotated_scaled_copies_and_low_for_noise():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2000, 20)) @ rng.normal(size=(20, 20))  # anisotropic
    copy = 2.5 * x @ random_rotation(20, seed=1) + 7.0
    noise = rng.normal(size=(2000, 20))
    assert linear_cka(x, copy) == pytest.approx(1.0, abs=1e-10)
    assert svcca(x, copy) == pytest.approx(1.0, abs=1e-8) and svcca(x, copy, top_k=5) == pytest.approx(1.0, abs=1e-8)
    assert linear_cka(x, noise) < 0.1 and svcca(x, noise) < 0.2
    assert linear_cka(x, x[:, :10]) < 1.0  # not trivially 1


# --- across seeds -----------------------------------------------------------------------


def _matching(corr):
    return match(np.asarray(corr, float))


def test_partner_counts_and_families_on_a_handmade_graph():
    # three runs with 3 features each. Feature 0 is matched mutually 0-1 and 1-2 (a chain: one
    # family of 3), feature 1 only between runs 0 and 2, feature 2 nowhere above 0.5.
    eye = np.eye(3) * 0.9 + 0.05
    weak = np.array([[0.9, 0.1, 0.1], [0.1, 0.2, 0.1], [0.1, 0.1, 0.3]])
    matchings = {(0, 1): _matching(weak), (1, 2): _matching(weak), (0, 2): _matching(eye)}
    counts = partner_counts(matchings, threshold=0.5)
    assert counts[0].tolist() == [2, 1, 1] and counts[1].tolist() == [2, 0, 0] and counts[2].tolist() == [2, 1, 1]

    fam = feature_families(matchings, min_corr=0.5)
    f0, f1, f2 = fam.family[0], fam.family[1], fam.family[2]
    assert f0[0] == f1[0] == f2[0]  # chain 0-1-2 plus the direct 0-2 edge
    assert f0[1] == f2[1] != f1[1] and f0[2] == f2[2]  # eye matches 2-2 above 0.5 too
    assert len({f0[0], f0[1], f0[2], f1[1], f1[2]}) == 5
    assert fam.size_distribution() == {1: 2, 2: 2, 3: 1}
    assert sorted(fam.n_runs.tolist()) == [1, 1, 2, 2, 3]
    assert feature_families(matchings, min_corr=0.96).size_distribution() == {1: 9}


def _all_pairs(n: int) -> list[tuple[int, int]]:
    return list(itertools.combinations(range(n), 2))


def test_seed_bootstrap_interval_contains_the_mean_and_is_seeded():
    pairs = _all_pairs(5)
    values = np.random.default_rng(4).normal(0.6, 0.1, size=len(pairs))
    s = summarize(values, pairs, n_units=5, n_bootstrap=500, seed=1)
    assert s["ci_low"] < s["mean"] < s["ci_high"] and s["mean"] == pytest.approx(values.mean())
    assert s["std"] == pytest.approx(values.std(ddof=1)) and s == summarize(values, pairs, 5, n_bootstrap=500, seed=1)
    assert s["n"] == len(pairs)
    one = summarize([0.7], [(0, 1)], n_units=2, n_bootstrap=100)  # two seeds: no interval
    assert one == {"mean": 0.7, "std": 0.0, "n": 1}
    summary = summarize_pairs([{"x": 1.0, "only_one": 2.0}, {"x": 3.0}], [(0, 1), (0, 2)], n_units=3, n_bootstrap=200)
    assert summary["x_mean"] == 2.0 and summary["x_ci_low"] >= 1.0 and "only_one_mean" not in summary


def _definitional_mean(draw: tuple[int, ...], value: dict[tuple[int, int], float]) -> float:
    """The statistic recomputed from scratch over the pairs among the drawn seeds: every two drawn
    positions holding different seeds make a pair."""
    found = [value[tuple(sorted((draw[a], draw[b])))] for a, b in itertools.combinations(range(len(draw)), 2)
             if draw[a] != draw[b]]
    return float(np.mean(found)) if found else float("nan")


def test_seed_bootstrap_matches_brute_force_enumeration():
    """Every one of the 4**4 equally likely resamples of 4 seeds, enumerated: the weighted form equals the
    statistic recomputed over the drawn seeds' pairs, and the Monte Carlo interval the exact quantiles."""
    n = 4
    pairs = _all_pairs(n)
    values = np.array([0.2, 0.9, 0.4, 0.55, 0.7, 0.1])
    value = dict(zip(pairs, values))
    draws = list(itertools.product(range(n), repeat=n))
    counts = np.array([np.bincount(d, minlength=n) for d in draws])
    exact = np.array([_definitional_mean(d, value) for d in draws])
    np.testing.assert_allclose(resampled_means(values, pairs, counts), exact, rtol=1e-12)
    exact = exact[~np.isnan(exact)]  # resamples of one seed drawn 4 times hold no pair
    s = summarize(values, pairs, n_units=n, n_bootstrap=40_000, seed=3)
    assert s["ci_low"] == pytest.approx(np.quantile(exact, 0.025), abs=0.02)
    assert s["ci_high"] == pytest.approx(np.quantile(exact, 0.975), abs=0.02)
    # resampling pairs as if independent gives a different (too narrow) interval here
    naive = np.quantile(np.random.default_rng(0).choice(values, (40_000, 6)).mean(1), [0.025, 0.975])
    assert abs(naive[0] - s["ci_low"]) > 0.02 or abs(naive[1] - s["ci_high"]) > 0.02


def test_seed_bootstrap_of_same_model_pairs_resamples_models():
    """Same-model pairs (i,) weigh by how often model i is drawn: a plain bootstrap of per-model values."""
    values = np.array([0.5, 0.7, 0.9])
    units = [(0,), (1,), (2,)]
    draws = list(itertools.product(range(3), repeat=3))
    counts = np.array([np.bincount(d, minlength=3) for d in draws])
    expected = np.array([values[list(d)].mean() for d in draws])
    np.testing.assert_allclose(resampled_means(values, units, counts), expected, rtol=1e-12)


def test_decoder_statistics_find_the_planted_shared_fraction():
    """B's decoder = A's rows permuted, with 30% of them replaced by fresh random directions."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200, 64))
    perm = rng.permutation(200)
    b = a[perm].copy()
    replaced = rng.choice(200, 60, replace=False)
    b[replaced] = rng.standard_normal((60, 64))
    b *= rng.uniform(0.5, 2, size=(200, 1))  # cosine ignores norms
    everyone = np.ones(200, bool)
    stats = decoder_statistics(a, b, everyone, everyone)
    assert stats["frac_shared_above_0.9"] == pytest.approx(0.7)
    assert stats["frac_shared_above_0.7"] == pytest.approx(0.7)
    assert decoder_statistics(a, a, everyone, everyone)["cos_hungarian_median"] == pytest.approx(1.0)
    cos = decoder_cosines(a, b)
    i, j = 3, 17
    assert cos[i, j] == pytest.approx(a[i] @ b[j] / np.linalg.norm(a[i]) / np.linalg.norm(b[j]))
    alive = everyone.copy()
    alive[:100] = False  # excluded features are neither counted nor anyone's partner
    assert decoder_statistics(a, a, alive, alive)["cos_hungarian_mean"] == pytest.approx(1.0)
