"""The experiment as its list of cached stages (each a module of ``universality.stages``):

    data -> per run: model (or a control: weight-shuffled, untrained) -> sae -> activations -> evaluation
            -> own_neurons -> token_share
         -> per pair of runs: pair (seeds: universality; SAEs of one model: the ceiling; the two controls)
         -> per model of a dictionary family: split (consecutive sizes)
         -> crosscoder over every seed's model (and its controls) -> crosscoder_eval -> summary

Every stage writes into its own content-addressed folder (``runtime.cache``), so re-running with the same
inputs reuses finished work. The per-run stages of different runs are independent: ``build_run`` does them for
one run (a ``RunTask``) and the ``Engine`` runs several at once, in this process, in worker processes or on a
Dask cluster; the pair and split stages then run the same way. The results do not depend on where they ran.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from universality.analysis.heldout import HeldoutActivations
from universality.analysis.pairs import PairResult
from universality.core.config import ExperimentConfig
from universality.core.errors import from_os_error
from universality.core.run_names import model_name, replica_name, seed_name, shuffled_name, size_of, untrained_name
from universality.measures.splitting import SplitLevel
from universality.runtime.engine import Engine, resolve_device, spread_devices
from universality.runtime.memory import check_memory
from universality.runtime.progress import Board
from universality.runtime import cache
from universality.stages import activations, crosscoder, data, evaluation, model, own_neurons, pair, sae, split, token_share
from universality.stages.data import Dataset
from universality.stages.model import RunModel
from universality.stages.sae import RunSAE
from universality.plans import crosscoder_plan, pair_plan, split_plan
from universality.summary import crosscoder_summary, run_summary

STAGES = (data, model, sae, activations, evaluation, own_neurons, token_share, pair, split, crosscoder)  # data-flow order, as the cache lists them
PER_RUN = (model, sae, activations, evaluation, own_neurons, token_share)  # what ``build_run`` does for one run


@dataclass(frozen=True)
class SAERun:
    """One SAE's side of a comparison: the model it was fitted on, the SAE with its evaluation, and its held-out
    activations; named as the SAE ("seed0", "seed0-sae1", "seed0-d512", "shuffled-seed0-1")."""

    name: str
    model: RunModel
    sae: RunSAE
    activations: HeldoutActivations


@dataclass(frozen=True)
class RunResult:
    """Everything one ``univ run`` produced, for tracking and export."""

    cfg: ExperimentConfig
    dataset: Dataset
    models: dict[str, RunModel]
    saes: dict[str, RunSAE]
    activations: dict[str, HeldoutActivations]  # each run's, on the comparison tokens
    pairs: list[PairResult]  # every pair of seeds
    replicate_pairs: list[PairResult]  # every pair of SAEs of one model: the within-model ceiling
    randomized: PairResult | None  # the two weight-shuffled controls, when enabled (compare.randomized_baseline)
    summary: dict[str, float]  # statistics over all pairs (mean, std, CI), the ceiling, families; other sizes' prefixed "size<N>."
    # Per dictionary size (every size of sae.sizes; the primary's lists are ``pairs`` and ``replicate_pairs``):
    size_pairs: dict[int, list[PairResult]] = dataclasses.field(default_factory=dict)  # pairs of seeds at that size
    size_replicate_pairs: dict[int, list[PairResult]] = dataclasses.field(default_factory=dict)  # its ceiling pairs
    # Feature splitting (a family only): per model ("seed0"), its dictionaries of consecutive sizes compared, smallest first
    splits: dict[str, list[SplitLevel]] = dataclasses.field(default_factory=dict)
    stage_folders: tuple[Path, ...] = ()  # every stage folder the run read, in stage order (what it cost: their build times)
    untrained: PairResult | None = None  # the two untrained controls, beside the weight-shuffled ones
    # The crosscoder over every seed's model first ("crosscoder"), then its extra seeds and controls (crosscoder.enabled)
    crosscoders: dict[str, crosscoder.RunCrosscoder] = dataclasses.field(default_factory=dict)
    # The main crosscoder's latents beside per-model matching: sae_feature_m, sae_corr_m per latent
    crosscoder_beside: dict[str, object] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class RunTask:
    """One run's per-run stages, in the plain values a worker process (or Dask worker) receives."""

    cfg: ExperimentConfig
    dataset_dir: Path
    dataset_key: str
    seed: int
    shuffle_seed: int | None  # set: the weight-shuffled control of ``seed``'s model
    device: str
    results_dir: Path
    progress: bool
    replicate: int = 0  # r > 0: replicate r of the model's SAE (the within-model ceiling)
    dict_size: int | None = None  # another size of the dictionary family than the primary (None)
    untrained: bool = False  # the untrained control of ``seed``: its initial weights, not trained

    @property
    def name(self) -> str:
        """The run's name: "seed0", "seed0-sae1", "seed0-d512", "shuffled-seed0-1" or "untrained-seed0" (its progress
        line's label)."""
        base = (untrained_name(self.seed) if self.untrained else seed_name(self.seed) if self.shuffle_seed is None
                else shuffled_name(self.seed, self.shuffle_seed))
        return replica_name(base, self.replicate, self.dict_size)


