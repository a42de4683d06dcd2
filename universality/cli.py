"""The ``univ`` command line. Each command parses its options and calls one library function."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from universality.config import DEFAULT_PRESET, preset_names
from universality.errors import UnivError


class Group(click.Group):
    """Turns a ``UnivError`` from any command into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UnivError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=Group)
@click.version_option(package_name="univ")
def main() -> None:
    """Feature universality: train transformers across seeds, fit SAEs, match their features."""


def _seed_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        seeds = [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter("expected comma-separated integers, e.g. 3,7,11") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise click.BadParameter("expected distinct non-negative integers, e.g. 3,7,11")
    return seeds


@main.command()
@click.option("--seeds", type=click.IntRange(min=1), default=None, help="Number of seeds (0..N-1). Default 2.")
@click.option("--seed-list", callback=_seed_list, help="Explicit seeds, e.g. 3,7,11 (instead of --seeds).")
@click.option("--preset", type=click.Choice(preset_names()), default=DEFAULT_PRESET, show_default=True)
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML/JSON config laid over the preset.")
@click.option("--corpus", default=None, help="'stdlib', a text file or folder, or hf:NAME[:SPLIT].")
@click.option("--results-dir", type=click.Path(path_type=Path), default=Path("results"), show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def run(seeds, seed_list, preset, config_file, corpus, results_dir, device) -> None:
    """Train one transformer per seed, fit an SAE on each, and compare every pair."""
    from universality import pipeline
    from universality.config import load_config, load_preset

    if seeds is not None and seed_list is not None:
        raise click.UsageError("give --seeds or --seed-list, not both")
    chosen = seed_list if seed_list is not None else list(range(seeds if seeds is not None else 2))
    cfg = load_preset(preset)
    if config_file is not None:
        cfg = load_config(config_file, base=cfg)
    if corpus is not None:
        cfg = cfg.replace(data={"corpus": corpus})
    result = pipeline.run(cfg, chosen, results_dir=results_dir, device=device)
    click.echo(pipeline.describe(result))


@main.command()
@click.argument("acts_a", type=click.Path(path_type=Path))
@click.argument("acts_b", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Table of A's features: .csv or .parquet.")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Report the fraction of A's features whose best partner exceeds this (default: the config's thresholds).")
@click.option("--min-firings", type=click.IntRange(min=1), default=None,
              help="Leave out features firing on fewer tokens (default: the config's compare.min_firings).")
def match(acts_a, acts_b, out, threshold, min_firings) -> None:
    """Match the features of two activation matrices over the same tokens (.npy dense or .npz sparse, N x F)."""
    import dataclasses

    from universality.config import CompareConfig
    from universality.match_files import match_activation_files

    cfg = CompareConfig() if min_firings is None else dataclasses.replace(CompareConfig(), min_firings=min_firings)
    stats = match_activation_files(acts_a, acts_b, out, cfg, threshold=threshold)
    for key, value in stats.items():
        if not key.startswith("decile"):  # the per-density-decile breakdown is in the library's dict
            click.echo(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    click.echo(f"wrote {out}")


@main.command("train-sae")
@click.argument("acts", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Checkpoint folder to write.")
@click.option("--dict-size", type=int, default=None, help="Number of features. Default 8 x the activation dims.")
@click.option("--arch", type=click.Choice(["relu", "topk"]), default="relu", show_default=True)
@click.option("--l1-coeff", type=float, default=None, help="L1 lambda (relu). Default: the paper's 0.004, scaled to the dims.")
@click.option("--k", type=int, default=None, help="Active features per token (topk). Default 32.")
@click.option("--samples", type=int, default=None, help="Activation vectors seen in training. Default 2,000,000.")
@click.option("--batch-size", type=int, default=None, help="Activations per step. Default 4096.")
@click.option("--lr", type=float, default=None, help="Adam learning rate. Default 1e-3.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def train_sae(acts, out_dir, dict_size, arch, l1_coeff, k, samples, batch_size, lr, seed, device) -> None:
    """Train an SAE on ACTS, a .npy array (rows x dims) of activations, and save it with its metrics."""
    from sae.api import train_sae_on_npy

    overrides = {"arch": arch, "dict_size": dict_size, "l1_coeff": l1_coeff, "k": k, "samples": samples,
                 "batch_size": batch_size, "lr": lr}
    metrics = train_sae_on_npy(acts, out_dir, overrides, seed=seed, device=device)
    click.echo(f"SAE saved to {out_dir}: fvu {metrics['fvu']:.4f}, L0 {metrics['l0']:.1f}, "
               f"dead {metrics['dead_fraction']:.1%} on {metrics['heldout_rows']} held-out rows")
