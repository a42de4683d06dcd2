"""Held-out activations of one run, recorded once and read by every pair it belongs to.

One forward pass over the shared held-out contexts gives the MLP neurons (stored dense,
memory-mapped) and, through the run's SAE, its features (stored sparse: mostly zeros).
Pairs then stream row chunks of both runs' files: the same tokens, in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from models.training import heldout_contexts
from models.transformer import OneLayerTransformer
from sae.base import SAE
from universality.atomic import atomic_path
from universality.correlation import to_csr

NEURONS, FEATURES = "neurons.npy", "features.npz"
CHUNK_ROWS = 8192  # tokens per streamed chunk


@dataclass(frozen=True)
class HeldoutActivations:
    """Memory-mapped neurons [N, M] and sparse features [N, F] of one run on the held-out tokens."""

    directory: Path

    def neurons(self) -> np.ndarray:
        return np.load(self.directory / NEURONS, mmap_mode="r")

    def features(self) -> sp.csr_matrix:
        return sp.load_npz(self.directory / FEATURES).tocsr()


def eval_contexts(heldout: np.ndarray, ctx_len: int, n_tokens: int) -> torch.Tensor:
    """The first ``n_tokens`` held-out tokens as whole contexts [N_ctx, ctx_len]: the comparison tokens."""
    contexts = heldout_contexts(heldout, ctx_len)
    return contexts[: max(1, n_tokens // ctx_len)]


@torch.no_grad()
def record(model: OneLayerTransformer, sae: SAE, contexts: torch.Tensor, directory: Path, device: str,
           batch_contexts: int = 64) -> HeldoutActivations:
    """Run ``model`` over ``contexts`` once; write its neurons and its SAE features."""
    n_tokens = contexts.numel()
    d_mlp = model.cfg.d_mlp
    feature_chunks = []
    with atomic_path(directory / NEURONS) as tmp:
        neurons = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_tokens, d_mlp))
        row = 0
        for batch in tqdm(contexts.split(batch_contexts), desc="held-out activations", leave=False):
            acts_NM = model(batch.to(device), return_mlp=True).mlp_acts.reshape(-1, d_mlp)
            neurons[row : row + len(acts_NM)] = acts_NM.cpu().numpy()
            feature_chunks.append(to_csr(sae.encode(acts_NM).cpu()))
            row += len(acts_NM)
        neurons.flush()
        del neurons
    with atomic_path(directory / FEATURES) as tmp:
        with open(tmp, "wb") as f:
            sp.save_npz(f, sp.vstack(feature_chunks, format="csr"))
    return HeldoutActivations(directory)


def paired_chunks(a, b, transform_b=None, chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple]:
    """Row chunks of two activation matrices over the same tokens (dense memmaps or CSR)."""
    for start in range(0, a.shape[0], chunk_rows):
        chunk_b = b[start : start + chunk_rows]
        yield a[start : start + chunk_rows], chunk_b if transform_b is None else transform_b(chunk_b)
