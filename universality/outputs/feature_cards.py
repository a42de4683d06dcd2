"""Feature cards: what one SAE feature responds to, what it does, and who it is in other seeds.

A card gathers a feature's firing density, its top activating contexts in the comparison
tokens (kept while streaming, see ``analysis.heldout.HeldoutActivations.top_examples``) with the activating token
marked, its direct logit effect (top promoted and suppressed tokens) and its best partners
in the other seeds. The terminal (``univ features``) and the HTML reports both render cards.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import pandas as pd

from universality.outputs.formatting import number

N_LOGIT_TOKENS = 8  # promoted / suppressed tokens shown per feature
N_TOP_TOKENS = 5  # distinct top activating tokens in a table's summary column


@dataclass(frozen=True)
class Example:
    """One activating position: the text before, the activating token, the text after."""

    value: float
    left: str
    token: str
    right: str


@dataclass(frozen=True)
class Partner:
    """A feature's max-correlation partner in another seed."""

    seed: int
    feature: int
    corr: float
    mutual: bool
    corr_context: float  # its max correlation after both sides' current-token means are removed (any partner)


@dataclass(frozen=True)
class Relative:
    """A parent (in the next smaller dictionary) or child (in the next larger) of a feature of the same model."""

    size: int  # its dictionary's size
    feature: int
    corr: float  # activation correlation on the comparison tokens
    cos: float  # cosine of the two decoder vectors


@dataclass(frozen=True)
class Lineage:
    """Where a feature sits in its model's dictionary family (``universality.measures.splitting``)."""

    size: int  # the feature's dictionary size
    primary: bool  # the run's primary size: the only one whose features are matched across seeds in the tables
    parents: list[Relative]
    children: list[Relative]


@dataclass(frozen=True)
class FeatureCard:
    seed: int
    feature: int
    density: float  # fraction of comparison tokens on which it fires
    examples: list[Example]
    promoted: list[tuple[str, float]]  # tokens whose logits it raises most, with the logit weight
    suppressed: list[tuple[str, float]]
    partners: list[Partner]
    position: int | None = None  # set: every top activation sits at this position of its context (a position feature)
    token_share: float = float("nan")  # fraction of its activation variance that the current token explains
    lineage: Lineage | None = None  # set for a dictionary family's features: its parents and children


@dataclass(frozen=True)
class RunSources:
    """What one seed's cards and table columns are read from, all on the comparison tokens."""

    seed: int
    tokens: np.ndarray  # [N] flat comparison token ids
    vocab: list[str]  # token id -> decoded text
    top_values: np.ndarray  # [F, k] top activations of each feature
    top_positions: np.ndarray  # [F, k] their positions in ``tokens`` (-1: none)
    logit_weights: np.ndarray  # [F, V] direct logit effect of each feature
    densities: np.ndarray  # [F] firing frequency
    context: int  # tokens shown each side of an example
    ctx_len: int  # the model's context length: an example's window never crosses into another context

    def single_position(self, features: slice = slice(None)) -> np.ndarray:
        """[F] bool (or of ``features`` only): features whose top activations all sit at one position of
        their contexts."""
        from universality.analysis.heldout import single_position

        return single_position(self.top_positions[features], self.ctx_len)

    def top_tokens(self) -> list[str]:
        """Per feature, its distinct top activating tokens joined as one string."""
        return [" | ".join(top_tokens(row, self.tokens, self.vocab)) for row in self.top_positions]

    def card(self, feature: int, matched: pd.DataFrame) -> FeatureCard:
        promoted, suppressed = logit_effects(self.logit_weights[feature], self.vocab)
        return FeatureCard(
            seed=self.seed,
            feature=feature,
            density=float(self.densities[feature]),
            examples=examples(self.top_values[feature], self.top_positions[feature], self.tokens, self.vocab,
                              self.context, self.ctx_len),
            promoted=promoted,
            suppressed=suppressed,
            partners=partners(matched, self.seed, feature),
            token_share=token_share(matched, self.seed, feature),
            position=(int(self.top_positions[feature, 0] % self.ctx_len)
                      if self.single_position(slice(feature, feature + 1))[0] else None),
        )


