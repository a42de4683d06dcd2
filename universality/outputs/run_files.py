"""Every file of a finished run, written in one place under ``<results>/reports/<run id>/``:

    runs/<run>/          each run's figures (its SAE's feature-density histogram)
    pairs/<a>-vs-<b>/    each pair's figures and HTML report (other dictionary sizes: figures only)
    tables/              the matched feature and family tables; a family's by-size and feature-splitting tables;
                         the crosscoder's latents table (crosscoder.parquet / .csv)
    crosscoder/<name>/   each crosscoder's latents table and relative-norm histogram (its child run's artifacts)
    report/              the run report (report.html) and its figures

``write_run_files`` returns where each went (``RunFiles``), which the tracker logs as each run's artifacts:
logging reads these files and writes none of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from universality.analysis.pairs import PairResult
from universality.core.run_names import crosscoder_name, pair_name
from universality.outputs import by_size, crosscoder_report, export, reports, split_report
from universality.outputs.reports import Figure
from universality.measures import splitting

TABLE_FORMATS = ("parquet", "csv")


@dataclass(frozen=True)
class PairFiles:
    """One comparison's child run: the pair, its kind and the folder of its report."""

    pair: PairResult
    kind: str  # "pair" (two seeds) | "replicate-pair" (two SAEs of one model) | "randomized-pair" | "untrained-pair" (the controls)
    folder: Path
    size: int | None = None  # another dictionary size than the primary, tagged on its run


@dataclass(frozen=True)
class RunFiles:
    """Where a finished run's files are: the tracker logs each folder to its run."""

    root: Path
    figures: dict[str, Path]  # run name -> its figures folder
    pairs: list[PairFiles]
    matched: pd.DataFrame  # the matched feature table (as exported)
    crosscoders: dict[str, Path] = field(default_factory=dict)  # crosscoder name -> its folder of files

    @property
    def parent_folders(self) -> list[tuple[Path, str]]:
        """(folder, artifact path) of the parent run's artifacts that were written."""
        return [(self.root / name, name) for name in ("tables", "report") if (self.root / name).is_dir()]


def write_run_files(result, root: Path) -> RunFiles:
    """Write every report, figure and table of a finished ``pipeline.RunResult`` under ``root``."""
    sources = export.run_sources(result)
    own = {name: sae.own_neurons for name, sae in result.saes.items()}
    matched, families = export.matched_table(result.pairs, sources, result.replicate_pairs, own_neurons=own)
    figures = {name: write_density_figure(result.saes[name], name, root / "runs" / name) for name in result.models}
    control = [(pair, f"{kind}-pair") for pair, kind in ((result.randomized, "randomized"), (result.untrained, "untrained"))
               if pair is not None]
    pairs = [PairFiles(pair, kind, reports.write_pair_report(pair, matched, sources, root / "pairs" / pair_name(pair.run_a, pair.run_b)))
             for pair, kind in [*((p, "pair") for p in result.pairs), *((p, "replicate-pair") for p in result.replicate_pairs),
                                *control]]
    pairs += other_size_pairs(result, root / "pairs")
    tables = root / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    for fmt in TABLE_FORMATS:
        export.write_tables(matched, families, tables / f"matched_features.{fmt}", fmt)
    sections = size_files(result, root) if len(result.cfg.sae.sizes) > 1 else ""
    sections += split_files(result, root) if result.splits else ""
    crosscoders, section = crosscoder_files(result, root) if result.crosscoders else ({}, "")
    sections += section
    if result.pairs:
        reports.write_run_report(result.pairs, result.replicate_pairs, result.randomized, result.summary, matched, sources,
                                 {name: sae.metrics for name, sae in result.saes.items()}, root / "report", own_neurons=own,
                                 n_neurons=result.cfg.model.d_mlp, by_size=sections, untrained=result.untrained,
                                 token_shares={name: sae.token_shares for name, sae in result.saes.items()})
    return RunFiles(root, figures, pairs, matched, crosscoders)


