"""The ``univ`` commands that read finished runs: ``ui``, ``export``, ``features``, ``steer`` and ``cache``
(registered on ``univ`` by ``universality.cli``). Each parses its options, then imports what it needs."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from universality.cli_options import EXPERIMENT, MAX_SEED, RESULTS_DIR, TRACKING_URI
from universality.core.config import UI_HOST, UI_PORT
from universality.core.errors import UnivError
from universality.runtime.cache import STAGES


@click.command()
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


@click.command()
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


@click.command()
@click.argument("run_id", metavar="RUN")
@click.argument("seed", type=click.IntRange(min=0), required=False)
@click.argument("feature", type=click.IntRange(min=0), required=False)
@click.option("--size", type=click.IntRange(min=1), default=None,
              help="The feature's dictionary size, for a run that fitted several (sae.dict_sizes): the card then shows its "
                   "parents and children in the next smaller and larger sizes. Default: the primary (largest) size.")
@click.option("--dashboard", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the feature's page from sae-dashboard, the field's SAE visualizer, to this .html file (needs "
                   "pip install 'univ[dashboard]'): activation histogram, top and quantile contexts of the comparison "
                   "tokens, logit effects, correlated neurons and features.")
@click.option("--crosscoder", "latent", type=click.IntRange(min=0), default=None, metavar="LATENT",
              help="Show this latent of the run's crosscoder instead of an SAE feature (univ features RUN --crosscoder "
                   "LATENT): its class, density, decoder norm and Latent Scaling in each model, the closest SAE feature "
                   "of each, and its top activating contexts.")
@RESULTS_DIR
@TRACKING_URI
def features(run_id, seed, feature, size, dashboard, latent, results_dir, tracking_uri) -> None:
    """Show one SAE feature of a univ run (RUN: run id or 'latest'): density, top contexts, logit effects, partners;
    in a dictionary family, its parents and children. With --dashboard, its sae-dashboard page instead; with
    --crosscoder LATENT (and no SEED FEATURE), one latent of the run's crosscoder."""
    import dataclasses

    from universality.outputs.feature_cards import lineage, render_terminal
    from universality.tracking import lookups, store

    if latent is not None:
        if seed is not None or size is not None or dashboard is not None:
            raise click.UsageError("--crosscoder LATENT shows a crosscoder latent: give it without SEED FEATURE, --size or --dashboard")
        from universality.outputs.crosscoder_report import render_latent_terminal

        client = store.open_client(results_dir, tracking_uri, read_only=True)
        click.echo(render_latent_terminal(lookups.crosscoder_card(client, lookups.find_run(client, run_id), latent, results_dir)))
        return
    if seed is None or feature is None:
        raise click.UsageError("give SEED and FEATURE (or --crosscoder LATENT for a crosscoder latent)")
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


@click.command()
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


@click.group()
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
