"""Content-addressed stage outputs: ``<results>/cache/<stage>/<key>/``.

A stage's key hashes everything that determines its output (its config and its upstream keys,
the corpus fingerprint, the seed, the stage's code version), so a re-run with the same inputs
finds the folder complete and skips the work, and any change lands in a new folder.

A folder is complete once its ``done.json`` exists and every file it lists still has the size and
sha256 recorded there; ``done.json`` is written last, atomically. A truncated or corrupted file
therefore reads as "not complete" and the stage is recomputed. Once a folder's hashes have matched, the
stat signature of its files (size, times, inode) is kept in ``.verified.json`` inside it, so later
processes trust the files without hashing them again while that signature holds (a cached re-run
then reads no large file twice). A lock file per folder keeps two
processes from building the same stage at once: the second waits, then finds the stage complete.
Locks are ``fcntl.flock`` locks: with several machines, the results folder must be on a shared
filesystem whose locks work across hosts (NFSv4, Lustre, GPFS); elsewhere two hosts may build the
same stage twice, which is wasteful but safe (every write is atomic and deterministic).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from universality.runtime.atomic import write_text

DONE = "done.json"
LOCK = ".lock"
MEMO = ".verified.json"  # the stat signature of the folder's files when their hashes last matched
SCRATCH = "resume"  # a stage's resumable training checkpoints: not part of its output
STAGES = ("data", "model", "sae", "activations", "evaluation", "own_neurons", "token_share", "pair", "split",
          "crosscoder", "crosscoder_eval")  # folders, in data-flow order
_HASH_CHUNK = 1 << 22
TIMESTAMP_TICK_NS = 2_000_000_000  # the coarsest file timestamp step allowed for (FAT, SMB: 2 s; ext4: a jiffy)
_verified: dict[Path, list] = {}  # stage folder -> stat signature of its files when their hashes last matched (MEMO's)
_locked_at: dict[Path, float] = {}  # stage folder -> when this process took its lock (build time in done.json)


def stage_key(stage: str, version: int, **inputs: Any) -> str:
    """A short stable hash of a stage's name, code version and inputs (JSON-serializable)."""
    payload = json.dumps({"stage": stage, "version": version, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def stage_dir(results_dir: Path, stage: str, key: str) -> Path:
    return Path(results_dir) / "cache" / stage / key


def folder_name(directory: Path) -> str:
    """A stage folder (``stage_dir``'s result) as "<stage>/<key>": what identifies it under any results folder."""
    return f"{Path(directory).parent.name}/{Path(directory).name}"


def results_dir_of(directory: Path) -> Path:
    """The results folder a stage folder (``stage_dir``'s result) belongs to."""
    return Path(directory).parent.parent.parent


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def output_files(directory: Path) -> list[Path]:
    """The stage's output files: everything but the marker, the lock, temp files and scratch."""
    return sorted(
        p for p in directory.rglob("*")
        if p.is_file() and p.name not in (DONE, LOCK) and not p.name.startswith(".")
        and SCRATCH not in p.relative_to(directory).parts[:-1]
    )


def manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """relative path -> {size, sha256} of every output file."""
    return {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
            for p in output_files(directory)}


def _read_done(directory: Path) -> dict[str, Any] | None:
    try:
        done = json.loads((directory / DONE).read_text())
    except (OSError, ValueError):
        return None
    return done if isinstance(done, dict) and {"summary", "files"} <= set(done) else None


def _intact(directory: Path, files: dict[str, dict[str, Any]], hashes: bool) -> bool:
    for name, expected in files.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != expected["size"]:
            return False
        if hashes and file_sha256(path) != expected["sha256"]:
            return False
    return True


def _signature(directory: Path, names: list[str]) -> list | None:
    """[name, size, mtime, ctime, inode] of each file: a replaced file has a new inode, a rewritten one new
    times, except a same-size rewrite within one timestamp tick (``_remember`` allows for that)."""
    try:
        stats = [(directory / name).stat() for name in names]
    except OSError:
        return None
    return [[name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino] for name, st in zip(names, stats)]


def _trusted(directory: Path, signature: list) -> bool:
    """Whether ``signature`` is the one the folder's files had when this process, or any before it (``MEMO``),
    last found their hashes matching."""
    if _verified.get(directory) == signature:
        return True
    try:
        return json.loads((directory / MEMO).read_text()) == signature
    except (OSError, ValueError):
        return False


def _remember(directory: Path, signature: list | None, taken_ns: int) -> None:
    """Trust ``signature`` (taken at ``taken_ns``) next time only if no file changed within a timestamp tick
    before it: a second same-size change in that tick would leave it as it is (git's "racily clean" rule),
    so a folder written just now is hashed again when next checked. Kept in ``MEMO`` for other processes
    (where the folder is writable: a read-only results folder is hashed each time)."""
    if signature is not None and all(ctime < taken_ns - TIMESTAMP_TICK_NS for *_, ctime, _ in signature):
        _verified[directory] = signature
        with contextlib.suppress(OSError):
            write_text(directory / MEMO, json.dumps(signature))
    else:
        _verified.pop(directory, None)


def is_complete(directory: Path) -> bool:
    """Whether the stage finished and its files are intact (sizes and sha256 as recorded). Files
    hashed once (in any process) are not hashed again while their size, times and inode stay the same."""
    done = _read_done(directory)
    if done is None:
        return False
    taken = time.time_ns()
    signature = _signature(directory, [DONE, *done["files"]])
    if signature is not None and _trusted(directory, signature):
        return True
    intact = signature is not None and _intact(directory, done["files"], hashes=True)
    if intact:
        _remember(directory, signature, taken)
    return intact


def mark_complete(directory: Path, summary: dict[str, Any], label: str = "") -> None:
    """Record the stage's summary, a one-line description, its build time and its files' checksums; written last."""
    seconds = time.perf_counter() - _locked_at.get(directory, time.perf_counter())
    done = {"label": label, "seconds": round(seconds, 3), "summary": summary, "files": manifest(directory)}
    write_text(directory / DONE, json.dumps(done, indent=1, default=str))


def read_summary(directory: Path) -> dict[str, Any]:
    return json.loads((directory / DONE).read_text())["summary"]


def build_seconds(directory: Path) -> float:
    """How long building the stage took, as recorded when it finished (0 when unknown)."""
    return float((_read_done(directory) or {}).get("seconds", 0.0))


@contextlib.contextmanager
def lock(directory: Path) -> Iterator[None]:
    """Hold the stage folder's exclusive lock (creating the folder); waits while another process holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        _locked_at[directory] = time.perf_counter()
        try:
            yield
        finally:
            _locked_at.pop(directory, None)
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(frozen=True)
class Stage:
    """One cached stage: its folder under ``<results>/cache/`` and its code version, bumped whenever its outputs
    change for the same inputs (so every stale folder is left behind, never reused)."""

    name: str
    version: int

    def __post_init__(self) -> None:
        if self.name not in STAGES:
            raise ValueError(f"stage {self.name!r} is not one of {STAGES}")

    def key(self, **inputs: Any) -> str:
        return stage_key(self.name, self.version, **inputs)

    def folder(self, results_dir: Path, key: str) -> Path:
        return stage_dir(results_dir, self.name, key)

    def is_cached(self, results_dir: Path, key: str) -> bool:
        return is_complete(self.folder(results_dir, key))

    def build(self, results_dir: Path, key: str, compute: Callable[[Path], dict[str, Any]], label: str) -> Path:
        """The stage's folder for ``key``, built at most once: under its lock, unless it is complete already,
        ``compute(folder)`` writes the outputs (atomically) and returns the summary that ``done.json`` records."""
        directory = self.folder(results_dir, key)
        with lock(directory):
            if not is_complete(directory):
                mark_complete(directory, compute(directory), label)
        return directory


@dataclass(frozen=True)
class Entry:
    """One cached stage folder, as ``univ cache ls`` shows it."""

    stage: str
    key: str
    size: int  # bytes, scratch included
    state: str  # "complete" | "damaged" (files changed since) | "partial" (never finished)
    label: str  # what it is: "transformer seed0", "SAE of seed1", ...
    seconds: float  # how long building it took (0 when unknown)


def entries(results_dir: Path, stage: str | None = None) -> list[Entry]:
    """Every cached stage folder (of one ``stage``, if given); checks sizes, not hashes (fast)."""
    root = Path(results_dir) / "cache"
    found = []
    for directory in sorted(root.glob(f"{stage or '*'}/*")):
        if not directory.is_dir():
            continue
        done = _read_done(directory)
        state = "partial" if done is None else "complete" if _intact(directory, done["files"], hashes=False) else "damaged"
        size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
        done = done or {}
        found.append(Entry(directory.parent.name, directory.name, size, state, done.get("label", ""), done.get("seconds", 0.0)))
    return found


def clear(results_dir: Path, stage: str | None = None) -> int:
    """Remove every cached stage output (of one ``stage``, if given); returns how many folders were removed."""
    removed = entries(results_dir, stage)
    for entry in removed:
        shutil.rmtree(stage_dir(results_dir, entry.stage, entry.key))
    return len(removed)
