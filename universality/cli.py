"""The ``univ`` command line. Each command parses its options and calls one library function."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from universality.runtime.cache import STAGES
from universality.core.config import DEFAULT_EXPERIMENT, DEFAULT_PRESET, UI_HOST, UI_PORT, preset_names
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


RESULTS_DIR = click.option("--results-dir", type=click.Path(path_type=Path), default=Path("results"), show_default=True,
                           help="Results folder: stage cache, and the embedded MLflow store unless a tracking URI is given.")
TRACKING_URI = click.option("--tracking-uri", default=None,
                            help="MLflow tracking server (default: $MLFLOW_TRACKING_URI, else SQLite in the results folder).")
EXPERIMENT = click.option("--experiment", default=DEFAULT_EXPERIMENT, show_default=True, help="MLflow experiment name.")
MAX_SEED = 2**63 - 1  # seeds go to torch.manual_seed, NumPy and int64 table columns: all take this range
DEVICE = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)


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
    """Train one transformer per seed, fit an SAE on each (and replicate SAEs for the ceiling), and compare every pair."""
    cfg, chosen = _experiment(seeds, seed_list, preset, config_file, corpus, sae_replicates, dict_sizes)  # fails before torch loads
    from universality import pipeline
    from universality.outputs.terminal import describe
    from universality.publish import publish
    from universality.runtime.engine import Engine, resolve_device
    from universality.runtime.memory import check_memory
    from universality.tracking.tracker import tracked_run

    check_memory(cfg, resolve_device(device))  # before the MLflow run is made
    engine = Engine(jobs, backend, scheduler)
    with tracked_run(results_dir, tracking_uri, experiment, cfg, chosen) as tracker:
        result = pipeline.run(cfg, chosen, results_dir=results_dir, device=device, engine=engine)
        original = publish(tracker, result)
    click.echo(describe(result))
    rerun = "" if original is None else f", a re-run of {original} (its child runs, reports and tables: nothing logged twice)"
    click.echo(f"MLflow run {tracker.run_id} in {tracker.client.tracking_uri}{rerun} (tracking took {tracker.seconds:.1f} s)")
    click.echo(run_link(tracker.client.tracking_uri, tracker.experiment_id, tracker.run_id))


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
@click.option("--latents", type=int, default=None, help="Number of latents. Default 8 x the activation dims.")
@click.option("--k", type=int, default=None, help="Latents per token on average (batchtopk). Default 32.")
@click.option("--l1-coeff", type=float, default=None, help="L1 lambda (l1). Default: the paper's 0.004, scaled to the dims.")
@click.option("--samples", type=int, default=None, help="Rows seen in training. Default 2,000,000.")
@click.option("--batch-size", type=int, default=None, help="Rows per step. Default 512.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True)
@DEVICE
def crosscoder(acts, out_dir, arch, latents, k, l1_coeff, samples, batch_size, seed, device) -> None:
    """Train one crosscoder on ACTS_0 ACTS_1 ..., .npy arrays (rows x dims) of several models' activations on the same
    rows; write its checkpoint (W_dec [n_models, n_latents, d]) and latents.csv (latent, norm_0.., class, density)."""
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


@main.command()
@click.option("--port", type=click.IntRange(1, 65535), default=UI_PORT, show_default=True)
@click.option("--host", default=UI_HOST, show_default=True, help="Interface to listen on (loopback by default).")
@EXPERIMENT
@RESULTS_DIR
def ui(port, host, experiment, results_dir) -> None:
    """Start the MLflow UI on the results folder's store and print the experiment's URL."""
    import os

    from universality.tracking import store

    client = store.open_client(results_dir, store.embedded_uri(results_dir), read_only=True)
    exp = store.experiment_id(client, experiment, results_dir)
    artifacts = Path(results_dir).resolve() / "mlartifacts"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", client.tracking_uri,
               "--artifacts-destination", str(artifacts), "--host", host, "--port", str(port)]
    click.echo(f"MLflow UI: {store.ui_url(f'http://{host}:{port}', exp)}  (Ctrl-C stops it)")
    sys.stdout.flush()
    os.execv(sys.executable, command)  # the server replaces this process: signals reach it directly


@main.command()
@click.argument("run_id", metavar="[RUN]", default="latest")
@click.option("--format", "fmt", type=click.Choice(["csv", "parquet", "json"]), default="csv", show_default=True)
@click.option("--out", type=click.Path(path_type=Path),
              help="Matched feature table; the families table is written beside it (OUT with .families before the suffix), "
                   "for a dictionary family the feature-splitting table (.splits), with a crosscoder its latents table "
                   "(.crosscoder). For a sweep: its summary table.")
@click.option("--models", type=click.Path(path_type=Path),
              help="Folder (created if needed) for every seed's transformer as TransformerLens loads it and its SAE as "
                   "SAELens loads it on that model: MODELS/seed<N>/config.json, model.safetensors, tokenizer.json, sae/.")
@RESULTS_DIR
@TRACKING_URI
def export(run_id, fmt, out, models, results_dir, tracking_uri) -> None:
    """Export a univ run's matched feature table and families (--out), its models and SAEs for TransformerLens
    and SAELens (--models), or a sweep's summary table (RUN: an MLflow run id, or 'latest': the latest univ run)."""
    from universality import sweep
    from universality.outputs import export as export_tables
    from universality.outputs import transformer_lens
    from universality.tracking import lookups, store
    from universality.tracking.names import KIND

    if out is None and models is None:
        raise click.UsageError("give --out, --models or both")
    for path in (p for p in (out, models) if p is not None):
        if not path.parent.is_dir():
            raise UnivError(f"folder {path.parent} does not exist")
    client = store.open_client(results_dir, tracking_uri, read_only=True)
    run = lookups.find_run(client, run_id, kinds=("experiment", "sweep"))
    if run.data.tags[KIND] == "sweep":
        if models is not None:
            raise UnivError(f"run {run.info.run_id} is a sweep: --models exports the models of one univ run")
        table = sweep.load_summary(client, run.info.run_id)
        export_tables.write_table(table, out, fmt)
        click.echo(f"sweep {run.info.run_id}: {len(table)} grid points -> {out}")
        return
    exported = transformer_lens.run_exports({seed: lookups.seed_folders(client, run, seed, results_dir)
                                             for seed in lookups.run_seeds(run)}) if models is not None else []  # read first
    if out is not None:
        click.echo(export_run_tables(client, run.info.run_id, out, fmt))
    if models is not None:
        folders = transformer_lens.write_models(models, exported)
        click.echo(f"run {run.info.run_id}: {', '.join(f.name for f in folders)} (TransformerLens models, SAELens SAEs) -> {models}")


