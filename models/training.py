"""Training and evaluation of the one-layer transformer, and the n-gram baselines it must beat.

The seed sets the initialization and the data order and nothing else: the batch drawn at step s
depends only on (seed, s), so a run resumed from a checkpoint sees the same data as one that
never stopped, and on CPU the same seed gives bit-identical weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.transformer import OneLayerTransformer, TransformerConfig, cross_entropy
from universality.runtime import resume
from universality.core.config import TrainConfig
from universality.core.errors import TrainingDiverged
from universality.runtime.progress import bar as progress_bar


@dataclass
class TrainingResult:
    model: OneLayerTransformer
    history: list[dict] = field(default_factory=list)  # {"step", "train_loss", "lr"} and {"step", "eval_loss"}
    eval_loss: float = float("nan")  # final held-out cross-entropy (nats/token) on the whole held-out split
    resumed_from: int = 0  # step the run resumed from (0: from scratch)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to the peak rate, then cosine decay to 10% of it."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def training_batch(tokens: np.ndarray, ctx_len: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Random contexts for one step, a pure function of (seed, step)."""
    starts = np.random.default_rng([seed, step]).integers(0, len(tokens) - ctx_len, size=batch_size)
    return torch.from_numpy(np.stack([tokens[s : s + ctx_len] for s in starts]).astype(np.int64))


def heldout_contexts(tokens: np.ndarray, ctx_len: int) -> torch.Tensor:
    """The held-out stream cut into consecutive, non-overlapping contexts [N, ctx_len]."""
    n = len(tokens) // ctx_len
    return torch.from_numpy(np.asarray(tokens[: n * ctx_len], dtype=np.int64).reshape(n, ctx_len))


@torch.no_grad()
def evaluate(model: OneLayerTransformer, contexts: torch.Tensor, batch_size: int, device: str) -> float:
    """Mean next-token cross-entropy over ``contexts`` (every context weighted equally)."""
    model.eval()
    total, n = 0.0, 0
    for batch in contexts.split(batch_size):
        batch = batch.to(device)
        total += cross_entropy(model(batch).logits, batch).item() * len(batch)
        n += len(batch)
    model.train()
    return total / n


def build_model(cfg: TransformerConfig, seed: int) -> OneLayerTransformer:
    torch.manual_seed(seed)
    return OneLayerTransformer(cfg)


def train_transformer(
    train_tokens: np.ndarray,
    heldout_tokens: np.ndarray,
    model_cfg: TransformerConfig,
    cfg: TrainConfig,
    seed: int,
    device: str = "cpu",
    checkpoint_dir: Path | None = None,
    progress: bool = True,
) -> TrainingResult:
    """Train with AdamW, warm-up + cosine decay and gradient clipping; resume from ``checkpoint_dir``."""
    model = build_model(model_cfg, seed).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    result = TrainingResult(model)
    if checkpoint_dir is not None:
        result.resumed_from, result.history = load_checkpoint(checkpoint_dir, model, optimizer, scheduler)
    eval_contexts = heldout_contexts(heldout_tokens, model_cfg.ctx_len)
    quick_eval = eval_contexts[: cfg.eval_batches * cfg.batch_size]

    bar = progress_bar(range(result.resumed_from, cfg.steps), desc=f"transformer seed {seed}", disable=not progress, leave=False)
    for step in bar:
        batch = training_batch(train_tokens, model_cfg.ctx_len, cfg.batch_size, seed, step).to(device)
        loss = cross_entropy(model(batch).logits, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        done = step + 1
        loss_value = loss.item()  # every step: one scalar to the host is cheap beside the step, and names the step
        if not math.isfinite(loss_value):
            raise TrainingDiverged(f"transformer training diverged at step {done} (loss {loss_value})")
        if done % cfg.eval_every == 0 or done == cfg.steps or step == 0:
            eval_loss = evaluate(model, quick_eval, cfg.batch_size, device)
            result.history.append({"step": done, "train_loss": loss_value, "eval_loss": eval_loss, "lr": scheduler.get_last_lr()[0]})
            bar.set_postfix(loss=f"{loss_value:.3f}", eval=f"{eval_loss:.3f}")
        if checkpoint_dir is not None and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            save_checkpoint(checkpoint_dir, model, optimizer, done, result.history)
    result.eval_loss = evaluate(model, eval_contexts, cfg.batch_size, device)
    return result


def save_checkpoint(directory: Path, model, optimizer, step: int, history: list[dict]) -> None:
    """Model and optimizer state, step and history, checksummed (``universality.runtime.resume``)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()} | resume.optimizer_tensors(optimizer)
    resume.save(directory, tensors, {"step": step, "history": history})


def load_checkpoint(directory: Path, model, optimizer, scheduler) -> tuple[int, list[dict]]:
    """Restore the last checkpoint in ``directory``; (0, []) when there is none or it is damaged."""
    saved = resume.load(directory)
    if saved is None:
        return 0, []
    tensors, state = saved
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    resume.load_optimizer_tensors(optimizer, tensors)
    scheduler.last_epoch = state["step"]
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * scheduler.lr_lambdas[0](state["step"])
    return state["step"], state["history"]


def ngram_baselines(train_tokens: np.ndarray, heldout_tokens: np.ndarray, vocab_size: int, ctx_len: int) -> dict[str, float]:
    """Unigram and add-one smoothed bigram cross-entropy (nats) of the training tokens, scored on the
    same held-out predictions as the model (within each context: position t predicts t + 1)."""
    train = np.asarray(train_tokens, dtype=np.int64)
    contexts = heldout_contexts(heldout_tokens, ctx_len).numpy()
    prev, nxt = contexts[:, :-1].ravel(), contexts[:, 1:].ravel()
    unigram = np.bincount(train, minlength=vocab_size) + 1.0
    unigram_ce = -np.mean(np.log(unigram[nxt] / unigram.sum()))
    pair_keys = train[:-1] * vocab_size + train[1:]
    keys, counts = np.unique(pair_keys, return_counts=True)
    wanted = prev * vocab_size + nxt
    found = np.searchsorted(keys, wanted).clip(max=len(keys) - 1)
    pair_counts = np.where(keys[found] == wanted, counts[found], 0)
    row_totals = np.bincount(train[:-1], minlength=vocab_size)
    bigram_ce = -np.mean(np.log((pair_counts + 1.0) / (row_totals[prev] + vocab_size)))
    return {"unigram_ce": float(unigram_ce), "bigram_ce": float(bigram_ce)}
