"""End-to-end ``univ run`` on this machine: wall time, peak memory, time per stage, share spent tracking;
then the same command again, answered by its recorded run, which must finish in under 5 seconds; then once more
without that record (as after an edit of the code), the pipeline reading every stage from the cache.

    python benchmarks/bench_pipeline.py                      # the quick preset, 4 seeds (~15 min on 2 cores)
    python benchmarks/bench_pipeline.py --preset tiny --seeds 2

Stage times come from the ``seconds`` each stage records in its ``done.json`` (summed over runs:
with parallel workers they add up to more than the wall time). Peak memory is the largest resident
set of the command or any of its worker processes.
"""

from __future__ import annotations

import argparse
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from universality.runtime import cache
from universality.tracking.reruns import COMMANDS

CACHED_LIMIT_S = 5.0


@dataclass(frozen=True)
class Timing:
    wall_s: float
    peak_rss_mib: float
    tracking_s: float | None  # None: the command reported no tracking time


def run_command(args: list[str]) -> Timing:
    """Run ``univ run ARGS`` as a subprocess; its wall time, peak memory and reported tracking time."""
    start = time.perf_counter()
    univ = [sys.executable, "-c", "from universality.cli import main; main()"]  # the `univ` console script
    done = subprocess.run([*univ, "run", *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"univ run failed:\n{done.stderr[-2000:]}")
    tracked = re.search(r"tracking took ([\d.]+) s", done.stdout)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return Timing(wall, peak_kib / 1024, float(tracked.group(1)) if tracked else None)


def stage_seconds(results_dir: Path) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for entry in cache.entries(results_dir):
        totals[entry.stage] += entry.seconds
    return dict(totals)


def report(name: str, timing: Timing) -> None:
    share = "n/a" if timing.tracking_s is None else f"{timing.tracking_s:.1f} s ({timing.tracking_s / timing.wall_s:.1%})"
    print(f"{name}: wall {timing.wall_s:.1f} s | peak memory {timing.peak_rss_mib:.0f} MiB | tracking {share}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=None, help="default: min(runs, cores)")
    parser.add_argument("--results-dir", type=Path, default=None, help="default: a fresh temporary folder")
    args = parser.parse_args()
    results = args.results_dir or Path(tempfile.mkdtemp(prefix="bench_pipeline_")) / "results"
    command = ["--preset", args.preset, "--seeds", str(args.seeds), "--results-dir", str(results)]
    command += ["--jobs", str(args.jobs)] if args.jobs else []
    print(f"univ run {' '.join(command)}")

    report("first run", run_command(command))
    for stage, seconds in stage_seconds(results).items():
        print(f"  {stage:<12} {seconds:8.1f} s (summed over runs)")
    cached = run_command(command)
    report("cached run", cached)
    verdict = "OK" if cached.wall_s < CACHED_LIMIT_S else "TOO SLOW"
    print(f"cached re-run {cached.wall_s:.1f} s vs limit {CACHED_LIMIT_S:.0f} s: {verdict}")
    shutil.rmtree(results / COMMANDS)
    report("cached run without its record (the pipeline reads the cache)", run_command(command))


if __name__ == "__main__":
    main()