def export_run_tables(client, run_id: str, out: Path, fmt: str) -> str:
    """Write a univ run's matched feature table and families to ``out`` and, where the run has them, its splits
    and crosscoder latents beside it; returns the line that says what went where."""
    from universality.outputs import export as export_tables
    from universality.tracking import lookups

    matched, families = lookups.load_tables(client, run_id)
    written = export_tables.write_tables(matched, families, out, fmt)
    message = f"run {run_id}: {len(matched)} matched rows -> {written[0]}, {len(families)} families -> {written[1]}"
    for name, table, what in (("splits", lookups.load_splits(client, run_id), "split edges"),  # a dictionary family
                              ("crosscoder", lookups.load_crosscoder(client, run_id), "crosscoder latents")):
        if table is not None:
            export_tables.write_table(table, export_tables.beside(out, name), fmt)
            message += f", {len(table)} {what} -> {export_tables.beside(out, name)}"
    return message


@main.command()
@click.argument("run_id", metavar="RUN")
@click.argument("seed", type=click.IntRange(min=0))
@click.argument("feature", type=click.IntRange(min=0))
@click.option("--size", type=click.IntRange(min=1), default=None,
              help="The feature's dictionary size, for a run that fitted several (sae.dict_sizes): the card then shows its "
                   "parents and children in the next smaller and larger sizes. Default: the primary (largest) size.")
