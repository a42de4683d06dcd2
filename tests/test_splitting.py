"""Feature splitting: classification against hand-built correlations, the tree across sizes, the streamed
level against brute force, and a planted hierarchy that two SAEs of consecutive sizes must recover."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from sae.training import train_sae
from universality.outputs.terminal import describe
from universality.core.config import SAEConfig
from universality.measures.correlation import pearson_reference
from universality.measures.similarity import decoder_cosines
from universality.measures.splitting import (EXCLUDED, SplitLevel, classify, compare_sizes, descendants, forest, level_statistics,
                                             split_edges, splits_table, top_families)
from universality.runtime import cache
from universality.stages import split as split_stage


def hand_built() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Correlations of 5 parents with 7 candidate children: persist, split, shift, vanish, excluded.
    Child 6 is excluded in B (too rare): its 0.95 with parent 3 must not count."""
    corr = np.array([
        [0.95, 0.10, 0.00, 0.00, 0.20, 0.00, 0.00],  # 0: one child above 0.9 -> persist
        [0.05, 0.70, 0.65, 0.41, 0.39, 0.00, 0.00],  # 1: three children above 0.4 -> split
        [0.00, 0.00, 0.00, 0.00, 0.60, 0.10, 0.00],  # 2: one child below 0.9 -> shift
        [0.10, 0.30, 0.00, 0.00, 0.00, 0.40, 0.95],  # 3: nothing above 0.4 among included -> vanish
        [0.99, 0.00, 0.00, 0.00, 0.00, 0.00, 0.00],  # 4: excluded in A
    ])
    return corr, np.array([True, True, True, True, False]), np.array([True] * 6 + [False])


def test_edges_and_classes_of_a_hand_built_correlation_matrix():
    corr, included_a, included_b = hand_built()
    edges = split_edges(corr, included_a, included_b)
    assert edges[["feature_a", "feature_b"]].values.tolist() == [[0, 0], [1, 1], [1, 2], [1, 3], [2, 4]]
    assert edges["corr"].tolist() == pytest.approx([0.95, 0.70, 0.65, 0.41, 0.60])
    assert classify(edges, included_a).tolist() == ["persist", "split", "shift", "vanish", EXCLUDED]
    assert classify(edges, included_a, persist_min_corr=0.96)[0] == "shift"  # the persist threshold is honoured


def level_of(corr, included_a, included_b, density_a, density_b, cos=None) -> SplitLevel:
    edges = split_edges(corr, included_a, included_b)
    edges["cos"] = 1.0 if cos is None else cos
    return SplitLevel(corr.shape[0], corr.shape[1], edges, included_a, included_b, density_a, density_b)


def test_level_statistics_fractions_and_child_density():
    corr, included_a, included_b = hand_built()
    density_a = np.array([0.1, 0.2, 0.1, 0.1, 0.0])
    density_b = np.array([0.1, 0.05, 0.1, 0.02, 0.1, 0.1, 1e-7])
    stats = level_statistics(level_of(corr, included_a, included_b, density_a, density_b))
    assert stats["n_parents"] == 4
    assert [stats[f"frac_{c}"] for c in ("persist", "split", "shift", "vanish")] == [0.25, 0.25, 0.25, 0.25]
    assert stats["children_per_split_mean"] == 3
    assert stats["child_density_ratio_median"] == pytest.approx(0.25)  # 0.05, 0.1, 0.02 over 0.2
    assert stats["children_density_sum_ratio_median"] == pytest.approx(0.85)
    assert stats["persist_decoder_cos_median"] == 1.0


