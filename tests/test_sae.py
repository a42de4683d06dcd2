"""SAE package: planted ground truth, the paper's constraints and procedures, checkpoints, CLI."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.optimize
import torch
from click.testing import CliRunner

from models.transformer import OneLayerTransformer, TransformerConfig
from sae.activations import array_chunks, model_activations, shuffled_batches
from sae.base import SAE
from sae.checkpoint import is_complete, load_sae, save_sae
from sae.constrained_adam import ConstrainedAdam
from sae.evaluation import evaluate_sae, loss_recovered
from sae.geometric_median import geometric_median
from sae.registry import build_sae
from sae.resampling import resample_dead
from sae.training import input_scale, train_sae
from universality.cli import main
from universality.config import SAEConfig
from universality.errors import DataError, TrainingDiverged


def sparse_superposition(n: int, n_true: int = 256, d: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations built from a known dictionary: each of ``n_true`` unit directions in ``d`` dims
    fires with probability 0.3-3% at a magnitude in [1, 2]; plus small Gaussian noise."""
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((n_true, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    on = rng.random((n, n_true)) < rng.uniform(0.003, 0.03, n_true)
    x = (rng.uniform(1.0, 2.0, (n, n_true)) * on) @ dirs + 0.01 * rng.standard_normal((n, d))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(dirs, dtype=torch.float32)


def epochs(x: torch.Tensor, batch_size: int, seed: int = 1):
    """Batches of ``x`` in a fresh random order every epoch, forever."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield from x[torch.randperm(len(x), generator=g)].split(batch_size)


def small_cfg(**kw) -> SAEConfig:
    base = dict(dict_size=128, batch_size=256, samples=256 * 40, lr=3e-3, l1_coeff=0.03, k=8,
                resample_inputs=1024, resample_fractions=(0.5,), dead_window_fraction=0.1)
    return SAEConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def planted() -> tuple[torch.Tensor, torch.Tensor]:
    return sparse_superposition(100_000)


@pytest.fixture
def one_thread():
    """Small matmuls run faster (and steadier on a shared machine) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- planted ground truth -------------------------------------------------------------------

def test_train_sae_defaults_recover_a_planted_dictionary(planted, tmp_path):
    """`univ train-sae ACTS.npy --out DIR` with no tuning gives a good SAE on well-scaled data."""
    x, true_dirs = planted
    np.save(tmp_path / "acts.npy", x.numpy())
    result = CliRunner().invoke(main, ["train-sae", str(tmp_path / "acts.npy"), "--out", str(tmp_path / "sae")])
    assert result.exit_code == 0, result.output
    W_dec = load_sae(tmp_path / "sae").W_dec.detach()
    assert (true_dirs @ (W_dec / W_dec.norm(dim=1, keepdim=True)).T).max(dim=1).values.mean() >= 0.95


@pytest.mark.parametrize("arch, samples, extra", [
    ("relu", 1_000_000, {"l1_coeff": 0.03}),
    ("topk", 400_000, {"k": 8}),
])
def test_recovers_planted_dictionary(planted, one_thread, arch, samples, extra):
    x, true_dirs = planted
    cfg = SAEConfig(arch=arch, dict_size=512, batch_size=256, samples=samples, lr=3e-3, resample_inputs=8192,
                    resample_fractions=(0.25, 0.5), dead_window_fraction=0.05, **extra)
    trained = train_sae(epochs(x, 256), cfg, 64, seed=0, progress=False)
    W_dec = trained.sae.W_dec.detach()
    max_cos = (true_dirs @ (W_dec / W_dec.norm(dim=1, keepdim=True)).T).max(dim=1).values
    assert max_cos.mean() >= 0.95
    metrics = evaluate_sae(trained.sae, x[-8192:].split(1024))  # raw scale: the input scale is folded in
    assert metrics["fvu"] < 0.2 and metrics["l0"] < 30


# ---- unit-norm decoder ----------------------------------------------------------------------

def test_decoder_rows_stay_unit_norm_and_parallel_grad_is_removed():
    torch.manual_seed(0)
    sae = build_sae(small_cfg(), 16)
    opt = ConstrainedAdam(sae.parameters(), [sae.W_dec], lr=1e-2)
    x = torch.randn(64, 16)
    for _ in range(5):
        opt.zero_grad()
        sae.loss(x).loss.backward()
        grad_before = sae.W_dec.grad.clone()
        W_before = sae.W_dec.detach().clone()
        opt.step()
        parallel = (sae.W_dec.grad * W_before).sum(dim=1)
        assert torch.allclose(parallel, torch.zeros_like(parallel), atol=1e-6)
        assert (grad_before * W_before).sum(dim=1).abs().max() > 1e-4  # there was something to remove
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae), atol=1e-5)


