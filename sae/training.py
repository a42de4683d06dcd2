"""The SAE trainer: Adam with unit-norm decoder vectors, input normalization, dead-feature resampling,
a warm-up / decay learning-rate schedule, bf16 matmuls where the hardware runs them fast, sparse steps
while few features are active (``sae.sparse``), and a snapshot of the SAE part-way through (for the
convergence diagnostic).

It knows nothing about any one architecture: each SAE class supplies its loss (``SAE.loss``).
Per step it does one forward, one backward, one optimizer step and [F]-sized firing updates;
statistics stay on the device and are read only when a history row is logged.
"""

from __future__ import annotations

import collections
import functools
import itertools
import math
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor

from sae.base import SAE
from sae.constrained_adam import ConstrainedAdam
from sae.geometric_median import geometric_median
from sae.registry import build_sae
from sae.resampling import resample_dead
from sae.sparse import sparse_max_density
from universality.runtime import resume
from universality.core.config import SAEConfig
from universality.core.errors import DataError, TrainingDiverged
from universality.runtime.memory import retain_freed_memory
from universality.runtime.progress import bar as progress_bar

INIT_SAMPLES = 16_384  # rows that set the input scale and the geometric-median b_dec
LOG_POINTS = 100  # history rows per run (about every 1% of steps)
CHECKPOINT_POINTS = 10  # resumable checkpoints per run, when a checkpoint folder is given
# "Ultralow" in the history rows: a feature that is not dead (it fired within the dead window) but fired on
# fewer than max(ULTRALOW_MIN_FIRINGS, ULTRALOW_DENSITY × n) of the n inputs of the last completed dead
# window (windows tile the run: steps 1..w, w+1..2w, ...): a feature on its way to dying. The firing floor
# is there because a short run's window cannot resolve a density of 1e-5 (quick: 65K inputs per window);
# 10 firings is also the comparison's floor (compare.min_firings) below which a feature is too rare to use.
ULTRALOW_DENSITY = 1e-5
ULTRALOW_MIN_FIRINGS = 10


@dataclass
class TrainedSAE:
    sae: SAE  # the input scale is folded in: it works on raw activations
    # {step, loss, mse, l1, aux, l0 (means since the previous row), dead, ultralow (counts now), lr}
    history: list[dict[str, float]] = field(default_factory=list)
    resampling_events: list[dict[str, int]] = field(default_factory=list)  # {step, n_resampled}
    input_scale: float | Tensor = 1.0  # training saw inputs × input_scale (so that E[||x||²] = d_in; [M, 1] for a crosscoder)
    # The parameters at cfg.snapshot_fraction of the steps, input scale folded in like ``sae``'s (float32, CPU);
    # None when the run has no snapshot step.
    snapshot: dict[str, Tensor] | None = None
    precision: str = "fp32"  # the matmul precision it was trained in ("fp32" | "bf16")


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """"fp32" or "bf16" for a config's ``precision``: "auto" is bf16 where the hardware runs bf16 matmuls fast
    (CUDA GPUs with bf16 support; CPUs with AVX512-BF16 or AMX, where oneDNN's bf16 matmul runs about 2x
    float32), else fp32 (elsewhere bf16 is emulated and slower than float32)."""
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        # torch.cpu's feature probes (from the cpuinfo library, on every OS; AMX implies AVX512-BF16 hardware).
        return "bf16" if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported() else "fp32"
    return "fp32"


def matmul_dtype(precision: str) -> torch.dtype | None:
    """The matmul dtype of a resolved precision (``resolve_precision``): bf16, or None for the parameters' own."""
    return torch.bfloat16 if precision == "bf16" else None


def lr_factor(step: int, steps: int, warmup_steps: int, decay_steps: int) -> float:
    """The learning-rate multiplier at 1-based ``step``: linear from 1/warmup to 1 over the first
    ``warmup_steps``, 1, then linear down to 1/decay at the last step over the final ``decay_steps``."""
    factor = 1.0
    if warmup_steps > 0:
        factor = min(factor, step / warmup_steps)
    if decay_steps > 0:
        factor = min(factor, (steps - step + 1) / decay_steps)
    return factor


