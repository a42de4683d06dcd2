"""The issue's planted test of contextual universality: two synthetic "models", each in its own basis, read one
token stream with a hidden context variable. They share every token feature (a function of the current token) and
a known fraction of their token-in-context features (the token AND the hidden context); the rest of B's context
features use another, independent hidden context. After SAE training and matching, the contextual correlation
finds the planted fraction, the token share tells token features from context features, and the raw statistic
counts the token features as universal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae.training import train_sae
from universality.core.config import SAEConfig
from universality.measures.correlation import pearson_reference
from universality.measures.token_control import compare_token_controlled

N_ROWS, VOCAB, D = 30_000, 40, 32
N_TOKEN_FEATURES, N_CONTEXT_FEATURES, N_SHARED_CONTEXT = 10, 20, 12  # planted fraction 0.6
CONTEXT_ON, CONTEXT_OFF = 0.02, 0.08  # a hidden two-state chain: switched on 20% of the time, in runs of ~12 tokens


def hidden_context(rng: np.random.Generator) -> np.ndarray:
    """[N] 0/1 Markov chain, P(0 -> 1) = CONTEXT_ON, P(1 -> 0) = CONTEXT_OFF (on 20% of the rows)."""
    state, out = 0, np.empty(N_ROWS, np.int8)
    switches = rng.random(N_ROWS)
    for i, u in enumerate(switches):
        state = int(u < CONTEXT_ON) if state == 0 else int(u >= CONTEXT_OFF)
        out[i] = state
    return out


def planted_world(seed: int = 0):
    """Tokens [N], A's and B's true features [N, 30] (10 token features, then 20 context features; B's last 8 on
    the other context) and both models' activations [N, D] in their own random bases."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, N_ROWS)
    context, other_context = hidden_context(rng), hidden_context(rng)
    magnitude = rng.uniform(1.0, 2.0, N_ROWS)
    token_of = rng.permutation(VOCAB)[: N_TOKEN_FEATURES + N_CONTEXT_FEATURES]  # one distinct token per feature
    scale = rng.uniform(1.0, 2.0, N_TOKEN_FEATURES)
    on_token = tokens[:, None] == token_of[None, :]
    token_part = on_token[:, :N_TOKEN_FEATURES] * scale  # a function of the current token alone
    on_context = on_token[:, N_TOKEN_FEATURES:] * magnitude[:, None]
    true_a = np.hstack([token_part, on_context * context[:, None]])
    b_context = np.column_stack([context] * N_SHARED_CONTEXT + [other_context] * (N_CONTEXT_FEATURES - N_SHARED_CONTEXT))
    true_b = np.hstack([token_part, on_context * b_context])

    def model(true: np.ndarray) -> np.ndarray:
        basis = rng.standard_normal((true.shape[1], D))
        basis /= np.linalg.norm(basis, axis=1, keepdims=True)
        return (true @ basis + 0.01 * rng.standard_normal((N_ROWS, D))).astype(np.float32)

    return tokens, true_a, true_b, model(true_a), model(true_b)


def sae_features(acts: np.ndarray, seed: int) -> np.ndarray:
    x = torch.from_numpy(acts)
    generator = torch.Generator().manual_seed(seed)
    batches = (x[torch.randperm(N_ROWS, generator=generator)[:256]] for _ in iter(int, 1))
    cfg = SAEConfig(arch="relu", l1_coeff=0.01, dict_size=64, batch_size=256, samples=256 * 1600, lr=1e-2,
                    resample_inputs=4096, resample_fractions=(0.25, 0.5), dead_window_fraction=0.1)
    sae = train_sae(batches, cfg, D, seed=seed, progress=False).sae
    with torch.no_grad():
        return sae.encode(x).numpy()


@pytest.fixture(scope="module")
def planted():
    tokens, true_a, true_b, acts_a, acts_b = planted_world()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: faster, and steadier on a shared machine
    try:
        feats_a, feats_b = sae_features(acts_a, seed=1), sae_features(acts_b, seed=2)
    finally:
        torch.set_num_threads(threads)
    pair = compare_token_controlled([(feats_a, feats_b, tokens)], VOCAB, min_firings=10, thresholds=(0.5,))
    recovered = pearson_reference(true_a, feats_a)  # [30, 64]: which SAE feature of A is which planted feature
    return pair, recovered.argmax(axis=1), recovered.max(axis=1)


def test_sae_recovers_every_planted_feature(planted):
    _, _, best = planted
    assert (best > 0.9).all(), best


def test_contextual_correlation_finds_the_planted_fraction_of_shared_context_features(planted):
    pair, sae_of, _ = planted
    context = sae_of[N_TOKEN_FEATURES:]
    matched = np.nan_to_num(pair.contextual.matching.best_b_corr[context], nan=0.0) > 0.5
    assert abs(matched.mean() - N_SHARED_CONTEXT / N_CONTEXT_FEATURES) <= 0.1, pair.contextual.matching.best_b_corr[context]
    assert matched[:N_SHARED_CONTEXT].all() and not matched[N_SHARED_CONTEXT:].any()  # and the right ones


def test_token_share_is_high_for_token_features_and_low_for_context_features(planted):
    pair, sae_of, _ = planted
    assert (pair.token_share_a[sae_of[:N_TOKEN_FEATURES]] > 0.8).all(), pair.token_share_a[sae_of[:N_TOKEN_FEATURES]]
    assert (pair.token_share_a[sae_of[N_TOKEN_FEATURES:]] < 0.5).all(), pair.token_share_a[sae_of[N_TOKEN_FEATURES:]]


def test_raw_statistic_counts_the_token_features(planted):
    pair, sae_of, _ = planted
    tokens_only = sae_of[:N_TOKEN_FEATURES]
    assert (pair.raw.matching.best_b_corr[tokens_only] > 0.9).all()  # raw: every token feature has a partner
    given_token = np.nan_to_num(pair.contextual.matching.best_b_corr[tokens_only], nan=0.0)
    assert (given_token < 0.5).all(), given_token  # contextual: only their noise is left given the token
    assert (pair.token_lookup.matching.best_b_corr[tokens_only] > 0.9).all()  # token identity alone "matches" them
    assert pair.raw.stats["frac_above_0.5"] > pair.contextual.stats["frac_above_0.5"]