def test_relu_fused_l1_gradient_matches_reference():
    """ReLUSAE.loss fuses the L1 gradient into the ReLU; SAE.loss is the plain autograd reference."""
    torch.manual_seed(0)
    sae = build_sae(small_cfg(dict_size=64, l1_coeff=0.1), 16)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.3)
    x = torch.randn(128, 16)
    results = []
    for loss_fn in (type(sae).loss, SAE.loss):
        sae.zero_grad()
        out = loss_fn(sae, x)
        out.loss.backward()
        results.append((out, {name: p.grad.clone() for name, p in sae.named_parameters()}))
    (fast, fast_grads), (ref, ref_grads) = results
    for field in ("loss", "mse", "l1"):
        assert torch.allclose(getattr(fast, field), getattr(ref, field), rtol=1e-5)
    assert torch.equal(fast.fired_F, ref.fired_F)
    for name, grad in ref_grads.items():
        assert torch.allclose(fast_grads[name], grad, rtol=1e-4, atol=1e-6), name


# ---- geometric median -----------------------------------------------------------------------

def test_geometric_median_matches_direct_minimisation():
    rng = np.random.default_rng(0)
    points = rng.standard_normal((200, 5))
    points[:20] += 50.0  # outliers drag the mean, barely the median
    gm = geometric_median(torch.tensor(points)).numpy()
    ref = scipy.optimize.minimize(lambda m: np.linalg.norm(points - m, axis=1).sum(), points.mean(0),
                                  method="Nelder-Mead", options={"xatol": 1e-9, "fatol": 1e-9, "maxiter": 20000}).x
    cost = lambda m: np.linalg.norm(points - m, axis=1).sum()
    assert cost(gm) <= cost(ref) + 1e-6
    assert np.linalg.norm(gm - ref) < 1e-3
    assert np.linalg.norm(gm) < 2.0 < np.linalg.norm(points.mean(0))


def test_geometric_median_known_cases():
    # The median of a point set symmetric about c is c; 3 collinear points: the middle one.
    square = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]]) + 3.0
    assert torch.allclose(geometric_median(square), torch.tensor([4.0, 4.0]), atol=1e-5)
    line = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    assert torch.allclose(geometric_median(line), torch.tensor([1.0, 0.0]), atol=1e-4)


# ---- resampling -----------------------------------------------------------------------------

def test_resampling_revives_planted_dead_features_and_resets_adam():
    torch.manual_seed(0)
    sae = build_sae(small_cfg(dict_size=64), 16)
    opt = ConstrainedAdam(sae.parameters(), [sae.W_dec], lr=1e-3)
    x = torch.randn(2048, 16)
    opt.zero_grad()
    sae.loss(x).loss.backward()
    opt.step()  # creates Adam state
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:10] = True
    with torch.no_grad():
        sae.b_enc[dead] = -1e6
    assert (sae.encode(x)[:, dead] > 0).sum() == 0
    alive_norm = sae.W_enc[:, ~dead].norm(dim=0).mean()

    n = resample_dead(sae, opt, dead, x, torch.Generator().manual_seed(0))
    assert n == 10
    assert ((sae.encode(x)[:, dead] > 0).sum(dim=0) > 0).all()
    assert torch.allclose(sae.W_dec[dead].norm(dim=1), torch.ones(10), atol=1e-5)
    assert torch.allclose(sae.W_enc[:, dead].norm(dim=0), 0.2 * alive_norm.expand(10), atol=1e-5)
    assert (sae.b_enc[dead] == 0).all()
    for param, cols in ((sae.W_dec, lambda t: t[dead]), (sae.W_enc, lambda t: t[:, dead]), (sae.b_enc, lambda t: t[dead])):
        state = opt.state[param]
        assert (cols(state["exp_avg"]) == 0).all() and (cols(state["exp_avg_sq"]) == 0).all()
    assert (opt.state[sae.W_dec]["exp_avg_sq"][~dead] != 0).any()  # untouched rows keep their state


