"""How much of a feature is its current token, and universality with the current token removed.

Two models that read the same tokens share every function of the current token, learned or
not (Heap et al. 2025; Dooms & Wilhelm 2025). Three measures separate that from what the
models learned, all from sufficient statistics streamed in one pass over the comparison tokens:

- **Token share** of a feature (or neuron): the fraction of its activation variance explained
  by current-token identity, cross-fitted over two halves of the tokens. The same estimator
  with the position in context as the group gives the **position share**.
- **Contextual correlation**: the Pearson correlation of A's and B's features after each one's
  mean activation for the current token is removed (the partial correlation given the token).
- **Token-lookup null**: the correlation of the per-token means alone, what token identity
  produces by itself.

With per-token sums ``S[t]`` [vocab, F] and counts ``n[t]`` over all N tokens, the token-mean
residuals' cross product is the within-token part ``XᵀY − Sₓᵀ diag(1/n) S_y`` and the per-token
means' (centred) one the between-token part ``Sₓᵀ diag(1/n) S_y − N μₓ μ_yᵀ``; the two sum to
the raw ``XᵀY − N μₓ μ_yᵀ`` that ``StreamingCorrelation`` accumulates. So the raw cross product
plus per-token sums give all three correlation matrices; nothing token-sized is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import scipy.sparse as sp

from universality.measures.comparison import PairComparison
from universality.measures.correlation import Activations, StreamingCorrelation, as_chunk
from universality.core.errors import DataError
from universality.measures.matching import match
from universality.measures.statistics import FeatureCensus, _correlation_summary, pair_statistics

N_FOLDS = 2
CONSTANT_BELOW = 1e-12  # as ``correlation._Moments.dead``: variance below this fraction of Σx² is rounding
SHARE_BINS = {"share_lt_050": (0.0, 0.5), "share_050_080": (0.5, 0.8), "share_ge_080": (0.8, np.inf)}
_ROW_BLOCK = 256  # rows of a correlation matrix normalized at a time


def folds_of(index: np.ndarray) -> np.ndarray:
    """[n] int8 fold (0 or 1) of each row, a fixed pseudo-random function of ``index`` (splitmix64's
    finalizer of the row's index, or of its context's index to keep each context in one half).

    Pseudo-random rather than ``index % 2``: with an even context length, the parity of a row is
    that of its position, so the position share's halves would share no position at all.
    """
    z = np.asarray(index).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return ((z ^ (z >> np.uint64(31))) >> np.uint64(63)).astype(np.int8)


def _add_group_sums(sums_GF: np.ndarray, chunk: np.ndarray | sp.csr_matrix, groups: np.ndarray) -> None:
    """``sums_GF[g] += Σ`` of the chunk's rows of group g, touching only the nonzero entries of sparse chunks."""
    n = groups.size
    onehot = sp.csr_matrix((np.ones(n), groups, np.arange(n + 1)), shape=(n, sums_GF.shape[0]))
    summed = onehot.T @ chunk
    if sp.issparse(summed):
        summed = summed.tocoo()
        sums_GF[summed.row, summed.col] += summed.data  # a product's entries are unique: no add.at needed
    else:
        sums_GF += summed


def _sum_sq(chunk: np.ndarray | sp.csr_matrix) -> np.ndarray:
    if sp.issparse(chunk):
        return np.bincount(chunk.indices, weights=chunk.data * chunk.data, minlength=chunk.shape[1])
    return np.einsum("nf,nf->f", chunk, chunk)


def _checked_groups(groups: np.ndarray, n_rows: int, n_groups: int, what: str) -> np.ndarray:
    groups = np.asarray(groups)
    if groups.shape != (n_rows,) or not np.issubdtype(groups.dtype, np.integer):
        raise DataError(f"{what} must be {n_rows} integers, one per row, got {groups.dtype} of shape {groups.shape}")
    if n_rows and (groups.min() < 0 or groups.max() >= n_groups):
        raise DataError(f"{what} must lie in [0, {n_groups}), got {groups.min()}..{groups.max()}")
    return groups.astype(np.intp, copy=False)


