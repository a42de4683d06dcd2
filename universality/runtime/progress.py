"""Progress of work that runs in worker processes, shown by the process that drives it.

Bars drawn by parallel workers would garble one terminal (and a Dask worker's terminal is on
another machine), so inside a worker task (``reporting``) a stage's bar (``bar``) draws nothing:
it writes its state -- stage, count, total, elapsed time, rate, postfix -- as a small JSON record,
atomically and at most about once a second, into a folder the driving process also sees. The driver
(``shown``) polls that folder in a thread and draws one live tqdm line per task (its current stage,
with the remaining time) and one permanent line per finished stage. Dask already requires the
results folder on a filesystem every worker shares, so the records live there:
``<results>/progress/<session>/<task>.<stage>.json`` (stage 0: the task itself), removed at the end.

Outside a worker task -- one task at a time in the driving process -- ``bar`` is a plain tqdm bar.

Without a terminal (stderr to a file: a batch job, ``nohup``, CI) nothing redraws a line with carriage
returns: a stage writes one plain line when it starts, one at most every ``LOG_INTERVAL_S`` while it
runs, and one when it ends, whether its bar draws here or the driver shows a worker's records.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Sequence

from tqdm.auto import tqdm
from tqdm.std import tqdm as plain_tqdm

from universality.runtime.atomic import write_text

RECORD_INTERVAL_S = 1.0  # a worker's bar writes its record at most this often (and always when it opens and closes)
POLL_INTERVAL_S = 0.5  # the driver reads the records this often
FIELDS = ("prefix", "n", "total", "initial", "elapsed", "rate", "unit", "postfix")  # of tqdm's format_dict, recorded
LOG_INTERVAL_S = 30.0  # without a terminal, a running stage writes a line at most this often
LOG_FORMAT = "{desc}: {percentage:.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
LOG_FORMAT_UNSIZED = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"  # no total: no percentage, no time left


@dataclass
class _Sink:
    """Where the bars of the task running in this thread go: records ``<folder>/<task>.<stage>.json``
    (stage 1, 2, ... in the order the bars open); no folder: nowhere (bars are off)."""

    folder: Path | None
    task: int
    stages: int = 0


_SINK: ContextVar[_Sink | None] = ContextVar("univ_progress_sink", default=None)


def bar(*args, **kwargs) -> tqdm:
    """A tqdm bar over one stage of work (tqdm's arguments): drawn on this terminal, or, inside
    ``reporting``, written as records for the driving process."""
    sink = _SINK.get()
    if sink is None:
        if kwargs.get("disable") or is_terminal(kwargs.get("file") or sys.stderr):
            return tqdm(*args, **kwargs)
        return _LoggingBar(*args, **kwargs)
    if sink.folder is None or kwargs.get("disable"):
        return tqdm(*args, **{**kwargs, "disable": True})
    sink.stages += 1
    return _RecordingBar(*args, record=sink.folder / f"{sink.task}.{sink.stages}.json", **kwargs)


class _RecordingBar(plain_tqdm):
    """A bar that writes its state to a JSON record instead of drawing it."""

    def __init__(self, *args, record: Path, **kwargs):
        self.record = record
        super().__init__(*args, **{**kwargs, "file": io.StringIO(), "mininterval": RECORD_INTERVAL_S})

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        _write(self.record, {**{k: self.format_dict[k] for k in FIELDS}, "done": False})
        return True

    def close(self) -> None:
        closing = not self.disable
        super().close()
        if closing:
            _write(self.record, {**{k: self.format_dict[k] for k in FIELDS}, "done": True})


class _LoggingBar(plain_tqdm):
    """A bar for a log file: plain lines (``status_line``) when it opens and at most every ``LOG_INTERVAL_S``
    while it runs, and ``stage_done`` when it closes, written to its ``file``; tqdm's own drawing goes to a
    discarded buffer."""

    def __init__(self, *args, file: IO[str] | None = None, **kwargs):
        self.log = file or sys.stderr
        self.logged_at: float | None = None  # tqdm's __init__ draws (calls display) once
        super().__init__(*args, **{**kwargs, "file": io.StringIO()})

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        now = time.monotonic()
        closed = self.disable  # tqdm's close() draws once more after disabling the bar: close writes its own line
        if not closed and (self.logged_at is None or now - self.logged_at >= LOG_INTERVAL_S):
            self.logged_at = now
            self._line(status_line({k: self.format_dict[k] for k in FIELDS}))
        return True

    def close(self) -> None:
        """The stage's last line, unless it is closed while an error is handled (the error's line follows, as a
        terminal's bar is cleared then)."""
        closing = not self.disable and sys.exc_info()[0] is None
        super().close()
        if closing:
            self._line(stage_done(self.format_dict))

    def _line(self, text: str) -> None:
        self.log.write(text + "\n")
        self.log.flush()


def is_terminal(stream: IO[str]) -> bool:
    """Whether ``stream`` is a terminal (a stream without ``isatty`` is not)."""
    return bool(getattr(stream, "isatty", lambda: False)())


def status_line(state: dict) -> str:
    """One plain line of a running stage from its ``FIELDS``: 'SAE relu: 25% 200/800 [01:00<03:01, 3.30step/s, mse=0.02]'."""
    return plain_tqdm.format_meter(**{k: state[k] for k in FIELDS}, bar_format=LOG_FORMAT if state["total"] else LOG_FORMAT_UNSIZED)


def stage_done(state: dict) -> str:
    """'SAE relu done in 02:10 (mse=0.012, l0=17.3)' from a stage's prefix, elapsed time and postfix."""
    postfix = f" ({state['postfix']})" if state.get("postfix") else ""
    return f"{state['prefix']} done in {tqdm.format_interval(state['elapsed'])}{postfix}"


def _write(record: Path, state: dict) -> None:
    """Progress never stops the work: a record that cannot be written is skipped."""
    try:
        write_text(record, json.dumps(state))
    except OSError:
        pass


@contextlib.contextmanager
def reporting(folder: Path | None, task: int) -> Iterator[None]:
    """Within (in a worker), ``bar``s write records for task number ``task`` into ``folder``
    (None: they are off), and the task's own record says when it started and finished."""
    token = _SINK.set(_Sink(folder, task))
    start = time.monotonic()
    try:
        if folder is not None:
            _write(folder / f"{task}.0.json", {"elapsed": 0.0, "done": False})
        yield
        if folder is not None:
            _write(folder / f"{task}.0.json", {"elapsed": time.monotonic() - start, "done": True})
    finally:
        _SINK.reset(token)


@dataclass(frozen=True)
class Board:
    """A set of tasks to show: their labels, in task order, and the folder that holds their records
    (seen by every worker: under the results folder)."""

    folder: Path
    labels: Sequence[str]

    def only(self, indices: Sequence[int]) -> Board:
        return Board(self.folder, [self.labels[i] for i in indices])


@contextlib.contextmanager
def shown(board: Board | None, file: IO[str] | None = None, live: bool | None = None) -> Iterator[Path | None]:
    """Show the progress of ``board``'s tasks while the block runs them; yields the folder their
    records go to (a fresh one per call, removed afterwards), or None without a board. ``live``:
    draw a live line per task (default: when ``file`` is a terminal); finished stages are always listed."""
    if board is None:
        yield None
        return
    Path(board.folder).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="run-", dir=Path(board.folder).resolve()))
    file = file or sys.stderr
    display = Display(folder, board.labels, file, file.isatty() if live is None else live)
    stop = threading.Event()
    thread = threading.Thread(target=display.follow, args=(stop,), daemon=True, name="univ-progress")
    thread.start()
    try:
        yield folder
    finally:
        stop.set()
        thread.join()
        display.poll()
        display.close()
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(board.folder)  # only when no other run is using it