def chain_levels() -> list[SplitLevel]:
    """Sizes 2 -> 3 -> 5: feature 0 splits into 0 and 1; 1 splits again into 2, 3, 4; feature 1 persists."""
    edges = [[(0, 0, 0.7), (0, 1, 0.6), (1, 2, 0.95)], [(0, 0, 0.95), (1, 2, 0.6), (1, 3, 0.5), (1, 4, 0.45), (2, 1, 0.9)]]
    sizes = (2, 3, 5)
    levels = []
    for (size_a, size_b), rows in zip(zip(sizes, sizes[1:]), edges):
        frame = pd.DataFrame(rows, columns=["feature_a", "feature_b", "corr"]).assign(cos=0.5)
        levels.append(SplitLevel(size_a, size_b, frame, np.ones(size_a, bool), np.ones(size_b, bool),
                                 np.full(size_a, 0.1), np.full(size_b, 0.05)))
    return levels


def test_tree_across_sizes_follows_children_to_grandchildren():
    levels = chain_levels()
    tree = descendants(levels, 0)
    assert tree[0].feature_b.tolist() == [0, 1]
    assert sorted(tree[1].feature_b.tolist()) == [0, 2, 3, 4]  # grandchildren of 0: through 0 and through 1
    assert descendants(levels, 1)[1].feature_b.tolist() == [1]  # 1 -> 2 -> 1: persists twice
    assert top_families(levels, 5) == [0]  # only feature 0's tree splits
    assert levels[1].parents(2).feature_a.tolist() == [1] and levels[0].children(0).feature_b.tolist() == [0, 1]


def test_the_forest_keeps_each_child_under_its_most_correlated_parent():
    """A dense feature correlating with its neighbour's children must not claim them in the drawn trees."""
    edges = pd.DataFrame([(0, 0, 0.5), (0, 1, 0.45), (0, 2, 0.9), (1, 0, 0.7), (1, 1, 0.8)],
                         columns=["feature_a", "feature_b", "corr"]).assign(cos=0.0)
    level = SplitLevel(2, 3, edges, np.ones(2, bool), np.ones(3, bool), np.full(2, 0.1), np.full(3, 0.1))
    [kept] = forest([level])
    assert kept.edges[["feature_a", "feature_b"]].values.tolist() == [[0, 2], [1, 1], [1, 0]]
    assert top_families([level], 2) == [0, 1] and top_families([kept], 2) == [1]  # 0 only persists in the forest
    assert level.classes().tolist() == ["split", "split"]  # classes still count every child


def test_splits_table_has_the_documented_columns():
    table = splits_table({"seed0": chain_levels(), "seed1": chain_levels()[:1]})
    assert list(table.columns) == ["model", "size_a", "feature_a", "size_b", "feature_b", "corr", "cos"]
    assert str(table.model.dtype) == "string" and table.size_a.tolist() == [2] * 3 + [3] * 5 + [2] * 3
    assert table.model.tolist() == ["seed0"] * 8 + ["seed1"] * 3
    empty = splits_table({})
    assert list(empty.columns) == list(table.columns) and empty.dtypes.equals(table.dtypes)


def test_streamed_level_matches_brute_force_and_round_trips(tmp_path):
    """compare_sizes over chunks: its edges are exactly the dense Pearson correlations above the threshold,
    its cosines those of the decoder vectors."""
    rng = np.random.default_rng(0)
    latent = (rng.random((4000, 6)) < 0.05) * rng.uniform(1, 2, (4000, 6))
    mix_a, mix_b = rng.random((6, 8)) * (rng.random((6, 8)) < 0.3), rng.random((6, 12)) * (rng.random((6, 12)) < 0.3)
    acts_a, acts_b = latent @ mix_a, latent @ mix_b
    W_a, W_b = rng.standard_normal((8, 16)), rng.standard_normal((12, 16))
    chunks = [(acts_a[i:i + 1000], acts_b[i:i + 1000]) for i in range(0, 4000, 1000)]
    level = compare_sizes(chunks, W_a, W_b, min_firings=10)
    reference = pearson_reference(acts_a, acts_b)
    alive_a, alive_b = (acts_a > 0).sum(0) >= 10, (acts_b > 0).sum(0) >= 10
    expected = np.argwhere((reference > 0.4) & alive_a[:, None] & alive_b[None, :])
    assert len(level.edges) == len(expected) > 5
    assert set(map(tuple, level.edges[["feature_a", "feature_b"]].values)) == set(map(tuple, expected))
    rows, cols = level.edges.feature_a.to_numpy(), level.edges.feature_b.to_numpy()
    np.testing.assert_allclose(level.edges["corr"], reference[rows, cols], atol=1e-6)
    np.testing.assert_allclose(level.edges["cos"], decoder_cosines(W_a, W_b)[rows, cols], atol=1e-12)
    split_stage.save(level, tmp_path)
    loaded = split_stage.load(tmp_path)
    pd.testing.assert_frame_equal(loaded.edges, level.edges)
    assert (loaded.size_a, loaded.size_b) == (8, 12) and np.array_equal(loaded.density_b, level.density_b)


