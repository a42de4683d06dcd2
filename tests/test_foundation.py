"""Corpus, tokenizer, transformer and its training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.training import build_model, ngram_baselines, train_transformer
from models.transformer import TransformerConfig
from universality.core.config import TrainConfig
from universality.text.corpus import load_corpus
from universality.core.errors import DataError
from universality.text.tokenization import encode_documents, shuffled_documents, train_tokenizer

SMALL = TransformerConfig(vocab_size=97, ctx_len=16, d_model=32, d_mlp=64, n_heads=4)


def test_stdlib_corpus_is_deterministic_and_fingerprinted():
    a, b = load_corpus("stdlib"), load_corpus("stdlib")
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    assert len(a.documents) > 100 and a.documents == b.documents


def test_folder_corpus_reads_supported_files_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"text": "first"}) + "\n" + json.dumps({"text": "second"}) + "\n")
    (tmp_path / "c.bin").write_bytes(b"\x00\x01")
    corpus = load_corpus(str(tmp_path))
    assert corpus.documents == ("hello world", "first", "second")


def _missing(folder):
    return folder / "missing"


def _empty_file(folder):
    (folder / "empty.txt").write_text("")
    return folder / "empty.txt"


def _binary_file(folder):
    (folder / "blob.txt").write_bytes(b"\x00\xff" * 100)
    return folder / "blob.txt"


def _folder_without_text(folder):
    (folder / "d").mkdir()
    (folder / "d" / "x.bin").write_bytes(b"x")
    return folder / "d"


@pytest.mark.parametrize("make, message", [
    (_missing, "does not exist"),
    (_empty_file, "no readable text"),
    (_binary_file, "not UTF-8 text"),
    (_folder_without_text, "has no"),
])
def test_bad_corpus_paths_raise_one_line_errors(tmp_path, make, message):
    with pytest.raises(DataError, match=message) as info:
        load_corpus(str(make(tmp_path)))
    assert "\n" not in str(info.value)


def test_tokenizer_round_trips_text(text_corpus):
    docs = shuffled_documents(load_corpus(str(text_corpus)))
    tokenizer = train_tokenizer(docs, vocab_size=400, max_chars=0)
    sample = "def f(x):\n    return x ** 2  # ünïcødé ✓\n"
    assert tokenizer.decode(tokenizer.encode(sample).ids) == sample
    stream = encode_documents(tokenizer, docs, max_tokens=5000)
    assert len(stream) == 5000 and stream.max() < tokenizer.get_vocab_size()


def test_model_shapes_and_mlp_activations():
    model = build_model(SMALL, seed=0)
    tokens = torch.randint(0, SMALL.vocab_size, (3, SMALL.ctx_len))
    out = model(tokens, return_mlp=True)
    assert out.logits.shape == (3, SMALL.ctx_len, SMALL.vocab_size)
    assert out.mlp_acts.shape == (3, SMALL.ctx_len, SMALL.d_mlp)
    assert (out.mlp_acts >= 0).all()  # post-ReLU neurons
    assert model(tokens).mlp_acts is None


def test_mlp_hook_replaces_neurons():
    model = build_model(SMALL, seed=0)
    tokens = torch.randint(0, SMALL.vocab_size, (2, SMALL.ctx_len))
    identity = model(tokens, mlp_hook=lambda a: a).logits
    torch.testing.assert_close(identity, model(tokens).logits)
    assert not torch.allclose(model(tokens, mlp_hook=torch.zeros_like).logits, identity)


def test_causal_masking_future_tokens_never_change_earlier_outputs():
    model = build_model(SMALL, seed=0)
    tokens = torch.randint(0, SMALL.vocab_size, (1, SMALL.ctx_len))
    changed = tokens.clone()
    t = 9
    changed[0, t:] = (changed[0, t:] + 1) % SMALL.vocab_size
    a, b = model(tokens, return_mlp=True), model(changed, return_mlp=True)
    torch.testing.assert_close(a.logits[:, :t], b.logits[:, :t])
    torch.testing.assert_close(a.mlp_acts[:, :t], b.mlp_acts[:, :t])
    assert not torch.allclose(a.logits[:, t:], b.logits[:, t:])


def _train(seed: int, steps: int = 30):
    rng = np.random.default_rng(123)
    # A learnable stream: a noisy cycle through the vocabulary.
    stream = (np.arange(20_000) * 7 + (rng.random(20_000) < 0.1)) % SMALL.vocab_size
    cfg = TrainConfig(steps=steps, batch_size=8, lr=1e-2, warmup_steps=5, eval_every=10, eval_batches=2)
    return train_transformer(stream[:16_000], stream[16_000:], SMALL, cfg, seed=seed, progress=False)


def test_same_seed_gives_identical_weights_and_different_seed_does_not():
    a, b, c = _train(0, steps=5), _train(0, steps=5), _train(1, steps=5)
    for (name, pa), pb, pc in zip(a.model.state_dict().items(), b.model.state_dict().values(), c.model.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.model.parameters(), c.model.parameters()))


def test_training_reduces_heldout_loss_below_unigram():
    result = _train(0, steps=60)
    losses = [h["eval_loss"] for h in result.history]
    assert losses[-1] < losses[0] - 1.0
    rng = np.random.default_rng(123)
    stream = (np.arange(20_000) * 7 + (rng.random(20_000) < 0.1)) % SMALL.vocab_size
    assert result.eval_loss < ngram_baselines(stream[:16_000], stream[16_000:], SMALL.vocab_size, SMALL.ctx_len)["unigram_ce"]


def test_ngram_baselines_match_brute_force():
    rng = np.random.default_rng(0)
    V, ctx = 7, 5
    train, heldout = rng.integers(0, V, 300), rng.integers(0, V, 50)
    got = ngram_baselines(train, heldout, V, ctx)
    pairs = [(c[i], c[i + 1]) for c in heldout[:50].reshape(-1, ctx) for i in range(ctx - 1)]
    uni = np.bincount(train, minlength=V) + 1.0
    big = np.ones((V, V))
    for p, n in zip(train[:-1], train[1:]):
        big[p, n] += 1
    assert got["unigram_ce"] == pytest.approx(-np.mean([np.log(uni[n] / uni.sum()) for _, n in pairs]))
    assert got["bigram_ce"] == pytest.approx(-np.mean([np.log(big[p, n] / big[p].sum()) for p, n in pairs]))