@dataclass(frozen=True)
class RunKeys:
    """The cache key of each per-run stage of a task: the one key chain that building and ``is_cached`` read."""

    trained_model: str  # the seed's trained transformer (an untrained control's own key: nothing is trained)
    model: str  # the run's transformer: the trained one, its weight-shuffled control, or the untrained control
    sae: str
    activations: str
    evaluation: str  # reads the activations stage's neurons
    own_neurons: str
    token_share: str

    def per_stage(self) -> list[tuple[object, str]]:
        """(stage module, key) of each per-run stage, in the order ``build_run`` does them."""
        return [(model, self.trained_model), (model, self.model), (sae, self.sae), (activations, self.activations),
                (evaluation, self.evaluation), (own_neurons, self.own_neurons), (token_share, self.token_share)]


def run_keys(task: RunTask, dataset: Dataset) -> RunKeys:
    trained = model.untrained_key(dataset, task.cfg, task.seed) if task.untrained else model.key(dataset, task.cfg, task.seed)
    run_model = trained if task.shuffle_seed is None else model.shuffled_key(trained, task.shuffle_seed)
    sae_key = sae.key(run_model, task.cfg, task.device, task.replicate, task.dict_size)
    acts_key = activations.key(dataset, sae_key, task.cfg)
    return RunKeys(trained, run_model, sae_key, acts_key, evaluation.key(dataset, sae_key, acts_key, task.cfg),
                   own_neurons.key(acts_key, task.cfg), token_share.key(acts_key, task.cfg))


@dataclass(frozen=True)
class RunPaths:
    """Where one run's stages left their outputs (each stage's folder of its key): what a worker returns and the
    driver loads."""

    name: str
    seed: int
    replicate: int
    keys: RunKeys
    results_dir: Path

    def folder(self, stage, key: str) -> Path:
        return stage.STAGE.folder(self.results_dir, key)


def build_run(task: RunTask) -> RunPaths:
    """model (or a control) -> sae -> activations -> evaluation -> own_neurons -> token_share for one run."""
    dataset = data.load(task.dataset_dir, task.dataset_key)
    keys, cfg, device, results = run_keys(task, dataset), task.cfg, task.device, task.results_dir
    if task.untrained:
        run_model = model.build_untrained(dataset, cfg, task.seed, keys.model, results, device)
    else:
        run_model = model.build(dataset, cfg, task.seed, keys.trained_model, device, results, task.progress)
    if task.shuffle_seed is not None:
        run_model = model.build_shuffled(run_model, task.shuffle_seed, keys.model, results, device)
    run_sae = sae.build(dataset, run_model, cfg, keys.sae, device, results, task.replicate, task.progress, task.dict_size)
    acts = activations.build(dataset, run_model, run_sae, cfg, keys.activations, device, results)
    evaluated = evaluation.build(dataset, run_model, run_sae, acts, cfg, keys.evaluation, device, results)
    own_neurons.build(evaluated, acts, cfg, keys.own_neurons, results)
    token_share.build(dataset, evaluated, acts, cfg, keys.token_share, results)
    return RunPaths(run_sae.name, run_model.seed, task.replicate, keys, results)