# ---- a planted hierarchy ----------------------------------------------------------------------

D, N_OTHER, HALF_ANGLE = 32, 12, np.deg2rad(25)


def planted_directions() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Orthonormal parent and unrelated directions; two children at ±25° from the parent (cosine 0.91 to it)."""
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((D, D)))
    parent, spread = q[:, 0], q[:, 1]
    children = np.stack([np.cos(HALF_ANGLE) * parent + s * np.sin(HALF_ANGLE) * spread for s in (1, -1)])
    return parent, children, q[:, 2:2 + N_OTHER].T


def planted_activations(n: int, seed: int) -> torch.Tensor:
    """One of the two children fires on 8% of tokens (never both): the parent's activation is their sum;
    each unrelated direction fires on 6%; magnitudes in [1, 2], plus small noise."""
    _, children, others = planted_directions()
    rng = np.random.default_rng(seed)
    child_acts = np.zeros((n, 2))
    child_acts[np.arange(n), rng.integers(0, 2, n)] = (rng.random(n) < 0.08) * rng.uniform(1, 2, n)
    other_acts = (rng.random((n, N_OTHER)) < 0.06) * rng.uniform(1, 2, (n, N_OTHER))
    x = child_acts @ children + other_acts @ others + 0.01 * rng.standard_normal((n, D))
    return torch.tensor(x, dtype=torch.float32)


def train_dictionary(x: torch.Tensor, size: int):
    cfg = SAEConfig(dict_size=size, batch_size=256, samples=256 * 2000, lr=3e-3, l1_coeff=0.03, resample_inputs=2048,
                    resample_fractions=(0.2, 0.4), dead_window_fraction=0.1, precision="fp32")
    g = torch.Generator().manual_seed(1)
    batches = (batch for _ in iter(int, 1) for batch in x[torch.randperm(len(x), generator=g)].split(256))
    return train_sae(batches, cfg, D, seed=0, progress=False).sae


def best_cosines(sae, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each direction, the SAE feature whose decoder vector is closest, and the cosine."""
    cos = decoder_cosines(directions, sae.W_dec.detach().numpy())
    return cos.argmax(axis=1), cos.max(axis=1)