@dataclass
class GroupStatistics:
    """Per-group (token id, or position in context) sufficient statistics of one side's activations,
    kept separately for each of the two folds of the rows: count [2, G], sums [2, G, F], Σx² [2, F]."""

    n_groups: int
    n_rows: int = field(init=False, default=0)
    counts: np.ndarray | None = field(init=False, default=None)
    sums: np.ndarray | None = field(init=False, default=None)
    sum_sq: np.ndarray | None = field(init=False, default=None)

    def update(self, acts: Activations, groups: np.ndarray, folds: np.ndarray | None = None) -> None:
        """Add rows ``acts`` [n, F] with the group of each row; ``folds`` [n] (0/1) defaults to
        ``folds_of`` the global row index, so the halves do not depend on the chunking."""
        chunk = as_chunk(acts)
        n, n_features = chunk.shape
        groups = _checked_groups(groups, n, self.n_groups, "group ids")
        if folds is None:
            folds = folds_of(np.arange(self.n_rows, self.n_rows + n))
        folds = _checked_groups(folds, n, N_FOLDS, "folds")
        if self.sums is None:
            self.counts = np.zeros((N_FOLDS, self.n_groups), dtype=np.int64)
            self.sums = np.zeros((N_FOLDS, self.n_groups, n_features))
            self.sum_sq = np.zeros((N_FOLDS, n_features))
        if n_features != self.sums.shape[2]:
            raise DataError(f"chunk has {n_features} features, earlier ones {self.sums.shape[2]}")
        for fold in range(N_FOLDS):
            rows = np.flatnonzero(folds == fold)
            self.counts[fold] += np.bincount(groups[rows], minlength=self.n_groups)
            _add_group_sums(self.sums[fold], chunk[rows], groups[rows])
            self.sum_sq[fold] += _sum_sq(chunk[rows])
        self.n_rows += n

    def share(self) -> np.ndarray:
        """[F] cross-fitted fraction of each feature's variance explained by its group; NaN if constant on both halves.

        Group means fitted on one fold predict the other fold's rows (a group unseen in the fitting
        fold gets that fold's global mean), the held-out R² is taken against the predicted fold's own
        variance, averaged over both directions and clipped at 0 (a negative R²: the group tells
        nothing). Cross-fitted because the in-sample R² rewards rare groups: a token seen once has its
        activation as its mean, an R² of 1 on that token whatever the feature does.
        """
        r2 = np.stack([self._held_out_r2(fit, 1 - fit) for fit in range(N_FOLDS)])
        defined = np.isfinite(r2)
        with np.errstate(invalid="ignore"):
            mean = np.where(defined, r2, 0.0).sum(axis=0) / defined.sum(axis=0)  # NaN where neither is defined
        return np.maximum(mean, 0.0)

    def _held_out_r2(self, fit: int, held: int) -> np.ndarray:
        n_fit, s_fit = self.counts[fit], self.sums[fit]
        n_held, s_held, sq_held = self.counts[held], self.sums[held], self.sum_sq[held]
        fit_mean = s_fit.sum(axis=0) / max(n_fit.sum(), 1)
        seen = n_fit > 0
        prediction = np.where(seen[:, None], s_fit / np.maximum(n_fit, 1)[:, None], fit_mean)  # [G, F]
        sse = sq_held - 2 * np.einsum("gf,gf->f", prediction, s_held) + np.einsum("g,gf->f", n_held, prediction**2)
        sst = sq_held - s_held.sum(axis=0) ** 2 / max(n_held.sum(), 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(_constant(sst, sq_held), np.nan, 1.0 - sse / sst)

    @property
    def total_counts(self) -> np.ndarray:
        """[G] rows of each group, both folds."""
        return self.counts.sum(axis=0)

    @property
    def total_sums(self) -> np.ndarray:
        """[G, F] per-group sums of each feature, both folds."""
        return self.sums.sum(axis=0)

    @property
    def total_sum_sq(self) -> np.ndarray:
        return self.sum_sq.sum(axis=0)


@dataclass(frozen=True)
class TokenControlledCorrelations:
    """The three [F_A, F_B] float32 correlation matrices of one pair, with the features each leaves
    without variance (correlation 0 with everything there, and dead in that matrix's census)."""

    raw: np.ndarray
    contextual: np.ndarray  # current-token means removed: the partial correlation given the token
    token_lookup: np.ndarray  # each feature replaced by its mean for the current token
    dead_a: np.ndarray  # [F_A] bool: never fires or constant (as StreamingCorrelation)
    dead_b: np.ndarray
    dead_context_a: np.ndarray  # [F_A] bool: dead, or constant within every token (a pure token feature)
    dead_context_b: np.ndarray
    dead_lookup_a: np.ndarray  # [F_A] bool: dead, or the same mean for every token (token-blind)
    dead_lookup_b: np.ndarray


def _normalized(cov_n: np.ndarray, var_n_a: np.ndarray, dead_a: np.ndarray, var_n_b: np.ndarray,
                dead_b: np.ndarray) -> np.ndarray:
    """n · covariance [F_A, F_B] and n · variances -> float32 correlations, 0 for dead features
    (``cov_n`` is scaled in place: no second float64 matrix)."""
    inv_a, inv_b = (np.where(dead, 0.0, 1.0 / np.sqrt(np.where(dead, 1.0, v))) for v, dead in
                    ((var_n_a, dead_a), (var_n_b, dead_b)))
    corr = np.empty(cov_n.shape, dtype=np.float32)
    for lo in range(0, cov_n.shape[0], _ROW_BLOCK):
        block = cov_n[lo : lo + _ROW_BLOCK]
        block *= inv_a[lo : lo + _ROW_BLOCK, None]
        block *= inv_b
        np.clip(block, -1.0, 1.0, out=corr[lo : lo + _ROW_BLOCK])
    return corr


def _constant(var_n: np.ndarray, sum_sq: np.ndarray) -> np.ndarray:
    """No variance left but rounding, relative to the feature's scale (as ``correlation._Moments.dead``)."""
    return var_n <= CONSTANT_BELOW * sum_sq


def _token_variance_parts(counts: np.ndarray, sums: np.ndarray, sum_sq: np.ndarray,
                          n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per feature, from per-token counts [G], sums [G, F] and Σx² [F]: n · within-token variance
    (Σx² − Σ_t S[t]²/n[t]) and n · between-token variance (Σ_t S[t]²/n[t] − N μ²)."""
    seen = counts > 0
    between_sq = np.einsum("gf,gf->f", sums[seen], sums[seen] / counts[seen, None])
    total = sums.sum(axis=0)
    return np.maximum(sum_sq - between_sq, 0.0), np.maximum(between_sq - total * total / n, 0.0)


class TokenControlledCorrelation(StreamingCorrelation):
    """``StreamingCorrelation`` that also keeps per-token sums of both sides, for the contextual and
    token-lookup correlations and each side's token share.

    Memory beyond the raw accumulator: two folds of [vocab, F] float64 sums per side.
    """

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.tokens_a = GroupStatistics(vocab_size)
        self.tokens_b = GroupStatistics(vocab_size)

    def update(self, acts_a: Activations, acts_b: Activations, tokens: np.ndarray,  # type: ignore[override]
               folds: np.ndarray | None = None) -> None:
        """Add one chunk: ``acts_a`` [N, F_A], ``acts_b`` [N, F_B] on the same N rows, ``tokens`` [N] the
        current token id of each row; ``folds`` as in ``GroupStatistics.update``."""
        a, b = as_chunk(acts_a), as_chunk(acts_b)
        tokens = _checked_groups(tokens, a.shape[0], self.tokens_a.n_groups, "token ids")
        super().update(a, b)
        self.tokens_a.update(a, tokens, folds)
        self.tokens_b.update(b, tokens, folds)

    @property
    def token_share_a(self) -> np.ndarray:
        """[F_A] cross-fitted token share of A's features (``GroupStatistics.share``)."""
        self._require_data()
        return self.tokens_a.share()

    @property
    def token_share_b(self) -> np.ndarray:
        self._require_data()
        return self.tokens_b.share()

    def correlations(self) -> TokenControlledCorrelations:
        """Raw, contextual and token-lookup correlation matrices, exact in float64 then stored as float32.

        Token means are fitted on the same rows, as a partial correlation is: a token seen once
        leaves a residual of 0 and so adds nothing to the contextual correlation.
        """
        self._require_data()
        n, counts = self.n_tokens, self.tokens_a.total_counts
        sums_a, sums_b = self.tokens_a.total_sums, self.tokens_b.total_sums
        sq_a, sq_b = self.tokens_a.total_sum_sq, self.tokens_b.total_sum_sq
        within_a, between_a = _token_variance_parts(counts, sums_a, sq_a, n)
        within_b, between_b = _token_variance_parts(counts, sums_b, sq_b, n)
        dead_a, dead_b = self.dead_a, self.dead_b
        dead_context_a, dead_context_b = dead_a | _constant(within_a, sq_a), dead_b | _constant(within_b, sq_b)
        dead_lookup_a, dead_lookup_b = dead_a | _constant(between_a, sq_a), dead_b | _constant(between_b, sq_b)

        seen = counts > 0
        inv_sqrt_n = 1.0 / np.sqrt(counts[seen, None])
        between_cross = (sums_a[seen] * inv_sqrt_n).T @ (sums_b[seen] * inv_sqrt_n)  # Sₓᵀ diag(1/n) S_y
        contextual = _normalized(self._cross_AB - between_cross, within_a, dead_context_a, within_b, dead_context_b)
        between_cross -= np.multiply.outer(sums_a.sum(axis=0), sums_b.sum(axis=0) / n)  # − N μₓ μ_yᵀ
        token_lookup = _normalized(between_cross, between_a, dead_lookup_a, between_b, dead_lookup_b)
        return TokenControlledCorrelations(self.correlation(), contextual, token_lookup, dead_a, dead_b,
                                           dead_context_a, dead_context_b, dead_lookup_a, dead_lookup_b)


@dataclass(frozen=True)
class TokenControlledPair:
    """One pair of runs in one basis, compared raw, given the current token, and by token identity alone.

    Each comparison's census counts the features its matrix leaves without variance as dead, so
    they are neither averaged nor anyone's partner there, as dead features are in the raw one.
    """

    raw: PairComparison
    contextual: PairComparison
    token_lookup: PairComparison
    token_share_a: np.ndarray  # [F_A] cross-fitted token share of A's features (NaN: constant)
    token_share_b: np.ndarray


def _compared(corr: np.ndarray, census_a: FeatureCensus, census_b: FeatureCensus,
              thresholds: Sequence[float]) -> PairComparison:
    matching = match(corr, census_a.included, census_b.included)
    return PairComparison(corr, census_a, census_b, matching, pair_statistics(matching, census_a, census_b, thresholds))


def token_controlled_pair(acc: TokenControlledCorrelation, min_firings: int,
                          thresholds: Sequence[float]) -> TokenControlledPair:
    """Match and summarize each of the accumulator's three matrices (``min_firings`` and ``thresholds``
    as in ``comparison.compare``)."""
    corrs = acc.correlations()

    def compared(corr: np.ndarray, dead_a: np.ndarray, dead_b: np.ndarray) -> PairComparison:
        census_a = FeatureCensus(acc.counts_a, dead_a, acc.n_tokens, min_firings)
        census_b = FeatureCensus(acc.counts_b, dead_b, acc.n_tokens, min_firings)
        return _compared(corr, census_a, census_b, thresholds)

    return TokenControlledPair(
        raw=compared(corrs.raw, corrs.dead_a, corrs.dead_b),
        contextual=compared(corrs.contextual, corrs.dead_context_a, corrs.dead_context_b),
        token_lookup=compared(corrs.token_lookup, corrs.dead_lookup_a, corrs.dead_lookup_b),
        token_share_a=acc.token_share_a,
        token_share_b=acc.token_share_b,
    )


def compare_token_controlled(chunks: Iterable[tuple[Activations, Activations, np.ndarray]], vocab_size: int,
                             min_firings: int, thresholds: Sequence[float]) -> TokenControlledPair:
    """Stream ``(acts_a, acts_b, token_ids)`` chunks of the same rows and compare them three ways."""
    acc = TokenControlledCorrelation(vocab_size)
    for acts_a, acts_b, tokens in chunks:
        acc.update(acts_a, acts_b, tokens)
    return token_controlled_pair(acc, min_firings, thresholds)


def token_share_bins(pair: TokenControlledPair, thresholds: Sequence[float]) -> dict[str, float]:
    """Raw and contextual max-correlation statistics of A's included features, by A's token share bin.

    The same features on both sides of a bin: a feature constant within every token (excluded from
    the contextual comparison) counts as max correlation 0 in its bin's contextual figures.
    """
    included = pair.raw.census_a.included
    stats: dict[str, float] = {}
    for name, (lo, hi) in SHARE_BINS.items():
        rows = np.flatnonzero(included & (pair.token_share_a >= lo) & (pair.token_share_a < hi))
        stats[f"{name}.n"] = int(rows.size)
        for kind, comparison in (("raw", pair.raw), ("contextual", pair.contextual)):
            summary = _correlation_summary(comparison.matching, rows, thresholds)
            del summary["n"]
            stats.update({f"{name}.{kind}.{k}": v for k, v in summary.items()})
    return stats


def token_control_statistics(pair: TokenControlledPair, basis: str, thresholds: Sequence[float]) -> dict[str, float]:
    """Flat, loggable: ``contextual.{basis}.*`` and ``token_lookup.{basis}.*`` (every ``pair_statistics``
    key), and ``by_token_share.{basis}.{bin}.{n | raw.* | contextual.*}``; ``basis`` e.g. "features", or ""
    for one basis only (``contextual.*``)."""
    scope = f".{basis}" if basis else ""
    return {
        **{f"contextual{scope}.{k}": v for k, v in pair.contextual.stats.items()},
        **{f"token_lookup{scope}.{k}": v for k, v in pair.token_lookup.stats.items()},
        **{f"by_token_share{scope}.{k}": v for k, v in token_share_bins(pair, thresholds).items()},
    }
