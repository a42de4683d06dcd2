"""SAE training step, sparse (sae.sparse) against dense, beside this machine's matmul speed (a script, not a test).

    python benchmarks/bench_sae.py [--steps 10] [--d-in 512] [--d-sae 2048 4096] [--batch 1024] [--l0 18]
                                   [--device cpu] [--threads N]

One training step = the SAE's loss, backward and the constrained Adam step, timed on an SAE whose encoder
biases are set so that each latent fires on l0/F of the batch (L0 ≈ ``--l0``, as on the real data: 18 of
2,048), on MLP-like (non-negative) random inputs, at a learning rate too small to move L0 while timed.
Each time is the best single step of ``--steps`` after two warm-up steps, the paths interleaved over
five repeats (the machine may be shared). "dense" is the step the trainer took before the sparse one
existed (ReLUSAE.loss with the fused L1 gradient; for TopK SAE.loss, the dense reference); "auto" is what
the trainer takes now on the device: sparse while the active density is at most
``sae.sparse.sparse_max_density(device)``, else dense. The density sweep times the sparse step itself
("sparse", taken whatever the density) against the dense one, to show where they cross (the first steps of
a ReLU SAE are far denser than its last), and says which of the two the trainer takes there. Peak memory:
the step's peak resident memory (CUDA: allocated memory) above what the process held before it.

The dense ReLU step does five [B, D] x [D, F]-sized matmuls, 2·D·F FLOP per sample each (encoder forward
x̄ W_enc, decoder forward f W_dec, decoder weight grad fᵀ g_x̂, feature grad g_x̂ W_decᵀ, encoder weight grad
x̄ᵀ g_pre): 10·D·F per sample, shown as a fraction of the same five matmuls timed back to back with torch.mm
in the same precision. The sparse step keeps only the first of them dense.
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import time
from pathlib import Path
from typing import Callable

import torch

from sae.base import SAE
from sae.constrained_adam import ConstrainedAdam
from sae.registry import build_sae
from sae.sparse import sparse_max_density
from universality.runtime.memory import retain_freed_memory
from universality.core.config import SAEConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_LIBC = ctypes.CDLL(None)  # malloc_trim (glibc), used only where /proc/self/clear_refs exists (Linux)
REPEATS = 5  # each timing is the best over this many interleaved repeats (the machine may be shared)


def matmul_flops_per_s(B: int, D: int, F: int, dtype: torch.dtype, device: str, reps: int) -> float:
    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device).to(dtype)

    x, W_enc, W_dec = rand(B, D), rand(D, F), rand(F, D)
    f, g_xhat, g_pre = rand(B, F).relu_(), rand(B, D), rand(B, F)
    ops = (lambda: x @ W_enc, lambda: f @ W_dec, lambda: f.T @ g_xhat, lambda: g_xhat @ W_dec.T, lambda: x.T @ g_pre)

    def once() -> float:
        start = time.perf_counter()
        for _ in range(reps):
            for op in ops:
                op()
        _sync(device)
        return time.perf_counter() - start

    once()  # warm-up
    return reps * 5 * 2 * B * D * F / min(once() for _ in range(REPEATS))


def sae_at_l0(cfg: SAEConfig, x_BD: torch.Tensor, l0: float) -> SAE:
    """A fresh SAE whose encoder biases make each latent fire on l0/F of ``x_BD``'s rows (L0 ≈ l0)."""
    sae = build_sae(cfg, x_BD.shape[1]).to(x_BD.device)
    with torch.no_grad():
        pre_BF = (x_BD - sae.b_dec) @ sae.W_enc
        sae.b_enc.copy_(-pre_BF.float().quantile(1 - l0 / cfg.dict_size, dim=0))
    return sae


def step_timer(sae: SAE, x_BD: torch.Tensor, device: str, max_density: float) -> Callable[[int], tuple[float, float, float]]:
    """A function of n that runs n training steps, sparse while at most ``max_density`` of the features are
    active (0: dense), and returns (best step seconds, mean L0, peak MiB above what was held before)."""
    optimizer = ConstrainedAdam(sae.parameters(), [sae.W_dec], lr=1e-9)

    def steps(n: int) -> tuple[float, float, float]:
        sae.sparse_max_density = max_density
        times, l0 = [], 0.0
        rest = _reset_peak_memory(device)
        for _ in range(n):
            start = time.perf_counter()
            out = sae.loss(x_BD)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            _sync(device)
            times.append(time.perf_counter() - start)
            l0 += float(out.fires_F.sum()) / len(x_BD) / n
        return min(times), l0, _peak_memory_mib(device) - rest

    return steps