def test_planted_parent_splits_into_its_two_children(one_thread):
    """A dictionary one feature short of the truth merges the two children into the parent; one with a
    feature more learns both children; the analysis reports exactly that split, and every unrelated
    feature persists."""
    parent, children, others = planted_directions()
    x = planted_activations(60_000, seed=1)
    small, large = train_dictionary(x, N_OTHER + 1), train_dictionary(x, N_OTHER + 2)
    (parent_feature,), (parent_cos,) = best_cosines(small, parent[None])
    child_features, child_cos = best_cosines(large, children)
    assert parent_cos > 0.99 and child_cos.min() > 0.99 and len(set(child_features)) == 2
    assert best_cosines(small, others)[1].min() > 0.99 and best_cosines(large, others)[1].min() > 0.99

    heldout = planted_activations(20_000, seed=2)
    with torch.no_grad():
        acts = [sae.encode(heldout).numpy() for sae in (small, large)]
    level = compare_sizes([tuple(acts)], small.W_dec.detach().numpy(), large.W_dec.detach().numpy(), min_firings=10)
    classes = level.classes()
    assert classes[parent_feature] == "split"
    assert sorted(level.children(parent_feature).feature_b) == sorted(child_features)
    assert level.children(parent_feature)["corr"].to_numpy() == pytest.approx([2**-0.5] * 2, abs=0.05)
    assert level.children(parent_feature)["cos"].to_numpy() == pytest.approx([np.cos(HALF_ANGLE)] * 2, abs=0.01)
    assert (np.delete(classes, parent_feature) == "persist").all()
    stats = level_statistics(level)
    assert stats["frac_split"] == pytest.approx(1 / (N_OTHER + 1)) and stats["frac_vanish"] == 0
    assert stats["children_density_sum_ratio_median"] == pytest.approx(1.0, abs=0.02)  # the firings are shared out


# ---- in the pipeline ----------------------------------------------------------------------------

@pytest.mark.slow
def test_a_family_run_splits_each_model_between_consecutive_sizes_and_a_single_size_does_no_extra_work(tmp_path):
    from fast_pipeline import fast_cfg, run_fast

    from universality import plans

    names = ["seed0", "seed0-d32", "seed0-d64", "seed1", "seed1-d32", "seed1-d64"]
    assert plans.split_plan(names, ["seed0", "seed1"], fast_cfg().replace(sae={"dict_sizes": [32, 64, 128]})) == [
        ("seed0-d32", "seed0-d64"), ("seed0-d64", "seed0"), ("seed1-d32", "seed1-d64"), ("seed1-d64", "seed1")]
    assert plans.split_plan(["seed0", "seed1"], ["seed0", "seed1"], fast_cfg()) == []

    results = tmp_path / "results"
    single = run_fast(results, [0], fast_cfg().replace(sae={"replicates": 0, "dict_size": 128}))
    assert single.splits == {} and not any(k.startswith("splits.") for k in single.summary)
    assert not (results / "cache" / "split").exists()

    family = fast_cfg().replace(sae={"dict_sizes": [64, 128], "replicates": 0})  # 128 is the single run's: cached
    result = run_fast(results, [0], family)
    [level] = result.splits["seed0"]
    assert (level.size_a, level.size_b) == (64, 128) and len(list((results / "cache" / "split").glob("*/done.json"))) == 1
    stats = {c: result.summary[f"splits.64_to_128.frac_{c}_mean"] for c in ("persist", "split", "shift", "vanish")}
    assert sum(stats.values()) == pytest.approx(1.0) and stats == {c: level_statistics(level)[f"frac_{c}"] for c in stats}
    assert "feature splitting" in describe(result) and "64 -> 128" in describe(result)
    # every folder the family read (the single run's too: it is the family's primary) is in its stage list, split included
    assert set(result.stage_folders) == {d for d in (results / "cache").glob("*/*") if d.is_dir()}
    assert [f.parent.name for f in result.stage_folders] == sorted((f.parent.name for f in result.stage_folders),
                                                                   key=cache.STAGES.index)
    again = run_fast(results, [0], family)  # cached: the same level
    pd.testing.assert_frame_equal(again.splits["seed0"][0].edges, level.edges)


def test_the_split_tree_figure_and_report_section():
    from universality.outputs import split_report

    levels = chain_levels()
    nodes, edges = split_report._tree_layout(levels, 0)
    assert nodes == [[0], [0, 1], [0, 2, 3, 4]] and len(edges) == 6
    figure = split_report.tree_figure("seed0", levels)
    assert figure.name == split_report.FIGURE_FILE and figure.png.startswith(b"\x89PNG")
    summary = {"splits.2_to_3.frac_split_mean": 0.5, "splits.3_to_5.frac_persist_mean": 0.25}
    section = split_report.split_section(summary, [(2, 3), (3, 5)], figure)
    assert section.count("<tr>") == 3 and "2 → 3" in section and "0.50" in section and "data:image/png" in section
    persisting = dataclasses.replace(levels[0], edges=levels[0].edges[levels[0].edges.feature_a == 1])
    assert top_families([persisting], 4) == [] and split_report.tree_figure("seed0", [persisting]).png.startswith(b"\x89PNG")


