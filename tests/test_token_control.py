"""Token share, contextual and token-lookup correlations against brute-force float64 references."""

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from universality.measures.comparison import compare
from universality.core.config import CompareConfig
from universality.measures.correlation import pearson_reference
from universality.core.errors import DataError
from universality.measures.token_control import (
    GroupStatistics,
    TokenControlledCorrelation,
    compare_token_controlled,
    folds_of,
    token_control_statistics,
)
from universality.measures.statistics import pair_statistics

THRESHOLDS = (0.3, 0.5, 0.7, 0.9)


# ---- brute-force references: whole dense float64 arrays, explicit per-group means ----

def group_means(x, groups, rows):
    """{group: mean of x[rows] over that group's rows} [F] each, fitted on ``rows`` only."""
    return {g: x[rows][groups[rows] == g].mean(axis=0) for g in np.unique(groups[rows])}


def held_out_r2(x, groups, fit_rows, held_rows):
    means, fallback = group_means(x, groups, fit_rows), x[fit_rows].mean(axis=0)
    prediction = np.array([means.get(g, fallback) for g in groups[held_rows]])
    held = x[held_rows]
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1 - ((held - prediction) ** 2).sum(axis=0) / ((held - held.mean(axis=0)) ** 2).sum(axis=0)


def share_reference(x, groups, folds):
    """Two-fold cross-fitted R² of x on its group, averaged over the directions that are defined, clipped at 0."""
    r2 = np.stack([held_out_r2(x, groups, folds == f, folds != f) for f in (0, 1)])
    r2[~np.isfinite(r2)] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # neither direction defined (a dead feature): NaN
        return np.maximum(np.nanmean(r2, axis=0), 0.0)


def in_sample_r2(x, groups):
    means = group_means(x, groups, np.ones(len(groups), bool))
    fitted = np.array([means[g] for g in groups])
    return 1 - ((x - fitted) ** 2).sum(axis=0) / ((x - x.mean(axis=0)) ** 2).sum(axis=0)


def token_mean_columns(x, tokens):
    """Each row replaced by its token's mean over all rows: the token-lookup features."""
    means = group_means(x, tokens, np.ones(len(tokens), bool))
    return np.array([means[t] for t in tokens])


# ---- data ----

