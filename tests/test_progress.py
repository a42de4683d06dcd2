"""Progress from worker processes: bars in a worker write throttled records, the driver draws them
(one live line per task, one line per finished stage), for loky workers and a Dask cluster."""

from __future__ import annotations

import io
import json
import re
import sys

import pytest
from fast_pipeline import fast_cfg, run_fast

from universality import pipeline
from universality.runtime import progress
from universality.runtime.engine import Engine


class Terminal(io.StringIO):
    """A StringIO that says it is a terminal, so the driver draws live lines into it."""

    def isatty(self) -> bool:
        return True


def test_a_bar_in_a_worker_writes_records_at_most_about_once_a_second(tmp_path, monkeypatch):
    writes = []
    monkeypatch.setattr(progress, "write_text", lambda path, text: writes.append((path.name, json.loads(text))))
    with progress.reporting(tmp_path, 3):
        for _ in progress.bar(range(20_000), desc="transformer seed 1"):  # well under a second
            pass
        with progress.bar(total=10, desc="SAE relu", unit="step") as sae:
            sae.update(10)
            sae.set_postfix(mse="0.010")
    names = [name for name, _ in writes]
    assert names[0] == names[-1] == "3.0.json"  # the task's own record: started, finished
    assert 2 <= names.count("3.1.json") <= 4  # opened, maybe one update, closed: not one per step
    last = {name: record for name, record in writes}
    assert last["3.1.json"]["done"] and last["3.1.json"]["n"] == 20_000 and last["3.1.json"]["prefix"] == "transformer seed 1"
    assert last["3.2.json"] | {"elapsed": 0, "rate": None} == {
        "prefix": "SAE relu", "n": 10, "total": 10, "initial": 0, "elapsed": 0, "rate": None, "unit": "step",
        "postfix": "mse=0.010", "done": True}
    assert last["3.0.json"]["done"]


def test_bars_draw_here_outside_workers_and_are_off_in_workers_without_a_folder(tmp_path):
    assert not progress.bar(total=3, file=io.StringIO()).disable
    with progress.reporting(None, 0):
        assert progress.bar(total=3).disable
    assert list(tmp_path.iterdir()) == []


def write_record(folder, task, stage, **state):
    (folder / f"{task}.{stage}.json").write_text(json.dumps(state))


def test_the_driver_draws_a_live_line_per_task_and_lists_finished_stages(tmp_path):
    write_record(tmp_path, 0, 0, elapsed=0.0, done=False)
    write_record(tmp_path, 0, 1, prefix="transformer seed 0", n=450, total=450, initial=0, elapsed=190.0, rate=2.4,
                 unit="it", postfix="eval=3.301, loss=3.212", done=True)
    write_record(tmp_path, 0, 2, prefix="SAE relu", n=200, total=800, initial=0, elapsed=60.0, rate=3.3, unit="step",
                 postfix="mse=0.0210", done=False)
    write_record(tmp_path, 2, 0, elapsed=75.0, done=True)
    screen = Terminal()
    display = progress.Display(tmp_path, ["seed0", "seed1", "seed0 vs seed1"], screen, live=True)
    display.poll()
    display.poll()  # each finished stage is listed once
    text = screen.getvalue()
    assert text.count("seed0: transformer seed 0 done in 03:10 (eval=3.301, loss=3.212)") == 1
    assert text.count("seed0 vs seed1: finished in 01:15") == 1
    live = text.rsplit("seed0 vs seed1: finished in 01:15", 1)[1]
    assert re.search(r"seed0: SAE relu: +25%.*200/800 \[01:00<03:0\d, +3\.\d+step/s, mse=0\.0210\]", live)
    assert "seed1: waiting" in live and "seed0 vs seed1: finished" in live
    display.close()


