"""The library side of ``univ match``: two activation files in, a per-feature match table out.

Each input is an [N, F] activation matrix over the same N tokens: a dense ``.npy`` (memory-
mapped and streamed in row chunks) or a sparse matrix saved with ``scipy.sparse.save_npz``.
With the current token id of every row (``--tokens``: a 1-D integer ``.npy``), the features are also
compared given the token (``measures.token_control``): the table gains ``token_share_a``,
``feature_b_context`` and ``corr_context``, the statistics ``contextual.*``, ``token_lookup.*`` and
``by_token_share.*``. Every problem with the inputs or the output path is a ``DataError``, found before
any work, and the table is written atomically at the very end, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import scipy.sparse as sp

import pandas as pd

from universality.analysis.heldout import CHUNK_ROWS, with_tokens
from universality.analysis.pairs import with_context_columns
from universality.runtime.atomic import atomic_path
from universality.measures.comparison import PairComparison, compare
from universality.core.config import CompareConfig
from universality.core.errors import DataError
from universality.measures.token_control import compare_token_controlled, token_control_statistics

TABLE_FORMATS = (".csv", ".parquet")


def load_activations(path: Path) -> np.ndarray | sp.csr_matrix:
    """An [N, F] activation matrix: a memory-mapped ``.npy`` or a CSR matrix from a ``.npz``."""
    path = Path(path)
    if path.suffix not in (".npy", ".npz"):
        raise DataError(f"{path}: unknown activation format {path.suffix!r} (expected .npy or .npz)")
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty file")
        if path.suffix == ".npy":
            acts = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            acts = sp.load_npz(path).tocsr()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a {path.suffix} activation matrix ({exc})") from None
    if acts.ndim != 2:
        raise DataError(f"{path}: activations must be 2-D [tokens, features], got shape {acts.shape}")
    if not np.issubdtype(acts.dtype, np.number) or np.issubdtype(acts.dtype, np.complexfloating):
        raise DataError(f"{path}: activations must be real numbers, not {acts.dtype}")
    if acts.shape[0] < 2 or acts.shape[1] < 1:
        raise DataError(f"{path}: need at least 2 tokens and 1 feature, got shape {acts.shape}")
    return acts


def load_tokens(path: Path, n_rows: int) -> np.ndarray:
    """[N] int64 token ids, one per activation row: a 1-D ``.npy`` of non-negative integers (whole-valued
    floats are accepted), exactly ``n_rows`` long."""
    path = Path(path)
    if path.suffix != ".npy":
        raise DataError(f"{path}: token ids must be a .npy file, not {path.suffix!r}")
    try:
        tokens = np.load(path, allow_pickle=False)
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a .npy array of token ids ({exc})") from None
    if tokens.ndim != 1:
        raise DataError(f"{path}: token ids must be 1-D [tokens], got shape {tokens.shape}")
    if tokens.size != n_rows:
        raise DataError(f"{path} has {tokens.size} token ids but the activations have {n_rows} rows")
    whole = np.issubdtype(tokens.dtype, np.integer) or (
        np.issubdtype(tokens.dtype, np.floating) and np.isfinite(tokens).all() and (tokens == np.round(tokens)).all())
    if not whole:
        raise DataError(f"{path}: token ids must be integers, got {tokens.dtype} values such as {tokens[:3].tolist()}")
    if tokens.size and tokens.min() < 0:
        raise DataError(f"{path}: token ids must be >= 0, found {tokens.min():g} at row {int(np.argmin(tokens))}")
    return tokens.astype(np.int64)


def _finite_rows(acts: np.ndarray | sp.csr_matrix, path: Path, start: int, stop: int) -> np.ndarray | sp.csr_matrix:
    """Rows [start, stop) read into memory, rejecting NaN and infinity."""
    chunk = acts[start:stop]
    chunk = chunk if sp.issparse(chunk) else np.array(chunk)  # a writable in-memory copy of the mapped rows
    if not np.isfinite(chunk.data if sp.issparse(chunk) else chunk).all():
        raise DataError(f"{path}: NaN or infinite activations in rows {start}..{stop - 1}")
    return chunk


def stream_pair(path_a: Path, path_b: Path, chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple]:
    """Row chunks ``(acts_a, acts_b)`` of two activation files over the same tokens."""
    acts_a, acts_b = load_activations(path_a), load_activations(path_b)
    if acts_a.shape[0] != acts_b.shape[0]:
        raise DataError(f"{path_a} has {acts_a.shape[0]} rows (tokens) but {path_b} has {acts_b.shape[0]}")
    for start in range(0, acts_a.shape[0], chunk_rows):
        stop = min(start + chunk_rows, acts_a.shape[0])
        yield _finite_rows(acts_a, path_a, start, stop), _finite_rows(acts_b, path_b, start, stop)


def write_table(table: pd.DataFrame, out: Path) -> None:
    """The per-feature table as CSV or Parquet (by extension), appearing whole or not at all."""
    out = Path(out)
    with atomic_path(out) as tmp:
        if out.suffix == ".csv":
            table.to_csv(tmp, index=False)
        else:
            table.to_parquet(tmp, index=False)


def match_activation_files(
    path_a: Path, path_b: Path, out: Path, cfg: CompareConfig = CompareConfig(), threshold: float | None = None,
    tokens: Path | None = None,
) -> dict[str, float]:
    """Compare two activation files, write A's per-feature match table to ``out``, return the statistics.

    ``threshold`` replaces ``cfg.thresholds`` for the ``frac_above_*`` statistics; ``tokens`` (a ``.npy`` of the
    current token id of each row) adds the contextual and token-lookup comparisons.
    """
    out = Path(out)
    if out.suffix not in TABLE_FORMATS:
        raise DataError(f"{out}: unknown table format {out.suffix!r} (expected .csv or .parquet)")
    if not out.parent.is_dir():
        raise DataError(f"{out}: folder {out.parent} does not exist")
    if threshold is not None:
        cfg = dataclasses.replace(cfg, thresholds=(threshold,))
    if tokens is None:
        comparison: PairComparison = compare(stream_pair(Path(path_a), Path(path_b)), cfg)
        write_table(comparison.table(), out)
        return comparison.stats
    token_ids = load_tokens(tokens, load_activations(path_a).shape[0])
    pair = compare_token_controlled(with_tokens(stream_pair(Path(path_a), Path(path_b)), token_ids),
                                    int(token_ids.max()) + 1, cfg.min_firings, cfg.thresholds)
    write_table(with_context_columns(pair.raw.table(), pair), out)
    return {**pair.raw.stats, **token_control_statistics(pair, "", cfg.thresholds)}
