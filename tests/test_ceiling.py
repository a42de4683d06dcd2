"""The within-model ceiling: a planted case (two synthetic "models" that share a known fraction of their
features, each written into its own basis, through SAE training and matching), position features, and
the ceiling in what a run prints, logs and reports."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from sae.evaluation import convergence
from sae.training import train_sae
from universality.tracking import lookups, names, store
from universality.analysis.heldout import single_position, token_positions
from universality.core.run_names import model_name, replica_name, replicate_of
from universality.measures.comparison import compare
from universality.core.config import CompareConfig, SAEConfig
from universality.measures.correlation import to_csr

N_SHARED, N_PRIVATE, D = 40, 24, 32
UNIV = [sys.executable, "-c", "from universality.cli import main; main()"]  # the CLI in its own process
BASIS_SEED = 1234
PLANTED_SHARED = N_SHARED / (N_SHARED + N_PRIVATE)  # of each model's features, the fraction the other has too


def two_models(n_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations of models A and B on the same tokens. Latent features fire with probability 1-4% at
    a magnitude in [1, 2]; A holds the shared latents and its private ones, B the shared and its own,
    each written along random directions of its own basis (so no basis is shared, as across seeds)."""
    rng = np.random.default_rng(seed)
    n_latents = N_SHARED + 2 * N_PRIVATE
    latents = rng.uniform(1, 2, (n_tokens, n_latents)) * (rng.random((n_tokens, n_latents)) < rng.uniform(0.01, 0.04, n_latents))
    own = {"a": np.r_[0:N_SHARED, N_SHARED : N_SHARED + N_PRIVATE], "b": np.r_[0:N_SHARED, N_SHARED + N_PRIVATE : n_latents]}
    basis = np.random.default_rng(BASIS_SEED)  # each model's directions: the same for training and held-out tokens
    models = []
    for side in ("a", "b"):
        dirs = basis.standard_normal((N_SHARED + N_PRIVATE, D))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        x = latents[:, own[side]] @ dirs + 0.01 * rng.standard_normal((n_tokens, D))
        models.append(torch.tensor(x, dtype=torch.float32))
    return models[0], models[1]


