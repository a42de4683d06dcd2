"""The experiment as a sequence of stages, each a plain function from inputs to outputs:

corpus -> tokens (prepare_data) -> models (train_model) -> SAEs (fit_sae) -> their evaluation
(evaluate) -> held-out activations (record_activations) -> features vs their own neurons
(compare_own_neurons) -> comparisons (compare_pair, summarize) -> tracking/export.

Every stage writes into its own content-addressed cache folder (see ``universality.cache``),
so re-running with the same inputs reuses finished work. The per-run stages (train_model or
shuffle_model -> fit_sae -> evaluate -> record_activations -> compare_own_neurons) of different runs are
independent: ``build_run`` does them for one run and ``universality.orchestration`` runs several at once.

Besides one SAE per seed, a run fits replicate SAEs (``sae.replicates``) on the same transformer,
differing only in the SAE's seed: their pairs are the within-model ceiling that every
cross-model number is read against.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from models.training import TrainingResult, heldout_contexts, ngram_baselines, train_transformer
from models.transformer import OneLayerTransformer, TransformerConfig
from sae.activations import model_activations, shuffled_batches
from sae.base import SAE
from sae.checkpoint import jsonable, load_sae, load_snapshot, save_sae
from sae.evaluation import convergence, evaluate_sae, loss_recovered
from sae.training import resolve_precision, train_sae
from universality import activations, cache, own_neurons, splitting, steering
from universality.across_seeds import FAMILY_MIN_CORR, feature_families, included_features, partner_counts, summarize_pairs
from universality.atomic import atomic_path, write_text
from universality.config import ExperimentConfig
from universality.corpus import load_corpus
from universality.errors import ConfigError, UnivError, from_os_error
from universality.orchestration import Engine, resolve_device, spread_devices
from universality.pairs import PairResult, compare_runs, feature_logit_weights, load_pair, save_pair, with_causal
from universality.progress import Board
from universality.run_names import model_name, replica_name, size_of, summary_prefix
from universality.tokenization import encode_documents, load_tokenizer, shuffled_documents, split_tokens, train_tokenizer

DATA_VERSION = 1
MODEL_VERSION = 2  # 2: LayerNorm with thread-count-independent gradients
SAE_VERSION = 3  # 2: training only (its evaluation is the evaluation stage); replicates. 3: bf16 matmuls, LR decay, snapshot, resampling until late
EVALUATION_VERSION = 1
ACTIVATIONS_VERSION = 3  # 3: the first compare.skip_first_positions of each context left out
PAIR_VERSION = 4  # 3: same-model (replicate) pairs compare features and decoder vectors. 4: causal universality (compare.causal_top_n)
OWN_NEURONS_VERSION = 1
SPLIT_VERSION = 1
SAE_EVAL_BATCH_CONTEXTS = 32
REPLICATE_SEED_STRIDE = 1_000_003  # replicate r of a model seeded s trains with SAE seed s + r * stride


@dataclass(frozen=True)
class Dataset:
    """Tokenizer and token splits shared by every seed."""

    directory: Path
    key: str
    corpus_source: str
    corpus_fingerprint: str
    vocab_size: int
    train: np.ndarray  # memory-mapped training token stream
    heldout: np.ndarray  # memory-mapped held-out token stream
    baselines: dict[str, float]  # unigram_ce / bigram_ce on the held-out predictions

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / "tokenizer.json"

    def tokenizer(self):
        return load_tokenizer(self.tokenizer_path)


@dataclass(frozen=True)
class RunModel:
    """A transformer of one run: a seed's trained model, or a weight-shuffled control."""

    name: str  # "seed0", ..., or "shuffled-seed0-1" for the randomized-transformer baseline
    seed: int
    directory: Path
    key: str
    model: OneLayerTransformer
    history: list[dict]
    metrics: dict[str, float]


@dataclass(frozen=True)
class RunSAE:
    """The SAE fitted on one run's MLP activations, and its evaluation."""

    name: str  # the run's name: "seed0", or "seed0-sae1" for replicate 1 of seed 0's model
    directory: Path
    key: str
    sae: SAE
    history: list[dict]
    resampling_events: list[dict]
    replicate: int = 0  # 0: the run's SAE; r > 0: an extra SAE of the same model with another SAE seed
    metrics: dict = dataclasses.field(default_factory=dict)  # the evaluation stage's: evaluate_sae, loss recovered, convergence
    evaluation: Path | None = None  # the evaluation stage's folder
    own_neurons: own_neurons.OwnNeurons | None = None  # the own_neurons stage's: its features vs its model's neurons


@dataclass(frozen=True)
class RunResult:
    """Everything one ``univ run`` produced, for tracking and export."""

    cfg: ExperimentConfig
    dataset: Dataset
    models: dict[str, RunModel]
    saes: dict[str, RunSAE]
    activations: dict[str, activations.HeldoutActivations]  # each run's, on the comparison tokens
    pairs: list[PairResult]  # every pair of seeds
    replicate_pairs: list[PairResult]  # every pair of SAEs of one model: the within-model ceiling
    randomized: PairResult | None  # the two weight-shuffled controls, when enabled
    summary: dict[str, float]  # statistics over all pairs (mean, std, CI), the ceiling, families; other sizes' prefixed "size<N>."
    # Per dictionary size (every size of sae.sizes; the primary's lists are ``pairs`` and ``replicate_pairs``):
    size_pairs: dict[int, list[PairResult]] = dataclasses.field(default_factory=dict)  # pairs of seeds at that size
    size_replicate_pairs: dict[int, list[PairResult]] = dataclasses.field(default_factory=dict)  # its ceiling pairs
    # Feature splitting (a family only): per model ("seed0"), its dictionaries of consecutive sizes compared, smallest first
    splits: dict[str, list[splitting.SplitLevel]] = dataclasses.field(default_factory=dict)


