"""The data stage: corpus -> BPE tokenizer -> one token stream split into training and held-out tokens,
shared by every seed (and the n-gram baselines the models' losses are read against)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.training import ngram_baselines
from universality.core.config import ExperimentConfig
from universality.runtime import cache
from universality.runtime.atomic import atomic_path
from universality.text.corpus import load_corpus
from universality.text.tokenization import encode_documents, load_tokenizer, shuffled_documents, split_tokens, train_tokenizer

STAGE = cache.Stage("data", 1)


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

    @property
    def results_dir(self) -> Path:
        return cache.results_dir_of(self.directory)

    def tokenizer(self):
        return load_tokenizer(self.tokenizer_path)


def key(cfg: ExperimentConfig, corpus_fingerprint: str) -> str:
    return STAGE.key(data=dataclasses.asdict(cfg.data), corpus=corpus_fingerprint)


def build(cfg: ExperimentConfig, results_dir: Path) -> Dataset:
    """The data stage of ``cfg``'s corpus, tokenized once."""
    corpus = load_corpus(cfg.data.corpus)

    def compute(directory: Path) -> dict:
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
        return {"corpus_source": corpus.source, "corpus_fingerprint": corpus.fingerprint, "vocab_size": vocab,
                "train_tokens": len(splits.train), "heldout_tokens": len(splits.heldout), "baselines": baselines}

    data_key = key(cfg, corpus.fingerprint)
    return load(STAGE.build(results_dir, data_key, compute, f"tokens of {corpus.source}"), data_key)


def load(directory: Path, key: str) -> Dataset:
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


def heldout_tokens(directory: Path) -> np.ndarray:
    """The held-out token stream of the data stage in ``directory``, memory-mapped."""
    return np.load(Path(directory) / "heldout.npy", mmap_mode="r")