def test_without_a_terminal_running_stages_are_plain_lines_when_first_seen_and_every_interval(tmp_path, monkeypatch):
    write_record(tmp_path, 0, 1, prefix="SAE relu", n=200, total=800, initial=0, elapsed=60.0, rate=3.3, unit="step",
                 postfix=None, done=False)
    write_record(tmp_path, 1, 0, elapsed=1.0, done=True)
    log = io.StringIO()
    display = progress.Display(tmp_path, ["seed0", "seed1"], log, live=False)
    display.poll()
    display.poll()  # within the interval: nothing new
    assert log.getvalue() == "seed1: finished in 00:01\nseed0: SAE relu: 25% 200/800 [01:00<03:01,  3.30step/s]\n"
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    write_record(tmp_path, 0, 1, prefix="SAE relu", n=800, total=800, initial=0, elapsed=240.0, rate=3.3, unit="step",
                 postfix="mse=0.0210", done=True)
    write_record(tmp_path, 0, 2, prefix="held-out activations", n=3, total=None, initial=0, elapsed=2.0, rate=1.5,
                 unit="it", postfix=None, done=False)
    display.poll()
    display.poll()  # the interval (now 0) has passed: the running stage again
    assert log.getvalue().splitlines()[2:] == ["seed0: SAE relu done in 04:00 (mse=0.0210)",
                                               *["seed0: held-out activations: 3 [00:02,  1.50it/s]"] * 2]


class LogFile(io.StringIO):
    """A log file: what a bar without a terminal sees."""

    def isatty(self) -> bool:
        return False


def test_without_a_terminal_a_bar_writes_a_line_when_it_starts_every_interval_and_when_it_ends(monkeypatch):
    log = LogFile()
    for _ in progress.bar(range(20_000), desc="transformer seed 1", file=log):  # well under the interval
        pass
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and lines[0] == "transformer seed 1: 0% 0/20000 [00:00<?, ?it/s]"
    assert lines[1].startswith("transformer seed 1 done in 00:00")
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    log = LogFile()
    with progress.bar(total=4, desc="SAE relu", unit="step", file=log, leave=False) as sae:
        for _ in range(4):
            sae.update(1)
            sae.set_postfix(mse="0.010")
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) > 2
    assert lines[0] == "SAE relu: 0% 0/4 [00:00<?, ?step/s]" and lines[-1] == "SAE relu done in 00:00 (mse=0.010)"
    assert all(re.fullmatch(r"SAE relu: \d+% [0-4]/4 \[.*\]", line) for line in lines[:-1])
    assert progress.bar(total=3, file=Terminal()).__class__ is progress.tqdm  # a terminal keeps tqdm's bar
    log = LogFile()
    failing = progress.bar(total=4, desc="SAE relu", file=log)
    try:
        raise RuntimeError("diverged")
    except RuntimeError:
        failing.close()  # as the command line closes the bars an error left open
    assert log.getvalue() == "SAE relu: 0% 0/4 [00:00<?, ?it/s]\n"  # no "done" line


def test_a_run_with_stderr_to_a_file_writes_short_plain_lines(tmp_path, monkeypatch):
    with open(tmp_path / "stderr.log", "w") as log:
        monkeypatch.setattr(sys, "stderr", log)
        run_fast(tmp_path / "results", [0], progress=True)
    text = (tmp_path / "stderr.log").read_text()
    assert "\r" not in text and max(map(len, text.splitlines())) <= 500, text
    for stage in ("tokenizing", "transformer seed 0", "SAE relu", "held-out activations"):
        assert any(line.startswith(f"{stage}: 0% ") or line.startswith(f"{stage}: 0 ") for line in text.splitlines()), stage
        assert any(line.startswith(f"{stage} done in ") for line in text.splitlines()), stage


def check_reported(output: str, runs: list[str], pairs: list[str]) -> None:
    """Every run's stages and every pair were listed as they finished."""
    lines = output.splitlines()
    for run in runs:
        for stage in ("SAE relu done in", "held-out activations done in", "finished in"):
            assert any(line.startswith(f"{run}: {stage}") for line in lines), (run, stage, output)
    for seed in (0, 1):
        assert any(re.match(rf"seed\d.*: transformer seed {seed} done in", line) for line in lines), output
    for pair in pairs:
        assert f"{pair}: finished in" in output


@pytest.mark.slow
def test_parallel_workers_report_every_run_and_stage(tmp_path, capsys):
    result = pipeline.run(fast_cfg(), [0, 1], tmp_path / "results", device="cpu", engine=Engine(jobs=2))
    output = capsys.readouterr().err
    assert list(result.saes) == ["seed0", "seed1", "seed0-sae1"]
    check_reported(output, list(result.saes), ["seed0 vs seed1", "seed0 vs seed0-sae1"])
    assert "\r" not in output  # not a terminal: plain lines only
    assert not (tmp_path / "results" / "progress").exists()  # records are removed afterwards