def prepare_data(cfg: ExperimentConfig, results_dir: Path) -> Dataset:
    """Corpus -> BPE tokenizer -> one token stream split into training and held-out tokens."""
    corpus = load_corpus(cfg.data.corpus)
    data_cfg = dataclasses.asdict(cfg.data)
    key = cache.stage_key("data", DATA_VERSION, data=data_cfg, corpus=corpus.fingerprint)
    directory = cache.stage_dir(results_dir, "data", key)
    with cache.lock(directory):
        if not cache.is_complete(directory):
            documents = shuffled_documents(corpus)
            tokenizer = train_tokenizer(documents, cfg.data.vocab_size, cfg.data.tokenizer_chars)
            splits = split_tokens(encode_documents(tokenizer, documents, cfg.data.max_tokens), cfg.data)
            with atomic_path(directory / "tokenizer.json") as tmp:
                tokenizer.save(str(tmp))
            for name, tokens in (("train", splits.train), ("heldout", splits.heldout)):
                with atomic_path(directory / f"{name}.npy") as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, tokens)
            vocab = tokenizer.get_vocab_size()
            baselines = ngram_baselines(splits.train, splits.heldout, vocab, cfg.data.ctx_len)
            cache.mark_complete(directory, {
                "corpus_source": corpus.source, "corpus_fingerprint": corpus.fingerprint, "vocab_size": vocab,
                "train_tokens": len(splits.train), "heldout_tokens": len(splits.heldout), "baselines": baselines,
            }, label=f"tokens of {corpus.source}")
    return open_dataset(directory, key)


def open_dataset(directory: Path, key: str) -> Dataset:
    """The finished data stage in ``directory`` (how worker processes get the dataset: by path)."""
    summary = cache.read_summary(directory)
    return Dataset(
        directory=directory,
        key=key,
        corpus_source=summary["corpus_source"],
        corpus_fingerprint=summary["corpus_fingerprint"],
        vocab_size=summary["vocab_size"],
        train=np.load(directory / "train.npy", mmap_mode="r"),
        heldout=np.load(directory / "heldout.npy", mmap_mode="r"),
        baselines=summary["baselines"],
    )


def transformer_config(cfg: ExperimentConfig, dataset: Dataset) -> TransformerConfig:
    return TransformerConfig(vocab_size=dataset.vocab_size, ctx_len=cfg.data.ctx_len, **dataclasses.asdict(cfg.model))


def model_key(dataset: Dataset, cfg: ExperimentConfig, seed: int) -> str:
    return cache.stage_key("model", MODEL_VERSION, data=dataset.key, model=transformer_config(cfg, dataset).to_dict(),
                           train=dataclasses.asdict(cfg.train), seed=seed)


def shuffled_key(base_key: str, shuffle_seed: int) -> str:
    return cache.stage_key("shuffled", MODEL_VERSION, model=base_key, shuffle_seed=shuffle_seed)


def size_config(cfg: ExperimentConfig, size: int | None = None) -> ExperimentConfig:
    """The config one SAE of the family is trained with: ``size`` features (None: the primary size) and no family,
    so that its cache key and checkpoint are those of a single-size run of that size."""
    sae = dataclasses.replace(cfg.sae, dict_size=size or cfg.sae.dict_size, dict_sizes=())
    return dataclasses.replace(cfg, sae=sae)


def sae_run_name(cfg: ExperimentConfig, model: str, size: int, replicate: int = 0) -> str:
    """The run name of ``model``'s SAE of ``size`` features: today's names for the primary size, "-d<size>" else."""
    return replica_name(model, replicate, None if size == cfg.sae.dict_size else size)


def family(run_names, cfg: ExperimentConfig, model: str) -> dict[int, str]:
    """size -> the run name of ``model``'s own (replicate 0) SAE of that size, ascending, for the sizes among
    ``run_names`` (a RunResult's ``saes``, or any names)."""
    names = set(run_names)
    return {size: name for size in cfg.sae.sizes if (name := sae_run_name(cfg, model, size)) in names}


def sae_training_bytes(d_in: int, size: int, batch_size: int, buffer_size: int, resample_inputs: int) -> int:
    """An estimate of the float32 bytes one SAE's training holds at once: its parameters (2 x d_in x size + size
    + d_in) four times (weights, gradients, Adam's two moments), a batch's pre-activations, features and their
    gradients (4 x batch x size), and the shuffling buffer and resampling inputs (d_in wide)."""
    params = 2 * d_in * size + size + d_in
    return 4 * (4 * params + 4 * batch_size * size + (buffer_size + resample_inputs) * d_in)


