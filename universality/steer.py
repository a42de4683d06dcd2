"""``univ steer``: one feature's intervention on a finished run, beside its partners in the other seeds.

A run's seed is loaded from the stage folders its MLflow child run recorded (as ``univ features`` does);
its partners are the max-correlation partners of the run's matched feature table. The intervention
(``universality.analysis.steering``) runs in every member's own model, and the result is text for the terminal,
statistics and a figure, all of which ``log`` adds to the run in MLflow as a child run of kind ``steer``.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch

from universality.outputs import reports
from universality.analysis import steering
from universality.analysis.heldout import HeldoutActivations, eval_contexts
from universality.core.errors import UnivError
from universality.stages.data import heldout_tokens
from universality.outputs.formatting import number
from universality.outputs.feature_cards import Partner, example_line, examples, visible

N_AFFECTED = 10  # most-affected tokens listed under an ablation
OVERLAP_TOKENS = 20  # most-affected tokens compared across seeds (Jaccard overlap)


@dataclass(frozen=True)
class Member:
    """A seed's feature in a steer: the one asked for (first), or its partner in another seed."""

    seed: int
    feature: int
    corr: float  # activation correlation with the first member's feature (NaN: the first itself)
    mutual: bool
    model: torch.nn.Module
    sae: torch.nn.Module
    acts: HeldoutActivations

    @property
    def label(self) -> str:
        return f"seed{self.seed} feature {self.feature}"

    def max_activation(self) -> float:
        """Its largest activation on the held-out comparison tokens (0: it never fires there)."""
        return float(self.acts.top_examples()[0][self.feature, 0])


@dataclass(frozen=True)
class Tokens:
    """What every member is run on: the run's comparison contexts and its vocabulary."""

    contexts_CT: torch.Tensor
    skip: int  # first positions of each context left out (compare.skip_first_positions)
    vocab: list[str]
    context: int  # tokens shown each side of an example


@dataclass(frozen=True)
class SteerResult:
    text: str  # the terminal's text (ANSI styles)
    params: dict[str, object]
    metrics: dict[str, float]
    figure: reports.Figure


def load_member(folders: list[Path], seed: int, feature: int, partner: Partner | None = None) -> Member:
    """A seed's model, SAE and held-out activations from its stage folders (data, model, SAE, activations);
    ``feature`` checked to exist and to fire."""
    from sae.checkpoint import load_sae
    from universality.stages.model import load_transformer

    _, model_dir, sae_dir, acts_dir = folders
    sae = load_sae(sae_dir, "cpu")
    if feature >= sae.d_sae:
        raise UnivError(f"feature {feature} is out of range: seed {seed} has {sae.d_sae} features (0..{sae.d_sae - 1})")
    acts = HeldoutActivations(acts_dir)
    if acts.top_examples()[0][feature, 0] <= 0:
        raise UnivError(f"feature {feature} of seed {seed} is dead: it never fires on the run's held-out comparison tokens")
    model = load_transformer(model_dir)
    return Member(seed, feature, math.nan if partner is None else partner.corr, partner is not None and partner.mutual,
                  model, sae, acts)


def load_tokens(data_dir: Path, params: dict[str, str], vocab: list[str]) -> Tokens:
    """The comparison contexts of a run (from its data folder and its logged config)."""
    heldout = heldout_tokens(data_dir)
    contexts = eval_contexts(heldout, int(params["data.ctx_len"]), int(params["compare.tokens"]))
    return Tokens(contexts, int(params["compare.skip_first_positions"]), vocab, int(params["compare.context_tokens"]))


