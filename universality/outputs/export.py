"""Matched feature tables: every feature of every seed against every other seed, and the families.

``matched_table`` has one row per (seed_a, feature_a, seed_b), for both orders of each pair of
seeds, so filtering on ``seed_a`` gives a seed's features against all others:

====================  =======  ==============================================================
column                dtype    meaning
====================  =======  ==============================================================
seed_a                int64    seed of the feature's run
feature_a             int64    SAE feature index in seed_a
seed_b                int64    the other seed
feature_b             int64    seed_b feature with the highest activation correlation (-1: none)
corr                  float64  its Pearson correlation on the comparison tokens (NaN: none)
feature_b_context     int64    seed_b feature with the highest contextual correlation: both features' mean
                               activation for the current token removed (-1: none, or feature_a is a
                               function of the current token alone)
corr_context          float64  that contextual correlation (the partial correlation given the token; NaN: none)
token_share_a         float64  fraction of feature_a's activation variance explained by the current token
                               alone, cross-fitted over two halves of the comparison tokens (NaN: constant)
hungarian_b           int64    one-to-one (Hungarian) partner in seed_b (-1: none)
hungarian_corr        float64  its correlation (NaN: none)
mutual                bool     feature_a and feature_b are each other's best partner
logit_corr            float64  correlation of the two features' logit weights (NaN: no partner)
density_a             float64  fraction of comparison tokens on which feature_a fires
density_b             float64  the same for feature_b (NaN: none)
top_tokens_a          string   feature_a's distinct top activating tokens, " | "-joined
top_tokens_b          string   the same for feature_b ("" when none)
family                int64    id in the families table, -1 when in no multi-seed family
sae_a, sae_b          int64    which SAE of each model: 0 the run's own, r > 0 replicate r
same_model            bool     both SAEs are of one model (a replicate pair: the within-model ceiling)
single_position_a     bool     feature_a's top activations all sit at one position of their contexts
own_neuron_a          int64    the neuron of feature_a's own model most correlated with it (-1: excluded)
own_neuron_corr_a     float64  that max activation correlation (NaN: feature_a excluded)
neurons_for_90pct_a   int64    fewest neurons carrying 90% of feature_a's decoder vector's squared norm
effect_corr           float64  correlation of feature_a's and feature_b's ablation effects (per-token change
                               in next-token log-probability; NaN: not among compare.causal_top_n top matches)
====================  =======  ==============================================================

Excluded features (dead, or too rare to correlate) have no partners. ``families_table`` lists
the families (connected components of mutual matches with correlation > ``FAMILY_MIN_CORR``)
that span two or more seeds, largest first:

family (int64), size (int64: member features), n_seeds (int64), mean_corr (float64: mean
correlation over the family's mutual-match edges), members (string: ``seed0:12;seed1:40,41``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from universality.measures.across_seeds import FAMILY_MIN_CORR, feature_families
from universality.runtime.atomic import atomic_path
from universality.core.errors import UnivError
from universality.outputs.feature_cards import RunSources, run_sources_of, vocab_strings
from universality.measures.matching import NO_PARTNER, Matching
from universality.analysis.own_neurons import OwnNeurons
from universality.analysis.pairs import PairResult
from universality.core.run_names import replicate_of
from universality.measures.similarity import logit_weight_similarity

FORMATS = ("csv", "parquet", "json")

MATCHED_COLUMNS: dict[str, str] = {
    "seed_a": "int64", "feature_a": "int64", "seed_b": "int64",
    "feature_b": "int64", "corr": "float64",
    "feature_b_context": "int64", "corr_context": "float64", "token_share_a": "float64",
    "hungarian_b": "int64", "hungarian_corr": "float64",
    "mutual": "bool", "logit_corr": "float64",
    "density_a": "float64", "density_b": "float64",
    "top_tokens_a": "string", "top_tokens_b": "string",
    "family": "int64",
    "sae_a": "int64", "sae_b": "int64", "same_model": "bool", "single_position_a": "bool",
    "own_neuron_a": "int64", "own_neuron_corr_a": "float64", "neurons_for_90pct_a": "int64",
    "effect_corr": "float64",
}
FAMILY_COLUMNS: dict[str, str] = {
    "family": "int64", "size": "int64", "n_seeds": "int64", "mean_corr": "float64", "members": "string",
}


def reversed_matching(m: Matching) -> Matching:
    """The same matching seen from B: B's features are the rows."""
    hungarian_a = np.full(m.best_a.size, NO_PARTNER)
    hungarian_a_corr = np.full(m.best_a.size, np.nan)
    paired = m.hungarian_b != NO_PARTNER
    hungarian_a[m.hungarian_b[paired]] = np.flatnonzero(paired)
    hungarian_a_corr[m.hungarian_b[paired]] = m.hungarian_corr[paired]
    mutual_a = np.zeros(m.best_a.size, bool)
    mutual_a[m.mutual_pairs()[1]] = True
    return Matching(m.best_a, m.best_a_corr, m.best_b, m.best_b_corr, hungarian_a, hungarian_a_corr, mutual_a)


