"""The token-share stage and the pair's token control on the fast tiny config: the per-run token and position
shares against a brute-force two-fold estimate, the pair's contextual partners against a brute-force partial
correlation given the current token (so the rows and the token ids line up), and the summary over seeds."""

from __future__ import annotations

import numpy as np
import pytest
from fast_pipeline import run_fast

from universality.analysis.heldout import comparison_tokens, row_positions
from universality.measures.correlation import pearson_reference
from universality.measures.token_control import folds_of


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    return run_fast(tmp_path_factory.mktemp("token_share") / "results", [0, 1])


def two_fold_share(x: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Brute force: per column, group means of one fold predict the other fold (unseen group: the fitting fold's
    mean), R² against the predicted fold's variance, averaged over both directions (NaN ones left out), clipped at 0."""
    x = np.asarray(x, np.float64)
    folds = folds_of(np.arange(len(groups)))
    r2 = np.full((2, x.shape[1]), np.nan)
    for fit in (0, 1):
        fit_rows, held_rows = folds == fit, folds != fit
        for f in range(x.shape[1]):
            means = {g: x[fit_rows & (groups == g), f].mean() for g in np.unique(groups[fit_rows])}
            default = x[fit_rows, f].mean()
            held, held_groups = x[held_rows, f], groups[held_rows]
            predicted = np.array([means.get(g, default) for g in held_groups])
            sst = ((held - held.mean()) ** 2).sum()
            if sst > 1e-12 * (held**2).sum():
                r2[fit, f] = 1 - ((held - predicted) ** 2).sum() / sst
    with np.errstate(invalid="ignore"):
        mean = np.nanmean(r2, axis=0)
    return np.maximum(mean, 0.0)


def run_tokens(result) -> np.ndarray:
    cfg = result.cfg
    return comparison_tokens(result.dataset.heldout, cfg.data.ctx_len, cfg.compare.tokens, cfg.compare.skip_first_positions)


@pytest.mark.slow
def test_token_and_position_shares_match_a_brute_force_two_fold_estimate(fast_run):
    shares, acts, cfg = fast_run.saes["seed0"].token_shares, fast_run.activations["seed0"], fast_run.cfg
    tokens = run_tokens(fast_run)
    neurons = np.asarray(acts.neurons())
    assert tokens.shape == (neurons.shape[0],)
    columns = np.arange(0, neurons.shape[1], 16)  # a sample of neurons and features keeps the brute force quick
    np.testing.assert_allclose(shares.neurons_token[columns], two_fold_share(neurons[:, columns], tokens), atol=1e-7)
    positions = row_positions(tokens.size, cfg.data.ctx_len, cfg.compare.skip_first_positions)
    np.testing.assert_allclose(shares.neurons_position[columns], two_fold_share(neurons[:, columns], positions), atol=1e-7)
    features = acts.features()
    fired = np.flatnonzero(features.getnnz(axis=0) >= cfg.compare.min_firings)[:16]
    np.testing.assert_allclose(shares.features_token[fired], two_fold_share(features[:, fired].toarray(), tokens), atol=1e-7)
    assert 0 < shares.stats["token_share.features_median"] < 1 and 0 < shares.stats["token_share.neurons_median"] < 1


@pytest.mark.slow
def test_pair_table_carries_the_runs_token_share_and_brute_force_contextual_partners(fast_run):
    pair = fast_run.pairs[0]
    np.testing.assert_array_equal(pair.token_share_a, fast_run.saes[pair.run_a].token_shares.features_token)
    np.testing.assert_array_equal(pair.token_share_b, fast_run.saes[pair.run_b].token_shares.features_token)
    np.testing.assert_array_equal(pair.table.token_share_a, pair.token_share_a)
    tokens = run_tokens(fast_run)
    a, b = (fast_run.activations[name].features().toarray() for name in (pair.run_a, pair.run_b))

    def minus_token_means(x):
        sums = np.zeros((tokens.max() + 1, x.shape[1]))
        np.add.at(sums, tokens, x)
        return x - (sums / np.maximum(np.bincount(tokens), 1)[:, None])[tokens]

    reference = pearson_reference(minus_token_means(a), minus_token_means(b))  # the partial correlation given the token
    context = pair.context_matching
    rows = np.flatnonzero(context.best_b >= 0)
    assert rows.size > 0.5 * len(pair.table)
    np.testing.assert_allclose(pair.table.corr_context[rows], reference[rows, context.best_b[rows]], atol=1e-5)
    included_b = np.zeros(b.shape[1], bool)
    included_b[np.unique(context.best_b[rows])] = True
    assert (reference[rows][:, included_b].max(axis=1) <= pair.table.corr_context[rows] + 1e-5).all()  # the max partner


@pytest.mark.slow
def test_summary_and_headline_carry_the_token_control(fast_run):
    from universality.outputs.terminal import describe

    summary = fast_run.summary
    seeds = [fast_run.saes[n].token_shares.stats["token_share.features_median"] for n in ("seed0", "seed1")]
    assert summary["token_share.features_median_mean"] == pytest.approx(np.mean(seeds))
    for key in ("contextual.features.max_corr_median", "contextual.neurons.max_corr_median", "contextual.rotation.max_corr_median",
                "token_lookup.features.max_corr_median", "ceiling.contextual.features.max_corr_median",
                "by_token_share.features.share_ge_080.contextual.max_corr_median"):
        assert f"{key}_mean" in summary, key
    shown = describe(fast_run)
    row = next(line for line in shown.splitlines() if line.strip().startswith("SAE features, across models"))
    assert row.split()[4:6] == [f"{summary['features.max_corr_median_mean']:.3f}",
                                f"{summary['contextual.features.max_corr_median_mean']:.3f}"]
