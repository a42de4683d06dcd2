"""The evaluation stage's one pass: loss recovered from one residual pass against three full forward passes
(float64), the metrics from recorded SAE features against the SAE run again, and a tiny run's metrics against
the five-pass evaluation it replaces (the model and the SAE run again for the neurons, the convergence
diagnostic and each of the three losses)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fast_pipeline import fast_cfg, run_fast
from test_steering import tiny_sae

from models.transformer import OneLayerTransformer, TransformerConfig, cross_entropy, next_token_loss
from sae.checkpoint import load_snapshot
from sae.evaluation import convergence, evaluate_sae, loss_recovered
from universality.analysis import heldout
from universality.core.config import CompareConfig
from universality.measures.correlation import to_csr

CE_KEYS = ("ce_clean", "ce_sae", "ce_zero_ablation")


def reference_losses(model, sae, token_batches, first_position: int) -> dict[str, float]:
    """The three cross-entropies from full forward passes with the MLP hooked: clean, spliced, zero-ablated."""
    def splice(acts):
        return sae(acts.reshape(-1, acts.shape[-1])).x_hat.reshape(acts.shape)

    totals, n = dict.fromkeys(CE_KEYS, 0.0), 0
    with torch.no_grad():
        for tokens in token_batches:
            weight = tokens.shape[0] * (tokens.shape[1] - 1 - first_position)
            for key, hook in zip(CE_KEYS, (None, splice, torch.zeros_like)):
                totals[key] += weight * float(cross_entropy(model(tokens, mlp_hook=hook).logits, tokens, first_position))
            n += weight
    ce = {key: total / n for key, total in totals.items()}
    ce["loss_recovered"] = 1 - (ce["ce_sae"] - ce["ce_clean"]) / (ce["ce_zero_ablation"] - ce["ce_clean"])
    return ce


def float64_model(act_fn: str) -> OneLayerTransformer:
    torch.manual_seed(0)
    model = OneLayerTransformer(TransformerConfig(vocab_size=40, ctx_len=12, d_model=16, d_mlp=24, n_heads=2,
                                                  act_fn=act_fn))
    with torch.no_grad():  # larger weights than the init, so that the MLP and the splice move the loss visibly
        for p in model.parameters():
            p.mul_(10.0)
    return model.double().eval()


@pytest.mark.parametrize("act_fn", ["relu", "gelu"])
@pytest.mark.parametrize("first_position", [0, 1, 3])
def test_one_pass_loss_recovered_equals_three_full_forward_passes(act_fn, first_position):
    model, sae = float64_model(act_fn), tiny_sae(24, 32, 0)
    batches = list(torch.randint(0, 40, (10, 12), generator=torch.Generator().manual_seed(1)).split(4))  # 4, 4, 2
    want = reference_losses(model, sae, batches, first_position)
    got = loss_recovered(model, sae, batches, "cpu", first_position)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=0, abs=1e-12), key
    # the three differ, so each path is checked: the splice is not the identity, the ablation moves the loss
    assert min(abs(want["ce_sae"] - want["ce_clean"]), abs(want["ce_zero_ablation"] - want["ce_sae"])) > 1e-2


@pytest.mark.parametrize("first_position", [0, 2])
def test_next_token_loss_in_chunks_equals_the_whole_batch_cross_entropy(first_position):
    model = float64_model("gelu")
    tokens = torch.randint(0, 40, (5, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        resid, _ = model.residual(tokens)
        want = float(cross_entropy(model.unembed(resid), tokens, first_position))
        for rows in (7, 1, 1000):  # chunks that split contexts, one position each, the whole batch at once
            assert next_token_loss(model, resid, tokens, first_position, chunk_rows=rows) == pytest.approx(want, rel=1e-13)


def test_recorded_features_give_what_running_the_sae_gives():
    """The activations stage's stored features stand in for the SAE: the same metrics, x̂ decoded from them."""
    first, batches = 2, list(torch.randint(0, 40, (10, 12), generator=torch.Generator().manual_seed(2)).split(4))
    for dtype in (torch.float64, torch.float32):
        model, sae = float64_model("relu").to(dtype), tiny_sae(24, 32, 0, dtype)
        with torch.no_grad():
            neurons = [model(b, return_mlp=True).mlp_acts[:, first:].reshape(-1, 24) for b in batches]
            recorded = [to_csr(sae.encode(x)) for x in neurons]
        assert sum(f.nnz for f in recorded) > 0
        want = loss_recovered(model, sae, batches, "cpu", first)
        got = loss_recovered(model, sae, batches, "cpu", first, recorded)
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=0, abs=1e-12 if dtype == torch.float64 else 1e-5), key
    want, got = evaluate_sae(sae, neurons), evaluate_sae(sae, neurons, recorded)  # float32, as the pipeline's
    np.testing.assert_array_equal(got.pop("densities"), want.pop("densities"))
    exact = ("tokens", "l0", "dead_fraction", "dense_fraction", "ultralow_count", "log10_density_hist")
    assert {k: got.pop(k) for k in exact} == {k: want.pop(k) for k in exact}
    assert got == pytest.approx(want, rel=1e-5)  # mse, fvu, l1: x̂ decoded in float64 instead of float32
    earlier = tiny_sae(24, 32, 1, torch.float32)
    cfg = CompareConfig(min_firings=1)
    assert convergence(sae, earlier, neurons, cfg, recorded) == convergence(sae, earlier, neurons, cfg)


