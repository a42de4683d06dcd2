"""Corpora: the Python standard library's source (the default), a user's files, or a Hugging Face dataset.

A corpus is a list of documents in a deterministic order plus a sha256 fingerprint of its content,
recorded with every run so results can be traced to the exact text they came from.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from universality.core.errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".jsonl")


@dataclass(frozen=True)
class Corpus:
    source: str  # what the user asked for ("stdlib", a path, "hf:NAME:SPLIT")
    documents: tuple[str, ...]
    fingerprint: str  # sha256 over the documents, in order


def load_corpus(source: str) -> Corpus:
    """Read the corpus named by ``source``; raises ``DataError`` if it holds no usable text."""
    if source == "stdlib":
        documents = _read_files(stdlib_files())
    elif source.startswith("hf:"):
        documents = _read_hf(source[3:])
    else:
        documents = _read_path(Path(source).expanduser())
    documents = tuple(d for d in documents if d.strip())
    if not documents:
        raise DataError(f"corpus {source!r} contains no readable text")
    return Corpus(source, documents, _fingerprint(documents))


def stdlib_files() -> list[Path]:
    """The standard library's .py files (not site-packages), sorted for a deterministic order."""
    files = []
    for folder, subfolders, names in os.walk(sysconfig.get_paths()["stdlib"]):
        subfolders[:] = [d for d in subfolders if d not in ("site-packages", "dist-packages")]  # never entered
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    return sorted(files)


def _fingerprint(documents: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(doc.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()


def _read_path(path: Path) -> list[str]:
    if not path.exists():
        raise DataError(f"corpus path {path} does not exist")
    if path.is_file():
        docs = _read_file(path)
        if docs is None:
            raise DataError(f"corpus file {path} is not UTF-8 text")
        return docs
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise DataError(f"corpus folder {path} has no {'/'.join(TEXT_SUFFIXES)} files")
    return _read_files(files)


def _read_files(files: list[Path]) -> list[str]:
    """Documents of every readable text file; binary or undecodable files are skipped."""
    return [doc for f in files for doc in (_read_file(f) or [])]


def _read_file(path: Path) -> list[str] | None:
    """The documents of one file, or None if it is binary or not UTF-8."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if b"\0" in raw[:8192]:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if path.suffix == ".jsonl":
        return _jsonl_texts(text, path)
    return [text]


def _jsonl_texts(text: str, path: Path) -> list[str]:
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{lineno} is not valid JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{lineno} has no string 'text' field")
        docs.append(record["text"])
    return docs


def _read_hf(spec: str) -> list[str]:
    name, _, split = spec.partition(":")
    try:
        import datasets
    except ImportError:
        raise DataError("corpus hf:... needs the 'datasets' package: pip install 'univ[datasets]'") from None
    try:
        dataset = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # the library raises many types: offline, unknown name, bad split
        raise DataError(f"cannot load Hugging Face dataset {name!r}: {str(exc).splitlines()[0]}") from None
    if "text" not in dataset.column_names:
        raise DataError(f"Hugging Face dataset {name!r} has no 'text' column")
    return list(dataset["text"])
