"""The ``univ`` command line. Each command parses its options and calls one library function."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from universality import cli_runs
from universality.cli_options import DEVICE, EXPERIMENT, MAX_SEED, RESULTS_DIR, TRACKING_URI
from universality.core.config import DEFAULT_PRESET, preset_names
from universality.core.errors import UnivError, first_line, from_os_error


class Group(click.Group):
    """Turns a ``UnivError`` (or a file-system ``OSError``, or an ``MlflowException``) from any command into
    one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Exception as exc:
            message = user_error(exc)
            if message is None:
                raise
            close_progress_bars()
            click.echo(f"Error: {message}", err=True)
            sys.exit(1)


def close_progress_bars() -> None:
    """Close the bars an error left open (clearing their line), so the error starts a line of its own."""
    tqdm = sys.modules.get("tqdm")  # loaded by every command that draws bars
    for bar in list(tqdm.tqdm._instances) if tqdm is not None else []:
        bar.close()


def user_error(exc: Exception) -> str | None:
    """The one-line message of an error in the user's input or environment, None for a bug."""
    if isinstance(exc, UnivError):
        return str(exc)
    if isinstance(exc, OSError):
        return str(from_os_error(exc))
    mlflow_errors = sys.modules.get("mlflow.exceptions")  # loaded by every command that talks to MLflow
    if mlflow_errors is not None and isinstance(exc, mlflow_errors.MlflowException):
        return f"MLflow: {first_line(exc)}"
    return None


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
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0 or max(seeds) > MAX_SEED:
        raise click.BadParameter(f"expected distinct integers in 0..{MAX_SEED}, e.g. 3,7,11")
    return seeds


