"""The sparse SAE step (sae.sparse) against the dense float64 reference, finite differences and the dense bf16 step."""

from __future__ import annotations

import pytest
import torch

from sae.base import SAE
from sae.registry import build_sae
from sae.relu import ReLUSAE
from sae.sparse import Active, _ActivePreActs, _ActiveSquaredError, _stable_order, sparse_max_density
from sae.training import train_sae
from universality.core.config import SAEConfig


def graph_ops(t: torch.Tensor) -> set[str]:
    """Names of the autograd nodes ``t`` was computed through."""
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return {node.name() for node in seen}


def float64_sae(arch: str, k: int = 8) -> SAE:
    torch.manual_seed(0)
    cfg = SAEConfig(arch=arch, dict_size=64, k=k, l1_coeff=0.1, samples=4096)
    sae = build_sae(cfg, 16).double()
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.3)
    return sae


def loss_and_grads(sae: SAE, loss_fn, x: torch.Tensor, dead: torch.Tensor | None):
    sae.zero_grad()
    out = loss_fn(sae, x, dead)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in sae.named_parameters()}


@pytest.mark.parametrize("arch, k, max_density, sparse_ops", [
    ("relu", 8, 0.0, {"_ReLUEncoderBackward"}),  # dense, with the L1 gradient fused into the encoder
    ("relu", 8, 1.0, {"_ActivePreActsBackward", "_ActiveSquaredErrorBackward"}),
    ("topk", 8, 1.0, {"_ActivePreActsBackward", "_ActiveSquaredErrorBackward"}),  # AuxK sparse too
    ("topk", 4, 0.1, {"_ActivePreActsBackward", "_ActiveSquaredErrorBackward", "MmBackward0"}),  # k/F sparse, k_aux/F dense
])
def test_loss_matches_dense_float64_reference(arch, k, max_density, sparse_ops):
    """Every path of ``loss`` against ``SAE.loss``, the plain dense autograd reference, in float64: the loss,
    its parts, the firing counts and every gradient, dead latents included (AuxK on 20 of 64)."""
    sae = float64_sae(arch, k)
    x = torch.randn(128, 16, dtype=torch.float64)
    dead = torch.arange(64) < 20
    sae.sparse_max_density = 0.0
    ref, ref_grads = loss_and_grads(sae, SAE.loss, x, dead)
    sae.sparse_max_density = max_density
    fast, fast_grads = loss_and_grads(sae, type(sae).loss, x, dead)
    assert sparse_ops <= graph_ops(fast.loss)
    assert ref.aux > 0 if arch == "topk" else ref.aux == 0
    for field in ("loss", "mse", "l1", "aux"):
        assert torch.allclose(getattr(fast, field), getattr(ref, field), rtol=1e-12, atol=1e-15), field
    assert torch.equal(fast.fires_F, ref.fires_F) and int(ref.fires_F.sum()) > 0
    for name, grad in ref_grads.items():
        assert grad.abs().max() > 0
        assert torch.allclose(fast_grads[name], grad, rtol=1e-10, atol=1e-14), name


def test_relu_takes_the_sparse_step_only_while_few_features_are_active():
    """Dense above ``sparse_max_density`` (the first steps of training), sparse at or below it."""
    sae = float64_sae("relu")
    x = torch.randn(128, 16, dtype=torch.float64)
    density = float((sae.pre_acts(x) > 0).double().mean())
    for max_density, expect_sparse in ((density * 0.99, False), (density, True), (0.0, False)):
        sae.sparse_max_density = max_density
        assert ("_ActiveSquaredErrorBackward" in graph_ops(sae.loss(x).loss)) == expect_sparse, max_density


