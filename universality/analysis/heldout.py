"""Held-out activations of one run, recorded once and read by every pair it belongs to.

One forward pass over the shared held-out contexts gives the MLP neurons (stored dense,
memory-mapped) and, through the run's SAE, its features (stored sparse: mostly zeros), at every
position but the first ``compare.skip_first_positions`` of each context.
Pairs then stream row chunks of both runs' files: the same tokens, in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import scipy.sparse as sp
import torch

from models.training import heldout_contexts
from models.transformer import OneLayerTransformer
from sae.base import SAE
from universality.runtime.atomic import atomic_path
from universality.measures.correlation import to_csr
from universality.runtime.progress import bar as progress_bar

NEURONS, FEATURES, TOP_VALUES, TOP_POSITIONS = "neurons.npy", "features.npz", "top_values.npy", "top_positions.npy"
CHUNK_ROWS = 8192  # tokens per streamed chunk


@dataclass(frozen=True)
class HeldoutActivations:
    """Memory-mapped neurons [N, M] and sparse features [N, F] of one run on the held-out tokens."""

    directory: Path

    def neurons(self) -> np.ndarray:
        return np.load(self.directory / NEURONS, mmap_mode="r")

    def neuron_chunks(self, chunk_rows: int = CHUNK_ROWS) -> Iterator[torch.Tensor]:
        """The stored neurons as float32 tensors of ``chunk_rows`` rows, in order: what ``mlp_neurons`` yielded
        when they were recorded, read back a chunk at a time instead of running the model again."""
        neurons = self.neurons()
        for start in range(0, neurons.shape[0], chunk_rows):
            yield torch.from_numpy(np.array(neurons[start : start + chunk_rows]))

    def feature_chunks(self, chunk_rows: int = CHUNK_ROWS) -> Iterator[sp.csr_matrix]:
        """The stored SAE features (float64 CSR) in the row chunks of ``neuron_chunks``: the SAE's encoding of them."""
        features = self.features()
        for start in range(0, features.shape[0], chunk_rows):
            yield features[start : start + chunk_rows]

    def features(self) -> sp.csr_matrix:
        return sp.load_npz(self.directory / FEATURES).tocsr()

    def top_examples(self) -> tuple[np.ndarray, np.ndarray]:
        """Each feature's top activations [F, k] (descending) and their token positions [F, k]
        in the flat comparison tokens (-1 where a feature fired on fewer than k tokens)."""
        return np.load(self.directory / TOP_VALUES), np.load(self.directory / TOP_POSITIONS)


class StreamingTopK:
    """The k largest values of every column, and their row positions, over a stream of row chunks."""

    def __init__(self, n_columns: int, k: int):
        self.values = torch.full((k, n_columns), -torch.inf)
        self.positions = torch.full((k, n_columns), -1, dtype=torch.long)
        self.rows_seen = 0

    def update(self, chunk_NF: torch.Tensor) -> None:
        k, n = self.values.shape[0], chunk_NF.shape[0]
        chunk_values, chunk_rows = chunk_NF.float().topk(min(k, n), dim=0)  # only a chunk's top k can enter
        values = torch.cat([self.values, chunk_values])
        positions = torch.cat([self.positions, chunk_rows + self.rows_seen])
        self.values, order = values.topk(k, dim=0)
        self.positions = positions.gather(0, order)
        self.rows_seen += n

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """([F, k] values, [F, k] positions); only positive activations count as examples."""
        fired = self.values > 0
        values = torch.where(fired, self.values, torch.zeros(()))
        positions = torch.where(fired, self.positions, torch.full((), -1))
        return values.T.contiguous().numpy(), positions.T.contiguous().numpy()