def test_a_tiny_runs_evaluation_equals_the_five_pass_evaluation(tmp_path):
    cfg = fast_cfg().replace(sae={"replicates": 0, "precision": "fp32"})  # the stage's matmuls as the reference's
    result = run_fast(tmp_path / "results", [0], cfg)
    model, run_sae = result.models["seed0"].model, result.saes["seed0"]
    skip = cfg.compare.skip_first_positions
    contexts = heldout.eval_contexts(result.dataset.heldout, cfg.data.ctx_len, cfg.compare.tokens)
    neurons = lambda: heldout.mlp_neurons(model, contexts, "cpu", skip, 32)  # noqa: E731  the model run again
    snapshot = load_snapshot(run_sae.directory, "cpu")
    assert snapshot is not None
    want = {**evaluate_sae(run_sae.sae, neurons()), **reference_losses(model, run_sae.sae, contexts.split(32), skip),
            **convergence(run_sae.sae, snapshot, neurons(), cfg.compare)}
    got = run_sae.metrics
    assert got.keys() == want.keys()
    assert got["tokens"] == want["tokens"] == len(contexts) * (cfg.data.ctx_len - skip)
    assert got["log10_density_hist"] == want["log10_density_hist"] and got["ultralow_count"] == want["ultralow_count"]
    np.testing.assert_allclose(got["densities"], want["densities"], rtol=0, atol=1e-12)
    for key in sorted(want.keys() - {"tokens", "densities", "log10_density_hist", "ultralow_count"}):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key


def test_the_unembedding_in_bf16_moves_loss_recovered_by_little(tmp_path):
    """The stage's bf16 unembedding (``sae.precision`` bf16) against float32, on a tiny run's model and SAE."""
    cfg = fast_cfg().replace(sae={"replicates": 0})
    result = run_fast(tmp_path / "results", [0], cfg)
    model, sae = result.models["seed0"].model, result.saes["seed0"].sae
    contexts = heldout.eval_contexts(result.dataset.heldout, cfg.data.ctx_len, cfg.compare.tokens).split(32)
    skip = cfg.compare.skip_first_positions
    want = loss_recovered(model, sae, contexts, "cpu", skip)
    got = loss_recovered(model, sae, contexts, "cpu", skip, matmul_dtype=torch.bfloat16)
    assert got != want  # the bf16 path ran
    for key in CE_KEYS:
        assert got[key] == pytest.approx(want[key], rel=1e-4), key
    assert got["loss_recovered"] == pytest.approx(want["loss_recovered"], abs=1e-3)