def _size_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        sizes = [int(s) for s in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated positive integers, e.g. 512,1024,2048, not {value!r}") from None
    if min(sizes) < 1 or len(set(sizes)) != len(sizes):
        raise click.BadParameter(f"expected distinct positive integers, e.g. 512,1024,2048, not {value!r}")
    return tuple(sizes)


def experiment_options(command):
    """The options ``run`` and ``sweep`` share: which seeds and config, where results go, where the work runs."""
    options = [
        click.option("--seeds", type=click.IntRange(min=1), default=None, help="Number of seeds (0..N-1). Default 2."),
        click.option("--seed-list", callback=_seed_list, help="Explicit seeds, e.g. 3,7,11 (instead of --seeds)."),
        click.option("--preset", type=click.Choice(preset_names()), default=DEFAULT_PRESET, show_default=True),
        click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML/JSON config laid over the preset."),
        click.option("--corpus", default=None, help="'stdlib', a text file or folder, or hf:NAME[:SPLIT]."),
        RESULTS_DIR,
        DEVICE,
        TRACKING_URI,
        EXPERIMENT,
        click.option("--jobs", type=click.IntRange(min=1), default=None,
                     help="Seeds trained at once (worker processes). Default: min(runs, CPU cores)."),
        click.option("--backend", type=click.Choice(["loky", "dask"]), default="loky", show_default=True,
                     help="loky: worker processes here; dask: a Dask cluster (results dir on a shared filesystem)."),
        click.option("--scheduler", default=None, help="Dask scheduler address tcp://HOST:PORT (with --backend dask)."),
        click.option("--sae-replicates", type=click.IntRange(min=0), default=None,
                     help="Extra SAEs per replicated model, differing only in the SAE seed: the within-model ceiling "
                          "(default: the config's sae.replicates, 1 on the first seed's model; 0: no ceiling)."),
        click.option("--dict-sizes", callback=_size_list, metavar="N1,N2,...",
                     help="A dictionary family: one SAE of each size per model, e.g. 512,1024,2048 (sae.dict_sizes); the "
                          "largest is the primary size, reported as a single-size run is. Default: one SAE of sae.dict_size."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _experiment(seeds, seed_list, preset, config_file, corpus, sae_replicates, dict_sizes):
    """(config, seeds) from the shared options: the preset, the config file laid over it, the corpus, the replicates,
    the dictionary sizes."""
    from universality.core.config import load_config, load_preset

    if seeds is not None and seed_list is not None:
        raise click.UsageError("give --seeds or --seed-list, not both")
    chosen = seed_list if seed_list is not None else list(range(seeds if seeds is not None else 2))
    cfg = load_preset(preset)
    if config_file is not None:
        cfg = load_config(config_file, base=cfg)
    if corpus is not None:
        cfg = cfg.replace(data={"corpus": corpus})
    if sae_replicates is not None:
        cfg = cfg.replace(sae={"replicates": sae_replicates})
    if dict_sizes is not None:
        cfg = cfg.replace(sae={"dict_sizes": dict_sizes})
    return cfg, chosen


@main.command()
@experiment_options
def run(seeds, seed_list, preset, config_file, corpus, results_dir, device, tracking_uri, experiment,
        jobs, backend, scheduler, sae_replicates, dict_sizes) -> None:
    """Train one transformer per seed, fit an SAE on each (and replicate SAEs for the ceiling), and compare every pair.
    The same command again, with nothing changed, answers with the run it made: nothing re-run, nothing logged."""
    cfg, chosen = _experiment(seeds, seed_list, preset, config_file, corpus, sae_replicates, dict_sizes)  # fails before torch loads
    from universality.tracking import reruns

    request = reruns.request_key(cfg, chosen, device, results_dir, tracking_uri, experiment)
    answer = reruns.recorded(results_dir, request)
    if answer is not None:
        click.echo(answer.description)
        click.echo(f"MLflow run {answer.run_id} in {answer.tracking_uri}: this command's run, finished before "
                   "(nothing re-run, nothing logged)")
        click.echo(run_link(answer.tracking_uri, answer.experiment_id, answer.run_id))
        return
    from universality import pipeline
    from universality.outputs.terminal import describe
    from universality.publish import publish
    from universality.runtime import cache
    from universality.runtime.engine import Engine, resolve_device
    from universality.runtime.memory import check_memory
    from universality.tracking.tracker import tracked_run

    check_memory(cfg, resolve_device(device))  # before the MLflow run is made
    engine = Engine(jobs, backend, scheduler)
    with tracked_run(results_dir, tracking_uri, experiment, cfg, chosen) as tracker:
        result = pipeline.run(cfg, chosen, results_dir=results_dir, device=device, engine=engine)
        original = publish(tracker, result)
    description = describe(result)
    click.echo(description)
    rerun = "" if original is None else f", a re-run of {original} (its child runs, reports and tables: nothing logged twice)"
    click.echo(f"MLflow run {tracker.run_id} in {tracker.client.tracking_uri}{rerun} (tracking took {tracker.seconds:.1f} s)")
    click.echo(run_link(tracker.client.tracking_uri, tracker.experiment_id, tracker.run_id))
    reruns.record(results_dir, request, reruns.Answer(original or tracker.run_id, tracker.experiment_id,
                                                      tracker.client.tracking_uri, description,
                                                      tuple(map(cache.folder_name, result.stage_folders))))


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The line that opens a run in the MLflow UI (Model training view): on a tracking server, or through ``univ ui``."""
    from universality.tracking import store

    server, serving = store.ui_server(tracking_uri)
    return f"open it: {store.run_url(server, experiment_id, run_id)}" + ("" if serving else "  (after `univ ui`)")


def _grid(ctx: click.Context, param: click.Parameter, specs: tuple[str, ...]):
    """The --grid specs as axes; a malformed one is a usage error (one line) before any work."""
    from universality.core.errors import ConfigError
    from universality.core.grid import parse_grid

    try:
        return parse_grid(specs)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command()
@click.option("--grid", "axes", multiple=True, required=True, callback=_grid, metavar="SECTION.FIELD=V1,V2,...",
              help="A grid axis: a config field and its values (repeat for more axes; tuples as [a,b]), "
                   "e.g. sae.samples=819200,3276800.")
@click.option("--stat", "stats", multiple=True, metavar="KEY",
              help="A run's summary statistic to tabulate and plot, by key (features.max_corr_median_mean) or MLflow "
                   "metric name (repeatable). Default: the median max correlation (mean over pairs) of SAE features "
                   "and of neurons across models, and of SAE features within a model (the ceiling).")
@experiment_options
def sweep(axes, stats, seeds, seed_list, preset, config_file, corpus, results_dir, device, tracking_uri, experiment,
          jobs, backend, scheduler, sae_replicates, dict_sizes) -> None:
    """Run the experiment at every point of a grid of config fields; tabulate and plot statistics against each axis."""
    from universality.core.grid import grid_points

    cfg, chosen = _experiment(seeds, seed_list, preset, config_file, corpus, sae_replicates, dict_sizes)
    points = grid_points(cfg, axes)  # every point's config is checked before torch loads
    from universality import sweep as sweeps
    from universality.runtime.engine import Engine

    engine = Engine(jobs, backend, scheduler)
    stats = tuple(dict.fromkeys(stats)) or sweeps.DEFAULT_STATS
    result = sweeps.run_sweep(axes, points, chosen, results_dir, stats=stats, device=device,
                              engine=engine, tracking_uri=tracking_uri, experiment=experiment, echo=click.echo)
    click.echo(sweeps.format_table(result.table))
    click.echo(f"summary table and figure in {result.files[0].parent}")
    click.echo(f"MLflow sweep run {result.run_id} in {result.tracking_uri}")
    click.echo(run_link(result.tracking_uri, result.experiment_id, result.run_id))


@main.command()
@click.argument("acts_a", type=click.Path(path_type=Path))
@click.argument("acts_b", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Table of A's features: .csv or .parquet.")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Report the fraction of A's features whose best partner exceeds this (default: the config's thresholds).")
@click.option("--min-firings", type=click.IntRange(min=1), default=None,
              help="Leave out features firing on fewer tokens (default: the config's compare.min_firings).")
@click.option("--tokens", type=click.Path(path_type=Path), default=None,
              help="The current token id of each row (.npy, 1-D integers): also match given the token (contextual "
                   "correlation, token share, the token-lookup null).")
def match(acts_a, acts_b, out, threshold, min_firings, tokens) -> None:
    """Match the features of two activation matrices over the same tokens (.npy dense or .npz sparse, N x F)."""
    import dataclasses

    from universality.core.config import CompareConfig
    from universality.match import match_activation_files

    cfg = CompareConfig() if min_firings is None else dataclasses.replace(CompareConfig(), min_firings=min_firings)
    stats = match_activation_files(acts_a, acts_b, out, cfg, threshold=threshold, tokens=tokens)
    for key, value in stats.items():
        if "decile" not in key:  # the per-density-decile breakdown is in the library's dict
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
@click.option("--batch-size", type=int, default=None, help="Activations per step. Default 512.")
@click.option("--lr", type=float, default=None, help="Adam learning rate. Default 3e-3.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True)
@DEVICE
def train_sae(acts, out_dir, dict_size, arch, l1_coeff, k, samples, batch_size, lr, seed, device) -> None:
    """Train an SAE on ACTS, a .npy array (rows x dims) of activations, and save it with its metrics."""
    from sae.api import train_sae_on_npy

    overrides = {"arch": arch, "dict_size": dict_size, "l1_coeff": l1_coeff, "k": k, "samples": samples,
                 "batch_size": batch_size, "lr": lr}
    metrics = train_sae_on_npy(acts, out_dir, overrides, seed=seed, device=device)
    click.echo(f"SAE saved to {out_dir}: fvu {metrics['fvu']:.4f}, L0 {metrics['l0']:.1f}, "
               f"dead {metrics['dead_fraction']:.1%} on {metrics['heldout_rows']} held-out rows")


@main.command("crosscoder")
@click.argument("acts", nargs=-1, type=click.Path(path_type=Path), metavar="ACTS_0 ACTS_1 [ACTS_2 ...]")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Checkpoint folder to write.")
@click.option("--arch", type=click.Choice(["l1", "batchtopk"]), default="batchtopk", show_default=True,
              help="batchtopk: Minder et al.'s BatchTopK crosscoder; l1: Lindsey et al.'s decoder-norm-weighted L1.")
@click.option("--latents", type=int, default=None, help="Number of latents. Default 8 x the widest file's dims.")
@click.option("--k", type=int, default=None, help="Latents per token on average (batchtopk). Default 32.")
@click.option("--l1-coeff", type=float, default=None, help="L1 lambda (l1). Default: the paper's 0.004, scaled to the dims.")
@click.option("--samples", type=int, default=None, help="Rows seen in training. Default 2,000,000.")
@click.option("--batch-size", type=int, default=None, help="Rows per step. Default 512.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True)
@DEVICE
def crosscoder(acts, out_dir, arch, latents, k, l1_coeff, samples, batch_size, seed, device) -> None:
    """Train one crosscoder on ACTS_0 ACTS_1 ..., .npy arrays (rows x dims) of several models' activations on the same
    rows; write its checkpoint (W_dec [n_models, n_latents, d]; where the files' dims differ, one W_dec_<m>
    [n_latents, d_m] per model) and latents.csv (latent, norm_0.., class, density)."""
    if len(acts) < 2:
        raise click.UsageError(f"a crosscoder needs at least two activation files, got {len(acts)}")
    if latents is not None and latents < 1:
        raise click.BadParameter(f"must be >= 1, not {latents}", param_hint="--latents")
    if arch == "batchtopk" and k is not None and not 1 <= k < (latents or 2**62):
        raise click.BadParameter(f"must be in [1, --latents) for batchtopk, not {k}", param_hint="--k")
    from sae.api import train_crosscoder_on_npy

    overrides = {"arch": f"crosscoder-{arch}", "dict_size": latents, "k": k, "l1_coeff": l1_coeff, "samples": samples,
                 "batch_size": batch_size}
    metrics = train_crosscoder_on_npy(list(acts), out_dir, overrides, seed=seed, device=device)
    counts = ", ".join(f"{cls} {n}" for cls, n in metrics["class_counts"].items())
    click.echo(f"crosscoder saved to {out_dir}: fvu {', '.join(f'{v:.4f}' for v in metrics['fvu'])}, L0 {metrics['l0']:.1f}, "
               f"dead {metrics['dead_fraction']:.1%}, latents {counts} on {metrics['heldout_rows']} held-out rows")


for command in (cli_runs.ui, cli_runs.export, cli_runs.features, cli_runs.steer, cli_runs.cache):
    main.add_command(command)