def device_memory(device: str) -> int:
    """Bytes of memory of ``device``: the GPU's total, or the machine's physical memory."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(cfg: ExperimentConfig, device: str) -> None:
    """A one-line error, before any work, when the largest SAE cannot train on ``device`` at all."""
    size = max(cfg.sae.sizes)
    need = sae_training_bytes(cfg.model.d_mlp, size, cfg.sae.batch_size, cfg.sae.buffer_size, cfg.sae.resample_inputs)
    have = device_memory(device)
    if need > have:
        raise ConfigError(f"an SAE of {size:,} features needs about {need / 2**30:,.1f} GiB to train (weights, gradients, "
                          f"Adam state, a batch of {cfg.sae.batch_size}), more than the {have / 2**30:,.1f} GiB of "
                          f"{device} memory: choose a smaller sae.dict_size / sae.dict_sizes")


def sae_seed(model_seed: int, replicate: int) -> int:
    """Replicate 0 (the run's SAE) is seeded by its model's seed; replicate r by a seed of its own."""
    return model_seed + REPLICATE_SEED_STRIDE * replicate


def sae_key(model_key: str, cfg: ExperimentConfig, device: str, replicate: int = 0, size: int | None = None) -> str:
    """The model, the SAE's training fields (with the precision "auto" resolves to on ``device``; ``size``
    features, None: the primary size) and its replicate index: nothing about evaluation or comparison, and not
    how many replicates or sizes a run asks for (adding replicates or sizes retrains no existing SAE)."""
    sae_cfg = size_config(cfg, size).sae
    fields = sae_cfg.training_fields() | {"precision": resolve_precision(sae_cfg.precision, device)}
    return cache.stage_key("sae", SAE_VERSION, model=model_key, sae=fields, replicate=replicate)


def evaluation_key(dataset: Dataset, sae_key: str, cfg: ExperimentConfig) -> str:
    return cache.stage_key("evaluation", EVALUATION_VERSION, sae=sae_key, data=dataset.key, tokens=cfg.compare.tokens,
                           skip_first_positions=cfg.compare.skip_first_positions)


def activations_key(dataset: Dataset, sae_key: str, cfg: ExperimentConfig) -> str:
    return cache.stage_key("activations", ACTIVATIONS_VERSION, sae=sae_key, tokens=cfg.compare.tokens,
                           top_k=cfg.compare.top_k_examples, data=dataset.key,
                           skip_first_positions=cfg.compare.skip_first_positions)


def own_neurons_key(activations_key: str, cfg: ExperimentConfig) -> str:
    return cache.stage_key("own_neurons", OWN_NEURONS_VERSION, activations=activations_key,
                           min_firings=cfg.compare.min_firings, thresholds=cfg.compare.thresholds)


def train_model(dataset: Dataset, cfg: ExperimentConfig, seed: int, device: str, results_dir: Path, progress: bool = True) -> RunModel:
    """Train (or reuse) the transformer of one seed; resumes from its last checkpoint."""
    model_cfg = transformer_config(cfg, dataset)
    key = model_key(dataset, cfg, seed)
    directory = cache.stage_dir(results_dir, "model", key)
    with cache.lock(directory):
        if not cache.is_complete(directory):
            result = train_transformer(dataset.train, dataset.heldout, model_cfg, cfg.train, seed, device,
                                       checkpoint_dir=directory / cache.SCRATCH, progress=progress)
            _save_model(directory, result, model_cfg, dataset.baselines, f"transformer seed{seed}")
    return load_run_model(directory, key, f"seed{seed}", seed, device)


def _save_model(directory: Path, result: TrainingResult, model_cfg: TransformerConfig, baselines: dict, label: str) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
    with atomic_path(directory / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    write_text(directory / "config.json", json.dumps(model_cfg.to_dict(), indent=1))
    write_text(directory / "history.json", json.dumps(result.history))
    metrics = {"eval_loss": result.eval_loss, **baselines,
               "eval_loss_minus_bigram": result.eval_loss - baselines["bigram_ce"]}
    cache.mark_complete(directory, {"metrics": metrics}, label)


def load_run_model(directory: Path, key: str, name: str, seed: int, device: str) -> RunModel:
    model_cfg = TransformerConfig(**json.loads((directory / "config.json").read_text()))
    model = OneLayerTransformer(model_cfg)
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    model.to(device).eval()
    return RunModel(
        name=name,
        seed=seed,
        directory=directory,
        key=key,
        model=model,
        history=json.loads((directory / "history.json").read_text()),
        metrics=cache.read_summary(directory)["metrics"],
    )


def shuffle_model(base: RunModel, shuffle_seed: int, results_dir: Path, device: str) -> RunModel:
    """The paper's randomized-transformer control: ``base`` with every weight tensor's entries
    permuted (a different permutation per ``shuffle_seed``): its statistics, none of its learning."""
    key = shuffled_key(base.key, shuffle_seed)
    directory = cache.stage_dir(results_dir, "model", key)
    name = f"shuffled-{base.name}-{shuffle_seed}"
    with cache.lock(directory):
        if not cache.is_complete(directory):
            generator = torch.Generator().manual_seed(shuffle_seed)
            state = {k: v.cpu().flatten()[torch.randperm(v.numel(), generator=generator)].reshape(v.shape)
                     for k, v in base.model.state_dict().items()}
            with atomic_path(directory / "model.safetensors") as tmp:
                save_file(state, str(tmp))
            write_text(directory / "config.json", json.dumps(base.model.cfg.to_dict(), indent=1))
            write_text(directory / "history.json", "[]")
            cache.mark_complete(directory, {"metrics": {}, "shuffled_from": base.key}, f"transformer {name}")
    return load_run_model(directory, key, name, base.seed, device)


def fit_sae(dataset: Dataset, run: RunModel, cfg: ExperimentConfig, device: str, results_dir: Path,
            replicate: int = 0, progress: bool = True, size: int | None = None) -> RunSAE:
    """Fit (or reuse) an SAE on ``run``'s MLP activations over the training tokens. Replicate r > 0
    differs from the run's SAE only in its seed: initialization and the order activations arrive in.
    ``size``: another size of the family than the primary; its SAE sees the same activation stream."""
    key = sae_key(run.key, cfg, device, replicate, size)
    directory = cache.stage_dir(results_dir, "sae", key)
    seed = sae_seed(run.seed, replicate)
    name = replica_name(run.name, replicate, size)
    cfg = size_config(cfg, size)
    with cache.lock(directory):
        if not cache.is_complete(directory):
            seqs = max(1, cfg.sae.batch_size // cfg.data.ctx_len)
            source = model_activations(run.model, dataset.train, cfg.data.ctx_len, seqs, device, seed=seed)
            generator = torch.Generator().manual_seed(seed)
            batches = shuffled_batches(source, cfg.sae.buffer_size, cfg.sae.batch_size, generator)
            trained = train_sae(batches, cfg.sae, run.model.cfg.d_mlp, seed=seed, device=device, progress=progress,
                                checkpoint_dir=directory / cache.SCRATCH)
            save_sae(trained, cfg.sae, directory)
            cache.mark_complete(directory, {"run": name}, f"SAE of {name}")
    return load_run_sae(directory, key, name, replicate, device)


def load_run_sae(directory: Path, key: str, name: str, replicate: int, device: str) -> RunSAE:
    saved = json.loads((directory / "metrics.json").read_text())
    return RunSAE(name, directory, key, load_sae(directory, device), saved["history"], saved["resampling_events"], replicate)


def evaluate(dataset: Dataset, run: RunModel, sae: RunSAE, cfg: ExperimentConfig, device: str, results_dir: Path) -> RunSAE:
    """The SAE's quality on the comparison tokens (past the skipped first positions of each context):
    reconstruction, sparsity, densities, loss recovered, and how much it still moved late in training.
    Its own stage, so that comparison settings re-evaluate but never retrain."""
    key = evaluation_key(dataset, sae.key, cfg)
    directory = cache.stage_dir(results_dir, "evaluation", key)
    with cache.lock(directory):
        if not cache.is_complete(directory):
            contexts = activations.eval_contexts(dataset.heldout, cfg.data.ctx_len, cfg.compare.tokens)
            skip = cfg.compare.skip_first_positions
            neurons = lambda: _heldout_neurons(run.model, contexts, device, skip)  # noqa: E731
            metrics = evaluate_sae(sae.sae, neurons())
            metrics.update(loss_recovered(run.model, sae.sae, contexts.split(SAE_EVAL_BATCH_CONTEXTS), device, skip))
            snapshot = load_snapshot(sae.directory, device)
            if snapshot is not None:
                metrics.update(convergence(sae.sae, snapshot, neurons(), cfg.compare))
            write_text(directory / "metrics.json", json.dumps(metrics, default=jsonable))
            cache.mark_complete(directory, {"run": sae.name}, f"evaluation of the SAE of {sae.name}")
    return load_evaluation(directory, sae)


def load_evaluation(directory: Path, sae: RunSAE) -> RunSAE:
    metrics = json.loads((directory / "metrics.json").read_text())
    metrics["densities"] = np.asarray(metrics["densities"])
    return dataclasses.replace(sae, metrics=metrics, evaluation=directory)


@torch.no_grad()
def _heldout_neurons(model: OneLayerTransformer, contexts: torch.Tensor, device: str, skip: int):
    """MLP activations [tokens, d_mlp] of the comparison contexts, past the first ``skip`` positions of each."""
    for batch in contexts.split(SAE_EVAL_BATCH_CONTEXTS):
        acts = model(batch.to(device), return_mlp=True).mlp_acts[:, skip:]
        yield acts.reshape(-1, acts.shape[-1])


def record_activations(dataset: Dataset, run: RunModel, sae: RunSAE, cfg: ExperimentConfig, device: str,
                       results_dir: Path) -> activations.HeldoutActivations:
    """Neurons and SAE features of one run on the comparison tokens, recorded once per run."""
    key = activations_key(dataset, sae.key, cfg)
    directory = cache.stage_dir(results_dir, "activations", key)
    with cache.lock(directory):
        if not cache.is_complete(directory):
            contexts = activations.eval_contexts(dataset.heldout, cfg.data.ctx_len, cfg.compare.tokens)
            activations.record(run.model, sae.sae, contexts, directory, device, cfg.compare.top_k_examples,
                               cfg.compare.skip_first_positions)
            cache.mark_complete(directory, {"run": run.name}, f"held-out activations of {run.name}")
    return activations.HeldoutActivations(directory)


def compare_own_neurons(sae: RunSAE, acts: activations.HeldoutActivations, cfg: ExperimentConfig, results_dir: Path) -> Path:
    """The SAE's features against its own model's neurons on the comparison tokens (the paper's "invisible
    in the neuron basis"), from the recorded activations and the decoder; returns the stage's folder."""
    directory = cache.stage_dir(results_dir, "own_neurons", own_neurons_key(acts.directory.name, cfg))
    with cache.lock(directory):
        if not cache.is_complete(directory):
            result = own_neurons.compare_own_neurons(acts, sae.sae.W_dec.detach().float().cpu().numpy(), cfg.compare)
            own_neurons.save(result, directory)
            cache.mark_complete(directory, {"run": sae.name}, f"features vs own neurons of {sae.name}")
    return directory


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

    @property
    def name(self) -> str:
        """The run's name: "seed0", "seed0-sae1", "seed0-d512" or "shuffled-seed0-1" (its progress line's label)."""
        model = f"seed{self.seed}" if self.shuffle_seed is None else f"shuffled-seed{self.seed}-{self.shuffle_seed}"
        return replica_name(model, self.replicate, self.dict_size)


@dataclass(frozen=True)
class RunPaths:
    """Where one run's stages left their outputs: what a worker returns and the driver loads."""

    name: str
    seed: int
    replicate: int
    model: tuple[Path, str]  # (stage folder, key)
    sae: tuple[Path, str]
    evaluation: Path
    activations: Path
    own_neurons: Path


def build_run(task: RunTask) -> RunPaths:
    """train_model (or shuffle_model) -> fit_sae -> evaluate -> record_activations -> compare_own_neurons for
    one run; cached and locked."""
    dataset = open_dataset(task.dataset_dir, task.dataset_key)
    model = train_model(dataset, task.cfg, task.seed, task.device, task.results_dir, task.progress)
    if task.shuffle_seed is not None:
        model = shuffle_model(model, task.shuffle_seed, task.results_dir, task.device)
    sae = fit_sae(dataset, model, task.cfg, task.device, task.results_dir, task.replicate, task.progress, task.dict_size)
    evaluated = evaluate(dataset, model, sae, task.cfg, task.device, task.results_dir)
    acts = record_activations(dataset, model, sae, task.cfg, task.device, task.results_dir)
    own = compare_own_neurons(sae, acts, task.cfg, task.results_dir)
    return RunPaths(sae.name, model.seed, task.replicate, (model.directory, model.key), (sae.directory, sae.key),
                    evaluated.evaluation, acts.directory, own)


def is_cached(task: RunTask, dataset: Dataset) -> bool:
    """Whether every stage of the task's run is complete: then ``build_run`` only looks it up."""
    key = model_key(dataset, task.cfg, task.seed)
    folders = [cache.stage_dir(task.results_dir, "model", key)]
    if task.shuffle_seed is not None:
        key = shuffled_key(key, task.shuffle_seed)
        folders.append(cache.stage_dir(task.results_dir, "model", key))
    key = sae_key(key, task.cfg, task.device, task.replicate, task.dict_size)
    acts_key = activations_key(dataset, key, task.cfg)
    folders += [cache.stage_dir(task.results_dir, "sae", key),
                cache.stage_dir(task.results_dir, "evaluation", evaluation_key(dataset, key, task.cfg)),
                cache.stage_dir(task.results_dir, "activations", acts_key),
                cache.stage_dir(task.results_dir, "own_neurons", own_neurons_key(acts_key, task.cfg))]
    return all(map(cache.is_complete, folders))


def load_run(paths: RunPaths, device: str) -> tuple[RunModel, RunSAE, activations.HeldoutActivations]:
    model = load_run_model(*paths.model, name=paths.name, seed=paths.seed, device=device)
    sae = load_evaluation(paths.evaluation, load_run_sae(*paths.sae, paths.name, paths.replicate, device))
    sae = dataclasses.replace(sae, own_neurons=own_neurons.load(paths.own_neurons))
    return model, sae, activations.HeldoutActivations(paths.activations)


def pair_key(acts_a: activations.HeldoutActivations, acts_b: activations.HeldoutActivations, cfg: ExperimentConfig,
             same_model: bool = False) -> str:
    """Both runs' activations (which fix the tokens) and the only compare settings a pair uses."""
    return cache.stage_key("pair", PAIR_VERSION, a=acts_a.directory.name, b=acts_b.directory.name,
                           min_firings=cfg.compare.min_firings, thresholds=cfg.compare.thresholds, same_model=same_model,
                           causal_top_n=cfg.compare.causal_top_n)


def is_compared(a: tuple, b: tuple, cfg: ExperimentConfig, results_dir: Path, same_model: bool = False,
                data_dir: Path | None = None) -> bool:
    """Whether ``compare_pair(a, b, ...)`` is cached (where the tokens are, ``data_dir``, is not part of its key)."""
    return cache.is_complete(cache.stage_dir(results_dir, "pair", pair_key(a[2], b[2], cfg, same_model)))


def compare_pair(a: tuple[RunModel, RunSAE, activations.HeldoutActivations],
                 b: tuple[RunModel, RunSAE, activations.HeldoutActivations],
                 cfg: ExperimentConfig, results_dir: Path, same_model: bool = False, data_dir: Path | None = None) -> PairResult:
    """Match A's features, neurons and rotated neurons against B's (cached per pair). Two SAEs of the
    same model (``same_model``) share their neurons: their features are matched, and their decoder vectors.
    With ``compare.causal_top_n``, the top mutual matches are also ablated in both models (on the held-out
    tokens of the data stage in ``data_dir``) and their effects correlated: causal universality."""
    (model_a, sae_a, acts_a), (model_b, sae_b, acts_b) = a, b
    key = pair_key(acts_a, acts_b, cfg, same_model)
    directory = cache.stage_dir(results_dir, "pair", key)
    with cache.lock(directory):
        if not cache.is_complete(directory):
            decoders = (sae_a.sae.W_dec.detach().cpu().numpy(), sae_b.sae.W_dec.detach().cpu().numpy()) if same_model else None
            result = compare_runs(
                sae_a.name, acts_a, feature_logit_weights(model_a.model, sae_a.sae),
                sae_b.name, acts_b, feature_logit_weights(model_b.model, sae_b.sae),
                cfg.compare, rotation_seed=int(key[:8], 16), decoders=decoders,
            )
            if cfg.compare.causal_top_n:
                result = with_causal(result, _causal(a, b, result, cfg, data_dir, seed=int(key[8:16], 16)))
            save_pair(result, directory)
            cache.mark_complete(directory, {"pair": [sae_a.name, sae_b.name]}, f"{sae_a.name} vs {sae_b.name}")
    return load_pair(directory)


def _causal(a: tuple, b: tuple, result: PairResult, cfg: ExperimentConfig, data_dir: Path | None,
            seed: int) -> steering.PairCausal:
    """Ablation effects of the pair's top mutual matches and of random pairs, on the comparison tokens."""
    if data_dir is None:
        raise ValueError("compare.causal_top_n needs the data stage's folder (data_dir)")
    contexts = activations.eval_contexts(np.load(Path(data_dir) / "heldout.npy", mmap_mode="r"), cfg.data.ctx_len,
                                         cfg.compare.tokens)
    a_subject, b_subject = (steering.subject(run_model.model, run_sae.sae, run_acts.features(), contexts,
                                             cfg.compare.skip_first_positions) for run_model, run_sae, run_acts in (a, b))
    return steering.causal_universality(a_subject, b_subject, result.matching, cfg.compare.causal_top_n, seed)


def split_key(acts_a: activations.HeldoutActivations, acts_b: activations.HeldoutActivations, cfg: ExperimentConfig) -> str:
    """Both dictionaries' activations (which fix the tokens) and the compare settings a split level uses."""
    return cache.stage_key("split", SPLIT_VERSION, a=acts_a.directory.name, b=acts_b.directory.name,
                           min_firings=cfg.compare.min_firings, min_corr=splitting.CHILD_MIN_CORR)


def split_plan(run_names, seed_names: list[str], cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """(smaller, next larger) own SAE of every seed's model, for each consecutive pair of its dictionary sizes;
    none for a single size."""
    plan = []
    for seed_name in seed_names:
        names = list(family(run_names, cfg, seed_name).values())
        plan += list(zip(names, names[1:]))
    return plan


def is_split(a: tuple, b: tuple, cfg: ExperimentConfig, results_dir: Path) -> bool:
    """Whether ``split_features(a, b, ...)`` is cached."""
    return cache.is_complete(cache.stage_dir(results_dir, "split", split_key(a[2], b[2], cfg)))


def split_features(a: tuple[RunModel, RunSAE, activations.HeldoutActivations],
                   b: tuple[RunModel, RunSAE, activations.HeldoutActivations],
                   cfg: ExperimentConfig, results_dir: Path) -> splitting.SplitLevel:
    """A's features (the smaller dictionary) against B's (the next larger, same model) on the comparison tokens:
    activation correlations and decoder cosines of every parent and child (cached per pair of sizes)."""
    (_, sae_a, acts_a), (_, sae_b, acts_b) = a, b
    directory = cache.stage_dir(results_dir, "split", split_key(acts_a, acts_b, cfg))
    with cache.lock(directory):
        if not cache.is_complete(directory):
            decoders = (run_sae.sae.W_dec.detach().float().cpu().numpy() for run_sae in (sae_a, sae_b))
            level = splitting.compare_sizes(activations.paired_chunks(acts_a.features(), acts_b.features()), *decoders,
                                            cfg.compare.min_firings)
            splitting.save_level(level, directory)
            cache.mark_complete(directory, {"split": [sae_a.name, sae_b.name]}, f"{sae_a.name} into {sae_b.name}")
    return splitting.load_level(directory)


def summarize_splits(splits: dict[str, list[splitting.SplitLevel]], cfg: ExperimentConfig) -> dict[str, float]:
    """Each consecutive size pair's split statistics over the models (mean, std, seed-bootstrap CI):
    ``splits.512_to_1024.frac_split_mean``, ``splits.512_to_1024.child_density_ratio_median_mean``, ..."""
    by_sizes: dict[tuple[int, int], list[dict]] = {}
    for levels in splits.values():
        for level in levels:
            by_sizes.setdefault((level.size_a, level.size_b), []).append(splitting.level_statistics(level))
    summary = {}
    for (size_a, size_b), stats in by_sizes.items():
        over_models = summarize_pairs(stats, [(i,) for i in range(len(stats))], len(stats), cfg.compare.n_bootstrap)
        summary.update({f"splits.{size_a}_to_{size_b}.{key}": value for key, value in over_models.items()})
    return summary


CEILING_RATIOS = ("features.max_corr_median", "features.max_corr_mean", "features.frac_above_0.5")


def summarize(pairs: list[PairResult], replicate_pairs: list[PairResult], randomized: PairResult | None,
              names: list[str], cfg: ExperimentConfig) -> dict:
    """Statistics over all pairs (mean, std, seed-bootstrap CI), the within-model ceiling and the ratio of
    cross-model universality to it, feature families and partner counts."""
    index = {name: i for i, name in enumerate(names)}
    units = [(index[model_name(p.run_a)], index[model_name(p.run_b)]) for p in pairs]
    summary = summarize_pairs([p.stats for p in pairs], units, len(names), cfg.compare.n_bootstrap) if pairs else {}
    if replicate_pairs:
        units = [(index[model_name(p.run_a)],) for p in replicate_pairs]
        ceiling = summarize_pairs([p.stats for p in replicate_pairs], units, len(names), cfg.compare.n_bootstrap)
        summary.update({f"ceiling.{key}": value for key, value in ceiling.items()})
        if pairs:
            for key in CEILING_RATIOS:
                summary[f"ceiling_ratio.{key}"] = summary[f"{key}_mean"] / summary[f"ceiling.{key}_mean"]
    matchings = {(index[model_name(p.run_a)], index[model_name(p.run_b)]): p.matching for p in pairs}
    if matchings:
        families = feature_families(matchings, min_corr=FAMILY_MIN_CORR)
        multi = families.n_runs > 1
        summary.update({
            "families.n_multi_run": int(multi.sum()),
            "families.n_all_runs": int((families.n_runs == len(names)).sum()),
            "families.mean_size_multi_run": float(families.size[multi].mean()) if multi.any() else 0.0,
        })
        included = included_features(matchings)
        for run, counts in partner_counts(matchings, threshold=FAMILY_MIN_CORR).items():
            partnered_everywhere = counts[included[run]] == len(names) - 1
            summary[f"{names[run]}.frac_features_partnered_all_runs"] = float(partnered_everywhere.mean())
    if randomized is not None:
        for key, value in randomized.stats.items():
            summary[f"randomized.{key}"] = value
        if pairs:
            summary["features.excess_over_randomized"] = (
                summary["features.max_corr_mean_mean"] - randomized.stats["features.max_corr_mean"])
    return summary


def summarize_own_neurons(saes: dict[str, RunSAE], names: list[str], cfg: ExperimentConfig) -> dict[str, float]:
    """The seeds' own SAEs against their models' neurons, over seeds (mean, std, seed-bootstrap CI):
    ``own_neurons.max_corr_median_mean``, ``own_neurons.neurons_for_90pct_median_mean``, ..."""
    stats = [saes[name].own_neurons.stats for name in names]
    over_seeds = summarize_pairs(stats, [(i,) for i in range(len(names))], len(names), cfg.compare.n_bootstrap)
    return {f"own_neurons.{key}": value for key, value in over_seeds.items()}


def run(cfg: ExperimentConfig, seeds: list[int], results_dir: Path, device: str = "auto", progress: bool = True,
        engine: Engine = Engine()) -> RunResult:
    """corpus -> tokens -> per run (model -> SAE -> evaluation -> held-out activations) -> pair comparisons -> summary.

    ``engine`` says where the per-run stages and the pair comparisons run (in this process, in
    parallel worker processes, on a Dask cluster); the results do not depend on it.
    """
    device = resolve_device(device)
    check_memory(cfg, device)
    results_dir = Path(results_dir)
    with _disk_errors():
        results_dir.mkdir(parents=True, exist_ok=True)
        dataset = prepare_data(cfg, results_dir)
        tasks = run_tasks(cfg, dataset, seeds, device, results_dir, progress)
        built = engine.map_cached(build_run, [(task,) for task in tasks], lambda task: is_cached(task, dataset),
                                  progress_board(results_dir, [task.name for task in tasks], progress))
        runs = {paths.name: load_run(paths, device) for paths in built}
        seed_names = [f"seed{s}" for s in seeds]
        plan = pair_plan(list(runs), seed_names, cfg)
        compared = engine.map_cached(compare_pair, [(runs[a], runs[b], cfg, results_dir, kind == "same-model", dataset.directory)
                                                    for a, b, kind in plan], is_compared,
                                     progress_board(results_dir, [f"{a} vs {b}" for a, b, _ in plan], progress))
        splits_plan = split_plan(list(runs), seed_names, cfg)
        levels = engine.map_cached(split_features, [(runs[a], runs[b], cfg, results_dir) for a, b in splits_plan], is_split,
                                   progress_board(results_dir, [f"{a} into {b}" for a, b in splits_plan], progress)
                                   ) if splits_plan else []
    splits: dict[str, list[splitting.SplitLevel]] = {}
    for (a, _), level in zip(splits_plan, levels):
        splits.setdefault(model_name(a), []).append(level)
    by_kind: dict[tuple[str, int | None], list[PairResult]] = {}  # (kind, the size in the names) -> its pairs
    for pair, (a, _, kind) in zip(compared, plan):
        by_kind.setdefault((kind, size_of(a)), []).append(pair)
    randomized = by_kind[("randomized", None)][0] if ("randomized", None) in by_kind else None
    models = {name: model for name, (model, _, _) in runs.items()}
    saes = {name: sae for name, (_, sae, _) in runs.items()}
    acts = {name: run_acts for name, (_, _, run_acts) in runs.items()}
    sizes = {size: None if size == cfg.sae.dict_size else size for size in cfg.sae.sizes}  # size -> its name's size
    size_pairs = {size: by_kind.get(("cross-model", named), []) for size, named in sizes.items()}
    size_replicate_pairs = {size: by_kind.get(("same-model", named), []) for size, named in sizes.items()}
    primary = cfg.sae.dict_size
    summary = summarize(size_pairs[primary], size_replicate_pairs[primary], randomized, seed_names, cfg)
    summary.update(summarize_own_neurons(saes, seed_names, cfg))
    for size, named in sizes.items():
        if named is not None:
            stats = summarize(size_pairs[size], size_replicate_pairs[size], None, seed_names, cfg)
            summary.update({f"{summary_prefix(named)}{key}": value for key, value in stats.items()})
    summary.update(summarize_splits(splits, cfg))
    return RunResult(cfg, dataset, models, saes, acts, size_pairs[primary], size_replicate_pairs[primary], randomized,
                     summary, size_pairs, size_replicate_pairs, splits)


def progress_board(results_dir: Path, labels: list[str], progress: bool) -> Board | None:
    """Where parallel workers report the progress of tasks labelled ``labels`` (None: ``progress`` is off)."""
    return Board(results_dir / "progress", labels) if progress else None


PAIR_KINDS = ("cross-model", "same-model", "randomized")


def pair_plan(run_names: list[str], seed_names: list[str], cfg: ExperimentConfig) -> list[tuple[str, str, str]]:
    """(A, B, kind) of every comparison: at each dictionary size (the primary first), each pair of seeds
    (cross-model) and each pair of SAEs of one model (same-model: the ceiling); then the two weight-shuffled
    controls (randomized)."""
    plan = []
    for size in (cfg.sae.dict_size, *cfg.sae.sizes[-2::-1]):
        named = None if size == cfg.sae.dict_size else size
        own = [sae_run_name(cfg, seed_name, size) for seed_name in seed_names]
        plan += [(a, b, "cross-model") for a, b in itertools.combinations(own, 2)]
        for seed_name in seed_names:  # the seed's own SAE first, in task order
            replicas = [n for n in run_names if model_name(n) == seed_name and size_of(n) == named]
            plan += [(a, b, "same-model") for a, b in itertools.combinations(replicas, 2)]
    shuffled = [n for n in run_names if n.startswith("shuffled-")]
    if shuffled:
        plan.append((shuffled[0], shuffled[1], "randomized"))
    return plan


def run_tasks(cfg: ExperimentConfig, dataset: Dataset, seeds: list[int], device: str, results_dir: Path,
              progress: bool) -> list[RunTask]:
    """One task per seed, then the replicate SAEs (of the first seed's model, or of every model), then
    the two weight-shuffled controls of the first seed's model (if enabled); then the same seeds and
    replicates at every other size of the dictionary family, largest first."""
    replicated = seeds[:1] if cfg.sae.replicates_on == "first" else seeds
    runs = []
    for size in (None, *(s for s in reversed(cfg.sae.sizes) if s != cfg.sae.dict_size)):
        runs += [(seed, None, 0, size) for seed in seeds]
        runs += [(seed, None, r, size) for seed in replicated for r in range(1, cfg.sae.replicates + 1)]
        if cfg.compare.randomized_baseline and size is None:
            runs += [(seeds[0], shuffle_seed, 0, None) for shuffle_seed in (1, 2)]
    devices = spread_devices(device, len(runs))
    return [RunTask(cfg, dataset.directory, dataset.key, seed, shuffle_seed, run_device, results_dir, progress, replicate, size)
            for (seed, shuffle_seed, replicate, size), run_device in zip(runs, devices)]


@contextlib.contextmanager
def _disk_errors() -> Iterator[None]:
    """A full disk or an unwritable results folder as one line naming the path, not a traceback.
    Nothing is left half-written: every file is written to a temp name and renamed into place."""
    try:
        yield
    except OSError as exc:
        raise from_os_error(exc) from None


def describe(result: RunResult) -> str:
    """A few lines for the terminal: each run's losses and SAE, then the universality headline with its
    ceiling (two SAEs of one model) and baselines beside it, so each number says how far to trust it."""
    lines = []
    for name, m in result.models.items():
        sae = result.saes[name]
        s = sae.metrics
        quality = f"SAE fvu {s['fvu']:.3f} L0 {s['l0']:.1f} dead {s['dead_fraction']:.1%}"
        if "convergence_corr_median" in s:
            quality += f" converged {s['convergence_corr_median']:.2f}"
        if sae.replicate or size_of(name):
            what = "replicate SAE" if sae.replicate else f"{sae.sae.W_dec.shape[0]:,}-feature SAE"
            lines.append(f"{name} ({what} of {model_name(name)}): {quality} loss recovered {s['loss_recovered']:.1%}")
        elif m.metrics:  # a trained model; a weight-shuffled control's MLP barely matters to its loss
            lines.append(f"{name}: held-out loss {m.metrics['eval_loss']:.3f} (bigram {m.metrics['bigram_ce']:.3f}) | "
                         f"{quality} loss recovered {s['loss_recovered']:.1%}")
        else:
            lines.append(f"{name} (control): {quality}")
    for p in result.pairs:
        st = p.stats
        lines.append(f"{p.run_a} vs {p.run_b}: median max corr features {st['features.max_corr_median']:.3f} | "
                     f"neurons {st['neurons.max_corr_median']:.3f} | rotated neurons {st['rotation.max_corr_median']:.3f}")
    for p in result.replicate_pairs:
        lines.append(f"{p.run_a} vs {p.run_b} (same model): median max corr features {p.stats['features.max_corr_median']:.3f} | "
                     f"decoder cosine, one-to-one {p.stats['decoder.cos_hungarian_median']:.3f}")
    lines += headline(result.summary, len(result.pairs), len(result.replicate_pairs), result.randomized)
    lines += size_lines(result) + split_lines(result)
    lines.append(f"results in {result.dataset.directory.parent.parent.parent}")
    return "\n".join(lines)


def size_lines(result: RunResult) -> list[str]:
    """A dictionary family's universality at each size: across models, the ceiling and their ratio (none for one size)."""
    if len(result.size_pairs) < 2:
        return []
    primary = result.cfg.sae.dict_size
    lines = ["by dictionary size: median max activation correlation (mean over pairs): across models | ceiling | ratio"]
    for size in result.size_pairs:
        prefix = summary_prefix(None if size == primary else size)
        values = [result.summary.get(f"{prefix}{key}", float("nan")) for key in (
            "features.max_corr_median_mean", "ceiling.features.max_corr_median_mean", "ceiling_ratio.features.max_corr_median")]
        shown = ("–" if np.isnan(v) else f"{v:.3f}" for v in values)
        lines.append(f"  {size:>8,} features{' (primary)' if size == primary else '':<10} " + " | ".join(shown))
    return lines


def split_lines(result: RunResult) -> list[str]:
    """A dictionary family's feature splitting between consecutive sizes (none for one size)."""
    pairs = [(level.size_a, level.size_b) for level in next(iter(result.splits.values()), [])]
    if not pairs:
        return []
    lines = [f"feature splitting: the smaller dictionary's features (mean over models) whose children in the next size "
             f"(activation correlation > {splitting.CHILD_MIN_CORR}) are one above {splitting.PERSIST_MIN_CORR} (persist), "
             "two or more (split), one below it (shift), none (vanish)"]
    for size_a, size_b in pairs:
        prefix = f"splits.{size_a}_to_{size_b}."
        shown = " | ".join(f"{c} {result.summary.get(f'{prefix}frac_{c}_mean', float('nan')):.2f}" for c in splitting.CLASSES)
        lines.append(f"  {size_a:>8,} -> {size_b:<8,} {shown}")
    return lines


def headline(summary: dict, n_pairs: int, n_replicate_pairs: int, randomized: PairResult | None) -> list[str]:
    """Median max activation correlation of SAE features across models, beside its ceiling, their ratio
    and the baselines (mean over pairs, with the 95% interval from resampling seeds)."""
    if not n_pairs and not n_replicate_pairs:
        return []

    def row(label: str, key: str) -> list[str]:
        if f"{key}_mean" not in summary:
            return []
        mean, low, high = (summary.get(f"{key}_{s}", float("nan")) for s in ("mean", "ci_low", "ci_high"))
        interval = f"  [{low:.3f}, {high:.3f}]" if np.isfinite(low) else ""
        return [f"  {label:<50} {mean:.3f}{interval}"]

    lines = [f"universality: median max activation correlation, mean over {n_pairs} pair{'s' * (n_pairs != 1)} of models"
             " [95% interval, resampling seeds; none below 3 seeds]", *row("SAE features, across models", "features.max_corr_median")]
    if n_replicate_pairs:
        lines += row(f"SAE features, same model (ceiling, {n_replicate_pairs} SAE pair{'s' * (n_replicate_pairs > 1)})",
                     "ceiling.features.max_corr_median")
        if "ceiling_ratio.features.max_corr_median" in summary:
            lines.append(f"  {'across models / ceiling':<50} {summary['ceiling_ratio.features.max_corr_median']:.3f}")
    lines += row("neurons", "neurons.max_corr_median") + row("rotated neurons (baseline)", "rotation.max_corr_median")
    lines += row("SAE features vs own neurons (mean over seeds)", "own_neurons.max_corr_median")
    if randomized is not None:
        lines.append(f"  {'SAE features, weight-shuffled models':<50} {randomized.stats['features.max_corr_median']:.3f}")
    if "causal.effect_corr_median_top_mean" in summary:
        lines += ["causal universality: median correlation of ablation effects (per-token change in next-token log-prob)",
                  *row("top mutual matches (compare.causal_top_n)", "causal.effect_corr_median_top"),
                  *row("random feature pairs", "causal.effect_corr_median_random")]
    return lines
