"""SAE training throughput in fp32 and bf16 against this machine's matmul speed in each (a script, not a test).

    python benchmarks/bench_sae.py [--steps 10] [--d-in 512] [--d-sae 2048 4096] [--batch 1024] [--device cpu] [--threads N]

FLOP count, per training sample: the five [B, D] x [D, F]-sized matmuls a step needs, 2·D·F each
(multiply + add): encoder forward x̄ W_enc, decoder forward f W_dec, decoder weight grad fᵀ g_x̂,
feature grad g_x̂ W_decᵀ, encoder weight grad x̄ᵀ g_pre. No input grad is needed (x has no grad; b_dec's
gradient through the encoder is a matrix-vector product). So 10·D·F FLOP per sample; elementwise
work, Adam and the decoder-norm constraint are not counted (they are the overhead being measured).

The reference is the same five matmuls, same shapes and layouts, timed back to back with torch.mm in
the same precision (bf16: bf16 inputs, as the SAE's bf16 matmuls have). Training time per step is the
difference between a long and a short ``train_sae`` run divided by the difference in steps (best of
three), so one-off setup (input scale, geometric median) is excluded. TopK decodes only its k active
latents (sparse), so its dense FLOP count does not apply: it is shown in samples/s (AuxK off), beside the
same step with the dense decoder (``SAE.loss``, the reference it is tested against).
"""

from __future__ import annotations

import argparse
import itertools
import resource
import time

import torch

from sae.base import SAE
from sae.constrained_adam import ConstrainedAdam
from sae.registry import build_sae
from sae.training import resolve_precision, train_sae
from universality.core.config import SAEConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
REPEATS = 3  # each timing is the best of this many (the machine may be shared)


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


def seconds_per_step(cfg: SAEConfig, D: int, steps: int, device: str) -> float:
    """Per-step time of ``train_sae`` (setup excluded) on MLP-like (non-negative) random inputs."""
    data = [torch.randn(cfg.batch_size, D, device=device).relu_() for _ in range(4)]

    def run(n: int) -> float:
        run_cfg = SAEConfig(**{**cfg.training_fields(), "samples": cfg.batch_size * n})
        start = time.perf_counter()
        train_sae(itertools.cycle(data), run_cfg, D, seed=0, device=device, progress=False)
        _sync(device)
        return time.perf_counter() - start

    short = 2
    run(short)  # warm-up
    return (min(run(short + steps) for _ in range(REPEATS)) - min(run(short) for _ in range(REPEATS))) / steps


def loss_step_seconds(cfg: SAEConfig, D: int, steps: int, device: str, dense: bool) -> float:
    """Best time of one forward + backward + Adam step with the SAE's own loss, or with the dense reference."""
    sae = build_sae(cfg, D).to(device)
    sae.matmul_dtype = DTYPES[resolve_precision(cfg.precision, device)]
    optimizer = ConstrainedAdam(sae.parameters(), [sae.W_dec], lr=cfg.lr)
    x = torch.randn(cfg.batch_size, D, device=device).relu_()
    loss = SAE.loss if dense else type(sae).loss
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        out = loss(sae, x)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times[2:])


def peak_memory_mib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-sae", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads (torch's default: all cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    B, D, device = args.batch, args.d_in, args.device
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}; "
          f"precision auto resolves to {resolve_precision('auto', device)}; batch {B}, d_in {D}")
    wall = time.perf_counter()
    for F in args.d_sae:
        print(f"\n== dictionary {F} ({10 * D * F / 1e6:.1f} MFLOP/sample counted for ReLU)")
        relu_rate = {}
        for name, dtype in DTYPES.items():
            peak = matmul_flops_per_s(B, D, F, dtype, device, reps=4)
            step = seconds_per_step(SAEConfig(dict_size=F, batch_size=B, samples=B, resample_fractions=(),
                                              snapshot_fraction=0, precision=name), D, args.steps, device)
            achieved = 10 * D * F * B / step
            relu_rate[name] = B / step
            print(f"{name}: matmul {peak / 1e9:7.1f} GFLOP/s | ReLU SAE training {B / step:8.0f} samples/s, "
                  f"{step * 1e3:6.1f} ms/step, {achieved / 1e9:6.1f} GFLOP/s = {achieved / peak:.2f} of matmul | "
                  f"peak memory {peak_memory_mib(device):.0f} MiB")
        print(f"ReLU bf16 / fp32 training speedup: {relu_rate['bf16'] / relu_rate['fp32']:.2f}x")
        for name in DTYPES:
            # A dead window of the whole run: no latent counts as dead, so AuxK (dense, run while any latent is
            # dead) stays off and the step is the one the sparse decoder speeds up.
            cfg = SAEConfig(arch="topk", k=args.k, dict_size=F, batch_size=B, samples=B, resample_fractions=(),
                            dead_window_fraction=1.0, snapshot_fraction=0, precision=name)
            step = seconds_per_step(cfg, D, args.steps, device)
            sparse, dense = (loss_step_seconds(cfg, D, args.steps, device, dense) for dense in (False, True))
            print(f"{name}: TopK (k={args.k}) SAE training {B / step:8.0f} samples/s, {step * 1e3:6.1f} ms/step | "
                  f"one step, sparse decoder {sparse * 1e3:6.1f} ms vs dense {dense * 1e3:6.1f} ms "
                  f"({dense / sparse:.2f}x)")
    print(f"\nwall time {time.perf_counter() - wall:.1f} s, peak memory {peak_memory_mib(device):.0f} MiB")


if __name__ == "__main__":
    main()
