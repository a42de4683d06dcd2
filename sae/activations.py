"""Where SAE training data comes from: small generators of activation chunks, and a shuffling buffer.

Nothing here holds all activations: sources yield chunks, ``shuffled_batches`` mixes a bounded
buffer of them into training batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from universality.core.errors import DataError

_CHECK_ROWS = 65_536  # rows per chunk when scanning a .npy file for NaN/inf


@torch.no_grad()
def model_activations(
    model: torch.nn.Module, tokens: np.ndarray, ctx_len: int, batch_seqs: int, device: str | torch.device, seed: int,
    with_tokens: bool = False,
) -> Iterator[Tensor] | Iterator[tuple[Tensor, Tensor]]:
    """MLP neuron activations [batch_seqs · ctx_len, d_mlp] (float32) of ``model`` on random contexts
    of the 1-D token stream ``tokens``, forever; ``with_tokens``: each chunk with its rows' current token ids
    [batch_seqs · ctx_len] (for an SAE that reads them). They stay on the model's device: a GPU run never
    copies them to the host."""
    if tokens.ndim != 1 or len(tokens) < ctx_len:
        raise DataError(f"need a 1-D token stream of at least {ctx_len} tokens, got shape {tokens.shape}")
    rng = np.random.default_rng(seed)
    offsets_T = np.arange(ctx_len)
    was_training = model.training
    model.eval()
    try:
        while True:
            starts_B = rng.integers(0, len(tokens) - ctx_len + 1, size=batch_seqs)
            batch_BT = torch.from_numpy(np.asarray(tokens[starts_B[:, None] + offsets_T], dtype=np.int64))
            batch_BT = batch_BT.to(device)
            acts_BTM = model(batch_BT, return_mlp=True).mlp_acts
            acts_ND = acts_BTM.reshape(-1, acts_BTM.shape[-1]).float()
            yield (acts_ND, batch_BT.reshape(-1)) if with_tokens else acts_ND
    finally:
        model.train(was_training)


def load_npy_activations(path: str | Path, min_rows: int = 1) -> np.ndarray:
    """A memory-mapped (N, d) activation array, validated: 2-D, finite, at least ``min_rows`` rows."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read activations {path}: {exc}") from None
    if not isinstance(array, np.ndarray):
        raise DataError(f"activations {path} must be a .npy array (rows x dims), not a .npz archive")
    if array.ndim != 2 or array.shape[1] < 1:
        raise DataError(f"activations {path} must be a 2-D (rows x dims) array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"activations {path} must be numeric, got dtype {array.dtype}")
    if len(array) < min_rows:
        raise DataError(f"activations {path} have {len(array)} rows, fewer than one batch ({min_rows})")
    for start in range(0, len(array), _CHECK_ROWS):
        if not np.isfinite(array[start : start + _CHECK_ROWS]).all():
            raise DataError(f"activations {path} contain NaN or infinite values")
    return array


def array_chunks(array: np.ndarray, chunk_rows: int, seed: int | None) -> Iterator[Tensor]:
    """Contiguous float32 chunks of an (N, d) array (memory-mapped is fine): with a ``seed``, in a
    fresh random order every pass, forever (``shuffled_batches`` then mixes rows across chunks);
    with ``seed=None``, one pass in order (for evaluation)."""
    starts = np.arange(0, len(array), chunk_rows)
    rng = None if seed is None else np.random.default_rng(seed)
    while True:
        for start in starts if rng is None else rng.permutation(starts):
            yield torch.from_numpy(np.array(array[start : start + chunk_rows], dtype=np.float32))
        if rng is None:
            return


def shuffled_batches(
    source: Iterator[Tensor] | Iterator[tuple[Tensor, ...]], buffer_size: int, batch_size: int, generator: torch.Generator,
) -> Iterator[Tensor] | Iterator[tuple[Tensor, ...]]:
    """Batches [batch_size, d] drawn from a shuffling buffer of about ``buffer_size`` rows (of tuples of row-aligned
    tensors, e.g. activations and their token ids, when ``source`` yields such tuples: shuffled together).

    Fill the buffer from ``source``, shuffle it, yield batches from its first half and keep the
    second half to mix with fresh rows: consecutive batches then rarely share a context.
    """
    pieces: list[tuple[Tensor, ...]] = []  # the kept half, then fresh chunks: joined once the buffer is full
    n_rows, tupled = 0, None
    for chunk in source:
        tupled = isinstance(chunk, tuple) if tupled is None else tupled
        pieces.append(chunk if tupled else (chunk,))
        n_rows += len(pieces[-1][0])
        if n_rows < max(buffer_size, 2 * batch_size):
            continue
        buffers = [torch.cat(parts) for parts in zip(*pieces)]
        order = torch.randperm(n_rows, generator=generator)
        buffers = [b[order.to(b.device)] for b in buffers]
        n_out = (n_rows // 2) // batch_size * batch_size
        batches = zip(*(b[:n_out].split(batch_size) for b in buffers))
        yield from (batches if tupled else (batch[0] for batch in batches))
        pieces, n_rows = [tuple(b[n_out:] for b in buffers)], n_rows - n_out


def zero_padded(source: Iterator[Tensor], width: int) -> Iterator[Tensor]:
    """``source``'s chunks [n, d] with zero columns appended up to ``width`` (a crosscoder over models of different
    widths reads each one padded to the widest: ``sae.crosscoder``)."""
    for chunk in source:
        yield torch.nn.functional.pad(chunk, (0, width - chunk.shape[1])) if chunk.shape[1] < width else chunk


def stacked(sources: list[Iterator[Tensor]]) -> Iterator[Tensor]:
    """A crosscoder's chunks [n, M, D] from M per-model chunk streams at the same tokens (e.g. ``model_activations``
    of each model with the same tokens and seed, or ``array_chunks`` of files with the same rows and seed); stops
    with the shortest. ``shuffled_batches`` then mixes tokens and keeps every token's M rows together."""
    for chunks in zip(*sources):
        if len({chunk.shape for chunk in chunks}) != 1:
            raise DataError(f"per-model activation chunks differ in shape: {[tuple(c.shape) for c in chunks]}")
        yield torch.stack(chunks, dim=1)
