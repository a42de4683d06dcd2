"""SAE training throughput against this machine's dense matmul speed (a script, not a test).

    python benchmarks/bench_sae.py [--steps 10] [--d-in 512] [--d-sae 4096] [--batch 4096]

FLOP count, per training sample: the five [B, D] x [D, F]-sized matmuls a step needs, 2·D·F each
(multiply + add): encoder forward x W_enc, decoder forward f W_dec, decoder weight grad fᵀ g_x̂,
feature grad g_x̂ W_decᵀ, encoder weight grad xᵀ g_pre. No input grad is needed (x has no grad; b_dec's
gradient through the encoder is a vector-matrix product). So 10·D·F FLOP per sample; elementwise
work, Adam and the decoder-norm constraint are not counted (they are the overhead being measured).

The reference is the same five matmuls, same shapes and layouts, timed back to back with torch.mm.
Training time per step is the difference between a long and a short ``train_sae`` run divided by the
difference in steps, so one-off setup (input scale, geometric median) is excluded.
"""

from __future__ import annotations

import argparse
import itertools
import resource
import time

import torch

from sae.training import train_sae
from universality.config import SAEConfig


def matmul_flops_per_s(B: int, D: int, F: int, reps: int) -> float:
    x, W_enc, W_dec = torch.randn(B, D), torch.randn(D, F), torch.randn(F, D)
    f, g_xhat, g_pre = torch.randn(B, F).relu_(), torch.randn(B, D), torch.randn(B, F)
    ops = (lambda: x @ W_enc, lambda: f @ W_dec, lambda: f.T @ g_xhat, lambda: g_xhat @ W_dec.T, lambda: x.T @ g_pre)
    for op in ops:
        op()
    start = time.perf_counter()
    for _ in range(reps):
        for op in ops:
            op()
    return reps * 5 * 2 * B * D * F / (time.perf_counter() - start)


def seconds_per_step(arch: str, B: int, D: int, F: int, steps: int) -> float:
    data = [torch.randn(B, D).relu_() for _ in range(4)]  # MLP-like: non-negative

    def run(n: int) -> float:
        cfg = SAEConfig(arch=arch, dict_size=F, batch_size=B, samples=B * n, k=32, resample_fractions=())
        start = time.perf_counter()
        train_sae(itertools.cycle(data), cfg, D, seed=0, progress=False)
        return time.perf_counter() - start

    short = 2
    run(short)  # warm-up
    return (run(short + steps) - run(short)) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4096)
    args = parser.parse_args()
    B, D, F = args.batch, args.d_in, args.d_sae
    flop_per_sample = 10 * D * F
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ReLU SAE {D} -> {F}, batch {B}")

    wall = time.perf_counter()
    peak_mm = matmul_flops_per_s(B, D, F, reps=4)
    relu_step = seconds_per_step("relu", B, D, F, args.steps)
    topk_step = seconds_per_step("topk", B, D, F, args.steps)
    peak_mm = max(peak_mm, matmul_flops_per_s(B, D, F, reps=4))  # again, in case the machine was busy at first
    achieved = flop_per_sample * B / relu_step

    print(f"dense float32 matmul (the step's 5 matmuls): {peak_mm / 1e9:8.1f} GFLOP/s")
    print(f"ReLU SAE training: {B / relu_step:10.0f} samples/s, {relu_step * 1e3:7.1f} ms/step, "
          f"{achieved / 1e9:6.1f} GFLOP/s ({flop_per_sample / 1e6:.1f} MFLOP/sample counted)")
    print(f"ratio achieved / matmul: {achieved / peak_mm:.2f} (target >= 0.6)")
    print(f"TopK SAE (k=32) training: {B / topk_step:10.0f} samples/s, {topk_step * 1e3:7.1f} ms/step")
    print(f"wall time {time.perf_counter() - wall:.1f} s, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
