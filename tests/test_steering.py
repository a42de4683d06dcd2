"""Interventions on SAE features: the fast one-layer ablation against a full forward pass (float64), the
planted cases of the issue, pinned sampling's determinism, and the cross-seed comparisons."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from click.testing import CliRunner
from fast_pipeline import fast_cfg, run_fast
from mlflow import MlflowClient
from scipy.spatial.distance import jensenshannon
from test_hardening import assert_one_line_error, univ

from models.transformer import OneLayerTransformer, TransformerConfig
from sae.checkpoint import save_sae
from sae.registry import build_sae
from universality.outputs.terminal import describe
from universality.outputs import export, reports
from universality.tracking import lookups, names, store
from universality.analysis import steering
from universality.analysis.heldout import TOP_POSITIONS, TOP_VALUES
from universality.cli import main
from universality.core.config import SAEConfig
from universality.core.errors import UnivError
from universality.measures.matching import match
from universality.steer import N_AFFECTED, load_member

CTX, SKIP = 12, 1


def tiny_model(seed: int, dtype=torch.float64) -> OneLayerTransformer:
    torch.manual_seed(seed)
    model = OneLayerTransformer(TransformerConfig(vocab_size=40, ctx_len=CTX, d_model=16, d_mlp=24, n_heads=2))
    with torch.no_grad():  # larger weights than the init, so that features and ablations move the logits visibly
        for p in model.parameters():
            p.mul_(10.0)
    return model.to(dtype).eval()


def tiny_sae(d_in: int, dict_size: int, seed: int, dtype=torch.float64):
    sae = build_sae(SAEConfig(dict_size=dict_size), d_in)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, dict_size, generator=generator))
        sae.b_enc.copy_(-torch.rand(dict_size, generator=generator) * 2)
    return sae.to(dtype)


def contexts(seed: int, n: int = 6) -> torch.Tensor:
    return torch.randint(0, 40, (n, CTX), generator=torch.Generator().manual_seed(seed))


def stored_features(model, sae, contexts_CT) -> sp.csr_matrix:
    """What the activations stage stores: features at every position past SKIP."""
    with torch.no_grad():
        acts = model(contexts_CT, return_mlp=True).mlp_acts[:, SKIP:]
        return sp.csr_matrix(sae.encode(acts.reshape(-1, acts.shape[-1])).numpy())


def full_logprobs(model, contexts_CT, hook=None) -> np.ndarray:
    """Reference: log p(next token) at the scored tokens from a full forward pass with ``hook``."""
    with torch.no_grad():
        logits = model(contexts_CT, mlp_hook=hook).logits[:, SKIP:-1]
        return steering.target_logprobs(logits, contexts_CT[:, SKIP + 1 :]).reshape(-1).numpy()


def test_fast_one_layer_ablation_equals_the_full_forward_pass():
    model, ctx = tiny_model(0), contexts(0)
    sae = tiny_sae(24, 32, 0)
    subject = steering.subject(model, sae, stored_features(model, sae, ctx), ctx, SKIP)
    base = full_logprobs(model, ctx)
    np.testing.assert_allclose(subject.res.logp_N.numpy(), base, rtol=0, atol=1e-12)
    checked = 0
    for feature in range(32):
        rows, _ = subject.activations(feature)
        if rows.size == 0:
            continue
        want = full_logprobs(model, ctx, steering.feature_hook(sae, [feature])) - base
        got = subject.ablation(feature)
        np.testing.assert_allclose(got.dense(), want, rtol=0, atol=1e-10)
        assert np.abs(want).max() > 1e-3  # the ablation does something to check
        assert np.all(want[np.setdiff1d(np.arange(want.size), got.rows)] == 0)  # exactly nothing where it does not fire
        checked += 1
    assert checked >= 10


def test_ablating_a_feature_that_never_fires_changes_nothing():
    model, ctx = tiny_model(1), contexts(1)
    sae = tiny_sae(24, 8, 1)
    with torch.no_grad():
        sae.b_enc[3] = -1e9  # feature 3 is zero on every input
    subject = steering.subject(model, sae, stored_features(model, sae, ctx), ctx, SKIP)
    effect = subject.ablation(3)
    assert effect.rows.size == 0 and not effect.dense().any() and math.isnan(effect.loss_change())
    np.testing.assert_array_equal(full_logprobs(model, ctx, steering.feature_hook(sae, [3])), full_logprobs(model, ctx))


def test_ablating_every_feature_of_a_perfect_sae_is_zero_ablating_the_mlp():
    """An SAE whose features are the neurons (W_enc = W_dec = I, no biases) reconstructs ReLU neurons exactly:
    ablating all its features removes the MLP's neurons, as a zero hook does (both paths)."""
    model, ctx = tiny_model(2), contexts(2)
    sae = build_sae(SAEConfig(dict_size=24), 24).double()
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(24))
        sae.W_dec.copy_(torch.eye(24))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    zeroed = full_logprobs(model, ctx, torch.zeros_like)
    everything = list(range(24))
    np.testing.assert_allclose(full_logprobs(model, ctx, steering.feature_hook(sae, everything)), zeroed, atol=1e-12)
    subject = steering.subject(model, sae, stored_features(model, sae, ctx), ctx, SKIP)
    f_NK = torch.from_numpy(subject.features_NF.toarray())
    rows = np.flatnonzero((f_NK > 0).any(1).numpy())
    effect = steering.ablation_effect(model, subject.res, rows, f_NK[rows], sae.W_dec.detach())
    np.testing.assert_allclose(effect.dense(), zeroed - full_logprobs(model, ctx), atol=1e-10)


