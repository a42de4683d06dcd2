"""The experiment as a sequence of stages, each a plain function from inputs to outputs:

corpus -> tokens (prepare_data) -> models (train_model) -> SAEs (fit_sae) -> comparisons
(compare_pair, summarize) -> tracking/export.

Every stage writes into its own content-addressed cache folder (see ``universality.cache``),
so re-running with the same inputs reuses finished work.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from models.training import TrainingResult, heldout_contexts, ngram_baselines, train_transformer
from models.transformer import OneLayerTransformer, TransformerConfig
from sae.activations import model_activations, shuffled_batches
from sae.base import SAE
from sae.checkpoint import load_sae, save_sae
from sae.evaluation import evaluate_sae, loss_recovered
from sae.training import train_sae
from universality import activations, cache
from universality.across_seeds import feature_families, partner_counts, summarize_pairs
from universality.atomic import atomic_path, write_text
from universality.config import ExperimentConfig
from universality.corpus import load_corpus
from universality.errors import UnivError
from universality.pairs import PairResult, compare_runs, feature_logit_weights, load_pair, save_pair
from universality.tokenization import encode_documents, load_tokenizer, shuffled_documents, split_tokens, train_tokenizer

DATA_VERSION = 1
MODEL_VERSION = 1
SAE_VERSION = 1
ACTIVATIONS_VERSION = 2
PAIR_VERSION = 1
SAE_EVAL_BATCH_CONTEXTS = 32


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

    name: str
    directory: Path
    key: str
    sae: SAE
    history: list[dict]
    resampling_events: list[dict]
    metrics: dict  # evaluate_sae + loss_recovered on the held-out tokens


@dataclass(frozen=True)
class RunResult:
    """Everything one ``univ run`` produced, for tracking and export."""

    cfg: ExperimentConfig
    dataset: Dataset
    models: dict[str, RunModel]
    saes: dict[str, RunSAE]
    pairs: list[PairResult]  # every pair of seeds
    randomized: PairResult | None  # the two weight-shuffled controls, when enabled
    summary: dict[str, float]  # statistics over all pairs (mean, std, CI), families


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UnivError("--device cuda asked for, but torch sees no CUDA device")
    return device


def prepare_data(cfg: ExperimentConfig, results_dir: Path) -> Dataset:
    """Corpus -> BPE tokenizer -> one token stream split into training and held-out tokens."""
    corpus = load_corpus(cfg.data.corpus)
    data_cfg = dataclasses.asdict(cfg.data)
    key = cache.stage_key("data", DATA_VERSION, data=data_cfg, corpus=corpus.fingerprint)
    directory = cache.stage_dir(results_dir, "data", key)
    if not cache.is_complete(directory):
        directory.mkdir(parents=True, exist_ok=True)
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
        })
    summary = cache.read_summary(directory)
    return Dataset(
        directory=directory,
        key=key,
        corpus_source=corpus.source,
        corpus_fingerprint=corpus.fingerprint,
        vocab_size=summary["vocab_size"],
        train=np.load(directory / "train.npy", mmap_mode="r"),
        heldout=np.load(directory / "heldout.npy", mmap_mode="r"),
        baselines=summary["baselines"],
    )


def transformer_config(cfg: ExperimentConfig, dataset: Dataset) -> TransformerConfig:
    return TransformerConfig(vocab_size=dataset.vocab_size, ctx_len=cfg.data.ctx_len, **dataclasses.asdict(cfg.model))


def train_model(dataset: Dataset, cfg: ExperimentConfig, seed: int, device: str, results_dir: Path, progress: bool = True) -> RunModel:
    """Train (or reuse) the transformer of one seed; resumes from its last checkpoint."""
    model_cfg = transformer_config(cfg, dataset)
    key = cache.stage_key("model", MODEL_VERSION, data=dataset.key, model=model_cfg.to_dict(),
                          train=dataclasses.asdict(cfg.train), seed=seed)
    directory = cache.stage_dir(results_dir, "model", key)
    if not cache.is_complete(directory):
        directory.mkdir(parents=True, exist_ok=True)
        result = train_transformer(dataset.train, dataset.heldout, model_cfg, cfg.train, seed, device,
                                   checkpoint_dir=directory / "resume", progress=progress)
        _save_model(directory, result, model_cfg, dataset.baselines)
    return load_run_model(directory, f"seed{seed}", seed, key, device)


def _save_model(directory: Path, result: TrainingResult, model_cfg: TransformerConfig, baselines: dict) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
    with atomic_path(directory / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    write_text(directory / "config.json", json.dumps(model_cfg.to_dict(), indent=1))
    write_text(directory / "history.json", json.dumps(result.history))
    metrics = {"eval_loss": result.eval_loss, **baselines,
               "eval_loss_minus_bigram": result.eval_loss - baselines["bigram_ce"]}
    cache.mark_complete(directory, {"metrics": metrics})


def load_run_model(directory: Path, name: str, seed: int, key: str, device: str) -> RunModel:
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
    key = cache.stage_key("shuffled", MODEL_VERSION, model=base.key, shuffle_seed=shuffle_seed)
    directory = cache.stage_dir(results_dir, "model", key)
    name = f"shuffled-{base.name}-{shuffle_seed}"
    if not cache.is_complete(directory):
        directory.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(shuffle_seed)
        state = {k: v.cpu().flatten()[torch.randperm(v.numel(), generator=generator)].reshape(v.shape)
                 for k, v in base.model.state_dict().items()}
        with atomic_path(directory / "model.safetensors") as tmp:
            save_file(state, str(tmp))
        write_text(directory / "config.json", json.dumps(base.model.cfg.to_dict(), indent=1))
        write_text(directory / "history.json", "[]")
        cache.mark_complete(directory, {"metrics": {}, "shuffled_from": base.key})
    return load_run_model(directory, name, base.seed, key, device)


def fit_sae(dataset: Dataset, run: RunModel, cfg: ExperimentConfig, device: str, results_dir: Path,
            progress: bool = True) -> RunSAE:
    """Fit (or reuse) an SAE on ``run``'s MLP activations over the training tokens, then evaluate it
    on the held-out tokens: reconstruction, sparsity, densities and loss recovered."""
    key = cache.stage_key("sae", SAE_VERSION, model=run.key, sae=dataclasses.asdict(cfg.sae))
    directory = cache.stage_dir(results_dir, "sae", key)
    ctx_len = cfg.data.ctx_len
    if not cache.is_complete(directory):
        seqs = max(1, cfg.sae.batch_size // ctx_len)
        source = model_activations(run.model, dataset.train, ctx_len, seqs, device, seed=run.seed)
        generator = torch.Generator().manual_seed(run.seed)
        batches = shuffled_batches(source, cfg.sae.buffer_size, cfg.sae.batch_size, generator)
        trained = train_sae(batches, cfg.sae, run.model.cfg.d_mlp, seed=run.seed, device=device, progress=progress)
        contexts = activations.eval_contexts(dataset.heldout, ctx_len, cfg.compare.tokens)
        metrics = evaluate_sae(trained.sae, _heldout_neurons(run.model, contexts, device))
        metrics.update(loss_recovered(run.model, trained.sae, contexts.split(SAE_EVAL_BATCH_CONTEXTS), device))
        save_sae(trained, cfg.sae, directory, metrics)
        cache.mark_complete(directory, {"run": run.name})
    saved = json.loads((directory / "metrics.json").read_text())
    history, events = saved.pop("history"), saved.pop("resampling_events")
    return RunSAE(run.name, directory, key, load_sae(directory, device), history, events, saved)


@torch.no_grad()
def _heldout_neurons(model: OneLayerTransformer, contexts: torch.Tensor, device: str):
    for batch in contexts.split(SAE_EVAL_BATCH_CONTEXTS):
        acts = model(batch.to(device), return_mlp=True).mlp_acts
        yield acts.reshape(-1, acts.shape[-1])


def record_activations(dataset: Dataset, run: RunModel, sae: RunSAE, cfg: ExperimentConfig, device: str,
                       results_dir: Path) -> activations.HeldoutActivations:
    """Neurons and SAE features of one run on the comparison tokens, recorded once per run."""
    key = cache.stage_key("activations", ACTIVATIONS_VERSION, sae=sae.key, tokens=cfg.compare.tokens, data=dataset.key)
    directory = cache.stage_dir(results_dir, "activations", key)
    if not cache.is_complete(directory):
        directory.mkdir(parents=True, exist_ok=True)
        contexts = activations.eval_contexts(dataset.heldout, cfg.data.ctx_len, cfg.compare.tokens)
        activations.record(run.model, sae.sae, contexts, directory, device, cfg.compare.top_k_examples)
        cache.mark_complete(directory, {"run": run.name})
    return activations.HeldoutActivations(directory)


def compare_pair(a: tuple[RunModel, RunSAE, activations.HeldoutActivations],
                 b: tuple[RunModel, RunSAE, activations.HeldoutActivations],
                 cfg: ExperimentConfig, results_dir: Path) -> PairResult:
    """Match A's features, neurons and rotated neurons against B's (cached per pair)."""
    (model_a, sae_a, acts_a), (model_b, sae_b, acts_b) = a, b
    key = cache.stage_key("pair", PAIR_VERSION, a=str(acts_a.directory.name), b=str(acts_b.directory.name),
                          compare=dataclasses.asdict(cfg.compare))
    directory = cache.stage_dir(results_dir, "pair", key)
    if not cache.is_complete(directory):
        result = compare_runs(
            model_a.name, acts_a, feature_logit_weights(model_a.model, sae_a.sae),
            model_b.name, acts_b, feature_logit_weights(model_b.model, sae_b.sae),
            cfg.compare, rotation_seed=int(key[:8], 16),
        )
        save_pair(result, directory)
        cache.mark_complete(directory, {"pair": [model_a.name, model_b.name]})
    return load_pair(directory)


def summarize(pairs: list[PairResult], randomized: PairResult | None, names: list[str], cfg: ExperimentConfig) -> dict:
    """Statistics over all pairs (mean, std, bootstrap CI), feature families and partner counts."""
    summary = summarize_pairs([p.stats for p in pairs], cfg.compare.n_bootstrap) if pairs else {}
    index = {name: i for i, name in enumerate(names)}
    matchings = {(index[p.run_a], index[p.run_b]): p.matching for p in pairs}
    if matchings:
        families = feature_families(matchings, min_corr=0.5)
        multi = families.n_runs > 1
        summary.update({
            "families.n_multi_run": int(multi.sum()),
            "families.n_all_runs": int((families.n_runs == len(names)).sum()),
            "families.mean_size_multi_run": float(families.size[multi].mean()) if multi.any() else 0.0,
        })
        for run, counts in partner_counts(matchings, threshold=0.5).items():
            summary[f"{names[run]}.frac_features_partnered_all_runs"] = float((counts == len(names) - 1).mean())
    if randomized is not None:
        for key, value in randomized.stats.items():
            summary[f"randomized.{key}"] = value
        if pairs:
            summary["features.excess_over_randomized"] = (
                summary["features.max_corr_mean_mean"] - randomized.stats["features.max_corr_mean"])
    return summary


def run(cfg: ExperimentConfig, seeds: list[int], results_dir: Path, device: str = "auto", progress: bool = True) -> RunResult:
    """corpus -> tokens -> models -> SAEs -> held-out activations -> pair comparisons -> summary."""
    device = resolve_device(device)
    results_dir = Path(results_dir)
    dataset = prepare_data(cfg, results_dir)
    models = {m.name: m for m in (train_model(dataset, cfg, s, device, results_dir, progress) for s in seeds)}
    if cfg.compare.randomized_baseline:
        base = next(iter(models.values()))
        for shuffle_seed in (1, 2):
            shuffled = shuffle_model(base, shuffle_seed, results_dir, device)
            models[shuffled.name] = shuffled
    saes = {name: fit_sae(dataset, m, cfg, device, results_dir, progress) for name, m in models.items()}
    acts = {name: record_activations(dataset, models[name], saes[name], cfg, device, results_dir) for name in models}
    runs = {name: (models[name], saes[name], acts[name]) for name in models}
    seed_names = [f"seed{s}" for s in seeds]
    pairs = [compare_pair(runs[a], runs[b], cfg, results_dir) for a, b in itertools.combinations(seed_names, 2)]
    shuffled_names = [n for n in models if n not in seed_names]
    randomized = compare_pair(runs[shuffled_names[0]], runs[shuffled_names[1]], cfg, results_dir) if shuffled_names else None
    return RunResult(cfg, dataset, models, saes, pairs, randomized, summarize(pairs, randomized, seed_names, cfg))


def describe(result: RunResult) -> str:
    """A few lines for the terminal: each run's losses and SAE, and the universality headline."""
    lines = []
    for name, m in result.models.items():
        s = result.saes[name].metrics
        loss = f"held-out loss {m.metrics['eval_loss']:.3f} (bigram {m.metrics['bigram_ce']:.3f}) | " if m.metrics else ""
        lines.append(f"{name}: {loss}SAE fvu {s['fvu']:.3f} L0 {s['l0']:.1f} dead {s['dead_fraction']:.1%} "
                     f"loss recovered {s['loss_recovered']:.1%}")
    for p in result.pairs:
        st = p.stats
        lines.append(f"{p.run_a} vs {p.run_b}: median max corr features {st['features.max_corr_median']:.3f} | "
                     f"neurons {st['neurons.max_corr_median']:.3f} | rotated neurons {st['rotation.max_corr_median']:.3f}")
    if result.randomized is not None:
        lines.append(f"randomized transformers: median max corr features {result.randomized.stats['features.max_corr_median']:.3f}")
    lines.append(f"results in {result.dataset.directory.parent.parent.parent}")
    return "\n".join(lines)
