"""Benchmark: streaming sparse Pearson correlation vs the obvious dense implementation.

4096 x 4096 SAE features over 200K tokens, ~30 active features per token on each side, A and
B correlated (B's features are a permutation of A's concepts, with dropout, rescaling and
noise, plus some features of its own). Chunks arrive as dense float32 torch tensors, as they
do from the pipeline, and are generated one at a time: no run ever holds all tokens.

- sparse: ``StreamingCorrelation`` over CSR chunks (float64 statistics); sparsifying the dense
          chunks is timed apart: the pipeline does it once per run, not once per pair.
- dense:  the obvious way, chunked to fit memory: one pass for means and stds, a second for
          the float32 product of standardized activations (full 200K x 4096 float32 would be
          3.3 GB per side).

Peak memory of the sparse path is measured in fresh subprocesses at 50K and 200K tokens.
Run: ``python benchmarks/bench_correlation.py [--tokens 200000]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import tracemalloc
from typing import Iterator

import numpy as np
import torch

from universality.measures.correlation import StreamingCorrelation, to_csr

N_FEATURES = 4096
CHUNK = 8192
ACTIVE_PER_TOKEN = 32  # concepts per token; B adds a few features of its own (~30 active each side)


def chunks(n_tokens: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Dense float32 chunks (acts_a, acts_b) of realistic, correlated SAE activations."""
    setup = np.random.default_rng(seed)
    freq = 1.0 / np.arange(1, N_FEATURES + 1) ** 0.8  # Zipf-like: a few common features, a long tail
    freq = setup.permutation(freq / freq.sum())
    perm = setup.permutation(N_FEATURES)  # concept c is feature c of A and feature perm[c] of B
    scale_b = setup.uniform(0.5, 2.0, N_FEATURES)
    for i, start in enumerate(range(0, n_tokens, CHUNK)):
        rng = np.random.default_rng([seed, i])
        n = min(CHUNK, n_tokens - start)
        k = rng.poisson(ACTIVE_PER_TOKEN, n)
        token = np.repeat(np.arange(n), k)
        concept = rng.choice(N_FEATURES, size=token.size, p=freq)
        magnitude = rng.exponential(1.0, token.size).astype(np.float32)
        a = np.zeros((n, N_FEATURES), np.float32)
        b = np.zeros((n, N_FEATURES), np.float32)
        keep_a = rng.random(token.size) < 0.95
        a[token[keep_a], concept[keep_a]] = magnitude[keep_a]
        keep_b = rng.random(token.size) < 0.85
        noise = rng.exponential(0.3, token.size).astype(np.float32)
        b[token[keep_b], perm[concept[keep_b]]] = (scale_b[concept] * magnitude + noise)[keep_b]
        extra = rng.integers(0, N_FEATURES, (n, 4))  # B's own features, unrelated to A
        b[np.arange(n)[:, None], extra] = rng.exponential(1.0, (n, 4)).astype(np.float32)
        yield torch.from_numpy(a), torch.from_numpy(b)


def sparse_correlation(n_tokens: int) -> tuple[np.ndarray, float, float]:
    """The library's streaming path over CSR chunks, as the pipeline stores SAE features (sparsified
    once per run when its activations are recorded, then read by every pair it belongs to).
    Returns the correlation, the seconds correlating and the seconds sparsifying (outside data generation)."""
    acc = StreamingCorrelation()
    seconds = sparsify = 0.0
    for a, b in chunks(n_tokens):
        start = time.perf_counter()
        csr_a, csr_b = to_csr(a), to_csr(b)
        middle = time.perf_counter()
        acc.update(csr_a, csr_b)
        seconds += time.perf_counter() - middle
        sparsify += middle - start
    start = time.perf_counter()
    corr = acc.correlation()
    return corr, seconds + time.perf_counter() - start, sparsify


def dense_correlation(n_tokens: int) -> tuple[np.ndarray, float]:
    """Obvious dense implementation: means/stds, then sum of float32 products of z-scores, chunked."""
    seconds = 0.0
    total = {"a": torch.zeros(N_FEATURES, dtype=torch.float64), "b": torch.zeros(N_FEATURES, dtype=torch.float64)}
    total_sq = {k: torch.zeros_like(v) for k, v in total.items()}
    for a, b in chunks(n_tokens):
        start = time.perf_counter()
        for key, x in (("a", a), ("b", b)):
            total[key] += x.sum(0, dtype=torch.float64)
            total_sq[key] += (x.double() ** 2).sum(0)
        seconds += time.perf_counter() - start
    mean = {k: total[k] / n_tokens for k in total}
    std = {k: (total_sq[k] / n_tokens - mean[k] ** 2).clamp_min(0).sqrt() for k in total}
    inv = {k: torch.where(std[k] > 0, 1 / std[k], torch.zeros_like(std[k])).float() for k in std}
    mean32 = {k: v.float() for k, v in mean.items()}
    corr = torch.zeros(N_FEATURES, N_FEATURES)
    for a, b in chunks(n_tokens):
        start = time.perf_counter()
        za = (a - mean32["a"]) * inv["a"]
        zb = (b - mean32["b"]) * inv["b"]
        corr.addmm_(za.T, zb)
        seconds += time.perf_counter() - start
    return (corr / n_tokens).numpy(), seconds


def measure_memory(n_tokens: int) -> dict:
    """Run in a fresh process: peak traced (numpy) memory and peak RSS of the sparse path."""
    tracemalloc.start()
    sparse_correlation(n_tokens)
    _, peak = tracemalloc.get_traced_memory()
    return {"tokens": n_tokens, "tracemalloc_peak_mb": peak / 2**20,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--memory-only", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_only is not None:
        print(json.dumps(measure_memory(args.memory_only)))
        return

    n = args.tokens
    print(f"{N_FEATURES} x {N_FEATURES} features, {n} tokens, chunks of {CHUNK}, torch threads {torch.get_num_threads()}")
    a, b = next(chunks(CHUNK))
    print(f"active per token: A {np.count_nonzero(a.numpy()) / CHUNK:.1f}, B {np.count_nonzero(b.numpy()) / CHUNK:.1f}")

    sparse, t_sparse, t_sparsify = sparse_correlation(n)
    print(f"sparse streaming (float64 stats): {t_sparse:7.2f} s  {n / t_sparse:10,.0f} tokens/s  (CSR chunks, as stored)")
    print(f"sparsifying dense chunks:         {t_sparsify:7.2f} s  (once per run, when activations are recorded)")
    dense, t_dense = dense_correlation(n)
    print(f"dense chunked (float32 z-scores): {t_dense:7.2f} s  {n / t_dense:10,.0f} tokens/s")
    print(f"speed-up: {t_dense / t_sparse:.1f}x per pair; {t_dense / (t_sparse + t_sparsify):.1f}x counting the sparsifying")
    print(f"max |sparse - dense| = {np.abs(sparse - dense).max():.2e} (dense is float32)")
    print(f"median max correlation A->B: {np.median(sparse.max(axis=1)):.3f}")

    for tokens in (n // 4, n):
        out = subprocess.run([sys.executable, __file__, "--memory-only", str(tokens)], check=True,
                             capture_output=True, text=True).stdout
        m = json.loads(out)
        print(f"sparse path memory at {m['tokens']:>7} tokens: tracemalloc peak {m['tracemalloc_peak_mb']:7.1f} MB, "
              f"max RSS {m['max_rss_mb']:7.1f} MB")


if __name__ == "__main__":
    main()