def test_effect_correlation_and_overlap_match_dense_references():
    rng = np.random.default_rng(0)
    n = 500
    effects = []
    for _ in range(2):
        rows = np.sort(rng.choice(n, 80, replace=False))
        effects.append(steering.Effect(rows, rng.normal(size=80), n))
    a, b = effects
    assert steering.effect_correlation(a, b) == pytest.approx(np.corrcoef(a.dense(), b.dense())[0, 1], abs=1e-12)
    assert steering.effect_correlation(a, a) == pytest.approx(1.0, abs=1e-12)
    top_a, top_b = set(np.argsort(-np.abs(a.dense()))[:10]), set(np.argsort(-np.abs(b.dense()))[:10])
    assert steering.top_overlap(a, b, 10) == pytest.approx(len(top_a & top_b) / len(top_a | top_b))
    assert steering.top_overlap(a, a, 10) == 1.0
    assert math.isnan(steering.effect_correlation(a, steering.Effect(np.zeros(0, np.int64), np.zeros(0), n)))


def test_cross_seed_effect_correlation_is_one_with_itself_and_near_zero_for_an_independent_model():
    """Planted: feature activations drawn independently for two independently initialized models on the same
    tokens. With itself, a feature's effect correlates exactly 1; with the other model's, the correlation of
    two independent sparse vectors over N = 2,400 tokens has a standard deviation of about 1/sqrt(N) = 0.02:
    |r| < 0.1 (5 sigma)."""
    ctx = contexts(3, n=240)
    rng = np.random.default_rng(3)
    effects = []
    for seed in (10, 11):
        model = tiny_model(seed)
        res = steering.residuals(model, ctx, SKIP)
        rows = np.flatnonzero(rng.random(len(res.target_N)) < 0.1)
        f_R1 = torch.from_numpy(rng.exponential(1.0, (rows.size, 1)))
        direction_1M = torch.nn.functional.normalize(torch.randn(1, 24, dtype=torch.float64), dim=1)
        effects.append(steering.ablation_effect(model, res, rows, f_R1, direction_1M))
    assert effects[0].n == 240 * (CTX - SKIP - 1)
    assert steering.effect_correlation(effects[0], effects[0]) == pytest.approx(1.0, abs=1e-12)
    assert abs(steering.effect_correlation(*effects)) < 0.1


def test_pinned_sampling_is_deterministic_for_a_sample_seed():
    model = tiny_model(4, torch.float32)
    sae = tiny_sae(24, 16, 4, torch.float32)
    prompt = torch.tensor([1, 2, 3, 4])
    hook = steering.feature_hook(sae, [5], value=20.0)
    first = steering.sample(model, prompt, 30, 1.0, seed=7, hook=hook)
    assert torch.equal(first, steering.sample(model, prompt, 30, 1.0, seed=7, hook=hook))
    assert not torch.equal(first, steering.sample(model, prompt, 30, 1.0, seed=8, hook=hook))
    plain = steering.sample(model, prompt, 30, 1.0, seed=7)
    assert torch.equal(plain, steering.sample(model, prompt, 30, 1.0, seed=7))
    assert not torch.equal(first, plain)  # pinning at 20 steers it
    assert first.shape == (30,)


def test_pinning_moves_the_neurons_along_the_decoder_vector_to_the_value():
    """Pinned at v, the neurons at every position move by (v - f_i) d_i: the feature's own contribution to the
    reconstruction becomes v d_i."""
    model, sae = tiny_model(5), tiny_sae(24, 16, 5)
    acts_NM = model(contexts(5), return_mlp=True).mlp_acts.reshape(-1, 24).detach()
    pinned_NM = steering.feature_hook(sae, [2], value=3.5)(acts_NM)
    f_N = sae.encode(acts_NM)[:, 2].detach()
    assert f_N.max() > 0 and (f_N == 0).any()
    np.testing.assert_allclose((pinned_NM - acts_NM).detach().numpy(),
                               torch.outer(3.5 - f_N, sae.W_dec[2].detach()).numpy(), atol=1e-12)