@click.option("--dashboard", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the feature's page from sae-dashboard, the field's SAE visualizer, to this .html file (needs "
                   "pip install 'univ[dashboard]'): activation histogram, top and quantile contexts of the comparison "
                   "tokens, logit effects, correlated neurons and features.")
@RESULTS_DIR
@TRACKING_URI
def features(run_id, seed, feature, size, dashboard, results_dir, tracking_uri) -> None:
    """Show one SAE feature of a univ run (RUN: run id or 'latest'): density, top contexts, logit effects, partners;
    in a dictionary family, its parents and children. With --dashboard, its sae-dashboard page instead."""
    import dataclasses

    from universality.outputs.feature_cards import lineage, render_terminal
    from universality.tracking import lookups, store

    if dashboard is not None:
        from universality.outputs import dashboard as sae_dashboard

        sae_dashboard.check_libraries()  # before any work: a one-line error naming the extra
        sae_dashboard.check_out(dashboard)
    client = store.open_client(results_dir, tracking_uri, read_only=True)
    run = lookups.find_run(client, run_id)
    sizes = lookups.run_sizes(run)
    if size is not None and size not in sizes:
        raise UnivError(f"run {run.info.run_id} has no {size}-feature SAE (its sizes: {', '.join(map(str, sizes))})")
    sources = lookups.seed_sources(client, run, seed, results_dir, size)
    n_features = sources.densities.size
    if feature >= n_features:
        raise UnivError(f"feature {feature} is out of range: seed {seed} has {n_features} features (0..{n_features - 1})")
    if dashboard is not None:
        if size not in (None, sizes[-1]):
            raise UnivError("--dashboard shows a feature of the primary (largest) size, the SAE univ export --models exports")
        if sources.densities[feature] == 0:
            raise UnivError(f"feature {feature} of seed {seed} is dead: it never fires on the comparison tokens, "
                            "so a dashboard would show nothing")
        title = f"univ run {run.info.run_id} · seed {seed} · feature {feature} (sae-dashboard)"
        sae_dashboard.render(dashboard, seed, feature, lookups.seed_folders(client, run, seed, results_dir),
                             run.data.params, title)
        click.echo(f"seed {seed} feature {feature}: sae-dashboard page -> {dashboard}")
        return
    matched, _ = lookups.load_tables(client, run.info.run_id)
    card = sources.card(feature, matched if size in (None, sizes[-1]) else matched.iloc[:0])
    splits = lookups.load_splits(client, run.info.run_id) if len(sizes) > 1 else None
    if splits is not None:
        card = dataclasses.replace(card, lineage=lineage(splits, seed, size or sizes[-1], feature, size in (None, sizes[-1])))
    click.echo(render_terminal(card))


def _finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    import math

    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"must be a finite number, not {value}")
    return value


@main.command()
@click.argument("run_id", metavar="RUN")
@click.argument("seed", type=click.IntRange(min=0))
@click.argument("feature", type=click.IntRange(min=0))
@click.option("--ablate", "intervention", flag_value="ablate", default=True,
              help="Subtract the feature from the MLP neurons on the held-out tokens; report the change in next-token loss (default).")
@click.option("--pin", "intervention", flag_value="pin", help="Clamp the feature at every position and sample a continuation of --prompt.")
@click.option("--prompt", default="1, 2, 3, 4, 5, 6, 7, 8, 9, 10", show_default=True, help="The text --pin continues.")
@click.option("--tokens", "n_tokens", type=click.IntRange(min=1), default=24, show_default=True, help="Tokens --pin samples.")
@click.option("--temperature", type=click.FloatRange(min=0), default=1.0, callback=_finite, show_default=True,
              help="Sampling temperature of --pin (0: greedy).")
@click.option("--sample-seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
              help="Seed of --pin's sampling; the unsteered sample beside it uses the same.")