def _direction(m: Matching, context: Matching, token_share_a: np.ndarray, a: RunSources, b: RunSources,
               tokens_a: list[str], tokens_b: list[str], family_a: np.ndarray) -> pd.DataFrame:
    """Rows of A's features matched into B, raw and given the current token (``context``)."""
    has = m.best_b != NO_PARTNER
    logit_corr = np.full(m.best_b.size, np.nan)
    logit_corr[has] = logit_weight_similarity(a.logit_weights, b.logit_weights, np.flatnonzero(has), m.best_b[has])
    density_b = np.append(b.densities, np.nan)  # index NO_PARTNER (-1) -> NaN
    top_b = np.append(np.asarray(tokens_b, object), "")
    return pd.DataFrame({
        "seed_a": a.seed, "feature_a": np.arange(m.best_b.size), "seed_b": b.seed,
        "feature_b": m.best_b, "corr": m.best_b_corr,
        "feature_b_context": context.best_b, "corr_context": context.best_b_corr, "token_share_a": token_share_a,
        "hungarian_b": m.hungarian_b, "hungarian_corr": m.hungarian_corr,
        "mutual": m.mutual, "logit_corr": logit_corr,
        "density_a": a.densities, "density_b": density_b[m.best_b],
        "top_tokens_a": tokens_a, "top_tokens_b": top_b[m.best_b],
        "family": family_a,
    })


def _typed(frame: pd.DataFrame, columns: Mapping[str, str]) -> pd.DataFrame:
    return frame[list(columns)].astype(columns).reset_index(drop=True)


def family_ids(pairs: Sequence[PairResult], seed_of: Mapping[str, int]) -> tuple[dict[int, np.ndarray], pd.DataFrame]:
    """Per seed, each feature's family id (-1 outside multi-seed families), and the families table."""
    seeds = sorted({seed_of[name] for p in pairs for name in (p.run_a, p.run_b)})
    index = {s: i for i, s in enumerate(seeds)}
    matchings = {(index[seed_of[p.run_a]], index[seed_of[p.run_b]]): p.matching for p in pairs}
    fam = feature_families(matchings, min_corr=FAMILY_MIN_CORR)
    multi = np.flatnonzero(fam.n_runs > 1)
    edges = [(fam.family[i][a], m.best_b_corr[a]) for (i, _), m in matchings.items()
             for a in m.mutual_pairs()[0] if m.best_b_corr[a] > FAMILY_MIN_CORR]
    edge_frame = pd.DataFrame(edges, columns=["old", "corr"])
    mean_corr = edge_frame.groupby("old")["corr"].mean()
    order = sorted(multi, key=lambda f: (-fam.size[f], -mean_corr.get(f, 0.0), f))
    new_id = np.full(fam.size.size, -1)
    new_id[order] = np.arange(len(order))
    ids = {seeds[i]: new_id[labels] for i, labels in fam.family.items()}
    members = (pd.DataFrame([(f, seed, feat) for seed, labels in ids.items() for feat, f in enumerate(labels) if f >= 0],
                            columns=["family", "seed", "feature"])
               .groupby(["family", "seed"])["feature"].agg(lambda x: ",".join(map(str, x))).reset_index()
               .assign(text=lambda d: "seed" + d.seed.astype(str) + ":" + d.feature)
               .groupby("family")["text"].agg(";".join))
    table = pd.DataFrame({
        "family": np.arange(len(order)),
        "size": [fam.size[f] for f in order],
        "n_seeds": [fam.n_runs[f] for f in order],
        "mean_corr": [mean_corr.get(f, np.nan) for f in order],
        "members": members.reindex(np.arange(len(order)), fill_value="").to_numpy(),
    })
    return ids, _typed(table, FAMILY_COLUMNS)