def test_sparse_backwards_match_finite_differences():
    """gradcheck (float64) of the two sparse autograd functions, every differentiable input, with a row
    that has no active latent and latents active on no row."""
    g = torch.Generator().manual_seed(0)
    B, D, F = 6, 4, 7
    mask = torch.rand(B, F, generator=g) < 0.4
    mask[2] = False
    mask[:, 5] = False
    active = Active.where(mask)
    x, W_enc, b_enc, b_dec = (torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
                              for shape in ((B, D), (D, F), (F,), (D,)))

    def pre_acts(x, W_enc, b_enc, b_dec):
        pre = ((x - b_dec) @ W_enc + b_enc).detach()  # the dense forward the sparse function gathers from
        return _ActivePreActs.apply(x, W_enc, b_enc, b_dec, pre, active)

    assert torch.autograd.gradcheck(pre_acts, (x, W_enc, b_enc, b_dec))
    vals = torch.rand(len(active), generator=g, dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn(F, D, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: _ActiveSquaredError.apply(*a, active)[0], (vals, W_dec, b_dec, target))
    assert torch.autograd.gradcheck(lambda *a: _ActiveSquaredError.apply(a[0], a[1], None, a[2], active)[0],
                                    (vals, W_dec, target))  # no bias (AuxK)


def test_active_pairs_match_the_dense_mask_and_topk():
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(5, 9, generator=g) < 0.3
    active = Active.where(mask)
    rebuilt = torch.zeros_like(mask)
    rebuilt[active.rows_N, active.latents_N] = True
    assert torch.equal(rebuilt, mask) and active.density() == pytest.approx(float(mask.double().mean()))
    for starts, keys in ((active.row_starts_B, active.rows_N), (active.latent_starts_F, active.latents_N[active.by_latent_N])):
        assert torch.equal(starts, torch.searchsorted(keys, torch.arange(len(starts))))  # first pair of each group
    assert torch.equal(active.rows_by_latent_N, active.rows_N[active.by_latent_N])
    assert torch.equal(active.flat_N, mask.flatten().nonzero().squeeze(1))
    assert torch.equal(active.latent_counts_F, mask.sum(dim=0))
    idx = torch.tensor([[0, 3], [1, 2]])
    topk = Active.at(idx, 4)
    assert topk.rows_N.tolist() == [0, 0, 1, 1] and topk.latents_N.tolist() == [0, 3, 1, 2]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("n_latents", [64, 66, 67])  # whole words of lanes, and not
def test_positive_features_are_found_word_by_word_as_the_dense_mask_finds_them(dtype, n_latents):
    g = torch.Generator().manual_seed(2)
    f = torch.relu(torch.randn(33, n_latents, generator=g) - 1.5).to(dtype)
    f[3, :8] = -0.0  # a ReLU of -0.0 is -0.0: a nonzero word, no active feature
    f[5] = 0.0  # a row with no active feature
    f[:, 1] = torch.rand(33, generator=g).to(dtype) + 1  # a latent active on every row
    want = Active.where(f > 0)
    got = Active.positive(f, max_density=1.0)
    for field in ("rows_N", "latents_N", "flat_N", "row_starts_B", "by_latent_N", "rows_by_latent_N", "latent_counts_F",
                  "latent_starts_F"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    f[3, :8] = f[3, :8].abs()  # -0.0 -> 0.0 (a -0.0 word counts as active for the first, coarse check only: see Active.positive)
    n_active = len(want)
    assert Active.positive(f, (n_active + 0.5) / f.numel()) is not None
    assert Active.positive(f, (n_active - 0.5) / f.numel()) is None  # one too many: the dense step


def test_the_latent_order_is_a_stable_argsort_for_any_dictionary_size():
    g = torch.Generator().manual_seed(3)
    for n_latents in (7, 1 << 16, (1 << 16) + 1):  # a radix sort of uint16 ids up to 16 bits, a merge sort beyond
        latents = torch.randint(0, n_latents, (5000,), generator=g)
        assert torch.equal(torch.from_numpy(_stable_order(latents.numpy(), n_latents)), torch.argsort(latents, stable=True))


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_sparse_bf16_step_follows_the_dense_bf16_step(arch):
    """bf16 matmuls (the trainer's "auto" on AVX512-BF16 CPUs): the sparse step's loss and gradients
    agree with the dense bf16 step's to bf16 rounding."""
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(arch=arch, dict_size=512, k=8, l1_coeff=0.03, samples=4096), 64)
    x = torch.randn(512, 64).relu()
    with torch.no_grad():
        sae.b_enc.fill_(-0.6)  # a few percent of the features active, as late in training
    sae.matmul_dtype = torch.bfloat16
    results = []
    for max_density in (0.0, 1.0):
        sae.zero_grad()
        sae.sparse_max_density = max_density
        out = sae.loss(x, torch.arange(512) < 32)
        out.loss.backward()
        results.append((out, torch.cat([p.grad.flatten() for p in sae.parameters()])))
    (dense, g_dense), (sparse, g_sparse) = results
    assert sparse.loss.item() == pytest.approx(dense.loss.item(), rel=0.005)
    assert torch.nn.functional.cosine_similarity(g_sparse, g_dense, dim=0) > 0.999


def test_trainer_allows_sparse_steps_on_cpu_and_returns_a_plain_sae(monkeypatch):
    """Training asks the SAE for sparse steps up to the device's density; the trained SAE, like a loaded
    one, computes densely."""
    assert sparse_max_density("cpu") > 0 and sparse_max_density(torch.device("cuda", 0)) == 0
    allowed = []
    real = ReLUSAE.loss
    monkeypatch.setattr(ReLUSAE, "loss", lambda self, *args: allowed.append(self.sparse_max_density) or real(self, *args))
    x = torch.randn(2048, 16).relu()
    cfg = SAEConfig(dict_size=64, batch_size=256, samples=256 * 8, resample_fractions=(), l1_coeff=0.03)
    trained = train_sae(iter(x.split(256)), cfg, 16, seed=0, progress=False)
    assert len(allowed) == 8 and set(allowed) == {sparse_max_density("cpu")}
    assert trained.sae.sparse_max_density == 0 and trained.sae.matmul_dtype is None
