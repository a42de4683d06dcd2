"""The experiment as a sequence of stages, each a plain function from inputs to outputs:

corpus -> tokens (prepare_data) -> models (train_model) -> SAEs (fit_sae) -> comparisons
(compare_pair, summarize) -> tracking/export.

Every stage writes into its own content-addressed cache folder (see ``universality.cache``),
so re-running with the same inputs reuses finished work.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from models.training import TrainingResult, ngram_baselines, train_transformer
from models.transformer import OneLayerTransformer, TransformerConfig
from universality import cache
from universality.atomic import atomic_path, write_text
from universality.config import ExperimentConfig
from universality.corpus import load_corpus
from universality.tokenization import encode_documents, load_tokenizer, shuffled_documents, split_tokens, train_tokenizer

DATA_VERSION = 1
MODEL_VERSION = 1


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
class SeedModel:
    """A trained transformer of one seed."""

    seed: int
    directory: Path
    key: str
    model: OneLayerTransformer
    history: list[dict]
    metrics: dict[str, float]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        from universality.errors import UnivError

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


def train_model(dataset: Dataset, cfg: ExperimentConfig, seed: int, device: str, results_dir: Path, progress: bool = True) -> SeedModel:
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
    return load_seed_model(directory, seed, key, device)


def _save_model(directory: Path, result: TrainingResult, model_cfg: TransformerConfig, baselines: dict) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
    with atomic_path(directory / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    write_text(directory / "config.json", json.dumps(model_cfg.to_dict(), indent=1))
    write_text(directory / "history.json", json.dumps(result.history))
    metrics = {"eval_loss": result.eval_loss, **baselines,
               "eval_loss_minus_bigram": result.eval_loss - baselines["bigram_ce"]}
    cache.mark_complete(directory, {"metrics": metrics})


def load_seed_model(directory: Path, seed: int, key: str, device: str) -> SeedModel:
    model_cfg = TransformerConfig(**json.loads((directory / "config.json").read_text()))
    model = OneLayerTransformer(model_cfg)
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    model.to(device).eval()
    return SeedModel(
        seed=seed,
        directory=directory,
        key=key,
        model=model,
        history=json.loads((directory / "history.json").read_text()),
        metrics=cache.read_summary(directory)["metrics"],
    )


def run(cfg: ExperimentConfig, seeds: list[int], results_dir: Path, device: str = "auto", progress: bool = True) -> dict:
    """Run every stage for ``seeds``; returns a plain summary of where things went."""
    device = resolve_device(device)
    results_dir = Path(results_dir)
    dataset = prepare_data(cfg, results_dir)
    models = {seed: train_model(dataset, cfg, seed, device, results_dir, progress) for seed in seeds}
    for seed, m in models.items():
        print(f"seed {seed}: held-out loss {m.metrics['eval_loss']:.4f} nats "
              f"(bigram {m.metrics['bigram_ce']:.4f}, unigram {m.metrics['unigram_ce']:.4f}) -> {m.directory}")
    return {"dataset": dataset, "models": models}