@click.option("--value", type=float, default=None, callback=_finite,
              help="Pin at this value (partners: at the same multiple of their own max activation).")
@click.option("--scale", type=float, default=None, callback=_finite,
              help="Pin at this multiple of the feature's max activation on the held-out tokens (default 1).")
@click.option("--across-seeds", is_flag=True, help="Also intervene on the feature's partner in every other seed, side by side.")
@click.option("--log", "log_run", is_flag=True, help="Add the result to the run in MLflow (a child run of kind steer).")
@RESULTS_DIR
@TRACKING_URI
def steer(run_id, seed, feature, intervention, prompt, n_tokens, temperature, sample_seed, value, scale, across_seeds,
          log_run, results_dir, tracking_uri) -> None:
    """Ablate or pin one SAE feature of a univ run (RUN: run id or 'latest') and show what it does; with
    --across-seeds, beside its matched partners in the other seeds."""
    if value is not None and scale is not None:
        raise click.UsageError("give --value or --scale, not both")
    from universality import steer
    from universality.outputs.feature_cards import partners, vocab_strings
    from universality.text.tokenization import load_tokenizer
    from universality.tracking import lookups, store
    from universality.tracking.tracker import Tracker

    client = store.open_client(results_dir, tracking_uri, read_only=True)
    run = lookups.find_run(client, run_id)
    folders = lookups.seed_folders(client, run, seed, results_dir)
    tokenizer = load_tokenizer(folders[0] / "tokenizer.json")
    prompt_L = steer.prompt_tokens(tokenizer, prompt) if intervention == "pin" else None
    members = [steer.load_member(folders, seed, feature)]
    if across_seeds:
        matched, _ = lookups.load_tables(client, run.info.run_id)
        members += [steer.load_member(lookups.seed_folders(client, run, p.seed, results_dir), p.seed, p.feature, p)
                    for p in partners(matched, seed, feature)]
    if intervention == "ablate":
        result = steer.ablate(members, steer.load_tokens(folders[0], run.data.params, vocab_strings(tokenizer)))
    else:
        settings = steer.PinSettings(prompt, n_tokens, temperature, sample_seed, value, 1.0 if scale is None else scale)
        result = steer.pin(members, tokenizer, prompt_L, settings)
    click.echo(result.text)
    if across_seeds and len(members) == 1:
        click.echo(f"no partners: seed {seed}'s feature {feature} has no included partner in another seed")
    if log_run:
        tracker = Tracker(store.open_client(results_dir, tracking_uri), run.info.experiment_id, run.info.run_id,
                                   results_dir)
        click.echo(f"logged as MLflow run {steer.log(tracker, result)} under run {run.info.run_id}")


@main.group()
def cache() -> None:
    """Inspect or clear the stage cache (<results>/cache/<stage>/<key>/)."""


_STAGE = click.option("--stage", type=click.Choice(STAGES), default=None,
                      help="Only this stage.")


@cache.command("ls")
@RESULTS_DIR
@_STAGE
def cache_ls(results_dir, stage) -> None:
    """List cached stage outputs: stage, key, size, state and what each is."""
    from universality.runtime import cache as stage_cache

    entries = stage_cache.entries(results_dir, stage)
    for e in entries:
        click.echo(f"{e.stage:<12} {e.key}  {e.size / 2**20:9.1f} MiB  {e.seconds:8.1f} s  {e.state:<8}  {e.label}")
    click.echo(f"{len(entries)} entries, {sum(e.size for e in entries) / 2**20:.1f} MiB in {Path(results_dir) / 'cache'}")


@cache.command("clear")
@RESULTS_DIR
@_STAGE
def cache_clear(results_dir, stage) -> None:
    """Remove cached stage outputs (all, or one stage's): the next run recomputes them."""
    from universality.runtime import cache as stage_cache

    click.echo(f"removed {stage_cache.clear(results_dir, stage)} cached {stage or 'stage'} folder(s)")