def write_density_figure(sae, name: str, folder: Path) -> Path:
    """A run's SAE feature-density histogram (drawn once per evaluation stage, then reused)."""
    folder.mkdir(parents=True, exist_ok=True)
    for figure in reports.drawn_once(sae.evaluation, lambda: [reports.density_histogram(sae.metrics["log10_density_hist"], name)]):
        reports.write_figure(figure, folder)
    return folder


def other_size_pairs(result, folder: Path) -> list[PairFiles]:
    """The pairs of a dictionary family's other sizes (not the primary): their figures (their features are in no
    matched table: no feature cards)."""
    written = []
    for size in result.cfg.sae.sizes:
        if size == result.cfg.sae.dict_size:
            continue
        for pair, kind in [*((p, "pair") for p in result.size_pairs[size]),
                           *((p, "replicate-pair") for p in result.size_replicate_pairs[size])]:
            pair_folder = folder / pair_name(pair.run_a, pair.run_b)
            pair_folder.mkdir(parents=True, exist_ok=True)
            for figure in reports.pair_figures(pair):
                reports.write_figure(figure, pair_folder)
            written.append(PairFiles(pair, kind, pair_folder, size))
    return written


def write_table_and_figure(table: pd.DataFrame, name: str, figure: Figure, tables: Path, figures: Path) -> list[Path]:
    """A table ``name`` (Parquet and CSV) in ``tables`` and its figure in ``figures``, each written atomically."""
    for folder in (tables, figures):
        folder.mkdir(parents=True, exist_ok=True)
    for fmt in TABLE_FORMATS:
        export.write_table(table, tables / f"{name}.{fmt}", fmt)
    return [*(tables / f"{name}.{fmt}" for fmt in TABLE_FORMATS), reports.write_figure(figure, figures)]


def size_files(result, root: Path) -> str:
    """A dictionary family's universality by size: its table and figure; returns the run report's section."""
    table = by_size.size_table(result)
    figure = by_size.size_figure(table)
    write_table_and_figure(table, by_size.TABLE_FILE, figure, root / "tables", root / "report")
    return by_size.size_section(table, figure)


def split_files(result, root: Path) -> str:
    """A dictionary family's feature splitting: every parent -> child edge, the split trees of the first model's
    largest families; returns the run report's section."""
    model, levels = next(iter(result.splits.items()))
    figure = split_report.tree_figure(model, levels)
    write_table_and_figure(splitting.splits_table(result.splits), split_report.TABLE_FILE, figure, root / "tables",
                           root / "report")
    return split_report.split_section(result.summary, [(level.size_a, level.size_b) for level in levels], figure)



def crosscoder_files(result, root: Path) -> tuple[dict[str, Path], str]:
    """Each crosscoder's latents table (Parquet and CSV) and relative-norm histogram in ``crosscoder/<name>/``, the
    main one's table in ``tables/`` too (what ``univ export`` reads); returns (name -> folder, the run report's section)."""
    from universality.analysis.heldout import eval_contexts
    from universality.outputs.feature_cards import vocab_strings

    cfg, dataset = result.cfg, result.dataset
    tokens = eval_contexts(dataset.heldout, cfg.data.ctx_len, cfg.compare.tokens).flatten().numpy()
    vocab = vocab_strings(dataset.tokenizer())
    folders, figures = {}, {}
    for name, cc in result.crosscoders.items():
        table = crosscoder_report.latents_table(cc, result.crosscoder_beside if name == crosscoder_name() else {}, tokens, vocab)
        figures[name] = crosscoder_report.relative_norm_histogram(cc)
        folders[name] = root / "crosscoder" / name
        write_table_and_figure(table, "latents", figures[name], folders[name], folders[name])
        if name == crosscoder_name():
            (root / "tables").mkdir(parents=True, exist_ok=True)
            for fmt in TABLE_FORMATS:
                export.write_table(table, root / "tables" / f"{crosscoder_report.TABLE_FILE}.{fmt}", fmt)
    return folders, crosscoder_report.crosscoder_section(result.crosscoders, result.summary, figures[crosscoder_name()])