def test_jensen_shannon_matches_scipy():
    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(9), 4), rng.dirichlet(np.ones(9), 4)
    got = steering.jensen_shannon(torch.from_numpy(np.log(p)), torch.from_numpy(np.log(q))).numpy()
    np.testing.assert_allclose(got, jensenshannon(p, q, base=2, axis=1) ** 2, atol=1e-12)
    assert steering.jensen_shannon(torch.from_numpy(np.log(p)), torch.from_numpy(np.log(p))).abs().max() < 1e-12


def test_causal_pairs_take_the_top_mutual_matches_and_seeded_random_pairs():
    corr = np.random.default_rng(1).uniform(-1, 1, (20, 15))
    matching = match(corr, np.arange(20) != 4, np.arange(15) != 7)
    top_a, top_b, rand_a, rand_b = steering.causal_pairs(matching, 3, seed=5)
    mutual_a, mutual_b = matching.mutual_pairs()
    best = np.argsort(-matching.best_b_corr[mutual_a])[:3]
    np.testing.assert_array_equal(top_a, mutual_a[best])
    np.testing.assert_array_equal(top_b, mutual_b[best])
    assert rand_a.size == rand_b.size == 3 and 4 not in rand_a and 7 not in rand_b
    again = steering.causal_pairs(matching, 3, seed=5)
    np.testing.assert_array_equal(again[2], rand_a)
    np.testing.assert_array_equal(again[3], rand_b)


def test_scored_rows_and_positions_line_up_with_the_contexts():
    rows = steering.scored_rows(3, 5, 1)  # stored rows: positions 1..4 of each context; scored: 1..3
    np.testing.assert_array_equal(rows, [0, 1, 2, 4, 5, 6, 8, 9, 10])
    assert [steering.scored_position(r, 5, 1) for r in range(4)] == [2, 3, 4, 7]


@pytest.mark.slow
def test_a_run_with_causal_top_n_reports_causal_universality_per_pair_and_in_the_export(tmp_path):
    cfg = fast_cfg().replace(compare={"causal_top_n": 4})
    result = run_fast(tmp_path / "results", [0, 1], cfg)
    for pair in [*result.pairs, *result.replicate_pairs]:
        assert pair.stats["causal.n_top"] == min(4, pair.matching.n_mutual) > 0
        computed = pair.table.effect_corr.notna()
        assert computed.sum() == pair.stats["causal.n_top"] and pair.table.mutual[computed].all()
        assert pair.random_effect_corr.shape == (4,)
        assert pair.stats["causal.effect_corr_median_top"] == pytest.approx(pair.table.effect_corr[computed].median())
        assert "ablation_effects.png" in {f.name for f in reports.pair_figures(pair)}
    assert np.isfinite(result.summary["causal.effect_corr_median_top_mean"])
    assert "ceiling.causal.effect_corr_median_top_mean" in result.summary
    assert "causal universality" in describe(result)
    matched, _ = export.matched_table(result.pairs, export.run_sources(result), result.replicate_pairs,
                                      own_neurons={name: sae.own_neurons for name, sae in result.saes.items()})
    cross = matched[~matched.same_model]
    pair = result.pairs[0]
    forward = cross[cross.seed_a == 0].set_index("feature_a").effect_corr
    backward = cross[cross.seed_a == 1].set_index("feature_a").effect_corr
    top_a = np.flatnonzero(pair.table.effect_corr.notna())
    np.testing.assert_allclose(forward[top_a], pair.table.effect_corr[top_a])
    np.testing.assert_allclose(backward[pair.matching.best_b[top_a]], pair.table.effect_corr[top_a])
    assert forward.notna().sum() == backward.notna().sum() == len(top_a)
    again = run_fast(tmp_path / "results", [0, 1], cfg)  # cached: the same numbers come back from disk
    np.testing.assert_array_equal(again.pairs[0].random_effect_corr, pair.random_effect_corr)


def best_mutual_pair(client, parent) -> tuple[int, int]:
    """Seed 0's feature with the highest activation correlation among its mutual matches in seed 1, and that partner."""
    matched, _ = lookups.load_tables(client, parent.info.run_id)
    rows = matched[(matched.seed_a == 0) & (matched.seed_b == 1) & matched.mutual & ~matched.same_model]
    best = rows.sort_values("corr", ascending=False).iloc[0]
    return int(best.feature_a), int(best.feature_b)


