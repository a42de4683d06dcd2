"""The tokenized SAE (sae/tokenized.py): the ReLU SAE with a per-token decoder bias b_tok [V, D]."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fast_pipeline import fast_cfg, run_fast
from sae.checkpoint import load_sae, load_snapshot, save_sae
from sae.evaluation import evaluate_sae, reconstruct
from sae.registry import build_sae
from sae.training import train_sae
from universality.analysis.steering import feature_hook
from universality.core.config import SAEConfig
from universality.core.errors import ConfigError, DataError, UnivError
from universality.measures.correlation import to_csr
from universality.outputs.transformer_lens import saelens_cfg

ARCH = "relu-tokenized"


def random_sae(d_in: int = 12, dict_size: int = 40, vocab: int = 7, seed: int = 0):
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(arch=ARCH, dict_size=dict_size, l1_coeff=0.01), d_in, vocab_size=vocab).double()
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_enc.uniform_(-2.0, 0.5)
        sae.b_dec.normal_()
        sae.b_tok.normal_()
    return sae


def reference_loss(sae, x, tokens):
    """Written out from the formula: f = ReLU((x − b_tok[t] − b_dec) W_enc + b_enc), x̂ = f W_dec + b_dec + b_tok[t]."""
    f = torch.relu((x - sae.b_tok[tokens] - sae.b_dec) @ sae.W_enc + sae.b_enc)
    x_hat = f @ sae.W_dec + sae.b_dec + sae.b_tok[tokens]
    return (x_hat - x).pow(2).mean() + sae.cfg.l1_coeff * f.sum(dim=1).mean()


@pytest.mark.parametrize("max_density", [0.0, 1.0])  # the dense step and the sparse one
def test_loss_and_gradients_match_float64_reference(max_density):
    sae = random_sae()
    x = torch.randn(30, 12, dtype=torch.float64)
    tokens = torch.randint(0, 7, (30,))
    sae.sparse_max_density = max_density
    got = sae.loss(x, None, tokens)
    got.loss.backward()
    grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    want = reference_loss(sae, x, tokens)
    want.backward()
    assert got.loss.item() == pytest.approx(want.item(), rel=1e-12)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-12, msg=name)
    seen = torch.zeros(7, dtype=torch.bool).index_fill_(0, tokens, True)
    assert (grads["b_tok"].abs().sum(dim=1) > 0).tolist() == seen.tolist()  # a token's bias learns from its rows only


def test_every_entry_point_needs_the_tokens_and_adds_their_bias():
    sae = random_sae()
    x, tokens = torch.randn(20, 12, dtype=torch.float64), torch.randint(0, 7, (20,))
    out = sae(x, tokens)
    with torch.no_grad():
        recorded = to_csr(sae.encode(x, tokens))
        x_hat, _, _ = reconstruct(sae, x, recorded, tokens)  # the evaluation's path: decoded from recorded features
    torch.testing.assert_close(x_hat, out.x_hat.detach())
    torch.testing.assert_close(out.x_hat, out.f @ sae.W_dec + sae.b_dec + sae.b_tok[tokens])
    for call in (lambda: sae(x), lambda: sae.encode(x), lambda: sae.loss(x), lambda: sae(x, tokens[:5])):
        with pytest.raises(DataError, match="current token"):
            call()
    with pytest.raises(ConfigError, match="vocabulary size"):
        build_sae(SAEConfig(arch=ARCH), 12)
    with pytest.raises(UnivError, match="cannot be set through an MLP hook"):
        feature_hook(sae, [0])


def planted(n: int, seed: int = 0, vocab: int = 16, d: int = 32, n_context: int = 24):
    """Each row: its token's own offset (norm about 3, twice a feature's) plus a few of ``n_context`` context features
    (each its own unit direction, firing with probability 5% at a magnitude in [1, 2]). Returns (x, tokens, offsets,
    dirs)."""
    rng = np.random.default_rng(seed)
    offsets = 3.0 * rng.standard_normal((vocab, d)) / np.sqrt(d)
    dirs = rng.standard_normal((n_context, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    tokens = rng.integers(0, vocab, n)
    codes = rng.uniform(1.0, 2.0, (n, n_context)) * (rng.random((n, n_context)) < 0.05)
    x = offsets[tokens] + codes @ dirs + 0.01 * rng.standard_normal((n, d))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(tokens), offsets, dirs


def epochs(x, tokens, batch_size, seed=1, with_tokens=True):
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(x), generator=g)
        for idx in order.split(batch_size):
            yield (x[idx], tokens[idx]) if with_tokens else x[idx]


def test_planted_context_features_are_recovered_and_the_lookup_table_takes_the_tokens(one_thread):
    """The per-token bias learns each token's offset, so the dictionary holds the context features alone (>= 90% at
    decoder cosine > 0.9, L0 within 3x the planted 1.2); the plain ReLU SAE on the same data spends features on tokens."""
    x, tokens, offsets, dirs = planted(60_000)
    cfg = SAEConfig(arch=ARCH, dict_size=64, batch_size=256, samples=256 * 600, lr=3e-3, l1_coeff=0.02,
                    resample_inputs=4096, resample_fractions=(0.25, 0.5), dead_window_fraction=0.05)
    trained = train_sae(epochs(x[:-8192], tokens[:-8192], 256), cfg, 32, seed=0, progress=False, vocab_size=16)
    sae = trained.sae
    unit = (sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)).detach().numpy()
    assert ((dirs @ unit.T).max(axis=1) > 0.9).mean() >= 0.9
    baseline = (sae.b_dec + sae.b_tok).detach().numpy()  # what the SAE predicts with no feature active
    assert np.abs(baseline - offsets).max() < 0.1 * np.abs(offsets).max()
    held, held_tokens = x[-8192:], tokens[-8192:]
    metrics = evaluate_sae(sae, held.split(1024), tokens=held_tokens.split(1024))
    assert metrics["fvu"] < 0.05 and metrics["l0"] < 3 * (24 * 0.05)  # planted: 1.2 context features per row
    plain = train_sae(epochs(x[:-8192], tokens[:-8192], 256, with_tokens=False), SAEConfig(**{**cfg.__dict__, "arch": "relu"}),
                      32, seed=0, progress=False)
    assert evaluate_sae(plain.sae, held.split(1024))["l0"] > 1.5 * metrics["l0"]


def test_checkpoint_round_trip_keeps_the_lookup_table(tmp_path, one_thread):
    x, tokens, _, _ = planted(4096, vocab=8, d=16, n_context=8)
    cfg = SAEConfig(arch=ARCH, dict_size=32, batch_size=256, samples=256 * 20)
    trained = train_sae(epochs(x, tokens, 256), cfg, 16, seed=0, progress=False, vocab_size=8)
    save_sae(trained, cfg, tmp_path)
    loaded, snapshot = load_sae(tmp_path), load_snapshot(tmp_path)
    assert torch.equal(loaded.b_tok, trained.sae.b_tok) and loaded.b_tok.abs().sum() > 0
    assert torch.equal(loaded(x, tokens).x_hat, trained.sae(x, tokens).x_hat)
    assert torch.equal(snapshot.b_tok, trained.snapshot["b_tok"])
    import json

    saved_cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert saved_cfg["architecture"] == ARCH and saved_cfg["vocab_size"] == 8
    with pytest.raises(UnivError, match="no SAELens equivalent"):
        saelens_cfg(saved_cfg, "m", 16)
    with pytest.raises(DataError, match="needs token ids"):
        train_sae(epochs(x, tokens, 256, with_tokens=False), cfg, 16, seed=0, progress=False, vocab_size=8)
    with pytest.raises(DataError, match="reads no token ids"):
        train_sae(epochs(x, tokens, 256), SAEConfig(dict_size=32, batch_size=256, samples=2560), 16, seed=0, progress=False)


def test_a_run_with_tokenized_saes_goes_end_to_end(tmp_path):
    cfg = fast_cfg().replace(sae={"arch": ARCH, "replicates": 0}, compare={"randomized_baseline": False})
    result = run_fast(tmp_path / "results", [0, 1], cfg)
    assert set(result.saes) == {"seed0", "seed1"} and all(run.sae.reads_tokens for run in result.saes.values())
    assert all(0 < run.metrics["fvu"] < 1 and np.isfinite(run.metrics["loss_recovered"]) for run in result.saes.values())
    assert 0 < result.summary["features.max_corr_median_mean"] <= 1