def ablate(members: list[Member], tokens: Tokens) -> SteerResult:
    """The paper's ablation of each member's feature on the held-out tokens, each effect compared with the first's."""
    subjects = [steering.subject(m.model, m.sae, m.acts.features(), tokens.contexts_CT, tokens.skip) for m in members]
    effects = [s.ablation(m.feature) for s, m in zip(subjects, members)]
    first, n = effects[0], effects[0].n
    lines = [click.style(f"ablate {members[0].label}", bold=True)
             + f": f·d subtracted from the MLP neurons at every position; {n:,} held-out tokens scored",
             f"{'':<22}{'act corr':>9}{'fires on':>18}{'loss change':>13}{'effect corr':>13}{'top-' + str(OVERLAP_TOKENS) + ' overlap':>16}"]
    metrics: dict[str, float] = {}
    for m, effect in zip(members, effects):
        corr = "" if math.isnan(m.corr) else f"{m.corr:.3f}{'*' if m.mutual else ' '}"
        effect_corr, overlap = steering.effect_correlation(first, effect), steering.top_overlap(first, effect, OVERLAP_TOKENS)
        fires = f"{effect.rows.size:,} ({effect.rows.size / n:.2%})"
        lines.append(f"  {m.label:<20}{corr:>9}{fires:>18}{number(effect.loss_change(), '+.4f'):>13}"
                     f"{number(effect_corr):>13}{number(overlap, '.2f'):>16}")
        metrics |= {f"seed{m.seed}.n_firing": effect.rows.size, f"seed{m.seed}.loss_change_firing": effect.loss_change(),
                    f"seed{m.seed}.effect_corr": effect_corr, f"seed{m.seed}.top_overlap": overlap}
    lines += ["  act corr: activation correlation with the first feature (* mutual match); loss change: mean change in",
              "  next-token loss (nats) where the feature fires; where it does not, exactly 0 (one layer: nothing after the",
              "  MLP but the unembedding); effect corr: correlation of the per-token log-prob changes with the first's.",
              f"tokens whose log-probability {members[0].label} moves most (change in log p, context, ⟦next token⟧):"]
    flat = tokens.contexts_CT.flatten().numpy()
    ctx_len = tokens.contexts_CT.shape[1]
    for row in first.most_affected(N_AFFECTED):
        position = steering.scored_position(int(row), ctx_len, tokens.skip)
        delta = first.delta[np.searchsorted(first.rows, row)]
        lines.append(example_line(examples([delta], [position], flat, tokens.vocab, tokens.context, ctx_len)[0], "+8.3f"))
    params = {"intervention": "ablate", "seed": members[0].seed, "feature": members[0].feature,
              "members": ", ".join(m.label for m in members)}
    return SteerResult("\n".join(lines), params, metrics, _effects_figure(members, effects))


def _effects_figure(members: list[Member], effects: list[steering.Effect]) -> reports.Figure:
    """Each member's change in log p(next token) where its feature fires."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    values = np.concatenate([e.delta for e in effects])
    bins = np.linspace(values.min(), values.max(), 41) if values.size and values.min() < values.max() else 20
    for m, effect in zip(members, effects):
        ax.hist(effect.delta, bins=bins, histtype="step", linewidth=2, label=f"{m.label} (n={effect.rows.size:,})")
    ax.set(yscale="log", xlabel="change in log p(next token) when the feature is ablated", ylabel="tokens where it fires",
           title=f"ablating {members[0].label} and its partners")
    ax.legend(fontsize=8)
    return reports.render(fig, "ablation.png", f"ablating {members[0].label} and its partners")


@dataclass(frozen=True)
class PinSettings:
    prompt: str
    n_tokens: int
    temperature: float
    sample_seed: int
    value: float | None  # the first feature's pinned value (None: scale x its max activation)
    scale: float  # used when value is None


def prompt_tokens(tokenizer, prompt: str) -> torch.Tensor:
    """The prompt's token ids; one that tokenizes to nothing is an error."""
    ids = tokenizer.encode(prompt).ids
    if not ids:
        raise UnivError(f"the prompt {prompt!r} tokenizes to nothing: give some text with --prompt")
    return torch.tensor(ids, dtype=torch.long)