def test_training_resamples_features_that_never_fire():
    x, _ = sparse_superposition(8192, d=16, n_true=32)
    trained = train_sae(epochs(x, 256), small_cfg(l1_coeff=10.0, lr=3e-2), 16, seed=0, progress=False)
    assert trained.resampling_events and trained.resampling_events[0]["step"] == 20
    assert trained.resampling_events[0]["n_resampled"] > 0  # a large λ kills features


# ---- loss recovered, evaluation -------------------------------------------------------------

class _FixedSAE(SAE):
    """A stand-in "SAE" whose reconstruction is the identity or zero."""

    arch = "relu"

    def __init__(self, d: int, identity: bool):
        super().__init__(d, SAEConfig(dict_size=d, samples=4096))
        with torch.no_grad():
            self.W_enc.copy_(torch.eye(d) * identity)
            self.W_dec.copy_(torch.eye(d))


def test_loss_recovered_identity_is_one_and_zero_is_zero():
    torch.manual_seed(0)
    model = OneLayerTransformer(TransformerConfig(vocab_size=64, ctx_len=16, d_model=16, d_mlp=32, n_heads=2))
    tokens = [torch.randint(0, 64, (4, 16)) for _ in range(2)]
    ident = loss_recovered(model, _FixedSAE(32, identity=True), tokens, "cpu")  # MLP acts are >= 0: relu is exact
    zero = loss_recovered(model, _FixedSAE(32, identity=False), tokens, "cpu")
    assert ident["loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert zero["loss_recovered"] == pytest.approx(0.0, abs=1e-5)
    assert ident["ce_zero_ablation"] != pytest.approx(ident["ce_clean"])


def test_evaluate_sae_counts_dead_and_dense_features():
    sae = _FixedSAE(8, identity=True)
    x = torch.rand(1000, 8)
    x[:, 0] = -1.0  # feature 0 never fires
    m = evaluate_sae(sae, x.split(100))
    assert m["dead_fraction"] == pytest.approx(1 / 8) and m["dense_fraction"] == pytest.approx(7 / 8)
    assert m["ultralow_count"] == 0 and m["densities"].shape == (8,)
    assert sum(m["log10_density_hist"]["counts"]) == 7
    assert m["l0"] == pytest.approx(7.0, abs=0.01)


# ---- checkpoints and the input scale --------------------------------------------------------

def test_checkpoint_round_trip_and_raw_scale_equivalence(tmp_path):
    x = sparse_superposition(4096, d=16, n_true=32)[0] * 37.0  # far from unit scale
    cfg = small_cfg(resample_fractions=())
    trained = train_sae(epochs(x, 256), cfg, 16, seed=0, progress=False)
    s = trained.input_scale
    assert s == pytest.approx(input_scale(x[:4096]), rel=0.05)

    out = save_sae(trained, cfg, tmp_path / "sae", metrics={"fvu": 0.1, "densities": np.zeros(3)})
    assert is_complete(out)
    loaded = load_sae(out)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(loaded, name), getattr(trained.sae, name))
    assert torch.equal(loaded.encode(x[:64]), trained.sae.encode(x[:64]))

    # The folded SAE on raw x reconstructs exactly what the unfolded one did on normalized x, scaled back.
    unfolded = build_sae(cfg, 16)
    unfolded.load_state_dict(trained.sae.state_dict())
    with torch.no_grad():
        unfolded.b_enc *= s
        unfolded.b_dec *= s
    assert torch.allclose(loaded(x[:64]).x_hat, unfolded(x[:64] * s).x_hat / s, rtol=1e-4, atol=1e-4)


def test_incomplete_checkpoint_is_refused(tmp_path):
    (tmp_path / "cfg.json").write_text("{}")
    with pytest.raises(DataError, match="not a complete"):
        load_sae(tmp_path)


