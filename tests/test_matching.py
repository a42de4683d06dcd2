"""Matching recovers a planted permutation; ``univ match`` end to end, including its bad inputs."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from universality.cli import main
from universality.measures.comparison import compare
from universality.core.config import CompareConfig
from universality.measures.matching import NO_PARTNER, match

N_TOKENS, F_A, N_SHARED, F_B = 6000, 30, 20, 34


def planted(seed=0):
    """A: sparse features. B: A's first 20 columns permuted, rescaled and noisy, plus 14 independent ones.

    Returns A, B and ``perm`` with B[:, perm[i]] ~ A[:, i] for i < 20.
    """
    rng = np.random.default_rng(seed)

    def sparse_feats(n_cols):
        return rng.exponential(size=(N_TOKENS, n_cols)) * (rng.random((N_TOKENS, n_cols)) < 0.05)

    a = sparse_feats(F_A)
    perm = rng.permutation(F_B)[:N_SHARED]
    b = sparse_feats(F_B)
    noise = 0.1 * rng.exponential(size=(N_TOKENS, N_SHARED)) * (a[:, :N_SHARED] > 0)
    b[:, perm] = rng.uniform(0.5, 3.0, N_SHARED) * a[:, :N_SHARED] + noise
    return a, b, perm


def chunks(a, b, size=1000):
    return ((a[i : i + size], b[i : i + size]) for i in range(0, a.shape[0], size))


def test_planted_permutation_is_recovered():
    a, b, perm = planted()
    result = compare(chunks(a, sp.csr_matrix(b)), CompareConfig(min_firings=10))
    m = result.matching
    shared, replaced = np.arange(N_SHARED), np.arange(N_SHARED, F_A)
    assert (m.best_b[shared] == perm).all() and (m.best_b_corr[shared] > 0.9).all()
    assert (m.hungarian_b[shared] == perm).all()
    assert m.mutual[shared].all() and (m.best_a[perm] == shared).all()
    assert (m.best_b_corr[replaced] < 0.1).all()
    # one-to-one: the 10 replaced A features take 10 of the 14 unshared B features, all weakly
    assert len(set(m.hungarian_b[replaced])) == 10 and not set(m.hungarian_b[replaced]) & set(perm)
    assert (m.hungarian_corr[replaced] < 0.1).all()
    assert result.stats["n_mutual"] == N_SHARED + m.mutual[replaced].sum()
    assert result.stats["frac_above_0.5"] == pytest.approx(N_SHARED / F_A)


def test_excluded_features_are_never_matched():
    corr = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.7], [0.3, 0.0, 0.95]])
    m = match(corr, valid_a=np.array([True, True, False]), valid_b=np.array([True, True, False]))
    assert m.best_b.tolist() == [0, 1, NO_PARTNER] and np.isnan(m.best_b_corr[2])
    assert m.best_a.tolist() == [0, 1, NO_PARTNER]
    assert m.hungarian_b.tolist() == [0, 1, NO_PARTNER]
    assert m.mutual.tolist() == [True, True, False]


def test_rectangular_hungarian_leaves_surplus_unpaired():
    corr = np.array([[0.9, 0.8], [0.85, 0.1], [0.2, 0.3]])
    m = match(corr)
    assert m.hungarian_b.tolist() == [1, 0, NO_PARTNER]  # 0.8 + 0.85 beats 0.9 + 0.3
    assert m.best_b.tolist() == [0, 0, 1] and m.mutual.tolist() == [True, False, False]


# --- univ match -------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path):
    a, b, perm = planted()
    np.save(tmp_path / "a.npy", a.astype(np.float32))
    sp.save_npz(tmp_path / "b.npz", sp.csr_matrix(b))
    return tmp_path, perm


@pytest.mark.parametrize("table", ["out.csv", "out.parquet"])
def test_cli_writes_the_table(files, table):
    tmp, perm = files
    result = CliRunner().invoke(main, ["match", str(tmp / "a.npy"), str(tmp / "b.npz"), "--out", str(tmp / table), "--threshold", "0.6"])
    assert result.exit_code == 0, result.output
    assert "max_corr_median:" in result.output and "frac_above_0.6: 0.6667" in result.output
    df = pd.read_csv(tmp / table) if table.endswith(".csv") else pd.read_parquet(tmp / table)
    assert len(df) == F_A and {"feature_a", "feature_b", "corr", "hungarian_b", "hungarian_corr", "mutual",
                                "density_a", "density_b", "dead_a"} <= set(df.columns)
    assert df["feature_b"][:N_SHARED].tolist() == perm.tolist() and df["mutual"][:N_SHARED].all()
    np.testing.assert_allclose(df["density_a"], (np.load(tmp / "a.npy") > 0).mean(axis=0), rtol=1e-6)


def test_cli_dense_against_dense(files):
    tmp, _ = files
    result = CliRunner().invoke(main, ["match", str(tmp / "a.npy"), str(tmp / "a.npy"), "--out", str(tmp / "t.csv")])
    assert result.exit_code == 0, result.output
    df = pd.read_csv(tmp / "t.csv")
    assert (df["feature_b"] == df["feature_a"]).all() and np.allclose(df["corr"], 1.0)


def _bad_inputs(tmp):
    a = np.load(tmp / "a.npy")
    np.save(tmp / "short.npy", a[:-1])
    np.save(tmp / "flat.npy", a[:, 0])
    with_nan = a.copy()
    with_nan[4321, 3] = np.nan
    np.save(tmp / "nan.npy", with_nan)
    with_inf = sp.csr_matrix(a)
    with_inf.data[7] = np.inf
    sp.save_npz(tmp / "inf.npz", with_inf)
    (tmp / "empty.npy").write_bytes(b"")
    (tmp / "junk.npz").write_bytes(b"not a zip file")
    np.savetxt(tmp / "a.txt", a[:5])
    return {
        "row counts differ": ("short.npy", "b.npz", "out.csv", "rows"),
        "not 2-D": ("flat.npy", "b.npz", "out.csv", "2-D"),
        "NaN": ("nan.npy", "b.npz", "out.csv", "NaN"),
        "inf": ("a.npy", "inf.npz", "out.parquet", "infinite"),
        "empty file": ("empty.npy", "b.npz", "out.csv", "empty"),
        "unreadable": ("junk.npz", "a.npy", "out.csv", "junk.npz"),
        "missing input": ("missing.npy", "b.npz", "out.csv", "missing.npy"),
        "missing output folder": ("a.npy", "b.npz", "nowhere/out.csv", "does not exist"),
        "unknown output extension": ("a.npy", "b.npz", "out.json", ".json"),
        "unknown input extension": ("a.txt", "b.npz", "out.csv", ".txt"),
    }


def test_cli_bad_inputs_fail_in_one_line_and_write_nothing(files):
    tmp, _ = files
    for name, (a, b, out, message) in _bad_inputs(tmp).items():
        before = set(tmp.rglob("*"))
        result = CliRunner().invoke(main, ["match", str(tmp / a), str(tmp / b), "--out", str(tmp / out)])
        assert result.exit_code == 1, name
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1, (name, result.output)
        assert message in result.output, (name, result.output)
        assert set(tmp.rglob("*")) == before, name  # no table, no leftover temp file


def test_cli_rejects_out_of_range_threshold(files):
    tmp, _ = files
    result = CliRunner().invoke(main, ["match", str(tmp / "a.npy"), str(tmp / "b.npz"), "--out", str(tmp / "o.csv"), "--threshold", "1.5"])
    assert result.exit_code != 0 and not (tmp / "o.csv").exists()


# --- univ match --tokens ----------------------------------------------------------------

N_VOCAB = 50


@pytest.fixture
def token_files(files):
    """The planted pair plus a token feature in both (a function of the current token alone) and the token ids."""
    tmp, perm = files
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, N_VOCAB, N_TOKENS)
    lookup = rng.exponential(size=N_VOCAB)
    a, b = np.load(tmp / "a.npy"), sp.load_npz(tmp / "b.npz").toarray()
    np.save(tmp / "ta.npy", np.column_stack([a, lookup[tokens]]).astype(np.float32))
    np.save(tmp / "tb.npy", np.column_stack([b, 2 * lookup[tokens] + 1]).astype(np.float32))
    np.save(tmp / "tokens.npy", tokens)
    return tmp, perm, tokens


def test_cli_with_tokens_adds_the_contextual_columns_and_statistics(token_files):
    from universality.measures.token_control import compare_token_controlled

    tmp, perm, tokens = token_files
    result = CliRunner().invoke(main, ["match", str(tmp / "ta.npy"), str(tmp / "tb.npy"), "--out", str(tmp / "t.csv"),
                                       "--tokens", str(tmp / "tokens.npy")])
    assert result.exit_code == 0, result.output
    assert "contextual.max_corr_median:" in result.output and "token_lookup.max_corr_median:" in result.output
    assert "decile" not in result.output
    df = pd.read_csv(tmp / "t.csv")
    rows = zip(chunks(np.load(tmp / "ta.npy"), np.load(tmp / "tb.npy")), np.split(tokens, range(1000, N_TOKENS, 1000)))
    reference = compare_token_controlled(((a, b, t) for (a, b), t in rows), N_VOCAB, CompareConfig().min_firings,
                                         CompareConfig().thresholds)
    np.testing.assert_array_equal(df["feature_b_context"], reference.contextual.matching.best_b)
    np.testing.assert_allclose(df["corr_context"], reference.contextual.matching.best_b_corr, rtol=1e-6)
    np.testing.assert_allclose(df["token_share_a"], reference.token_share_a, rtol=1e-9)
    token_feature = F_A
    assert df["feature_b"][token_feature] == F_B and df["corr"][token_feature] > 0.99  # raw: the token feature matches
    assert df["token_share_a"][token_feature] > 0.99 and df["feature_b_context"][token_feature] == -1  # nothing left given the token
    assert df["feature_b_context"][:N_SHARED].tolist() == perm.tolist()  # the planted features do not depend on the token
    assert (df["token_share_a"][:N_SHARED] < 0.05).all()


def _bad_token_files(tmp, tokens):
    np.save(tmp / "short_tokens.npy", tokens[:-1])
    np.save(tmp / "negative.npy", np.where(np.arange(tokens.size) == 17, -3, tokens))
    np.save(tmp / "fractional.npy", tokens + 0.5)
    np.save(tmp / "square.npy", tokens.reshape(-1, 2))
    np.savetxt(tmp / "tokens.txt", tokens[:5])
    return {"length": ("short_tokens.npy", "token ids but the activations have"),
            "negative": ("negative.npy", ">= 0"), "not integers": ("fractional.npy", "integers"),
            "wrong shape": ("square.npy", "1-D"), "format": ("tokens.txt", ".npy"), "missing": ("nowhere.npy", "nowhere.npy")}


def test_cli_bad_token_files_fail_in_one_line_before_any_work(token_files, monkeypatch):
    import universality.match as match_module

    tmp, _, tokens = token_files
    monkeypatch.setattr(match_module, "compare_token_controlled", lambda *a, **k: pytest.fail("work started"))
    for name, (file, message) in _bad_token_files(tmp, tokens).items():
        before = set(tmp.rglob("*"))
        result = CliRunner().invoke(main, ["match", str(tmp / "ta.npy"), str(tmp / "tb.npy"), "--out", str(tmp / "t.csv"),
                                           "--tokens", str(tmp / file)])
        assert result.exit_code == 1, (name, result.output)
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1, (name, result.output)
        assert message in result.output, (name, result.output)
        assert set(tmp.rglob("*")) == before, name


def test_cli_tokens_without_a_value_is_a_usage_error(token_files):
    tmp, _, _ = token_files
    result = CliRunner().invoke(main, ["match", str(tmp / "ta.npy"), str(tmp / "tb.npy"), "--out", str(tmp / "t.csv"), "--tokens"])
    assert result.exit_code == 2 and not (tmp / "t.csv").exists()