def load_run_sources(seed: int, data_dir: Path, model_dir: Path, sae_dir: Path, acts_dir: Path,
                     ctx_len: int, compare_tokens: int, context: int, vocab: list[str]) -> RunSources:
    """A seed's sources from its stage folders (the ones a univ run records on its MLflow runs)."""
    from sae.checkpoint import load_sae
    from universality.analysis.heldout import HeldoutActivations
    from universality.stages.model import load_transformer

    model = load_transformer(model_dir)
    heldout = np.load(Path(data_dir) / "heldout.npy", mmap_mode="r")
    return run_sources_of(seed, model, load_sae(Path(sae_dir), "cpu"), HeldoutActivations(Path(acts_dir)),
                          heldout, ctx_len, compare_tokens, context, vocab)


def run_sources_of(seed: int, model, sae, acts, heldout: np.ndarray, ctx_len: int, compare_tokens: int,
                   context: int, vocab: list[str]) -> RunSources:
    """A seed's sources from its model, SAE and held-out activations (already loaded)."""
    from universality.analysis.heldout import eval_contexts
    from universality.analysis.pairs import feature_logit_weights

    features = acts.features()
    top_values, top_positions = acts.top_examples()
    return RunSources(
        seed=seed,
        tokens=eval_contexts(heldout, ctx_len, compare_tokens).flatten().numpy(),
        vocab=vocab,
        top_values=top_values,
        top_positions=top_positions,
        logit_weights=feature_logit_weights(model, sae),
        densities=features.getnnz(axis=0) / features.shape[0],
        context=context,
        ctx_len=ctx_len,
    )


def vocab_strings(tokenizer) -> list[str]:
    """Each token id decoded on its own (byte-level pieces that are not whole characters show as U+FFFD)."""
    return [tokenizer.decode([i], skip_special_tokens=False) for i in range(tokenizer.get_vocab_size())]


def examples(values_k: np.ndarray, positions_k: np.ndarray, tokens: np.ndarray, vocab: list[str],
             context: int, ctx_len: int) -> list[Example]:
    """Up to ``context`` tokens each side of each top position (-1 positions skipped), within the
    model's context of ``ctx_len`` tokens that holds it: what the model saw, and what followed."""
    out = []
    for value, pos in zip(values_k, positions_k):
        if pos < 0:
            continue
        start = pos - pos % ctx_len
        left = "".join(vocab[t] for t in tokens[max(start, pos - context) : pos])
        right = "".join(vocab[t] for t in tokens[pos + 1 : min(start + ctx_len, pos + 1 + context)])
        out.append(Example(float(value), left, vocab[tokens[pos]], right))
    return out


def top_tokens(positions_k: np.ndarray, tokens: np.ndarray, vocab: list[str], n: int = N_TOP_TOKENS) -> list[str]:
    """The distinct tokens at a feature's top activating positions, strongest first."""
    seen = dict.fromkeys(vocab[tokens[p]] for p in positions_k if p >= 0)
    return list(seen)[:n]


def logit_effects(weights_V: np.ndarray, vocab: list[str], n: int = N_LOGIT_TOKENS) -> tuple[list, list]:
    """(promoted, suppressed): the ``n`` tokens with the largest and the smallest logit weight."""
    order = np.argsort(weights_V)
    pick = lambda idx: [(vocab[i], float(weights_V[i])) for i in idx]  # noqa: E731
    return pick(order[::-1][:n]), pick(order[:n])


def _own_rows(matched: pd.DataFrame, seed: int, feature: int) -> pd.DataFrame:
    """``seed``'s ``feature`` (its own SAE) against every other model (replicate SAEs are the ceiling, not partners)."""
    return matched[(matched.seed_a == seed) & (matched.feature_a == feature) & ~matched.same_model & (matched.sae_a == 0)]


def partners(matched: pd.DataFrame, seed: int, feature: int) -> list[Partner]:
    """Best partners of ``seed``'s ``feature`` in every other seed, from the matched feature table, highest
    contextual correlation first (the part that is not the current token), the raw one beside it."""
    rows = _own_rows(matched, seed, feature)
    rows = rows[rows.feature_b >= 0].sort_values(["corr_context", "corr"], ascending=False, na_position="last")
    return [Partner(int(r.seed_b), int(r.feature_b), float(r.corr), bool(r.mutual), float(r.corr_context))
            for r in rows.itertuples()]


def token_share(matched: pd.DataFrame, seed: int, feature: int) -> float:
    """``seed``'s ``feature``'s token share, from the matched feature table (NaN: not in it)."""
    rows = _own_rows(matched, seed, feature)
    return float(rows.token_share_a.iloc[0]) if len(rows) else float("nan")


def visible(text: str) -> str:
    """Whitespace made visible enough to read a one-line context."""
    return text.replace("\n", "⏎").replace("\t", "⇥")