def fraction_step(fraction: float, steps: int) -> int:
    """The step at ``fraction`` of a run of ``steps`` (at least 1 for a positive fraction; 0 for 0)."""
    return max(1, round(fraction * steps)) if fraction > 0 else 0


def input_scale(x_ND: Tensor) -> float | Tensor:
    """The factor s with E[||s x||²] = d_in: one λ then fits activations of any model's scale. For a
    crosscoder's inputs [N, M, D], one factor per model, [M, 1] (it broadcasts over a batch): each model's
    activations are normalized as its own SAE's would be."""
    if x_ND.ndim == 3:
        return torch.tensor([input_scale(x_ND[:, m]) for m in range(x_ND.shape[1])]).unsqueeze(1)
    mean_sq_norm = float(x_ND.double().pow(2).sum(dim=1).mean())
    if not mean_sq_norm > 0 or not math.isfinite(mean_sq_norm):
        raise DataError("cannot normalise activations: they are all zero or not finite")
    return math.sqrt(x_ND.shape[1] / mean_sq_norm)


def initial_b_dec(x_ND: Tensor) -> Tensor:
    """The geometric median of the (normalized) inputs, where the paper starts b_dec; for a crosscoder's
    inputs [N, M, D] each model's own, concatenated as its b_dec [M·D] is."""
    if x_ND.ndim == 3:
        return torch.cat([geometric_median(x_ND[:, m]) for m in range(x_ND.shape[1])])
    return geometric_median(x_ND)


