"""The SAE trainer: Adam with unit-norm decoder vectors, input normalization, dead-feature resampling.

It knows nothing about any one architecture: each SAE class supplies its loss (``SAE.loss``).
Per step it does one forward, one backward, one optimizer step and a [F]-sized dead-feature
update; statistics stay on the device and are read only when a history row is logged.
"""

from __future__ import annotations

import collections
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from sae.base import SAE
from sae.constrained_adam import ConstrainedAdam
from sae.geometric_median import geometric_median
from sae.registry import build_sae
from sae.resampling import resample_dead
from universality import checkpoint
from universality.config import SAEConfig
from universality.errors import DataError, TrainingDiverged
from universality.progress import bar as progress_bar

INIT_SAMPLES = 16_384  # rows that set the input scale and the geometric-median b_dec
LOG_POINTS = 100  # history rows per run (about every 1% of steps)
CHECKPOINT_POINTS = 10  # resumable checkpoints per run, when a checkpoint folder is given


@dataclass
class TrainedSAE:
    sae: SAE  # the input scale is folded in: it works on raw activations
    history: list[dict[str, float]] = field(default_factory=list)  # {step, loss, mse, l1, aux, l0, dead}
    resampling_events: list[dict[str, int]] = field(default_factory=list)  # {step, n_resampled}
    input_scale: float = 1.0  # training saw inputs × input_scale (so that E[||x||²] = d_in)


def input_scale(x_ND: Tensor) -> float:
    """The factor s with E[||s x||²] = d_in: one λ then fits activations of any model's scale."""
    mean_sq_norm = float(x_ND.double().pow(2).sum(dim=1).mean())
    if not mean_sq_norm > 0 or not math.isfinite(mean_sq_norm):
        raise DataError("cannot normalise activations: they are all zero or not finite")
    return math.sqrt(x_ND.shape[1] / mean_sq_norm)