def example_line(ex: Example, value_format: str = "8.3f") -> str:
    """An example as a terminal line: its value, then its context with the token highlighted."""
    token = click.style(f"⟦{visible(ex.token)}⟧", fg="black", bg="yellow", bold=True)  # brackets survive pipes
    return f"  {ex.value:{value_format}}  {visible(ex.left)}{token}{visible(ex.right)}"


def lineage(splits: pd.DataFrame, seed: int, size: int, feature: int, primary: bool) -> Lineage:
    """``seed``'s ``feature`` of ``size`` features among its model's other sizes, from the splits table
    (``splitting.SPLIT_COLUMNS``): its parents and children, most correlated first."""
    rows = splits[splits.model == f"seed{seed}"].sort_values("corr", ascending=False, kind="stable")
    parents = rows[(rows.size_b == size) & (rows.feature_b == feature)]
    children = rows[(rows.size_a == size) & (rows.feature_a == feature)]
    return Lineage(size, primary,
                   [Relative(int(r.size_a), int(r.feature_a), float(r.corr), float(r.cos)) for r in parents.itertuples()],
                   [Relative(int(r.size_b), int(r.feature_b), float(r.corr), float(r.cos)) for r in children.itertuples()])


def _lineage_lines(family: Lineage) -> list[str]:
    """A family member's parents and children; cross-seed partners only exist at the primary size."""
    lines = [] if family.primary else ["best partners: only the primary size's features are matched across seeds"]
    for label, relatives in (("parents (next smaller dictionary)", family.parents),
                             ("children (next larger dictionary)", family.children)):
        lines.append(f"{label}:" if relatives else f"{label}: none")
        lines.extend(f"  {r.size:,}-feature SAE, feature {r.feature}: corr {r.corr:.3f}, decoder cosine {r.cos:.3f}"
                     for r in relatives)
    return lines


def render_terminal(card: FeatureCard) -> str:
    """The card as terminal text, the activating token highlighted with ANSI styles."""
    size = "" if card.lineage is None else f" ({card.lineage.size:,}-feature SAE)"
    lines = [click.style(f"seed{card.seed} feature {card.feature}{size}", bold=True) + f"  density {card.density:.3g}"
             f"  token share {number(card.token_share, '.2f')}",
             *([click.style(f"position feature: every top activation is at position {card.position} of its context",
                            fg="red")] if card.position is not None else []),
             "top activating contexts:"]
    lines.extend(example_line(ex) for ex in card.examples)
    for label, pairs in (("promotes", card.promoted), ("suppresses", card.suppressed)):
        lines.append(f"{label}: " + ", ".join(f"{visible(t)!r} {w:+.2f}" for t, w in pairs))
    if card.lineage is None or card.lineage.primary:
        lines.append("best partners:" if card.partners else "best partners: none (no included partner)")
        lines.extend(f"  seed{p.seed} feature {p.feature}: corr {p.corr:.3f}, contextual {number(p.corr_context)}"
                     f"{' (mutual)' if p.mutual else ''}" for p in card.partners)
    lines += [] if card.lineage is None else _lineage_lines(card.lineage)
    return "\n".join(lines)


def render_html(card: FeatureCard) -> str:
    """The card as an HTML fragment (escaped text, the activating token in a <mark>)."""
    esc = lambda s: html.escape(visible(s))  # noqa: E731
    rows = "".join(f"<tr><td>{ex.value:.3f}</td><td class='ctx'>{esc(ex.left)}<mark>{esc(ex.token)}</mark>"
                   f"{esc(ex.right)}</td></tr>" for ex in card.examples)
    effects = "".join(f"<p><b>{label}:</b> " + ", ".join(f"<code>{esc(t)}</code> {w:+.2f}" for t, w in pairs) + "</p>"
                      for label, pairs in (("promotes", card.promoted), ("suppresses", card.suppressed)))
    partner_list = ", ".join(f"seed{p.seed}/{p.feature} ({p.corr:.3f}, contextual {number(p.corr_context)}"
                             f"{', mutual' if p.mutual else ''})" for p in card.partners)
    return (f"<div class='card'><h4>seed{card.seed} feature {card.feature} "
            f"<small>density {card.density:.3g}, token share {number(card.token_share, '.2f')}</small></h4>"
            + (f"<p><b>position feature:</b> every top activation is at position {card.position} of its context</p>"
               if card.position is not None else "")
            + f"<p><b>best partners:</b> {partner_list or 'none'}</p>{effects}"
            f"<table class='examples'><tr><th>act</th><th>context</th></tr>{rows}</table></div>")