def planted(seed=0, n=3000, vocab=400):
    """Two sides with shared features, per-token effects, a dead column each and a pure token column in A."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab + 1)
    tokens = rng.choice(vocab, size=n, p=p / p.sum())  # Zipf-like: many tokens seen once, or in one fold only

    def sparse(f, density):
        return sp.random(n, f, density=density, random_state=rng, data_rvs=lambda k: rng.exponential(size=k)).toarray()

    def per_token(f):
        return (rng.exponential(size=(vocab, f)) * (rng.random((vocab, f)) < 0.1))[tokens]

    a = sparse(30, 0.05) + per_token(30)
    b = 0.5 * a[:, rng.permutation(30)[:20]] + sparse(20, 0.05) + per_token(20)
    a[:, 3] = 0.0  # dead
    a[:, 5] = (tokens % 4) * 0.5  # a pure token feature: constant within every token, exactly
    b[:, 2] = 0.0
    return a, b, tokens


def chunks(n, cuts=(1, 700, 1100, 2999)):
    edges = [0, *[c for c in cuts if c < n], n]
    return [slice(lo, hi) for lo, hi in zip(edges[:-1], edges[1:])]


CONVERSIONS = {
    "dense": (lambda x: x, lambda x: x),
    "sparse": (sp.csr_matrix, sp.csr_matrix),
    "mixed": (sp.csr_matrix, lambda x: x),
}


def stream(a, b, tokens, convert=("dense",)):
    to_a, to_b = CONVERSIONS[convert[0]]
    acc = TokenControlledCorrelation(vocab_size=int(tokens.max()) + 1)
    for rows in chunks(len(tokens)):
        acc.update(to_a(a[rows]), to_b(b[rows]), tokens[rows])
    return acc


# ---- folds ----

def test_folds_are_balanced_and_not_aligned_with_position():
    folds = folds_of(np.arange(20_000))
    assert abs(folds.mean() - 0.5) < 0.02
    position = np.arange(20_000) % 8  # even context length: parity would put each position in one fold
    for p in range(8):
        assert 0.4 < folds[position == p].mean() < 0.6


# ---- token share ----

@pytest.mark.parametrize("convert", [lambda x: x, sp.csr_matrix], ids=["dense", "sparse"])
def test_share_matches_brute_force_two_fold_reference(convert):
    a, _, tokens = planted()
    assert (np.bincount(tokens) == 1).sum() > 20  # tokens seen once: unseen by one fold's fit
    stats = GroupStatistics(n_groups=400)
    for rows in chunks(len(tokens)):
        stats.update(convert(a[rows]), tokens[rows])
    expected = share_reference(a, tokens, folds_of(np.arange(len(tokens))))
    np.testing.assert_allclose(stats.share(), expected, atol=1e-10)
    assert np.isnan(stats.share()[3])  # dead: no variance to explain
    assert 0.9 < stats.share()[5] < 1.0  # pure token feature, short of 1 by the tokens one fold never saw


def test_position_share_uses_the_same_estimator_with_given_folds():
    a, _, _ = planted()
    position = np.arange(a.shape[0]) % 16
    a[:, 0] += 3.0 * (position == 0)  # a first-position feature
    context_folds = folds_of(np.arange(a.shape[0]) // 16)  # whole contexts in one half
    stats = GroupStatistics(n_groups=16)
    for rows in chunks(a.shape[0], cuts=(512, 1024)):
        stats.update(a[rows], position[rows], context_folds[rows])
    np.testing.assert_allclose(stats.share(), share_reference(a, position, context_folds), atol=1e-10)
    assert stats.share()[0] > 0.3 > np.nanmax(stats.share()[1:])


def test_planted_token_feature_has_share_near_one():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 20, size=4000)
    x = rng.exponential(size=20)[tokens] + 0.01 * rng.standard_normal(4000)
    stats = GroupStatistics(n_groups=20)
    stats.update(x[:, None], tokens)
    assert stats.share()[0] > 0.99


def test_noise_feature_on_rare_tokens_has_share_near_zero_though_in_sample_r2_is_inflated():
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 1500, size=2000)  # most tokens seen once or twice
    x = rng.standard_normal((2000, 3))
    stats = GroupStatistics(n_groups=1500)
    stats.update(x, tokens)
    assert (in_sample_r2(x, tokens) > 0.5).all()  # a token seen once "explains" its row
    assert (stats.share() < 0.05).all()


# ---- the three correlation matrices ----

@pytest.mark.parametrize("convert", list(CONVERSIONS))
def test_correlations_match_brute_force_residualized_corrcoef(convert, monkeypatch):
    monkeypatch.setattr("universality.measures.token_control._ROW_BLOCK", 7)  # ragged row blocks
    a, b, tokens = planted()
    corrs = stream(a, b, tokens, (convert,)).correlations()
    mean_a, mean_b = token_mean_columns(a, tokens), token_mean_columns(b, tokens)
    np.testing.assert_allclose(corrs.raw, pearson_reference(a, b), atol=1e-5)
    np.testing.assert_allclose(corrs.contextual, pearson_reference(a - mean_a, b - mean_b), atol=1e-5)
    np.testing.assert_allclose(corrs.token_lookup, pearson_reference(mean_a, mean_b), atol=1e-5)


def test_pure_token_feature_is_dead_in_context_only_and_dead_feature_everywhere():
    a, b, tokens = planted()
    corrs = stream(a, b, tokens).correlations()
    assert np.flatnonzero(corrs.dead_a).tolist() == [3]
    assert np.flatnonzero(corrs.dead_context_a).tolist() == [3, 5]
    assert np.flatnonzero(corrs.dead_lookup_a).tolist() == [3]
    assert (corrs.contextual[[3, 5]] == 0).all() and (corrs.contextual[:, 2] == 0).all()
    assert np.abs(corrs.raw[5]).max() > 0.1  # it does correlate before the token is removed


def test_token_blind_feature_is_dead_in_the_token_lookup_only():
    rng = np.random.default_rng(4)
    tokens = rng.permutation(np.repeat(np.arange(10), 40))
    occurrence = np.array([(tokens[:i] == t).sum() for i, t in enumerate(tokens)])
    blind = np.where(occurrence % 2 == 0, 1.0, -1.0)  # mean 0 on every token: nothing to look up
    a = np.stack([blind, tokens * 0.25 + rng.random(400)], axis=1)
    b = np.stack([2 * blind, rng.random(400)], axis=1)
    acc = TokenControlledCorrelation(vocab_size=10)
    acc.update(a, b, tokens)
    corrs = acc.correlations()
    assert corrs.dead_lookup_a.tolist() == [True, False] and corrs.dead_lookup_b.tolist() == [True, False]
    assert not corrs.dead_context_a.any()
    assert (corrs.token_lookup[0] == 0).all() and corrs.contextual[0, 0] == pytest.approx(1.0)


def test_token_share_of_the_pair_accumulator_matches_the_reference():
    a, b, tokens = planted()
    acc = stream(a, b, tokens, ("sparse",))
    folds = folds_of(np.arange(len(tokens)))
    np.testing.assert_allclose(acc.token_share_a, share_reference(a, tokens, folds), atol=1e-10)
    np.testing.assert_allclose(acc.token_share_b, share_reference(b, tokens, folds), atol=1e-10)


@pytest.mark.parametrize(
    "tokens, message",
    [
        (np.zeros(9, dtype=int), "must be 10 integers"),
        (np.zeros(10), "must be 10 integers"),
        (np.full(10, -1), r"must lie in \[0, 5\)"),
        (np.full(10, 5), r"must lie in \[0, 5\)"),
        (np.zeros((10, 1), dtype=int), "must be 10 integers"),
    ],
    ids=["length", "float", "negative", "beyond-vocab", "shape"],
)
def test_bad_token_ids_fail_before_anything_is_accumulated(tokens, message):
    acc = TokenControlledCorrelation(vocab_size=5)
    with pytest.raises(DataError, match=message):
        acc.update(np.ones((10, 2)), np.ones((10, 3)), tokens)
    assert acc.n_tokens == 0


# ---- statistics of a planted pair ----

def planted_models(n=20_000, seed=3):
    """Two "models" on one token stream with a hidden context: feature 0 is a token feature with
    each model's own noise, 1 a token-in-context feature both share, 2 an exact token feature,
    the rest each model's own sparse noise."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 64, size=n)
    context = rng.random(n) < 0.25

    def model(scale):
        own = sp.random(n, 12, density=0.02, random_state=rng, data_rvs=lambda k: rng.exponential(size=k)).toarray()
        own[:, 0] = (tokens == 7) * (2 + 0.05 * rng.standard_normal(n))
        own[:, 1] = ((tokens == 9) & context) * scale
        own[:, 2] = (tokens == 11) * 1.0
        return own

    return model(1.5), model(0.7), tokens