# ---- determinism, divergence ----------------------------------------------------------------

def test_same_seed_gives_identical_weights():
    x, _ = sparse_superposition(4096, d=16, n_true=32)
    runs = [train_sae(epochs(x, 256), small_cfg(arch=arch), 16, seed=3, progress=False) for arch in ("relu", "relu", "topk", "topk")]
    for a, b in (runs[0:2], runs[2:4]):
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert torch.equal(getattr(a.sae, name), getattr(b.sae, name))
        assert a.history == b.history
    other = train_sae(epochs(x, 256), small_cfg(), 16, seed=4, progress=False)
    assert not torch.equal(other.sae.W_dec, runs[0].sae.W_dec)


def test_divergence_raises():
    x = torch.randn(1024, 8)
    with pytest.raises(TrainingDiverged, match="diverged at step"):
        train_sae(epochs(x, 256), small_cfg(lr=1e30, dict_size=16), 8, seed=0, progress=False)


# ---- activation sources ---------------------------------------------------------------------

def test_shuffled_batches_cover_and_mix_rows():
    rows = torch.arange(1000, dtype=torch.float32)[:, None]
    chunks = (rows[i : i + 100] for i in range(0, 1000, 100))
    batches = list(shuffled_batches(chunks, buffer_size=400, batch_size=50, generator=torch.Generator().manual_seed(0)))
    seen = torch.cat(batches).squeeze(1)
    assert all(len(b) == 50 for b in batches) and len(seen.unique()) == len(seen)
    assert not torch.equal(seen, seen.sort().values)


def test_model_activations_shape():
    model = OneLayerTransformer(TransformerConfig(vocab_size=64, ctx_len=16, d_model=16, d_mlp=32, n_heads=2))
    tokens = np.random.default_rng(0).integers(0, 64, 500)
    acts = list(itertools.islice(model_activations(model, tokens, 16, 4, "cpu", seed=0), 3))
    assert all(a.shape == (64, 32) and a.dtype == torch.float32 for a in acts)


def test_array_chunks_one_pass_in_order(tmp_path):
    arr = np.arange(30, dtype=np.float32).reshape(10, 3)
    assert torch.equal(torch.cat(list(array_chunks(arr, 4, seed=None))), torch.from_numpy(arr))


# ---- the CLI --------------------------------------------------------------------------------

@pytest.mark.parametrize("array, args, message", [
    (np.zeros((100, 3, 2), np.float32), [], "2-D"),
    (np.full((300, 4), np.nan, np.float32), [], "NaN"),
    (np.ones((100, 4), np.float32), [], "fewer than one batch"),
    (np.ones((300, 4), np.float32), ["--arch", "topk", "--k", "32", "--dict-size", "32"], "sae.k"),
    (np.ones((300, 4), np.float32), ["--dict-size", "0"], "dict_size"),
])
def test_cli_rejects_bad_input(tmp_path, array, args, message):
    np.save(tmp_path / "acts.npy", array)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["train-sae", str(tmp_path / "acts.npy"), "--out", str(out),
                                       "--batch-size", "256", *args])
    assert result.exit_code == 1
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_unknown_arch_is_a_usage_error(tmp_path):
    np.save(tmp_path / "acts.npy", np.ones((300, 4), np.float32))
    result = CliRunner().invoke(main, ["train-sae", str(tmp_path / "acts.npy"), "--out", str(tmp_path / "o"), "--arch", "gated"])
    assert result.exit_code == 2 and not (tmp_path / "o").exists()


def test_cli_trains_and_writes_checkpoint(tmp_path):
    x, _ = sparse_superposition(6000, d=16, n_true=32)
    np.save(tmp_path / "acts.npy", x.numpy())
    out = tmp_path / "sae"
    result = CliRunner().invoke(main, ["train-sae", str(tmp_path / "acts.npy"), "--out", str(out), "--batch-size", "256",
                                       "--samples", "20000", "--arch", "topk", "--k", "4"])
    assert result.exit_code == 0, result.output
    assert is_complete(out) and load_sae(out).d_sae == 128
    assert "fvu" in result.output