def train_sae(
    batches: Iterator[Tensor], cfg: SAEConfig, d_in: int, *, seed: int, device: str | torch.device = "cpu",
    progress: bool = True, checkpoint_dir: Path | None = None,
) -> TrainedSAE:
    """Train a ``cfg.arch`` SAE on ``cfg.samples // cfg.batch_size`` batches [batch_size, d_in] of raw activations.

    With ``checkpoint_dir``, save a resumable checkpoint every ~10% of the steps and resume from the
    last one: ``batches`` must then be a deterministic stream (the same batches on every call), which
    is replayed up to the checkpoint's position, so a resumed run ends bit-identical on CPU.
    """
    steps = cfg.samples // cfg.batch_size
    generator = torch.Generator().manual_seed(seed)
    first = list(itertools.islice(batches, max(1, min(steps, math.ceil(INIT_SAMPLES / cfg.batch_size)))))
    if not first or first[0].shape[1] != d_in:
        raise DataError(f"expected activation batches with {d_in} columns")
    sample_ND = torch.cat(first)[:INIT_SAMPLES].float()
    scale = input_scale(sample_ND)

    sae = build_sae(cfg, d_in, generator)
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(sample_ND * scale))
    sae.to(device)
    optimizer = ConstrainedAdam(sae.parameters(), [sae.W_dec], lr=cfg.lr)

    window = max(1, round(cfg.dead_window_fraction * steps))
    resample_steps = {round(f * steps) for f in cfg.resample_fractions} & set(range(1, steps)) if sae.resamples_dead else set()
    log_every = max(1, steps // LOG_POINTS)
    last_fired_F = torch.zeros(sae.d_sae, dtype=torch.long, device=device)
    sums = torch.zeros(4, device=device)  # loss, mse, l1, aux since the last history row
    trained = TrainedSAE(sae, input_scale=scale)
    progress_state = _Progress(trained, optimizer, generator, last_fired_F, sums)
    start = progress_state.resume(checkpoint_dir) if checkpoint_dir is not None else 0
    checkpoint_every = max(1, steps // CHECKPOINT_POINTS)
    source = itertools.chain(first, batches)
    collections.deque(itertools.islice(source, progress_state.consumed), maxlen=0)  # replay to the checkpoint
    bar = progress_bar(total=steps, initial=start, disable=not progress, desc=f"SAE {cfg.arch}", unit="step", leave=False)

    for step in range(start + 1, steps + 1):
        x_BD = next(source).to(device, torch.float32) * scale
        progress_state.consumed += 1
        dead_F = (step - last_fired_F) >= window
        out = sae.loss(x_BD, dead_F)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        last_fired_F.masked_fill_(out.fired_F, step)
        sums += torch.stack([out.loss.detach(), out.mse.detach(), out.l1, out.aux.detach()])

        if step in resample_steps:
            _check_finite(sums, step)
            resample_batches = list(itertools.islice(source, math.ceil(cfg.resample_inputs / cfg.batch_size)))
            progress_state.consumed += len(resample_batches)
            inputs_ND = torch.cat(resample_batches)
            dead_now_F = (step - last_fired_F) >= window
            n = resample_dead(sae, optimizer, dead_now_F, inputs_ND.to(device, torch.float32) * scale, generator)
            last_fired_F[dead_now_F] = step  # a resampled feature gets a fresh window to fire in
            trained.resampling_events.append({"step": step, "n_resampled": n})
        if step % log_every == 0 or step == steps:
            n_logged = step - (trained.history[-1]["step"] if trained.history else 0)
            loss, mse, l1, aux = (sums / n_logged).tolist()
            _check_finite(sums, step)
            row = {"step": step, "loss": loss, "mse": mse, "l1": l1, "aux": aux,
                   "l0": float((out.f > 0).sum(dim=1).float().mean()),
                   "dead": int(((step - last_fired_F) >= window).sum())}
            trained.history.append(row)
            sums.zero_()
            bar.update(n_logged)
            bar.set_postfix(mse=f"{mse:.4f}", l0=f"{row['l0']:.1f}", dead=row["dead"])
        if checkpoint_dir is not None and step % checkpoint_every == 0 and step < steps:
            progress_state.save(checkpoint_dir, step)
    bar.close()
    sae.fold_input_scale(scale)
    return trained


@dataclass
class _Progress:
    """Everything a resumed run needs besides the config: parameters, Adam state, the RNG used by
    resampling, dead-feature clocks, running sums, history, and how many batches were consumed."""

    trained: TrainedSAE
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    last_fired_F: Tensor
    sums: Tensor
    consumed: int = 0  # batches drawn from the stream (training steps and resampling inputs)

    def save(self, directory: Path, step: int) -> None:
        tensors = {f"sae.{k}": v for k, v in self.trained.sae.state_dict().items()}
        tensors |= checkpoint.optimizer_tensors(self.optimizer)
        tensors |= {"generator": self.generator.get_state(), "last_fired_F": self.last_fired_F, "sums": self.sums}
        checkpoint.save(directory, tensors, {"step": step, "consumed": self.consumed, "history": self.trained.history,
                                             "resampling_events": self.trained.resampling_events})

    def resume(self, directory: Path) -> int:
        """Restore the last checkpoint in ``directory``; returns its step (0 when there is none)."""
        saved = checkpoint.load(directory)
        if saved is None:
            return 0
        tensors, state = saved
        self.trained.sae.load_state_dict({k[len("sae."):]: v for k, v in tensors.items() if k.startswith("sae.")})
        checkpoint.load_optimizer_tensors(self.optimizer, tensors)
        self.generator.set_state(tensors["generator"])
        self.last_fired_F.copy_(tensors["last_fired_F"])
        self.sums.copy_(tensors["sums"])
        self.consumed = state["consumed"]
        self.trained.history[:] = state["history"]
        self.trained.resampling_events[:] = state["resampling_events"]
        return state["step"]


def _check_finite(sums: Tensor, step: int) -> None:
    if not bool(torch.isfinite(sums).all()):
        raise TrainingDiverged(
            f"SAE training diverged at step {step} (loss is NaN or infinite); try a lower learning rate"
        )