def matched_table(pairs: Sequence[PairResult], sources: Mapping[str, RunSources],
                  replicate_pairs: Sequence[PairResult] = (), *,
                  own_neurons: Mapping[str, OwnNeurons]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(matched features, families) of every pair of seeds, then of every pair of SAEs of one model
    (``same_model`` rows); ``sources`` and ``own_neurons`` (each SAE's features vs its model's neurons) are
    keyed by run name. Families link features across models only.
    A single-seed run has no pairs: both tables are then empty, with their columns and dtypes."""
    if not pairs and not replicate_pairs:
        return (_typed(pd.DataFrame({c: [] for c in MATCHED_COLUMNS}), MATCHED_COLUMNS),
                _typed(pd.DataFrame({c: [] for c in FAMILY_COLUMNS}), FAMILY_COLUMNS))
    seed_of = {name: s.seed for name, s in sources.items()}
    families, family_table = (family_ids(pairs, seed_of) if pairs else
                              ({}, _typed(pd.DataFrame({c: [] for c in FAMILY_COLUMNS}), FAMILY_COLUMNS)))
    top = {name: s.top_tokens() for name, s in sources.items()}
    single = {name: s.single_position() for name, s in sources.items()}
    frames = []
    for p in [*pairs, *replicate_pairs]:
        directions = ((p.matching, p.context_matching, p.token_share_a, p.run_a, p.run_b),
                      (reversed_matching(p.matching), reversed_matching(p.context_matching), p.token_share_b, p.run_b, p.run_a))
        for (m, context, token_share, name_a, name_b), effect in zip(directions, effect_corr(p)):
            a, b = sources[name_a], sources[name_b]
            sae_a, sae_b = replicate_of(name_a), replicate_of(name_b)
            family = families[a.seed] if sae_a == 0 and a.seed in families else np.full(m.best_b.size, -1)
            own = own_neurons[name_a]
            frames.append(_direction(m, context, token_share, a, b, top[name_a], top[name_b], family).assign(
                sae_a=sae_a, sae_b=sae_b, same_model=a.seed == b.seed, single_position_a=single[name_a],
                own_neuron_a=own.neuron, own_neuron_corr_a=own.max_corr, neurons_for_90pct_a=own.neurons_for_90pct,
                effect_corr=effect))
    frame = pd.concat(frames)
    frame = frame.sort_values(["same_model", "seed_a", "sae_a", "seed_b", "sae_b", "feature_a"], kind="stable")
    return _typed(frame, MATCHED_COLUMNS), family_table


def effect_corr(pair: PairResult) -> tuple[np.ndarray, np.ndarray]:
    """The ablation-effect correlation of each of A's features with its partner ([F_A], NaN where not computed),
    and the same seen from B: the pairs it is computed for are mutual matches, each its partner's partner."""
    forward = pair.table["effect_corr"].to_numpy(np.float64)
    backward = np.full(pair.matching.best_a.size, np.nan)
    done = np.flatnonzero(np.isfinite(forward))
    backward[pair.matching.best_b[done]] = forward[done]
    return forward, backward


def run_sources(result) -> dict[str, RunSources]:
    """Sources of every seed that belongs to a pair in a finished ``pipeline.RunResult``."""
    cfg, dataset = result.cfg, result.dataset
    vocab = vocab_strings(dataset.tokenizer())
    names = dict.fromkeys(name for p in [*result.pairs, *result.replicate_pairs] for name in (p.run_a, p.run_b))
    return {
        name: run_sources_of(result.models[name].seed, result.models[name].model, result.saes[name].sae,
                             result.activations[name], dataset.heldout, cfg.data.ctx_len, cfg.compare.tokens,
                             cfg.compare.context_tokens, vocab)
        for name in names
    }


def beside(path: Path, table: str) -> Path:
    """Where another ``table`` goes beside ``path``: ``out.csv`` -> ``out.<table>.csv``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.{table}{path.suffix}")


def families_path(path: Path) -> Path:
    """Where the families table goes beside ``path``: ``out.csv`` -> ``out.families.csv``."""
    return beside(path, "families")


def _write_json(frame: pd.DataFrame, path: Path) -> None:
    records = [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
               for row in frame.astype(object).to_dict("records")]
    path.write_text(json.dumps(records, ensure_ascii=False, default=lambda v: v.item()))


WRITERS: dict[str, Callable[[pd.DataFrame, Path], None]] = {
    "csv": lambda frame, path: frame.to_csv(path, index=False),
    "parquet": lambda frame, path: frame.to_parquet(path, index=False),
    "json": _write_json,
}


def write_table(frame: pd.DataFrame, path: Path, fmt: str) -> None:
    """Write atomically in ``fmt``; the folder must exist (a typo should not create folders)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UnivError(f"folder {path.parent} does not exist")
    with atomic_path(path) as tmp:
        WRITERS[fmt](frame, tmp)


def read_table(path: Path, fmt: str, columns: Mapping[str, str]) -> pd.DataFrame:
    """Read a table written by ``write_table`` back with its documented dtypes."""
    if fmt == "parquet":
        frame = pd.read_parquet(path)
    elif fmt == "csv":
        strings = [c for c, t in columns.items() if t == "string"]
        frame = pd.read_csv(path, dtype={c: str for c in strings}, keep_default_na=False,
                            na_values={c: [""] for c in columns if c not in strings})
    else:
        frame = pd.DataFrame(json.loads(Path(path).read_text()), columns=list(columns))
        frame = frame.fillna({c: np.nan for c, t in columns.items() if t == "float64"})
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise UnivError(f"{path}: no column {', '.join(missing)} (a table of an older univ: run again to rebuild it)")
    return _typed(frame, columns)


def write_tables(matched: pd.DataFrame, families: pd.DataFrame, path: Path, fmt: str) -> tuple[Path, Path]:
    """Both tables: ``path`` and ``families_path(path)``. Checks both folders before writing either."""
    fam_path = families_path(path)
    if not Path(path).parent.is_dir():
        raise UnivError(f"folder {Path(path).parent} does not exist")
    write_table(matched, path, fmt)
    write_table(families, fam_path, fmt)
    return Path(path), fam_path
