"""The streaming Pearson accumulator against dense float64 references."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from universality.measures.correlation import (
    StreamingCorrelation,
    _add_sparse_cross,
    as_chunk,
    pearson_reference,
    sparse_cross_reference,
    to_csr,
)
from universality.core.errors import DataError


def sparse_acts(rng, n, f, density, dead=()):
    """Nonnegative sparse activations; columns in ``dead`` never fire."""
    acts = sp.random(n, f, density=density, random_state=rng, data_rvs=lambda k: rng.exponential(size=k)).toarray()
    acts[:, list(dead)] = 0.0
    return acts


def stream(pairs):
    acc = StreamingCorrelation()
    for a, b in pairs:
        acc.update(a, b)
    return acc


def row_chunks(a, b, size):
    return [(a[i : i + size], b[i : i + size]) for i in range(0, a.shape[0], size)]


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    a = sparse_acts(rng, 3000, 40, 0.04, dead=(3, 17))
    b = 0.5 * a[:, ::-1][:, :30] + sparse_acts(rng, 3000, 30, 0.04, dead=(5,))
    b[:, 5] = 0.0
    return a, b


@pytest.mark.parametrize(
    "convert",
    [
        lambda x: x,  # dense numpy (sparse enough to be sparsified)
        lambda x: sp.csr_matrix(x),
        lambda x: torch.from_numpy(x.astype(np.float32)),
    ],
    ids=["numpy", "csr", "torch"],
)
def test_chunked_matches_numpy_corrcoef(data, convert, monkeypatch):
    monkeypatch.setattr("universality.measures.correlation._ROW_BLOCK", 7)  # several row blocks, a ragged last one
    a, b = data
    acc = stream((convert(ca), convert(cb)) for ca, cb in row_chunks(a, b, 700))
    np.testing.assert_allclose(acc.correlation(), pearson_reference(a, b), atol=1e-5)
    assert acc.n_tokens == 3000


def test_dense_path_and_mixed_paths_match_reference():
    rng = np.random.default_rng(1)
    neurons_a = rng.normal(size=(1000, 12)) + 3.0  # dense, nonzero mean: the dense matmul path
    feats_b = sparse_acts(rng, 1000, 25, 0.05)
    feats_b[:, 0] += np.maximum(neurons_a[:, 0] - 3, 0)
    for a, b in [(neurons_a, feats_b), (feats_b, neurons_a), (neurons_a, neurons_a[:, ::-1])]:
        acc = stream(row_chunks(a, b, 128))
        np.testing.assert_allclose(acc.correlation(), pearson_reference(a, b), atol=1e-5)


def test_dead_features_have_zero_correlation_and_are_flagged(data):
    a, b = data
    a = a.copy()
    a[:, 9] = 2.5  # constant: fires everywhere but has no variance
    acc = stream(row_chunks(a, b, 1000))
    corr = acc.correlation()
    assert np.flatnonzero(acc.dead_a).tolist() == [3, 9, 17]
    assert np.flatnonzero(acc.dead_b).tolist() == [5]
    assert not corr[[3, 9, 17]].any() and not corr[:, 5].any()
    assert acc.counts_a[3] == 0 and acc.counts_a[9] == 3000
    assert acc.counts_b.tolist() == np.count_nonzero(b > 0, axis=0).tolist()


def test_sparse_cross_kernel_matches_scipy_product(monkeypatch):
    rng = np.random.default_rng(2)
    a = sp.random(500, 60, density=0.1, random_state=rng, format="csr")
    b = sp.random(500, 45, density=0.2, random_state=rng, format="csr")
    monkeypatch.setattr("universality.measures.correlation.PAIR_BLOCK", 97)  # many small blocks
    cross = np.ones((60, 45))
    _add_sparse_cross(cross, a, b)
    np.testing.assert_allclose(cross, 1.0 + sparse_cross_reference(a, b), rtol=1e-12)


def test_to_csr_round_trips_dense_torch_and_numpy():
    rng = np.random.default_rng(3)
    dense = sparse_acts(rng, 50, 20, 0.1)
    dense[4, 7] = -1.5  # negative entries are kept too
    for x in (dense, torch.from_numpy(dense), torch.from_numpy(dense).to(torch.bfloat16)):
        csr = to_csr(x)
        assert csr.dtype == np.float64 and csr.has_canonical_format
        np.testing.assert_allclose(csr.toarray(), np.asarray(torch.as_tensor(x).double()), rtol=0)
    mostly_zero = sparse_acts(rng, 200, 20, 0.02)
    assert sp.issparse(as_chunk(mostly_zero)) and not sp.issparse(as_chunk(np.ones((4, 3))))


def test_bad_input_is_a_data_error():
    acc = StreamingCorrelation()
    with pytest.raises(DataError, match="2 tokens"):
        acc.correlation()
    with pytest.raises(DataError, match="2-D"):
        acc.update(np.zeros(5), np.zeros((5, 2)))
    with pytest.raises(DataError, match="tokens"):
        acc.update(np.zeros((5, 3)), np.zeros((4, 2)))
    acc.update(np.zeros((5, 3)), np.zeros((5, 2)))
    with pytest.raises(DataError, match="features"):
        acc.update(np.zeros((5, 4)), np.zeros((5, 2)))


def test_signed_features_that_never_exceed_zero_are_alive_and_correlated():
    """Rotated or GELU neurons are signed: a feature that varies below zero is not dead."""
    rng = np.random.default_rng(3)
    a = rng.normal(size=(500, 4))
    b = np.column_stack([-np.abs(a[:, 0]) - 1.0, a[:, 1:]])  # column 0 is always negative
    acc = StreamingCorrelation()
    for start in range(0, 500, 128):
        acc.update(a[start : start + 128], b[start : start + 128])
    assert not acc.dead_b.any() and acc.counts_b[0] == 500
    np.testing.assert_allclose(acc.correlation(), pearson_reference(a, b), atol=1e-5)
