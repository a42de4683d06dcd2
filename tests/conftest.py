"""Shared fixtures: small corpora and the tiny preset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from universality.core.config import load_preset


@pytest.fixture(scope="session")
def tiny_cfg():
    return load_preset("tiny")


@pytest.fixture
def one_thread():
    """Small matmuls run faster (and steadier on a shared machine) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def text_corpus(tmp_path: Path) -> Path:
    """A small folder corpus of real Python source (a few stdlib modules)."""
    from universality.text.corpus import stdlib_files

    folder = tmp_path / "corpus"
    folder.mkdir()
    for path in stdlib_files()[:40]:
        (folder / f"{path.parent.name}_{path.name}").write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def tracked_tiny(tmp_path_factory):
    """One tracked ``univ run --seeds 2 --preset tiny`` (embedded MLflow store), shared by the
    tracking, report and export tests: (results folder, the command's output)."""
    from click.testing import CliRunner

    from universality.cli import main

    results = tmp_path_factory.mktemp("tracked") / "results"
    out = CliRunner().invoke(main, ["run", "--seeds", "2", "--preset", "tiny", "--results-dir", str(results)])
    assert out.exit_code == 0, out.output
    return results, out.output