def test_statistics_separate_token_features_from_context_features():
    a, b, tokens = planted_models()
    pair = compare_token_controlled(
        ((sp.csr_matrix(a[r]), b[r], tokens[r]) for r in chunks(len(tokens), cuts=(5000, 12000))),
        vocab_size=64, min_firings=10, thresholds=THRESHOLDS)
    raw, ctx, lookup = (c.matching.best_b_corr for c in (pair.raw, pair.contextual, pair.token_lookup))
    assert raw[0] > 0.99 and raw[1] > 0.99  # raw counts the token feature as universal
    assert abs(ctx[0]) < 0.1 and ctx[1] > 0.99  # given the token only the context feature is shared
    assert lookup[0] > 0.99  # token identity alone "matches" the token feature
    assert pair.token_share_a[0] > 0.95 and pair.token_share_a[1] < 0.5

    stats = token_control_statistics(pair, "features", THRESHOLDS)
    expected_keys = set(pair_statistics(pair.contextual.matching, pair.contextual.census_a,
                                        pair.contextual.census_b, THRESHOLDS))
    for prefix, comparison in (("contextual", pair.contextual), ("token_lookup", pair.token_lookup)):
        keys = {k.removeprefix(f"{prefix}.features.") for k in stats if k.startswith(f"{prefix}.features.")}
        assert keys == expected_keys
        assert stats[f"{prefix}.features.max_corr_median"] == comparison.stats["max_corr_median"]
    # the exact token feature has no variance given the token: dead there, alive raw
    assert stats["contextual.features.n_dead_a"] == pair.raw.stats["n_dead_a"] + 1

    high, low = "by_token_share.features.share_ge_080", "by_token_share.features.share_lt_050"
    assert stats[f"{high}.n"] == 2  # features 0 and 2
    assert stats[f"{high}.n"] + stats[f"{low}.n"] + stats["by_token_share.features.share_050_080.n"] \
        == pair.raw.stats["n_included_a"]
    assert stats[f"{high}.raw.max_corr_median"] > 0.99
    assert stats[f"{high}.contextual.max_corr_median"] < 0.1  # features 0 (noise left) and 2 (dead: 0)


def test_raw_comparison_of_the_one_pass_is_todays_compare():
    a, b, tokens = planted_models(n=5000)
    cuts = chunks(len(tokens), cuts=(1000, 2500))
    pair = compare_token_controlled(((a[r], b[r], tokens[r]) for r in cuts), 64, 10, THRESHOLDS)
    today = compare(((a[r], b[r]) for r in cuts), CompareConfig(min_firings=10, thresholds=THRESHOLDS))
    np.testing.assert_array_equal(pair.raw.corr, today.corr)
    assert pair.raw.stats == pytest.approx(today.stats, nan_ok=True)
