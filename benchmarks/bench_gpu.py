"""The pipeline on a GPU, without tracking: time per stage, SAE quality and the universality headline.

    python benchmarks/bench_gpu.py --preset paper --seeds 2 [--config shorter.toml]

Checks the CUDA paths end to end and sizes the ``paper`` preset: stage times come from each
stage's ``done.json``, so a shortened run (``--config``) extrapolates to the full one.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from universality.outputs.terminal import describe
from universality.runtime import cache
from universality import pipeline
from universality.core.config import load_config, load_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--config", type=Path)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--results-dir", type=Path)
    args = parser.parse_args()
    cfg = load_preset(args.preset)
    if args.config:
        cfg = load_config(args.config, base=cfg)
    results = args.results_dir or Path(tempfile.mkdtemp(prefix="univ-gpu-"))
    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}; torch {torch.__version__}")
    start = time.perf_counter()
    result = pipeline.run(cfg, list(range(args.seeds)), results, device="auto", progress=False)
    wall = time.perf_counter() - start
    print(describe(result))
    for entry in cache.entries(results):
        print(f"{entry.stage:12s} {entry.label:40s} {entry.seconds:8.1f} s  {entry.size / 2**20:9.1f} MiB")
    for name, sae in result.saes.items():
        m = sae.metrics
        print(f"{name}: mse {m['mse']:.4g} fvu {m['fvu']:.3f} l0 {m['l0']:.1f} dead {m['dead_fraction']:.3f} "
              f"dense {m['dense_fraction']:.3f} ultralow {m['ultralow_count']} loss recovered {m['loss_recovered']:.3f} "
              f"resampled {[e['n_resampled'] for e in sae.resampling_events]}")
    for pair in result.pairs + ([result.randomized] if result.randomized else []):
        s = pair.stats
        print(f"{pair.run_a} vs {pair.run_b}: " + ", ".join(
            f"{k} {s[k]:.3f}" for k in ("features.max_corr_mean", "features.max_corr_median", "features.frac_above_0.5",
                                        "neurons.max_corr_median", "rotation.max_corr_median", "features.logit_corr_median", "cka")))
    print(f"wall {wall:.1f} s; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0:.2f} GiB")


if __name__ == "__main__":
    main()