def is_cached(task: RunTask, dataset: Dataset) -> bool:
    """Whether every per-run stage of the task is complete: then ``build_run`` only looks it up."""
    return all(stage.STAGE.is_cached(task.results_dir, key) for stage, key in run_keys(task, dataset).per_stage())


def load_run(paths: RunPaths, device: str) -> SAERun:
    keys = paths.keys
    run_model = model.load(paths.folder(model, keys.model), keys.model, paths.name, paths.seed, device)
    run_sae = sae.load(paths.folder(sae, keys.sae), keys.sae, paths.name, paths.replicate, device)
    run_sae = evaluation.load(paths.folder(evaluation, keys.evaluation), run_sae)
    run_sae = own_neurons.load(paths.folder(own_neurons, keys.own_neurons), run_sae)
    run_sae = token_share.load(paths.folder(token_share, keys.token_share), run_sae)
    return SAERun(paths.name, run_model, run_sae, activations.load(paths.folder(activations, keys.activations)))


def run(cfg: ExperimentConfig, seeds: list[int], results_dir: Path, device: str = "auto", progress: bool = True,
        engine: Engine = Engine()) -> RunResult:
    """data -> per run (model -> SAE -> activations -> evaluation -> own neurons -> token share) -> pairs -> splits
    -> summary.

    ``engine`` says where the per-run stages, the pairs and the splits run; the results do not depend on it.
    """
    device = resolve_device(device)
    check_memory(cfg, device)
    results_dir = Path(results_dir)
    seed_names = [seed_name(s) for s in seeds]
    with _disk_errors():
        results_dir.mkdir(parents=True, exist_ok=True)
        dataset = data.build(cfg, results_dir)
        tasks = run_tasks(cfg, dataset, seeds, device, results_dir, progress)
        built = engine.map_cached(build_run, [(task,) for task in tasks], lambda task: is_cached(task, dataset),
                                  progress_board(results_dir, [task.name for task in tasks], progress))
        runs = {paths.name: load_run(paths, device) for paths in built}
        plan = pair_plan(list(runs), seed_names, cfg)
        pair_tasks = [(runs[a], runs[b], cfg, pair.key(runs[a].activations.directory.name, runs[b].activations.directory.name,
                                                       cfg, kind == "same-model"), results_dir, kind == "same-model",
                       dataset.directory) for a, b, kind in plan]
        compared = engine.map_cached(pair.build, pair_tasks, lambda a, b, cfg, key, *_: pair.STAGE.is_cached(results_dir, key),
                                     progress_board(results_dir, [f"{a} vs {b}" for a, b, _ in plan], progress))
        splits_plan = split_plan(list(runs), seed_names, cfg)
        split_tasks = [(runs[a], runs[b], cfg, split.key(runs[a].activations.directory.name,
                                                         runs[b].activations.directory.name, cfg), results_dir)
                       for a, b in splits_plan]
        levels = engine.map_cached(split.build, split_tasks, lambda a, b, cfg, key, *_: split.STAGE.is_cached(results_dir, key),
                                   progress_board(results_dir, [f"{a} into {b}" for a, b in splits_plan], progress)
                                   ) if splits_plan else []
        cc_plan = crosscoder_plan(seeds, cfg)
        cc_tasks = [(dataset.directory, dataset.key, [runs[m].model for m in models], name, cfg, replicate,
                     train_key := crosscoder.key([runs[m].model.key for m in models], cfg, device, replicate),
                     crosscoder.eval_key(dataset.key, train_key, cfg), device, results_dir, progress)
                    for name, models, replicate in cc_plan]
        crosscoders = dict(zip([name for name, *_ in cc_plan], engine.map_cached(
            crosscoder.build, cc_tasks, lambda *task: crosscoder.is_cached(results_dir, task[6], task[7]),
            progress_board(results_dir, [name for name, *_ in cc_plan], progress))))
    splits: dict[str, list[SplitLevel]] = {}
    for (a, _), level in zip(splits_plan, levels):
        splits.setdefault(model_name(a), []).append(level)
    by_kind: dict[tuple[str, int | None], list[PairResult]] = {}  # (kind, the size in the names) -> its pairs
    for result, (a, _, kind) in zip(compared, plan):
        by_kind.setdefault((kind, size_of(a)), []).append(result)
    randomized, untrained = (by_kind[(kind, None)][0] if (kind, None) in by_kind else None for kind in ("randomized", "untrained"))
    sizes = {size: None if size == cfg.sae.dict_size else size for size in cfg.sae.sizes}  # size -> its name's size
    size_pairs = {size: by_kind.get(("cross-model", named), []) for size, named in sizes.items()}
    size_replicate_pairs = {size: by_kind.get(("same-model", named), []) for size, named in sizes.items()}
    saes = {name: r.sae for name, r in runs.items()}
    summary = run_summary(size_pairs, size_replicate_pairs, randomized, saes, splits, seed_names, cfg, untrained)
    beside, cc_stats = crosscoder_summary(crosscoders, {name: r.activations for name, r in runs.items()},
                                          size_pairs[cfg.sae.dict_size], cfg)
    summary |= cc_stats
    used = [(data, dataset.key), *(sk for paths in built for sk in paths.keys.per_stage()),
            *((pair, t[3]) for t in pair_tasks), *((split, t[3]) for t in split_tasks)]
    folders = sorted(dict.fromkeys([*(stage.STAGE.folder(results_dir, key) for stage, key in used),
                                    *(folder for cc in crosscoders.values() for folder in (cc.directory, cc.evaluation))]),
                     key=lambda folder: cache.STAGES.index(folder.parent.name))
    primary = cfg.sae.dict_size
    return RunResult(cfg, dataset, {name: r.model for name, r in runs.items()}, saes,
                     {name: r.activations for name, r in runs.items()}, size_pairs[primary], size_replicate_pairs[primary],
                     randomized, summary, size_pairs, size_replicate_pairs, splits, tuple(folders), untrained, crosscoders,
                     beside)


