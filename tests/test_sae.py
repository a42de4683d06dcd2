"""SAE package: planted ground truth, the paper's constraints and procedures, checkpoints, CLI."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import scipy.optimize
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from models.transformer import OneLayerTransformer, TransformerConfig
from sae.activations import array_chunks, model_activations, shuffled_batches
from sae.base import SAE
from sae.checkpoint import is_complete, load_sae, load_snapshot, save_sae
from sae.constrained_adam import ConstrainedAdam
from sae.evaluation import evaluate_sae, loss_recovered
from sae.geometric_median import geometric_median
from sae.registry import build_sae
from sae.resampling import resample_dead
from sae.training import fraction_step, input_scale, lr_factor, resolve_precision, train_sae
from universality.cli import main
from universality.core.config import SAEConfig
from universality.core.errors import DataError, TrainingDiverged


def sparse_superposition(n: int, n_true: int = 256, d: int = 64, seed: int = 0, heavy_tail: float = 0.0,
                         offset: float = 0.0, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations built from a known dictionary: each of ``n_true`` unit directions in ``d`` dims
    fires with probability 0.3-3% at a magnitude in [1, 2] (``heavy_tail`` > 0: lognormal with that σ and
    median 1 instead); plus small Gaussian noise, a fixed centre of norm ``offset``, all times ``scale``."""
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((n_true, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    on = rng.random((n, n_true)) < rng.uniform(0.003, 0.03, n_true)
    magnitudes = rng.lognormal(0.0, heavy_tail, (n, n_true)) if heavy_tail > 0 else rng.uniform(1.0, 2.0, (n, n_true))
    centre = rng.standard_normal(d)
    centre *= offset / np.linalg.norm(centre)
    x = scale * ((magnitudes * on) @ dirs + 0.01 * rng.standard_normal((n, d)) + centre)
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


# ---- planted ground truth -------------------------------------------------------------------

def test_train_sae_defaults_recover_a_planted_dictionary(planted, tmp_path, one_thread):
    """`univ train-sae ACTS.npy --out DIR` with no tuning gives a good SAE on well-scaled data."""
    x, true_dirs = planted
    np.save(tmp_path / "acts.npy", x.numpy())
    result = CliRunner().invoke(main, ["train-sae", str(tmp_path / "acts.npy"), "--out", str(tmp_path / "sae")])
    assert result.exit_code == 0, result.output
    W_dec = load_sae(tmp_path / "sae").W_dec.detach()
    assert (true_dirs @ (W_dec / W_dec.norm(dim=1, keepdim=True)).T).max(dim=1).values.mean() >= 0.95


def test_train_sae_defaults_recover_heavy_tailed_off_centre_rescaled_features(tmp_path, one_thread):
    """The defaults on harder data: lognormal magnitudes (σ 0.5: a tenth of the firings above 1.9x the
    median, a tenth below 0.53x), inputs off-centre (a fixed centre of norm 3, about half the typical
    signal norm) and far from unit scale (x 37). The planted directions are found (mean best cosine >= 0.95)
    with an L0 near the planted one (at most 2.5x; λ ∝ 1/√d gave 5x here). All the default samples: at a
    quarter or half of them (or half the rows) the dictionary is not found yet (0.77-0.92)."""
    x, true_dirs = sparse_superposition(100_000, heavy_tail=0.5, offset=3.0, scale=37.0)
    planted_l0 = 256 * (0.003 + 0.03) / 2  # n_true x the mean firing probability
    np.save(tmp_path / "acts.npy", x.numpy())
    result = CliRunner().invoke(main, ["train-sae", str(tmp_path / "acts.npy"), "--out", str(tmp_path / "sae")])
    assert result.exit_code == 0, result.output
    W_dec = load_sae(tmp_path / "sae").W_dec.detach()
    assert (true_dirs @ (W_dec / W_dec.norm(dim=1, keepdim=True)).T).max(dim=1).values.mean() >= 0.95
    assert json.loads((tmp_path / "sae" / "metrics.json").read_text())["l0"] <= 2.5 * planted_l0


@pytest.mark.parametrize("arch, samples, extra", [
    ("relu", 250_000, {"l1_coeff": 0.03}),
    ("topk", 150_000, {"k": 8}),
])
def test_recovers_planted_dictionary_in_fp32_and_bf16(planted, one_thread, arch, samples, extra):
    """Both precisions find the planted directions (mean best cosine >= 0.95) and reconstruct held-out
    inputs equally well: their FVUs agree within 0.01 (bf16 rounds each matmul input to 8 bits of
    mantissa; the weights, Adam and the loss stay float32). Batches of 64: more steps per sample find the
    dictionary in a quarter of the samples that batches of 256 need (ReLU: best cosine 0.985 at 250K against
    0.88 at 400K), which matters where bf16 is emulated (CPUs without AVX512-BF16: 4-7x fp32's time)."""
    x, true_dirs = planted
    fvus = []
    for precision in ("fp32", "bf16"):
        cfg = SAEConfig(arch=arch, dict_size=512, batch_size=64, samples=samples, lr=3e-3, resample_inputs=8192,
                        resample_fractions=(0.25, 0.5), dead_window_fraction=0.05, precision=precision, **extra)
        trained = train_sae(epochs(x, 64), cfg, 64, seed=0, progress=False)
        assert trained.precision == precision and trained.sae.matmul_dtype is None  # evaluated in float32
        W_dec = trained.sae.W_dec.detach()
        max_cos = (true_dirs @ (W_dec / W_dec.norm(dim=1, keepdim=True)).T).max(dim=1).values
        assert max_cos.mean() >= 0.95, precision
        metrics = evaluate_sae(trained.sae, x[-8192:].split(1024))  # raw scale: the input scale is folded in
        assert metrics["fvu"] < 0.2 and metrics["l0"] < 30, precision
        fvus.append(metrics["fvu"])
    assert fvus[1] == pytest.approx(fvus[0], abs=0.01)


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


def test_encoder_backward_matches_finite_differences():
    """The hand-written encoder backward (the one-matmul W_enc gradient and b_dec through a
    matrix-vector product), checked by gradcheck in float64. (The losses against the dense reference
    and the sparse step's backwards: tests/test_sparse_step.py.)"""
    from sae.base import _Encoder

    g = torch.Generator().manual_seed(0)
    x, W_enc, b_enc, b_dec = (torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
                              for shape in ((6, 4), (4, 5), (5,), (4,)))
    assert torch.autograd.gradcheck(lambda *a: _Encoder.apply(*a, torch.float64), (x, W_enc, b_enc, b_dec))


def test_relu_encoder_backward_matches_finite_differences():
    """The ReLU SAE's encoder (ReLU fused into the product; its L1 gradient, when coeff > 0, is tested with the
    loss against the dense reference in tests/test_sparse_step.py), gradcheck in float64 with coeff 0."""
    from sae.relu import _ReLUEncoder

    g = torch.Generator().manual_seed(0)
    x, W_enc, b_enc, b_dec = (torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
                              for shape in ((6, 4), (4, 5), (5,), (4,)))
    f = _ReLUEncoder.apply(x, W_enc, b_enc, b_dec, torch.float64, 0.0)
    assert 0 < int((f > 0).sum()) < f.numel()  # both sides of the ReLU
    assert torch.autograd.gradcheck(lambda *a: _ReLUEncoder.apply(*a, torch.float64, 0.0), (x, W_enc, b_enc, b_dec))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("B, D, F", [(1024, 512, 2048), (7, 5, 3), (1, 9, 66), (0, 4, 8)])
def test_linear_relu_is_relu_of_the_product_to_the_dtypes_rounding(dtype, B, D, F):
    """``linear_relu`` (a fused CPU kernel where the build has one, else addmm) against ReLU(x Wᵀ + b) in float64 on
    the same (rounded) inputs, within the textbook bound of a dot product accumulated in float32 (or float64) and
    its result rounded to the dtype: D · eps_acc · (|x| |W|ᵀ + |b|) + eps · |result|."""
    from sae.relu import linear_relu

    g = torch.Generator().manual_seed(0)
    x, W, b = (torch.randn(*shape, generator=g).to(dtype) for shape in ((B, D), (F, D), (F,)))
    got = linear_relu(x, W, b)
    assert got.dtype == dtype and got.shape == (B, F)
    x, W, b = x.double(), W.double(), b.double()
    want = torch.relu(x @ W.T + b)
    eps_acc = torch.finfo(torch.promote_types(dtype, torch.float32)).eps
    bound = D * eps_acc * (x.abs() @ W.abs().T + b.abs()) + torch.finfo(dtype).eps * want
    assert torch.all((got.double() - want).abs() <= bound)
    assert torch.all(got[(x @ W.T + b) < -1] == 0)


def test_bf16_loss_and_gradients_follow_fp32():
    """One bf16 step against the float32 one: same loss to 1%, gradients pointing the same way."""
    torch.manual_seed(0)
    for arch in ("relu", "topk"):
        sae = build_sae(small_cfg(arch=arch, dict_size=256), 64)
        x = torch.randn(512, 64).relu()
        results = []
        for dtype in (None, torch.bfloat16):
            sae.zero_grad()
            sae.matmul_dtype = dtype
            out = sae.loss(x, torch.arange(256) < 32)
            out.loss.backward()
            assert all(p.grad.dtype == torch.float32 for p in sae.parameters())
            results.append((out, torch.cat([p.grad.flatten() for p in sae.parameters()])))
        (fp32, g32), (bf16, g16) = results
        assert bf16.loss.item() == pytest.approx(fp32.loss.item(), rel=0.01) and bf16.loss.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.999, arch


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
    for param in (sae.W_dec, sae.W_enc_FD, sae.b_enc):  # every parameter with a row per feature (W_enc's in W_enc_FD)
        state = opt.state[param]
        assert (state["exp_avg"][dead] == 0).all() and (state["exp_avg_sq"][dead] == 0).all()
    assert {id(p) for p in sae.parameters()} == {id(p) for p in (sae.W_dec, sae.W_enc_FD, sae.b_enc, sae.b_dec)}
    assert (opt.state[sae.W_dec]["exp_avg_sq"][~dead] != 0).any()  # untouched rows keep their state


def test_training_resamples_features_that_never_fire():
    x, _ = sparse_superposition(8192, d=16, n_true=32)
    trained = train_sae(epochs(x, 256), small_cfg(l1_coeff=10.0, lr=3e-2), 16, seed=0, progress=False)
    assert trained.resampling_events and trained.resampling_events[0]["step"] == 20
    assert trained.resampling_events[0]["n_resampled"] > 0  # a large λ kills features


# ---- schedules, firing statistics, precision ---------------------------------------------------

def test_lr_schedule_warms_up_and_decays_to_zero():
    factors = [lr_factor(step, 100, warmup_steps=5, decay_steps=20) for step in range(1, 101)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert factors[5:80] == [1.0] * 75
    assert factors[80:] == pytest.approx([(20 - i) / 20 for i in range(20)])  # 1 down to 1/20 at the last step
    assert [lr_factor(s, 10, 0, 0) for s in range(1, 11)] == [1.0] * 10
    assert fraction_step(0.75, 40) == 30 and fraction_step(0.01, 10) == 1 and fraction_step(0.0, 10) == 0


def test_history_logs_lr_dead_and_ultralow(one_thread):
    x, _ = sparse_superposition(8192, d=16, n_true=32)
    cfg = small_cfg(lr_warmup_fraction=0.1, lr_decay_fraction=0.25, resample_fractions=(), l1_coeff=10.0, lr=3e-2)
    trained = train_sae(epochs(x, 256), cfg, 16, seed=0, progress=False)
    rows = trained.history
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert [r["lr"] for r in rows[:4]] == pytest.approx([7.5e-3, 1.5e-2, 2.25e-2, 3e-2])
    assert rows[-1]["lr"] == pytest.approx(3e-2 / 10) and max(r["lr"] for r in rows) == pytest.approx(3e-2)
    assert all({"dead", "ultralow", "l0"} <= set(r) for r in rows)
    assert rows[-1]["dead"] > 0  # a large λ kills features, and nothing resamples them


def test_firing_counts_dead_and_ultralow_features():
    from sae.training import _Firing

    firing = _Firing.new(4, "cpu")
    # Window of 2 steps: feature 0 fires often, 1 rarely, 2 never, 3 only in the second window.
    firing.update(torch.tensor([30, 2, 0, 0]), step=1, window=2)
    firing.update(torch.tensor([30, 1, 0, 0]), step=2, window=2)
    assert firing.counts_2F.tolist() == [[0, 0, 0, 0], [60, 3, 0, 0]]
    dead = firing.dead(2, window=2)
    assert dead.tolist() == [False, False, True, True]
    assert firing.ultralow(dead, below=10).tolist() == [False, True, False, False]
    firing.update(torch.tensor([30, 0, 0, 50]), step=3, window=2)
    firing.restart(torch.tensor([False, False, True, False]), step=3)  # feature 2 resampled: a fresh clock
    assert firing.dead(4, window=2).tolist() == [False, True, False, False]


def test_resolve_precision(monkeypatch):
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    for avx512_bf16, amx, expected in ((True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert resolve_precision("auto", "cpu") == expected
    for bf16_ok, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16_ok)
        assert resolve_precision("auto", torch.device("cuda", 0)) == expected
    assert resolve_precision("auto", "mps") == "fp32"


# ---- the snapshot ---------------------------------------------------------------------------

def test_snapshot_is_saved_and_survives_resume_bit_identical(tmp_path, monkeypatch, one_thread):
    """40 steps, checkpoints every 4, snapshot at 80% = step 32: crash right after the checkpoint at
    step 32, resume, and get the uninterrupted run's snapshot and final SAE exactly."""
    import sae.training as training
    from universality.runtime import resume

    x = sparse_superposition(4096, d=16, n_true=32)[0] * 5.0
    cfg = small_cfg(snapshot_fraction=0.8)
    reference = train_sae(epochs(x, 256), cfg, 16, seed=0, progress=False)
    assert set(reference.snapshot) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    assert not torch.equal(reference.snapshot["W_dec"], reference.sae.W_dec)  # training went on after it

    real_save = training._Progress.save

    def save_then_crash(self, directory, step):
        real_save(self, directory, step)
        if step == 32:
            raise RuntimeError("crash")

    monkeypatch.setattr(training._Progress, "save", save_then_crash)
    with pytest.raises(RuntimeError, match="crash"):
        train_sae(epochs(x, 256), cfg, 16, seed=0, progress=False, checkpoint_dir=tmp_path / "ckpt")
    monkeypatch.undo()
    tensors, state = resume.load(tmp_path / "ckpt")
    assert state["step"] == 32  # the SAE at step 32, with the input scale folded in, is the snapshot
    scale = reference.input_scale
    assert torch.equal(tensors["sae.b_dec"] / scale, reference.snapshot["b_dec"])
    assert torch.equal(tensors["sae.W_enc"], reference.snapshot["W_enc"])

    resumed = train_sae(epochs(x, 256), cfg, 16, seed=0, progress=False, checkpoint_dir=tmp_path / "ckpt")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(resumed.snapshot[name], reference.snapshot[name])
        assert torch.equal(getattr(resumed.sae, name), getattr(reference.sae, name))
    assert resumed.history == reference.history

    out = save_sae(resumed, cfg, tmp_path / "sae")
    snap = load_snapshot(out)
    assert all(torch.equal(getattr(snap, name), reference.snapshot[name]) for name in reference.snapshot)
    # Like the final SAE, it works on raw activations: it reconstructs them about as well.
    fvus = [evaluate_sae(s, x[:2048].split(512))["fvu"] for s in (snap, load_sae(out))]
    assert fvus[0] < 2 * fvus[1] + 0.05

    no_snapshot = train_sae(epochs(x, 256), small_cfg(snapshot_fraction=0.0), 16, seed=0, progress=False)
    assert no_snapshot.snapshot is None
    assert load_snapshot(save_sae(no_snapshot, cfg, tmp_path / "sae")) is None  # an old snapshot file is removed


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
    on_disk = load_file(str(out / "sae_weights.safetensors"))  # SAELens's names and layout
    assert {name: tuple(t.shape) for name, t in on_disk.items()} == {"W_enc": (16, 128), "b_enc": (128,), "W_dec": (128, 16), "b_dec": (16,)}
    assert torch.equal(on_disk["W_enc"], trained.sae.W_enc)
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


def test_encoder_is_held_feature_major_and_its_state_dict_is_saelens_layout():
    """W_enc [D, F] is a view of the contiguous [F, D] parameter W_enc_FD (the fused Adam walks a parameter as flat
    memory, and the sparse step builds the encoder gradient a feature at a time); the state dict speaks W_enc."""
    sae = build_sae(small_cfg(), 16, torch.Generator().manual_seed(0))
    assert all(p.is_contiguous() for p in sae.parameters())
    assert sae.W_enc.shape == (16, 128) and sae.W_enc.data_ptr() == sae.W_enc_FD.data_ptr()
    state = sae.state_dict()
    assert list(state) == ["W_dec", "b_enc", "b_dec", "W_enc"] and torch.equal(state["W_enc"], sae.W_enc)
    other = build_sae(small_cfg(), 16, torch.Generator().manual_seed(1))
    assert not torch.equal(other.W_enc, sae.W_enc)
    other.load_state_dict({name: t.contiguous() for name, t in state.items()})  # as a file holds them
    assert torch.equal(other.W_enc, sae.W_enc) and other.W_enc_FD.is_contiguous()
    with pytest.raises(RuntimeError, match="W_enc"):
        other.load_state_dict({name: t for name, t in state.items() if name != "W_enc"})


def test_incomplete_checkpoint_is_refused(tmp_path):
    (tmp_path / "cfg.json").write_text("{}")
    with pytest.raises(DataError, match="not a complete"):
        load_sae(tmp_path)


# ---- determinism, divergence ----------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_same_seed_gives_identical_weights(precision):
    x, _ = sparse_superposition(4096, d=16, n_true=32)
    runs = [train_sae(epochs(x, 256), small_cfg(arch=arch, precision=precision), 16, seed=3, progress=False)
            for arch in ("relu", "relu", "topk", "topk")]
    for a, b in (runs[0:2], runs[2:4]):
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert torch.equal(getattr(a.sae, name), getattr(b.sae, name))
            assert torch.equal(a.snapshot[name], b.snapshot[name])
        assert a.history == b.history
    other = train_sae(epochs(x, 256), small_cfg(precision=precision), 16, seed=4, progress=False)
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


def test_cli_trains_and_writes_checkpoint(tmp_path, one_thread):
    x, _ = sparse_superposition(6000, d=16, n_true=32)
    np.save(tmp_path / "acts.npy", x.numpy())
    out = tmp_path / "sae"
    result = CliRunner().invoke(main, ["train-sae", str(tmp_path / "acts.npy"), "--out", str(out), "--batch-size", "256",
                                       "--samples", "20000", "--arch", "topk", "--k", "4"])
    assert result.exit_code == 0, result.output
    assert is_complete(out) and load_sae(out).d_sae == 128
    assert "fvu" in result.output