def train_sae(
    batches: Iterator[Tensor], cfg: SAEConfig, d_in: int, *, seed: int, device: str | torch.device = "cpu",
    progress: bool = True, checkpoint_dir: Path | None = None, model_dims: Sequence[int] | None = None,
    vocab_size: int | None = None,
) -> TrainedSAE:
    """Train a ``cfg.arch`` SAE on ``cfg.samples // cfg.batch_size`` batches [batch_size, d_in] of raw activations
    (a crosscoder: [batch_size, n_models, d_in], every model's activations at the same tokens; ``model_dims``: the
    models' own widths when they differ, each zero-padded to d_in). An SAE that reads tokens (``sae.tokenized``) gets
    (activations, token ids [batch_size]) pairs instead, ids below ``vocab_size``.

    With ``checkpoint_dir``, save a resumable checkpoint every ~10% of the steps and resume from the
    last one: ``batches`` must then be a deterministic stream (the same batches on every call), which
    is replayed up to the checkpoint's position, so a resumed run ends bit-identical on CPU.
    """
    retain_freed_memory()  # a step reuses the memory the last one freed (page faults were ~30% of a quick step)
    steps = cfg.samples // cfg.batch_size
    generator = torch.Generator().manual_seed(seed)
    first = list(itertools.islice(batches, max(1, min(steps, math.ceil(INIT_SAMPLES / cfg.batch_size)))))
    x_first, tokens_first = zip(*map(_split, first)) if first else ((), ())
    if not first or x_first[0].ndim not in (2, 3) or x_first[0].shape[-1] != d_in:
        raise DataError(f"expected activation batches with {d_in} columns")
    sample_ND = torch.cat(x_first)[:INIT_SAMPLES].float()
    scale = input_scale(sample_ND)

    sae = build_sae(cfg, d_in, generator, n_models=x_first[0].shape[1] if x_first[0].ndim == 3 else 1,
                    model_dims=model_dims, vocab_size=vocab_size)
    if sae.reads_tokens != (tokens_first[0] is not None):
        raise DataError(f"an SAE of arch {cfg.arch!r} {'needs' if sae.reads_tokens else 'reads no'} token ids with its activations")
    with torch.no_grad():
        sae.b_dec.copy_(initial_b_dec(sample_ND * scale))
    if sae.reads_tokens:  # the per-token decoder bias starts at each token's mean (sae.tokenized)
        sae.init_token_bias(sample_ND * scale, torch.cat(tokens_first)[:INIT_SAMPLES])
    sae.to(device)
    device_scale = scale.to(device) if isinstance(scale, Tensor) else scale
    precision = resolve_precision(cfg.precision, device)
    sae.matmul_dtype = matmul_dtype(precision)  # weights and Adam state stay float32
    sae.sparse_max_density = sparse_max_density(device)  # the sparse step where it measures faster (sae.sparse)
    optimizer = ConstrainedAdam(sae.parameters(), [sae.W_dec], lr=cfg.lr)

    window = max(1, round(cfg.dead_window_fraction * steps))
    resample_steps = {round(f * steps) for f in cfg.resample_fractions} & set(range(1, steps)) if sae.resamples_dead else set()
    warmup_steps, decay_steps = fraction_step(cfg.lr_warmup_fraction, steps), fraction_step(cfg.lr_decay_fraction, steps)
    snapshot_step = fraction_step(cfg.snapshot_fraction, steps)
    ultralow_below = max(ULTRALOW_MIN_FIRINGS, ULTRALOW_DENSITY * window * cfg.batch_size)
    log_every = max(1, steps // LOG_POINTS)
    trained = TrainedSAE(sae, input_scale=scale, precision=precision)
    state = _Progress(trained, optimizer, generator, _Firing.new(sae.d_sae, device), torch.zeros(5, device=device))
    start = state.resume(checkpoint_dir) if checkpoint_dir is not None else 0
    checkpoint_every = max(1, steps // CHECKPOINT_POINTS)
    source = itertools.chain(first, batches)
    collections.deque(itertools.islice(source, state.consumed), maxlen=0)  # replay to the checkpoint
    bar = progress_bar(total=steps, initial=start, disable=not progress, desc=f"SAE {cfg.arch}", unit="step", leave=False)

    for step in range(start + 1, steps + 1):
        x_BD, tokens_B = _split(next(source))
        x_BD = x_BD.to(device, torch.float32) * device_scale
        state.consumed += 1
        lr = cfg.lr * lr_factor(step, steps, warmup_steps, decay_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        out = sae.loss(x_BD, state.firing.dead(step, window), tokens_B)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        state.firing.update(out.fires_F, step, window)
        l0 = out.fires_F.sum() / len(x_BD)
        state.sums += torch.stack([out.loss.detach(), out.mse.detach(), out.l1, out.aux.detach(), l0])

        if step in resample_steps:
            _check_finite(state.sums, step)
            resample_batches = list(itertools.islice(source, math.ceil(cfg.resample_inputs / cfg.batch_size)))
            state.consumed += len(resample_batches)
            inputs = [_split(batch) for batch in resample_batches]
            inputs_ND = torch.cat([x for x, _ in inputs])
            tokens_N = torch.cat([t for _, t in inputs]) if sae.reads_tokens else None
            dead_F = state.firing.dead(step, window)
            n = resample_dead(sae, optimizer, dead_F, inputs_ND.to(device, torch.float32) * device_scale, generator, tokens_N)
            state.firing.restart(dead_F, step)
            trained.resampling_events.append({"step": step, "n_resampled": n})
        if step == snapshot_step:
            trained.snapshot = _folded_parameters(sae, scale)
        if step % log_every == 0 or step == steps:
            n_logged = step - (trained.history[-1]["step"] if trained.history else 0)
            _check_finite(state.sums, step)
            loss, mse, l1, aux, l0 = (state.sums / n_logged).tolist()
            dead_F = state.firing.dead(step, window)
            row = {"step": step, "loss": loss, "mse": mse, "l1": l1, "aux": aux, "l0": l0, "dead": int(dead_F.sum()),
                   "ultralow": int(state.firing.ultralow(dead_F, ultralow_below).sum()), "lr": lr}
            trained.history.append(row)
            state.sums.zero_()
            bar.update(n_logged)
            bar.set_postfix(mse=f"{mse:.4f}", l0=f"{l0:.1f}", dead=row["dead"])
        if checkpoint_dir is not None and step % checkpoint_every == 0 and step < steps:
            state.save(checkpoint_dir, step)
    bar.close()
    sae.matmul_dtype, sae.sparse_max_density = None, 0.0  # the returned SAE computes like any loaded one
    sae.fold_input_scale(scale)
    return trained


def _split(batch: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None]:
    """(activations, their token ids or None) of a batch: a tensor, or an (activations, token ids) pair."""
    return batch if isinstance(batch, tuple) else (batch, None)


def _folded_parameters(sae: SAE, scale: float | Tensor) -> dict[str, Tensor]:
    """The parameters (and buffers, e.g. a crosscoder's input scales) as float32 CPU copies, with the input
    scale folded in (so they work on raw activations)."""
    copy = deepcopy(sae).to("cpu", torch.float32)
    copy.fold_input_scale(scale)
    return {name: p.detach() for name, p in copy.state_dict().items()}


@dataclass
class _Firing:
    """Per-feature firing bookkeeping on the device: the last step each feature fired (dead: none within
    the dead window), and its firing counts in the current and the last completed window (ultralow)."""

    last_fired_F: Tensor  # [F] int64 step
    counts_2F: Tensor  # [2, F] int64: firings in the current window, in the last completed one

    @classmethod
    def new(cls, n_features: int, device: str | torch.device) -> "_Firing":
        zeros = functools.partial(torch.zeros, dtype=torch.long, device=device)
        return cls(zeros(n_features), zeros(2, n_features))

    def dead(self, step: int, window: int) -> Tensor:
        return (step - self.last_fired_F) >= window

    def update(self, fires_F: Tensor, step: int, window: int) -> None:
        self.last_fired_F.masked_fill_(fires_F > 0, step)
        self.counts_2F[0] += fires_F
        if step % window == 0:
            self.counts_2F[1] = self.counts_2F[0]
            self.counts_2F[0] = 0

    def restart(self, features_F: Tensor, step: int) -> None:
        """Resampled features get a fresh dead window and fresh counts (they are new features)."""
        self.last_fired_F[features_F] = step
        self.counts_2F[:, features_F] = 0

    def ultralow(self, dead_F: Tensor, below: float) -> Tensor:
        last_F = self.counts_2F[1]
        return ~dead_F & (last_F > 0) & (last_F < below)


@dataclass
class _Progress:
    """Everything a resumed run needs besides the config: parameters, Adam state, the RNG used by
    resampling, firing clocks and counts, running sums, history, the snapshot (once taken), and how
    many batches were consumed."""

    trained: TrainedSAE
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    firing: _Firing
    sums: Tensor  # [5]: loss, mse, l1, aux, l0 summed since the last history row
    consumed: int = 0  # batches drawn from the stream (training steps and resampling inputs)

    def save(self, directory: Path, step: int) -> None:
        tensors = {f"sae.{k}": v for k, v in self.trained.sae.state_dict().items()}
        tensors |= resume.optimizer_tensors(self.optimizer)
        tensors |= {"generator": self.generator.get_state(), "last_fired_F": self.firing.last_fired_F,
                    "counts_2F": self.firing.counts_2F, "sums": self.sums}
        tensors |= {f"snapshot.{k}": v for k, v in (self.trained.snapshot or {}).items()}
        resume.save(directory, tensors, {"step": step, "consumed": self.consumed, "history": self.trained.history,
                                             "resampling_events": self.trained.resampling_events})

    def resume(self, directory: Path) -> int:
        """Restore the last checkpoint in ``directory``; returns its step (0 when there is none)."""
        saved = resume.load(directory)
        if saved is None:
            return 0
        tensors, state = saved
        self.trained.sae.load_state_dict(_prefixed(tensors, "sae."))
        resume.load_optimizer_tensors(self.optimizer, tensors)
        self.generator.set_state(tensors["generator"])
        self.firing.last_fired_F.copy_(tensors["last_fired_F"])
        self.firing.counts_2F.copy_(tensors["counts_2F"])
        self.sums.copy_(tensors["sums"])
        self.trained.snapshot = _prefixed(tensors, "snapshot.") or None
        self.consumed = state["consumed"]
        self.trained.history[:] = state["history"]
        self.trained.resampling_events[:] = state["resampling_events"]
        return state["step"]


def _prefixed(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _check_finite(sums: Tensor, step: int) -> None:
    if not bool(torch.isfinite(sums).all()):
        raise TrainingDiverged(
            f"SAE training diverged at step {step} (loss is NaN or infinite); try a lower learning rate"
        )