def batches(x: torch.Tensor, batch_size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield from x[torch.randperm(len(x), generator=g)].split(batch_size)


def fit(x: torch.Tensor, seed: int):
    cfg = SAEConfig(dict_size=N_SHARED + N_PRIVATE, batch_size=256, samples=1_000_000, lr=3e-3, l1_coeff=0.03,
                    resample_inputs=4096, resample_fractions=(0.1, 0.2, 0.3, 0.4), dead_window_fraction=0.05)
    return train_sae(batches(x, 256, seed), cfg, D, seed=seed, progress=False).sae


def universality(sae_a, acts_a: torch.Tensor, sae_b, acts_b: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        chunks = [(to_csr(sae_a.encode(a)), to_csr(sae_b.encode(b))) for a, b in zip(acts_a.split(4096), acts_b.split(4096))]
    return compare(chunks, CompareConfig(min_firings=5)).stats


@pytest.fixture(scope="module")
def planted():
    torch.set_num_threads(1)
    train_a, train_b = two_models(100_000, seed=0)
    eval_a, eval_b = two_models(20_000, seed=7)  # held-out tokens
    return train_a, train_b, eval_a, eval_b


@pytest.fixture(scope="module")
def fitted(planted):
    """SAEs on model A (two SAE seeds) and on model B."""
    train_a, train_b, _, _ = planted
    return fit(train_a, seed=0), fit(train_b, seed=1), fit(train_a, seed=2)


@pytest.mark.slow
def test_planted_shared_fraction_is_recovered_and_the_ceiling_is_high(planted, fitted):
    _, _, eval_a, eval_b = planted
    sae_a, sae_b, sae_a2 = fitted
    across = universality(sae_a, eval_a, sae_b, eval_b)
    assert across["frac_above_0.5"] == pytest.approx(PLANTED_SHARED, abs=0.1)
    ceiling = universality(sae_a, eval_a, sae_a2, eval_a)
    assert ceiling["max_corr_median"] > 0.9


def test_token_positions_and_single_position_features_against_brute_force():
    ctx_len, skip = 8, 2
    kept = [(c, t) for c in range(5) for t in range(skip, ctx_len)]  # the stored rows, in order
    rows = np.array([[0, 7, 13, -1], [29, 1, 2, 3]])
    expected = np.array([[c * ctx_len + t if r >= 0 else -1 for r, (c, t) in zip(row, [kept[r] for r in row])]
                         for row in rows])
    positions = token_positions(rows, ctx_len, skip)
    np.testing.assert_array_equal(positions, expected)
    top = np.array([[2, 10, 18, -1],  # position 2 of three contexts: a position feature
                    [2, 11, 18, 26],  # positions 2, 3, 2, 2
                    [5, -1, -1, -1],  # one example: not enough to say
                    [-1, -1, -1, -1]])
    assert single_position(top, ctx_len).tolist() == [True, False, False, False]


@pytest.mark.slow
def test_a_run_reports_its_ceiling_everywhere(tracked_tiny, tmp_path):
    """`univ run --seeds 2 --preset tiny` prints the ceiling and logs the replicate SAE, its pair with its
    own report, and the ceiling in the run report."""
    results, output = tracked_tiny
    assert "seed0-sae1 (replicate SAE of seed0)" in output and "seed0 vs seed0-sae1 (same model)" in output
    ceiling = re.search(r"same model \(ceiling, 1 SAE pair\)\s+([0-9.]+)", output)
    across = re.search(r"SAE features, across models\s+([0-9.]+)", output)
    ratio = re.search(r"across models / ceiling\s+([0-9.]+)", output)
    assert ceiling and across and ratio
    assert float(ratio.group(1)) == pytest.approx(float(across.group(1)) / float(ceiling.group(1)), abs=2e-3)
    client = MlflowClient(store.embedded_uri(results))
    parent = lookups.find_run(client, "latest")
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    kinds = {r.info.run_name: r.data.tags[names.KIND] for r in children}
    assert kinds["seed0-sae1"] == "sae-replicate" and kinds["seed0-vs-seed0-sae1"] == "replicate-pair"
    pair = next(r for r in children if r.info.run_name == "seed0-vs-seed0-sae1")
    assert "report/report.html" in {a.path for a in client.list_artifacts(pair.info.run_id, "report")}
    report = client.download_artifacts(parent.info.run_id, "report/report.html", str(tmp_path))
    text = Path(report).read_text()
    assert "Universality against its ceiling" in text and "two SAE seeds (the ceiling)" in text


def test_bad_replicate_and_position_settings_are_one_line_errors(tmp_path):
    bad = subprocess.run([*UNIV, "run", "--preset", "tiny", "--sae-replicates", "-1",
                          "--results-dir", str(tmp_path / "r")], capture_output=True, text=True)
    assert bad.returncode == 2 and "--sae-replicates" in bad.stderr and "Traceback" not in bad.stderr
    config = tmp_path / "c.toml"
    config.write_text("[compare]\nskip_first_positions = 32\n")
    bad = subprocess.run([*UNIV, "run", "--preset", "tiny", "--config", str(config),
                          "--results-dir", str(tmp_path / "r")], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "Error: compare.skip_first_positions must be below data.ctx_len (32)"]
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_convergence_is_one_for_an_sae_against_itself_and_low_for_unrelated_saes(planted, fitted):
    _, _, eval_a, eval_b = planted
    sae_a, sae_b, _ = fitted
    cfg = CompareConfig(min_firings=5)
    same = convergence(sae_a, sae_a, eval_a.split(4096), cfg)
    assert same["convergence_corr_median"] == pytest.approx(1.0, abs=1e-6)
    assert same["convergence_decoder_cos_median"] == pytest.approx(1.0, abs=1e-6)
    unrelated = convergence(sae_a, sae_b, eval_a.split(4096), cfg)  # B's SAE knows another basis
    assert unrelated["convergence_corr_median"] < 0.5 and unrelated["convergence_decoder_cos_median"] < 0.5


def test_run_names_are_made_and_read_in_one_place():
    assert [replica_name("seed3", r) for r in (0, 2)] == ["seed3", "seed3-sae2"]
    assert [(model_name(n), replicate_of(n)) for n in ("seed3", "seed3-sae2", "shuffled-seed0-1")] == [
        ("seed3", 0), ("seed3", 2), ("shuffled-seed0-1", 0)]


def test_both_kinds_of_control_are_controls():
    from universality.core.run_names import control_kind, is_control, shuffled_name, untrained_name

    assert untrained_name(0) == "untrained-seed0" and shuffled_name(0, 1) == "shuffled-seed0-1"
    assert [control_kind(n) for n in ("shuffled-seed0-1", "untrained-seed1", "seed0", "seed0-sae1")] == [
        "randomized", "untrained", None, None]
    assert [is_control(n) for n in ("shuffled-seed0-2", "untrained-seed0", "seed1")] == [True, True, False]
    assert (model_name("untrained-seed0"), replicate_of("untrained-seed0")) == ("untrained-seed0", 0)