def eval_contexts(heldout: np.ndarray, ctx_len: int, n_tokens: int) -> torch.Tensor:
    """The first ``n_tokens`` held-out tokens as whole contexts [N_ctx, ctx_len]: the comparison tokens."""
    contexts = heldout_contexts(heldout, ctx_len)
    return contexts[: max(1, n_tokens // ctx_len)]


def token_positions(rows: np.ndarray, ctx_len: int, skip: int) -> np.ndarray:
    """Stored row -> position in the flat comparison tokens, when the first ``skip`` positions of every
    context are not stored (-1 stays -1)."""
    kept = ctx_len - skip
    positions = (rows // kept) * ctx_len + skip + rows % kept
    return np.where(rows >= 0, positions, -1)


def single_position(top_positions: np.ndarray, ctx_len: int) -> np.ndarray:
    """[F] bool: features whose top activations (two or more) all sit at one position of their contexts,
    e.g. "the first token of a context": real, but about position, not content."""
    valid = top_positions >= 0
    in_context = np.where(valid, top_positions % ctx_len, -1)
    first = in_context.max(axis=1, keepdims=True)  # any valid entry's position, when all agree
    return (valid.sum(axis=1) >= 2) & ((in_context == first) | ~valid).all(axis=1)


@torch.no_grad()
def mlp_neurons(model: OneLayerTransformer, contexts: torch.Tensor, device: str, skip: int = 0,
                batch_contexts: int = 64) -> Iterator[torch.Tensor]:
    """The one held-out forward pass: MLP activations [tokens, d_mlp] of ``contexts``, ``batch_contexts`` at a time,
    past the first ``skip`` positions of each context (on ``device``)."""
    for batch in contexts.split(batch_contexts):
        acts = model(batch.to(device), return_mlp=True).mlp_acts[:, skip:]
        yield acts.reshape(-1, acts.shape[-1])


@torch.no_grad()
def record(model: OneLayerTransformer, sae: SAE, contexts: torch.Tensor, directory: Path, device: str,
           top_k: int, skip: int = 0, batch_contexts: int = 64) -> HeldoutActivations:
    """Run ``model`` over ``contexts`` once; write its neurons, its SAE features and, for every
    feature, its ``top_k`` activating token positions (kept while streaming, no second pass).
    The first ``skip`` positions of every context are left out of all three."""
    n_ctx, ctx_len = contexts.shape
    n_tokens = n_ctx * (ctx_len - skip)
    d_mlp = model.cfg.d_mlp
    feature_chunks = []
    top = StreamingTopK(sae.d_sae, top_k)
    with atomic_path(directory / NEURONS) as tmp:
        neurons = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_tokens, d_mlp))
        row = 0
        batches = zip(contexts.split(batch_contexts), mlp_neurons(model, contexts, device, skip, batch_contexts))
        for contexts_BT, acts_NM in progress_bar(batches, desc="held-out activations", total=-(-n_ctx // batch_contexts),
                                                 leave=False):
            neurons[row : row + len(acts_NM)] = acts_NM.cpu().numpy()
            features_NF = sae.encode(acts_NM, contexts_BT[:, skip:].reshape(-1)).cpu()  # tokens: for an SAE that reads them
            feature_chunks.append(to_csr(features_NF))
            top.update(features_NF)
            row += len(acts_NM)
        neurons.flush()
        del neurons
    with atomic_path(directory / FEATURES) as tmp:
        with open(tmp, "wb") as f:
            sp.save_npz(f, sp.vstack(feature_chunks, format="csr"))
    top_values, top_rows = top.result()
    for name, array in ((TOP_VALUES, top_values), (TOP_POSITIONS, token_positions(top_rows, ctx_len, skip))):
        with atomic_path(directory / name) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, array)
    return HeldoutActivations(directory)


def comparison_tokens(heldout: np.ndarray, ctx_len: int, n_tokens: int, skip: int) -> np.ndarray:
    """[N] the current token id of each stored row, in ``record``'s row order (contexts in order, the first
    ``skip`` positions of each left out)."""
    return eval_contexts(heldout, ctx_len, n_tokens)[:, skip:].reshape(-1).numpy()


def row_positions(n_rows: int, ctx_len: int, skip: int) -> np.ndarray:
    """[N] each stored row's position in its context (``skip`` .. ``ctx_len - 1``)."""
    return skip + np.arange(n_rows) % (ctx_len - skip)


def with_tokens(chunks: Iterator[tuple], tokens: np.ndarray) -> Iterator[tuple]:
    """``(a, b)`` row chunks with the token ids of their rows: ``(a, b, tokens)``."""
    start = 0
    for a, b in chunks:
        yield a, b, tokens[start : start + a.shape[0]]
        start += a.shape[0]


def paired_chunks(a, b, transform_b=None, chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple]:
    """Row chunks of two activation matrices over the same tokens (dense memmaps or CSR)."""
    for start in range(0, a.shape[0], chunk_rows):
        chunk_b = b[start : start + chunk_rows]
        yield a[start : start + chunk_rows], chunk_b if transform_b is None else transform_b(chunk_b)