class _Line(plain_tqdm):
    """One driver-side line that draws a worker's record as tqdm would: its count, total, elapsed time,
    rate and the time left."""

    shown: dict = {}

    @property
    def format_dict(self) -> dict:
        return {**super().format_dict, **self.shown}


@dataclass
class Display:
    """Draws the records in ``folder`` of tasks labelled ``labels``."""

    folder: Path
    labels: Sequence[str]
    file: IO[str]
    live: bool
    listed: set[tuple[int, int]] = field(default_factory=set)  # finished (task, stage) records already listed
    lines: list[_Line] = field(default_factory=list)
    started: set[tuple[int, int]] = field(default_factory=set)  # not live: running stages already logged once
    logged_at: float | None = None  # not live: when the running stages were last logged

    def __post_init__(self) -> None:
        if self.live:
            self.lines = [_Line(total=None, position=i, file=self.file, leave=False, bar_format="{desc}",
                                desc=f"{label}: waiting") for i, label in enumerate(self.labels)]

    def follow(self, stop: threading.Event) -> None:
        while not stop.wait(POLL_INTERVAL_S):
            self.poll()

    def poll(self) -> None:
        records = read_records(self.folder)
        for (task, stage), record in sorted(records.items()):
            if record["done"] and (task, stage) not in self.listed:
                self.listed.add((task, stage))
                plain_tqdm.write(finished_line(self.labels[task], record), file=self.file)
        if not self.live:
            self.log_running(records)
        for task, line in enumerate(self.lines):
            stages = {stage: r for (t, stage), r in records.items() if t == task}
            if stages:
                line.shown, line.bar_format = live_state(self.labels[task], stages)
                line.refresh()

    def log_running(self, records: dict[tuple[int, int], dict]) -> None:
        """Without live lines: a line for each stage when it is first seen running, and for every running
        stage at most every ``LOG_INTERVAL_S``."""
        now = time.monotonic()
        due = self.logged_at is None or now - self.logged_at >= LOG_INTERVAL_S
        running = [(key, r) for key, r in sorted(records.items()) if not r["done"] and "prefix" in r]
        for key, record in running:
            if due or key not in self.started:
                self.started.add(key)
                plain_tqdm.write(f"{self.labels[key[0]]}: {status_line(record)}", file=self.file)
        if due:
            self.logged_at = now

    def close(self) -> None:
        for line in reversed(self.lines):
            line.close()


def read_records(folder: Path) -> dict[tuple[int, int], dict]:
    """(task, stage) -> record of every record in ``folder`` (a file vanishing meanwhile is skipped)."""
    records = {}
    for path in folder.glob("*.json"):
        task, stage = map(int, path.stem.split("."))
        with contextlib.suppress(OSError, ValueError):
            records[task, stage] = json.loads(path.read_text())
    return records


def finished_line(label: str, record: dict) -> str:
    """'seed0: SAE relu done in 02:10 (mse=0.012, l0=17.3)', or 'seed0: finished in 05:30' for the task."""
    if "prefix" not in record:
        return f"{label}: finished in {tqdm.format_interval(record['elapsed'])}"
    return f"{label}: {stage_done(record)}"


def live_state(label: str, stages: dict[int, dict]) -> tuple[dict, str | None]:
    """What a task's live line shows, from its records by stage: (format_dict fields, bar format)."""
    if stages.get(0, {}).get("done"):
        return {"prefix": f"{label}: finished"}, "{desc}"
    current = stages[max(stages)]
    if "prefix" not in current:
        return {"prefix": f"{label}: running"}, "{desc}"
    return {**{k: current[k] for k in FIELDS}, "prefix": f"{label}: {current['prefix']}"}, None