def compare(cfg: SAEConfig, x_BD: torch.Tensor, l0: float, device: str, n: int,
            max_density: float | None = None) -> dict[str, tuple[float, float, float]]:
    """{"dense", "other"}: (best step seconds, L0, peak MiB) of one SAE at L0 ≈ l0, the paths interleaved; the other
    path is sparse up to ``max_density`` (None: the trainer's threshold on the device, "auto"; 1: always sparse)."""
    sae = sae_at_l0(cfg, x_BD, l0)
    sae.matmul_dtype = DTYPES[cfg.precision]
    other = sparse_max_density(device) if max_density is None else max_density
    timers = {"dense": step_timer(sae, x_BD, device, 0.0), "other": step_timer(sae, x_BD, device, other)}
    best: dict[str, tuple[float, float, float]] = {}
    for _ in range(REPEATS):
        for name, timer in timers.items():
            timer(2)  # warm-up
            result = timer(n)
            best[name] = min(best.get(name, result), result)
    return best


def _reset_peak_memory(device: str) -> float:
    """Resets the peak-memory counter; returns the memory held now (MiB)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    clear_refs = Path("/proc/self/clear_refs")
    if clear_refs.exists():
        _LIBC.malloc_trim(0)  # glibc hands freed memory back, so the step's temporaries are counted again
        clear_refs.write_text("5")  # Linux: the peak resident set size (VmHWM) restarts from the current one
    return _rss_mib("VmRSS")


def _peak_memory_mib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return _rss_mib("VmHWM")


def _rss_mib(field: str) -> float:
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _row(label: str, B: int, result: dict[str, tuple[float, float, float]], other: str = "auto") -> str:
    (dense, l0, dense_mib), (fast, _, fast_mib) = result["dense"], result["other"]
    return (f"{label:<22} L0 {l0:7.1f} | dense {B / dense:8.0f} samples/s {dense * 1e3:7.1f} ms {dense_mib:5.0f} MiB | "
            f"{other:<6} {B / fast:8.0f} samples/s {fast * 1e3:7.1f} ms {fast_mib:5.0f} MiB | {dense / fast:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-sae", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--l0", type=float, default=18.0, help="active latents per input for the ReLU steps")
    parser.add_argument("--densities", type=float, nargs="*", default=[0.02, 0.05, 0.075, 0.1, 0.2],
                        help="active densities of the bf16 ReLU sweep (the first steps of training are denser)")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads (torch's default: all cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    retained = retain_freed_memory()  # as the trainer does: both paths run with freed memory kept for reuse
    B, D, device = args.batch, args.d_in, args.device
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}; batch {B}, d_in {D}; "
          f"sparse step while at most {sparse_max_density(device):.0%} of [B, F] is active; best of {args.steps} steps; "
          f"freed memory {'kept for reuse' if retained else 'returned to the system'} (as in training)")
    x_BD = torch.randn(B, D, device=device).relu_()
    wall = time.perf_counter()
    for F in args.d_sae:
        print(f"\n== dictionary {F} ({10 * D * F / 1e6:.1f} MFLOP/sample in the dense ReLU step)")
        for name, dtype in DTYPES.items():
            cfg = SAEConfig(dict_size=F, batch_size=B, samples=B, precision=name)
            result = compare(cfg, x_BD, args.l0, device, args.steps)
            peak = matmul_flops_per_s(B, D, F, dtype, device, reps=4)
            achieved = 10 * D * F * B / result["dense"][0]
            print(_row(f"ReLU {name}", B, result) + f" | matmul {peak / 1e9:.0f} GFLOP/s, dense step {achieved / peak:.2f} of it")
        for density in args.densities:
            cfg = SAEConfig(dict_size=F, batch_size=B, samples=B, precision="bf16")
            result = compare(cfg, x_BD, density * F, device, args.steps, max_density=1.0)
            takes = "sparse" if result["other"][1] / F <= sparse_max_density(device) else "dense"
            print(_row(f"ReLU bf16 at {density * 100:g}%", B, result, "sparse") + f" | the trainer takes {takes}")
        for name in DTYPES:
            cfg = SAEConfig(arch="topk", k=args.k, dict_size=F, batch_size=B, samples=B, precision=name)
            print(_row(f"TopK k={args.k} {name}", B, compare(cfg, x_BD, args.k, device, args.steps)))
    print(f"\nwall time {time.perf_counter() - wall:.1f} s")


if __name__ == "__main__":
    main()
