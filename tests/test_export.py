"""Matched feature tables: round trips in every format with the documented dtypes, the matching
seen from B, and the export / features commands' errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from universality.outputs import export
from universality.tracking import lookups, store
from universality.cli import main
from universality.core.config import DEFAULT_EXPERIMENT
from universality.measures.matching import match


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.slow
@pytest.mark.parametrize("fmt", export.FORMATS)
def test_export_round_trips_with_documented_columns(tracked_tiny, tmp_path, fmt):
    results, _ = tracked_tiny
    out = tmp_path / f"matched.{fmt}"
    result = invoke("export", "latest", "--format", fmt, "--out", out, "--results-dir", results)
    assert result.exit_code == 0, result.output
    client = MlflowClient(store.embedded_uri(results))
    matched, families = lookups.load_tables(client, lookups.find_run(client, "latest").info.run_id)
    back = export.read_table(out, fmt, export.MATCHED_COLUMNS)
    back_families = export.read_table(export.families_path(out), fmt, export.FAMILY_COLUMNS)
    pd.testing.assert_frame_equal(back, matched)
    pd.testing.assert_frame_equal(back_families, families)
    assert {c: str(t) for c, t in back.dtypes.items()} == export.MATCHED_COLUMNS
    cross, same = matched[~matched.same_model], matched[matched.same_model]
    assert len(cross) == 2 * 256  # both directions of the one pair of 256-feature SAEs
    assert set(cross.seed_a) == {0, 1} and (cross.seed_a != cross.seed_b).all() and (cross.sae_a == 0).all()
    assert len(same) == 2 * 256  # and of seed 0's SAE with its replicate: the ceiling, marked as such
    assert (same.seed_a == 0).all() and (same.seed_b == 0).all() and set(zip(same.sae_a, same.sae_b)) == {(0, 1), (1, 0)}
    assert (same.family[same.sae_a == 1] == -1).all()  # families link features across models only
    assert len(families) > 0 and (families["size"] >= 2).all()
    first = families.iloc[0]
    rows = matched[matched.family == first.family]
    listed = {(int(part.split(":")[0][4:]), int(f)) for part in first.members.split(";") for f in part.split(":")[1].split(",")}
    assert set(zip(rows.seed_a, rows.feature_a)) == listed and len(listed) == first["size"]
    assert (rows.mutual & (rows["corr"] > export.FAMILY_MIN_CORR)).any()
    check_contextual_columns(cross)


def check_contextual_columns(cross: pd.DataFrame) -> None:
    """Both directions carry a contextual partner where the raw one exists (but for token features), a token share
    in [0, 1], and A's contextual max partner seen from B is never above B's own contextual max."""
    assert ((cross.feature_b_context == -1) == cross.corr_context.isna()).all()
    assert cross.token_share_a.dropna().between(0, 1).all() and cross.token_share_a.notna().mean() > 0.5
    for seed_a in (0, 1):
        side = cross[cross.seed_a == seed_a]
        assert (side.feature_b_context >= 0).mean() > 0.5  # most features keep a partner given the token
        other = cross[cross.seed_a != seed_a].set_index("feature_a")
        paired = side[side.feature_b_context >= 0]
        assert (paired.corr_context.to_numpy() <= other.corr_context.reindex(paired.feature_b_context).to_numpy() + 1e-6).all()


@pytest.mark.slow
def test_feature_card_in_terminal(tracked_tiny):
    results, _ = tracked_tiny
    out = invoke("features", "latest", 1, 3, "--results-dir", results)
    assert out.exit_code == 0, out.output
    assert "seed1 feature 3" in out.output and "⟦" in out.output and "seed0 feature" in out.output
    assert "promotes:" in out.output and "suppresses:" in out.output


@pytest.mark.slow
def test_bad_inputs_are_one_line_errors_and_write_nothing(tracked_tiny, tmp_path):
    results, _ = tracked_tiny
    client = MlflowClient(store.embedded_uri(results))
    child = univ_child(client)
    cases = [
        (("export", "0123abc", "--out", tmp_path / "a.csv"), 1, "unknown run id"),
        (("export", child, "--out", tmp_path / "a.csv"), 1, "is not a univ"),
        (("export", "--format", "xls", "--out", tmp_path / "a.csv"), 2, "xls"),
        (("export", "--out", tmp_path / "missing" / "a.csv"), 1, "does not exist"),
        (("features", "latest", 0, 256), 1, "out of range"),
        (("features", "latest", 7, 0), 1, "no seed 7"),
    ]
    for args, code, message in cases:
        out = invoke(*args, "--results-dir", results)
        assert out.exit_code == code, (args, out.output)
        assert message in out.output
        if code == 1:
            assert len(out.output.strip().splitlines()) == 1, out.output
    assert list(tmp_path.iterdir()) == []


def univ_child(client: MlflowClient) -> str:
    exp = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    return client.search_runs([exp.experiment_id], filter_string="tags.`univ.kind` = 'seed'")[0].info.run_id


def test_reversed_matching_is_the_matching_of_the_transpose():
    corr = np.random.default_rng(0).uniform(-1, 1, (7, 5))
    valid_a, valid_b = np.array([1, 1, 0, 1, 1, 1, 1], bool), np.array([1, 1, 1, 0, 1], bool)
    got, want = export.reversed_matching(match(corr, valid_a, valid_b)), match(corr.T, valid_b, valid_a)
    for name in ("best_b", "best_b_corr", "best_a", "best_a_corr", "hungarian_b", "hungarian_corr", "mutual"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


def test_families_path_sits_beside_the_table(tmp_path):
    assert export.families_path(tmp_path / "out.csv") == tmp_path / "out.families.csv"


@pytest.mark.slow
def test_single_seed_run_is_tracked_and_exports_empty_typed_tables(tmp_path):
    """One seed without replicate SAEs has no pairs: the run still succeeds, and its tables have the columns
    but no rows."""
    config = tmp_path / "one.toml"
    config.write_text('preset = "tiny"\n[train]\nsteps = 10\nwarmup_steps = 2\n[sae]\nsamples = 4096\n')
    results = tmp_path / "results"
    ran = invoke("run", "--seeds", 1, "--sae-replicates", 0, "--config", config, "--results-dir", results)
    assert ran.exit_code == 0, ran.output
    out = tmp_path / "matched.csv"
    exported = invoke("export", "--format", "csv", "--out", out, "--results-dir", results)
    assert exported.exit_code == 0, exported.output
    matched = export.read_table(out, "csv", export.MATCHED_COLUMNS)
    assert matched.empty and dict(matched.dtypes.astype(str)) == export.MATCHED_COLUMNS


def test_match_and_export_tables_share_one_documented_vocabulary(tmp_path):
    """`univ match` and `univ export` name the same quantities alike, and the README's table names every column."""
    import re
    from pathlib import Path

    from universality.core.config import CompareConfig
    from universality.match import match_activation_files

    acts = np.maximum(np.random.default_rng(0).standard_normal((400, 6)), 0)
    np.save(tmp_path / "a.npy", acts)
    np.save(tmp_path / "b.npy", acts[:, ::-1].copy())
    match_activation_files(tmp_path / "a.npy", tmp_path / "b.npy", tmp_path / "t.csv", CompareConfig(min_firings=1))
    match_columns = set(pd.read_csv(tmp_path / "t.csv").columns)
    assert match_columns - set(export.MATCHED_COLUMNS) == {"dead_a", "ultralow_a"}  # match-only diagnostics
    assert {"feature_a", "feature_b", "corr", "hungarian_b", "hungarian_corr", "mutual"} <= set(export.MATCHED_COLUMNS)
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme[readme.index("| column | dtype | meaning |"):].split("\n\n")[0]
    documented = {name for row in table.splitlines() for name in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert match_columns | set(export.MATCHED_COLUMNS) <= documented, sorted((match_columns | set(export.MATCHED_COLUMNS)) - documented)


def test_a_table_without_the_contextual_columns_is_a_one_line_error(tmp_path):
    from universality.core.errors import UnivError

    old = {c: [] for c in export.MATCHED_COLUMNS if c not in ("corr_context", "feature_b_context", "token_share_a")}
    pd.DataFrame(old).to_csv(tmp_path / "old.csv", index=False)
    with pytest.raises(UnivError, match="no column feature_b_context, corr_context, token_share_a .*older univ"):
        export.read_table(tmp_path / "old.csv", "csv", export.MATCHED_COLUMNS)
