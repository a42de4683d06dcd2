"""Reading univ runs back from MLflow: a run by id or ``latest``, its matched-feature, splitting and crosscoder tables,
its dictionary sizes, and the stage folders (on this machine) of each seed, for ``univ export``, ``univ
features`` and ``univ steer``."""

from __future__ import annotations

import ast
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from universality.core.errors import UnivError
from universality.core.run_names import crosscoder_name
from universality.measures import splitting
from universality.outputs import crosscoder_report, export, split_report
from universality.outputs.feature_cards import RunSources, load_run_sources, vocab_strings
from universality.runtime import cache
from universality.tracking.names import CROSSCODER_TABLE, KIND, SAME_AS, TABLES


def find_run(client: MlflowClient, run: str, kinds: Sequence[str] = ("experiment",)):
    """A univ run of one of ``kinds`` by id, or ``latest``: the newest finished univ run (an
    ``experiment``, whatever ``kinds`` allows) in any experiment. A cached re-run (``SAME_AS``) stands for the
    run that logged its outputs: that run is returned."""
    found = _find_run(client, run, kinds)
    original = found.data.tags.get(SAME_AS)
    return found if original is None else _find_run(client, original, kinds)


def _find_run(client: MlflowClient, run: str, kinds: Sequence[str]):
    if run == "latest":
        ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(ids, filter_string=f"tags.`{KIND}` = 'experiment' and attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=1) if ids else []
        if not runs:
            raise UnivError(f"no finished univ run in {client.tracking_uri}")
        return runs[0]
    try:
        found = client.get_run(run)
    except MlflowException:
        raise UnivError(f"unknown run id {run!r} in {client.tracking_uri}") from None
    if found.data.tags.get(KIND) not in kinds:
        raise UnivError(f"run {run} is not a univ run of kind {' or '.join(kinds)} (its {KIND} tag is {found.data.tags.get(KIND)!r})")
    return found


def load_tables(client: MlflowClient, run_id: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The (matched features, families) tables logged on a univ parent run, downloaded from its artifacts."""
    with downloaded(client, run_id, TABLES, "matched feature tables") as paths:
        try:
            return (export.read_table(paths["matched"], "parquet", export.MATCHED_COLUMNS),
                    export.read_table(paths["families"], "parquet", export.FAMILY_COLUMNS))
        except KeyError as exc:  # a column this version names differently or added since
            raise UnivError(f"run {run_id}'s tables have no column {exc}: an older univ wrote them; run it again") from None


def load_splits(client: MlflowClient, run_id: str) -> pd.DataFrame | None:
    """The feature-splitting table of a dictionary-family run (``splitting.SPLIT_COLUMNS``); None for one size."""
    artifact = f"tables/{split_report.TABLE_FILE}.parquet"
    if artifact not in {a.path for a in client.list_artifacts(run_id, "tables")}:
        return None
    with downloaded(client, run_id, {"splits": artifact}, "feature-splitting table") as paths:
        return export.read_table(paths["splits"], "parquet", splitting.SPLIT_COLUMNS)


def crosscoder_card(client: MlflowClient, parent, latent: int, results_dir: Path) -> crosscoder_report.LatentCard:
    """The card of a univ run's crosscoder ``latent``: its row of the latents table logged on the run, and its top
    examples from the crosscoder's evaluation folder (recorded on its child run; it must be on this machine)."""
    import numpy as np

    from universality.analysis.heldout import eval_contexts
    from universality.stages.crosscoder import TOP_POSITIONS, TOP_VALUES

    parent_id = parent.info.run_id
    latents = load_crosscoder(client, parent_id)
    children = client.search_runs([parent.info.experiment_id], filter_string=(
        f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}' and tags.`{KIND}` = 'crosscoder' and "
        f"tags.`univ.run_name` = '{crosscoder_name()}'"))
    if latents is None or not children:
        raise UnivError(f"run {parent_id} has no crosscoder (it runs with [crosscoder] enabled = true)")
    if latent >= len(latents):
        raise UnivError(f"latent {latent} is out of range: the crosscoder has {len(latents)} latents (0..{len(latents) - 1})")
    tags, params = children[0].data.tags, parent.data.params
    data_dir, evaluation = local_folders(parent, [parent.data.tags["univ.data_dir"], tags["univ.crosscoder_eval_dir"]],
                                         results_dir)
    ctx_len = int(params["data.ctx_len"])
    tokens = eval_contexts(np.load(data_dir / "heldout.npy", mmap_mode="r"), ctx_len, int(params["compare.tokens"]))
    return crosscoder_report.latent_card(latents, tags["univ.crosscoder_models"].split(","), latent,
                                         np.load(evaluation / TOP_VALUES), np.load(evaluation / TOP_POSITIONS),
                                         tokens.flatten().numpy(), run_vocab(data_dir), int(params["compare.context_tokens"]),
                                         ctx_len)


def load_crosscoder(client: MlflowClient, run_id: str) -> pd.DataFrame | None:
    """The crosscoder's latents table of a univ run (``outputs.crosscoder_report``); None for a run without one."""
    if CROSSCODER_TABLE not in {a.path for a in client.list_artifacts(run_id, "tables")}:
        return None
    with downloaded(client, run_id, {"crosscoder": CROSSCODER_TABLE}, "crosscoder latents table") as paths:
        return crosscoder_report.typed_latents(pd.read_parquet(paths["crosscoder"]))


@contextlib.contextmanager
def downloaded(client: MlflowClient, run_id: str, artifacts: Mapping[str, str], what: str) -> Iterator[dict[str, str]]:
    """name -> local path of each of a run's ``artifacts`` (name -> artifact path), in a temporary folder
    removed on the way out; a missing one is a one-line error naming ``what``."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep the CLI's output to its own lines
    with tempfile.TemporaryDirectory() as tmp:
        try:
            paths = {name: client.download_artifacts(run_id, path, tmp) for name, path in artifacts.items()}
        except (MlflowException, OSError):
            raise UnivError(f"run {run_id} has no {what} (did it finish?)") from None
        yield paths


def local_folders(parent, recorded: Sequence[str], results_dir: Path) -> list[Path]:
    """The stage folders a univ run recorded (``stage_folder``); a one-line error when one is not on this machine."""
    folders = [stage_folder(path, results_dir) for path in recorded]
    missing = [f for f in folders if not f.is_dir()]
    if missing:
        raise UnivError(f"stage folder {missing[0]} of run {parent.info.run_id} is not on this machine")
    return folders


def run_vocab(data_dir: Path) -> list[str]:
    """Each token id of a run's tokenizer (in its data stage folder) decoded on its own."""
    from universality.text.tokenization import load_tokenizer

    return vocab_strings(load_tokenizer(data_dir / "tokenizer.json"))


def stage_folder(recorded: str, results_dir: Path) -> Path:
    """A stage folder recorded on a run: absolute as univ records them, or, from an older run, a relative
    ``<results>/cache/<stage>/<key>`` (relative to where that run was started), found under ``results_dir``."""
    path = Path(recorded)
    return path if path.is_absolute() else cache.stage_dir(results_dir, path.parent.name, path.name)


def seed_sources(client: MlflowClient, parent, seed: int, results_dir: Path, size: int | None = None) -> RunSources:
    """A seed's card sources, from the stage folders its child run recorded (they must be on this machine);
    ``size``: of its SAE of that dictionary size (a family run), default the primary one."""
    folders = seed_folders(client, parent, seed, results_dir, size)
    params = parent.data.params
    return load_run_sources(seed, *folders, int(params["data.ctx_len"]), int(params["compare.tokens"]),
                            int(params["compare.context_tokens"]), run_vocab(folders[0]))


def run_seeds(parent) -> list[int]:
    """The seeds of a univ run, as it was started."""
    return [int(seed) for seed in parent.data.params["seeds"].split(",")]


def run_sizes(parent) -> tuple[int, ...]:
    """The dictionary sizes of a univ run, ascending (one, the primary, unless it fitted a family)."""
    params = parent.data.params
    return tuple(ast.literal_eval(params.get("sae.dict_sizes", "()"))) or (int(params["sae.dict_size"]),)


def seed_folders(client: MlflowClient, parent, seed: int, results_dir: Path, size: int | None = None) -> list[Path]:
    """The data, model, SAE and activations stage folders of a univ run's seed, as its child run recorded them
    (they must be on this machine); ``size``: its SAE of that dictionary size, default the primary one."""
    parent_id = parent.info.run_id
    sized = "" if size is None else f" and tags.`univ.dict_size` = '{size}'"
    kinds = ("seed",) if size is None else ("seed", "sae-size")  # the primary size's SAE is the seed's own run
    children = [run for run in client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}' and tags.`univ.seed` = '{seed}'{sized}")
        if run.data.tags.get(KIND) in kinds]
    if not children:
        raise UnivError(f"run {parent_id} has no seed {seed} (its seeds: {parent.data.params.get('seeds')})")
    tags = children[0].data.tags
    return local_folders(parent, [parent.data.tags["univ.data_dir"],
                                  *(tags[f"univ.{k}_dir"] for k in ("model", "sae", "activations"))], results_dir)