@pytest.mark.slow
def test_steer_ablate_across_seeds_prints_both_seeds_and_logs_a_child_run(tracked_tiny, tmp_path):
    results, _ = tracked_tiny
    client = MlflowClient(store.embedded_uri(results))
    parent = lookups.find_run(client, "latest")
    feature, partner = best_mutual_pair(client, parent)
    out = CliRunner().invoke(main, ["steer", "latest", "0", str(feature), "--ablate", "--across-seeds", "--log",
                                    "--results-dir", str(results)])
    assert out.exit_code == 0, out.output
    assert f"seed0 feature {feature}" in out.output and f"seed1 feature {partner}" in out.output
    assert "effect corr" in out.output and len(re.findall(r"^ +[+-][0-9.]+  .*⟦", out.output, re.M)) == N_AFFECTED
    steers = client.search_runs([parent.info.experiment_id], filter_string=(
        f"tags.`{names.KIND}` = 'steer' and tags.`mlflow.parentRunId` = '{parent.info.run_id}'"))
    assert len(steers) == 1 and steers[0].info.status == "FINISHED"
    run = steers[0]
    assert run.data.params["intervention"] == "ablate" and run.data.params["feature"] == str(feature)
    assert run.data.metrics["seed0/effect_corr"] == pytest.approx(1.0)
    assert -1 <= run.data.metrics["seed1/effect_corr"] <= 1
    assert {"steer/steer.txt", "steer/ablation.png"} <= {a.path for a in client.list_artifacts(run.info.run_id, "steer")}
    text = open(client.download_artifacts(run.info.run_id, "steer/steer.txt", str(tmp_path))).read()
    assert f"seed1 feature {partner}" in text and "\x1b[" not in text


@pytest.mark.slow
def test_steer_pin_samples_steered_beside_unsteered_with_the_same_seed(tracked_tiny):
    results, _ = tracked_tiny
    args = ["steer", "latest", "1", "3", "--pin", "--prompt", "def f(x):", "--tokens", "8", "--scale", "4",
            "--sample-seed", "5", "--results-dir", str(results)]
    first, again = (CliRunner().invoke(main, args) for _ in range(2))
    assert first.exit_code == 0, first.output
    assert first.output == again.output  # the same seed: the same samples
    assert "unsteered:" in first.output and "steered:" in first.output and "Jensen–Shannon" in first.output
    assert "pin seed1 feature 3" in first.output and "4 x its max activation" in first.output


@pytest.mark.slow
def test_steer_bad_inputs_are_one_line_errors_and_write_nothing_to_mlflow(tracked_tiny):
    results, _ = tracked_tiny
    client = MlflowClient(store.embedded_uri(results))
    exp = client.get_experiment_by_name("univ").experiment_id
    before = len(client.search_runs([exp]))
    cases = [
        (("0123abc", 0, 0), 1, "unknown run id"),
        (("latest", 7, 0), 1, "no seed 7"),
        (("latest", 0, 256), 1, "out of range"),
        (("latest", 0, 0, "--pin", "--prompt", ""), 1, "tokenizes to nothing"),
        (("latest", 0, 0, "--pin", "--tokens", 0), 2, "--tokens"),
        (("latest", 0, 0, "--pin", "--value", "nan"), 2, "--value"),
        (("latest", 0, 0, "--pin", "--scale", "inf"), 2, "--scale"),
        (("latest", 0, 0, "--pin", "--temperature", "-1"), 2, "--temperature"),
        (("latest", 0, 0, "--pin", "--value", 1, "--scale", 2), 2, "not both"),
    ]
    for args, status, message in cases:
        assert_one_line_error(univ("steer", *args, "--log", "--results-dir", results), message, status=status)
    assert len(client.search_runs([exp])) == before


def test_a_dead_feature_is_a_one_line_error(tmp_path):
    """A feature that never fires on the comparison tokens has nothing to ablate and no max to pin at."""
    sae = tiny_sae(24, 8, 6, torch.float32)
    folders = [tmp_path / name for name in ("data", "model", "sae", "acts")]  # no model: it is loaded last
    save_sae(sae, sae.cfg, folders[2])
    folders[3].mkdir()
    top = np.ones((8, 3), np.float32)
    top[5] = 0
    np.save(folders[3] / TOP_VALUES, top)
    np.save(folders[3] / TOP_POSITIONS, np.zeros((8, 3), np.int64))
    with pytest.raises(UnivError, match="feature 5 of seed 0 is dead"):
        load_member(folders, 0, 5)
    with pytest.raises(UnivError, match="out of range"):
        load_member(folders, 0, 8)