@pytest.mark.slow
def test_a_tracked_family_run_exports_its_splits_and_shows_a_feature_of_any_size(tmp_path, tracked_tiny):
    import json

    from click.testing import CliRunner
    from fast_pipeline import fast_cfg
    from mlflow import MlflowClient

    from universality.tracking import lookups, store
    from universality.cli import main

    config = tmp_path / "fast.json"
    config.write_text(json.dumps(fast_cfg().to_dict()))
    results = tmp_path / "results"
    run = CliRunner().invoke(main, ["run", "--config", str(config), "--seeds", "2", "--jobs", "1", "--device", "cpu",
                                    "--results-dir", str(results), "--dict-sizes", "64,128", "--sae-replicates", "0"])
    assert run.exit_code == 0, run.output
    assert "feature splitting" in run.output and "64 -> 128" in run.output

    client = MlflowClient(store.embedded_uri(results))
    parent = lookups.find_run(client, "latest")
    assert {f"splits/64_to_128_frac_{c}_mean" for c in ("persist", "split", "shift", "vanish")} <= set(parent.data.metrics)
    report = open(client.download_artifacts(parent.info.run_id, "report/report.html", str(tmp_path))).read()
    assert "Feature splitting between dictionary sizes" in report
    assert "report/split_trees.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}

    out = CliRunner().invoke(main, ["export", "latest", "--out", str(tmp_path / "m.csv"), "--results-dir", str(results)])
    assert out.exit_code == 0, out.output
    splits = pd.read_csv(tmp_path / "m.splits.csv")
    assert list(splits.columns) == ["model", "size_a", "feature_a", "size_b", "feature_b", "corr", "cos"]
    assert set(splits.model) == {"seed0", "seed1"} and (splits.size_a == 64).all() and (splits["corr"] > 0.4).all()
    assert "split edges" in out.output

    parent_row = splits[splits.model == "seed0"].iloc[0]
    shown = CliRunner().invoke(main, ["features", "latest", "0", str(parent_row.feature_a), "--size", "64",
                                      "--results-dir", str(results)])
    assert shown.exit_code == 0, shown.output
    assert "(64-feature SAE)" in shown.output and "only the primary size" in shown.output
    assert f"128-feature SAE, feature {parent_row.feature_b}: corr {parent_row['corr']:.3f}" in shown.output
    child = CliRunner().invoke(main, ["features", "latest", "0", str(parent_row.feature_b), "--results-dir", str(results)])
    assert child.exit_code == 0 and f"64-feature SAE, feature {parent_row.feature_a}" in child.output
    assert "best partners" in child.output and "only the primary size" not in child.output

    bad = CliRunner().invoke(main, ["features", "latest", "0", "0", "--size", "100", "--results-dir", str(results)])
    assert bad.exit_code == 1 and bad.output.strip().endswith("has no 100-feature SAE (its sizes: 64, 128)")
    assert len(bad.output.strip().splitlines()) == 1

    single, _ = tracked_tiny  # one size: no splits table, no lineage
    out = CliRunner().invoke(main, ["export", "latest", "--out", str(tmp_path / "s.csv"), "--results-dir", str(single)])
    assert out.exit_code == 0 and not (tmp_path / "s.splits.csv").exists() and "split edges" not in out.output
    bad = CliRunner().invoke(main, ["features", "latest", "0", "0", "--size", "64", "--results-dir", str(single)])
    assert bad.exit_code == 1 and "has no 64-feature SAE (its sizes: 256)" in bad.output
