"""The library side of ``univ match``: two activation files in, a per-feature match table out.

Each input is an [N, F] activation matrix over the same N tokens: a dense ``.npy`` (memory-
mapped and streamed in row chunks) or a sparse matrix saved with ``scipy.sparse.save_npz``.
Every problem with the inputs or the output path is a ``DataError``, and the table is written
atomically at the very end, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import scipy.sparse as sp

from universality.analysis.heldout import CHUNK_ROWS
from universality.runtime.atomic import atomic_path
from universality.measures.comparison import PairComparison, compare
from universality.core.config import CompareConfig
from universality.core.errors import DataError

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


def write_table(comparison: PairComparison, out: Path) -> None:
    """The per-feature table as CSV or Parquet (by extension), appearing whole or not at all."""
    out = Path(out)
    with atomic_path(out) as tmp:
        if out.suffix == ".csv":
            comparison.table().to_csv(tmp, index=False)
        else:
            comparison.table().to_parquet(tmp, index=False)


def match_activation_files(
    path_a: Path, path_b: Path, out: Path, cfg: CompareConfig = CompareConfig(), threshold: float | None = None
) -> dict[str, float]:
    """Compare two activation files, write A's per-feature match table to ``out``, return the statistics.

    ``threshold`` replaces ``cfg.thresholds`` for the ``frac_above_*`` statistics.
    """
    out = Path(out)
    if out.suffix not in TABLE_FORMATS:
        raise DataError(f"{out}: unknown table format {out.suffix!r} (expected .csv or .parquet)")
    if not out.parent.is_dir():
        raise DataError(f"{out}: folder {out.parent} does not exist")
    if threshold is not None:
        cfg = dataclasses.replace(cfg, thresholds=(threshold,))
    comparison = compare(stream_pair(Path(path_a), Path(path_b)), cfg)
    write_table(comparison, out)
    return comparison.stats
