"""Shared fixtures: small corpora and the tiny preset."""

from __future__ import annotations

from pathlib import Path

import pytest

from universality.config import load_preset


@pytest.fixture(scope="session")
def tiny_cfg():
    return load_preset("tiny")


@pytest.fixture()
def text_corpus(tmp_path: Path) -> Path:
    """A small folder corpus of real Python source (a few stdlib modules)."""
    from universality.corpus import stdlib_files

    folder = tmp_path / "corpus"
    folder.mkdir()
    for path in stdlib_files()[:40]:
        (folder / f"{path.parent.name}_{path.name}").write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    return folder
