"""Byte-level BPE tokenizer trained on the corpus, and the token stream every seed shares.

Documents are shuffled once with a fixed generator (independent of any run's seed), encoded,
joined by an end-of-text token and split into a training stream and a held-out tail. Every
model is evaluated, and later compared, on the very same held-out tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from universality.core.config import DataConfig
from universality.text.corpus import Corpus
from universality.core.errors import DataError
from universality.runtime.progress import bar as progress_bar

END_OF_TEXT = "<|endoftext|>"
SPLIT_SEED = 0  # the document order is part of the data, never of a run's seed


@dataclass(frozen=True)
class TokenSplits:
    train: np.ndarray  # 1-D token ids for training
    heldout: np.ndarray  # 1-D token ids of the fixed held-out evaluation split


def shuffled_documents(corpus: Corpus) -> list[str]:
    order = np.random.default_rng(SPLIT_SEED).permutation(len(corpus.documents))
    return [corpus.documents[i] for i in order]


def train_tokenizer(documents: list[str], vocab_size: int, max_chars: int) -> Tokenizer:
    """A byte-level BPE (GPT-2 style) trained on the first ``max_chars`` characters of ``documents``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_take_chars(documents, max_chars), trainer=trainer)
    return tokenizer


def _take_chars(documents: list[str], max_chars: int):
    used = 0
    for doc in documents:
        if max_chars and used >= max_chars:
            return
        yield doc
        used += len(doc)


def encode_documents(tokenizer: Tokenizer, documents: list[str], max_tokens: int) -> np.ndarray:
    """One stream of token ids, documents separated by the end-of-text token, cut at ``max_tokens``."""
    eot = tokenizer.token_to_id(END_OF_TEXT)
    dtype = np.uint16 if tokenizer.get_vocab_size() <= np.iinfo(np.uint16).max else np.uint32
    chunks, total = [], 0
    batch = 64
    with progress_bar(total=max_tokens or None, desc="tokenizing", unit="tok", leave=False) as bar:
        for start in range(0, len(documents), batch):
            for enc in tokenizer.encode_batch(documents[start : start + batch]):
                ids = np.asarray(enc.ids + [eot], dtype=dtype)
                chunks.append(ids)
                total += len(ids)
                bar.update(len(ids))
            if max_tokens and total >= max_tokens:
                break
    stream = np.concatenate(chunks)
    return stream[:max_tokens] if max_tokens else stream


def split_tokens(stream: np.ndarray, cfg: DataConfig) -> TokenSplits:
    """Held-out = the last ``cfg.heldout_tokens`` tokens; the training stream must hold many contexts."""
    if len(stream) < cfg.heldout_tokens + 8 * cfg.ctx_len:
        raise DataError(
            f"corpus has only {len(stream)} tokens; need at least {cfg.heldout_tokens + 8 * cfg.ctx_len} "
            f"(data.heldout_tokens + 8 contexts)"
        )
    return TokenSplits(train=stream[: -cfg.heldout_tokens], heldout=stream[-cfg.heldout_tokens :])


def load_tokenizer(path: Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))