def progress_board(results_dir: Path, labels: list[str], progress: bool) -> Board | None:
    """Where parallel workers report the progress of tasks labelled ``labels`` (None: ``progress`` is off)."""
    return Board(results_dir / "progress", labels) if progress else None


def run_tasks(cfg: ExperimentConfig, dataset: Dataset, seeds: list[int], device: str, results_dir: Path,
              progress: bool) -> list[RunTask]:
    """One task per seed, then the replicate SAEs (of the first seed's model, or of every model), then
    the two weight-shuffled controls of the first seed's model and the untrained controls of the first seed and the
    next (the initial weights their training starts from; both if enabled); then the same seeds and
    replicates at every other size of the dictionary family, largest first."""
    replicated = seeds[:1] if cfg.sae.replicates_on == "first" else seeds
    runs = []
    for size in (None, *(s for s in reversed(cfg.sae.sizes) if s != cfg.sae.dict_size)):
        runs += [(seed, None, 0, size, False) for seed in seeds]
        runs += [(seed, None, r, size, False) for seed in replicated for r in range(1, cfg.sae.replicates + 1)]
        if cfg.compare.randomized_baseline and size is None:
            runs += [(seeds[0], shuffle_seed, 0, None, False) for shuffle_seed in (1, 2)]
            runs += [(seed, None, 0, None, True) for seed in (seeds[0], seeds[0] + 1)]
    devices = spread_devices(device, len(runs))
    return [RunTask(cfg, dataset.directory, dataset.key, seed, shuffle_seed, run_device, results_dir, progress, replicate, size,
                    untrained) for (seed, shuffle_seed, replicate, size, untrained), run_device in zip(runs, devices)]


@contextlib.contextmanager
def _disk_errors() -> Iterator[None]:
    """A full disk or an unwritable results folder as one line naming the path, not a traceback.
    Nothing is left half-written: every file is written to a temp name and renamed into place."""
    try:
        yield
    except OSError as exc:
        raise from_os_error(exc) from None