def pin(members: list[Member], tokenizer, prompt_L: torch.Tensor, settings: PinSettings) -> SteerResult:
    """The paper's pinned sampling in each member's model (at the same multiple of its own max activation as the
    first), beside the unsteered sample with the same seed; the next-token distributions on one shared text (the
    prompt and the first member's steered sample) compared between steered and unsteered, and with the first's."""
    first_max = members[0].max_activation()
    scale = settings.scale if settings.value is None else settings.value / first_max
    values = [scale * m.max_activation() for m in members]
    hooks = [steering.feature_hook(m.sae, [m.feature], v) for m, v in zip(members, values)]
    draw = lambda m, hook: steering.sample(m.model, prompt_L, settings.n_tokens, settings.temperature,  # noqa: E731
                                           settings.sample_seed, hook)
    samples = [(draw(m, hook), draw(m, None)) for m, hook in zip(members, hooks)]
    text_L = torch.cat([prompt_L, samples[0][0]])
    dists = [(steering.next_token_logprobs(m.model, text_L, hook), steering.next_token_logprobs(m.model, text_L))
             for m, hook in zip(members, hooks)]
    decode = lambda ids: visible(tokenizer.decode(ids.tolist(), skip_special_tokens=False))  # noqa: E731
    lines = [click.style(f"pin {members[0].label}", bold=True)
             + f" at {values[0]:.3f} ({scale:.3g} x its max activation {first_max:.3f}) at every position; "
             f"{settings.n_tokens} tokens, temperature {settings.temperature:g}, sample seed {settings.sample_seed}",
             f"prompt: {decode(prompt_L)}"]
    metrics: dict[str, float] = {}
    mean_jsd = lambda p, q: float(steering.jensen_shannon(p, q).mean())  # noqa: E731
    for m, value, (steered, plain), (p_steered, p_plain) in zip(members, values, samples, dists):
        corr = "" if math.isnan(m.corr) else f" (act corr {m.corr:.3f}{', mutual' if m.mutual else ''})"
        shift = mean_jsd(p_steered, p_plain)
        lines += [click.style(m.label, bold=True) + f"{corr}, pinned at {value:.3f}",
                  f"  unsteered: {decode(plain)}", f"  steered:   {decode(steered)}",
                  f"  Jensen–Shannon (bits), steered vs unsteered next-token distributions: {shift:.3f}"]
        metrics |= {f"seed{m.seed}.value": value, f"seed{m.seed}.jsd_steered_vs_unsteered": shift}
        if m is not members[0]:
            to_first = (mean_jsd(p_plain, dists[0][1]), mean_jsd(p_steered, dists[0][0]))
            lines.append(f"  Jensen–Shannon to {members[0].label}: unsteered {to_first[0]:.3f} -> both steered {to_first[1]:.3f}")
            metrics |= {f"seed{m.seed}.jsd_to_first_unsteered": to_first[0], f"seed{m.seed}.jsd_to_first_steered": to_first[1]}
    lines.append(f"  (distributions compared on the prompt and {members[0].label}'s steered sample, {len(text_L)} tokens)")
    params = {"intervention": "pin", "seed": members[0].seed, "feature": members[0].feature, "prompt": settings.prompt,
              "tokens": settings.n_tokens, "temperature": settings.temperature, "sample_seed": settings.sample_seed,
              "value": values[0], "scale": scale, "members": ", ".join(m.label for m in members)}
    return SteerResult("\n".join(lines), params, metrics, _pin_figure(members, metrics))


def _pin_figure(members: list[Member], metrics: dict[str, float]) -> reports.Figure:
    """How far pinning moves each model's next-token distribution, and how close it brings the models together."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    x = np.arange(len(members))
    series = (("steered vs unsteered", "jsd_steered_vs_unsteered"), (f"to {members[0].label}, unsteered", "jsd_to_first_unsteered"),
              (f"to {members[0].label}, both steered", "jsd_to_first_steered"))
    for i, (label, key) in enumerate(series):
        ax.bar(x + (i - 1) * 0.27, [metrics.get(f"seed{m.seed}.{key}", np.nan) for m in members], 0.27, label=label)
    ax.set_xticks(x, [m.label for m in members], fontsize=8)
    ax.set(ylabel="Jensen–Shannon divergence (bits)", title=f"pinning {members[0].label} and its partners")
    ax.legend(fontsize=8)
    return reports.render(fig, "pinned.png", f"pinning {members[0].label} and its partners")


def log(tracker, result: SteerResult) -> str:
    """The result as a child run (kind ``steer``) of the univ run ``tracker`` holds: params, statistics, the
    terminal text without its styles and the figure."""
    from universality.tracking.names import metrics_from

    name = f"steer-{result.params['intervention']}-seed{result.params['seed']}-f{result.params['feature']}"
    run_id = tracker.child(name, "steer", {"univ.seed": str(result.params["seed"]), "univ.feature": str(result.params["feature"])})
    try:
        tracker.log(run_id, metrics_from(result.metrics), params=result.params)
        tracker.client.log_text(run_id, click.unstyle(result.text) + "\n", "steer/steer.txt")
        with tempfile.TemporaryDirectory() as tmp:
            tracker.client.log_artifact(run_id, str(reports.write_figure(result.figure, Path(tmp))), "steer")
    except BaseException:
        tracker.finish(run_id, "FAILED")
        raise
    tracker.finish(run_id)
    return run_id
