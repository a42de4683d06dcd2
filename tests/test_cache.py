"""The stage cache: keys, checksums, listing and clearing, and what a re-run recomputes."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from fast_pipeline import fast_cfg, run_fast, stage_checksums

from universality.runtime import cache, resume
from universality.stages import data as data_stage
from universality.stages import evaluation as evaluation_stage
from universality.stages import model as model_stage
from universality.stages import pair as pair_stage
from universality.stages import sae as sae_stage
from universality.cli import main


@pytest.fixture(scope="module")
def base_results(tmp_path_factory) -> Path:
    """A finished two-seed run; each test works on its own copy."""
    results = tmp_path_factory.mktemp("base") / "results"
    run_fast(results, [0, 1])
    return results


@pytest.fixture()
def results(base_results, tmp_path) -> Path:
    copy = tmp_path / "results"
    shutil.copytree(base_results, copy)
    return copy


STAGE_OF = {"train_tokenizer": data_stage, "train_transformer": model_stage, "train_sae": sae_stage,
            "loss_recovered": evaluation_stage, "compare_runs": pair_stage}  # the work each stage module calls


def forbid(monkeypatch, *names: str) -> None:
    """Make the stages' training/comparison functions fail if called: proves a stage was cached."""
    def fail(*args, **kwargs):
        raise AssertionError("a cached stage was recomputed")
    for name in names:
        monkeypatch.setattr(STAGE_OF[name], name, fail)


def record_calls(monkeypatch, name: str) -> list:
    """Let the stage's ``name`` run, remembering its arguments."""
    calls, real = [], getattr(STAGE_OF[name], name)
    def recording(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)
    monkeypatch.setattr(STAGE_OF[name], name, recording)
    return calls


def test_stage_key_is_stable_and_changes_with_any_input():
    key = cache.stage_key("sae", 1, model="abc", sae={"lr": 1e-3})
    assert key == cache.stage_key("sae", 1, sae={"lr": 1e-3}, model="abc")
    assert key != cache.stage_key("sae", 2, model="abc", sae={"lr": 1e-3})
    assert key != cache.stage_key("sae", 1, model="abc", sae={"lr": 2e-3})


def test_done_marker_checksums_detect_corruption_and_truncation(tmp_path):
    folder = tmp_path / "stage"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\x01" * 1000)
    (folder / cache.SCRATCH).mkdir()
    (folder / cache.SCRATCH / "checkpoint.json").write_text("{}")  # scratch: not part of the output
    cache.mark_complete(folder, {"n": 1}, "a test stage")
    assert cache.is_complete(folder) and cache.read_summary(folder) == {"n": 1}
    assert set(json.loads((folder / cache.DONE).read_text())["files"]) == {"weights.bin"}

    (folder / "weights.bin").write_bytes(b"\x01" * 999 + b"\x02")  # same size, one byte flipped
    assert not cache.is_complete(folder)
    (folder / "weights.bin").write_bytes(b"\x01" * 10)
    assert not cache.is_complete(folder)
    assert [e.state for e in cache.entries(tmp_path.parent, None)] == []  # not under <results>/cache


def test_same_size_rewrite_within_one_timestamp_tick_is_caught(tmp_path):
    """A file rewritten in place with the same size, its mtime as before (as when both writes fall in one
    coarse timestamp tick): the (size, mtime) memo of verified hashes must not hide it."""
    folder = tmp_path / "stage"
    folder.mkdir()
    weights = folder / "weights.bin"
    weights.write_bytes(b"\x01" * 1000)
    cache.mark_complete(folder, {}, "a test stage")
    assert cache.is_complete(folder)
    before = weights.stat()
    with open(weights, "r+b") as f:  # in place: the same inode
        f.seek(500)
        f.write(b"\x02")
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns, weights.stat().st_ino) == (
        before.st_size, before.st_mtime_ns, before.st_ino)
    assert not cache.is_complete(folder)


def test_verified_hashes_are_reused_only_for_files_older_than_a_timestamp_tick(tmp_path, monkeypatch):
    folder = tmp_path / "stage"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\x01" * 1000)
    cache.mark_complete(folder, {}, "a test stage")
    hashed = []
    real = cache.file_sha256
    monkeypatch.setattr(cache, "file_sha256", lambda path: hashed.append(path) or real(path))
    assert cache.is_complete(folder) and cache.is_complete(folder)
    assert len(hashed) == 2  # written just now: a same-tick change could still come unseen, so hashed each time
    monkeypatch.setattr(cache, "TIMESTAMP_TICK_NS", -10**18)  # as if the files were old
    assert cache.is_complete(folder) and cache.is_complete(folder) and cache.is_complete(folder)
    assert len(hashed) == 3  # hashed once more, then trusted while size, times and inode stay


def test_another_process_trusts_the_verified_memo_until_a_file_changes(tmp_path, monkeypatch):
    folder = tmp_path / "stage"
    folder.mkdir()
    weights = folder / "weights.bin"
    weights.write_bytes(b"\x01" * 1000)
    cache.mark_complete(folder, {}, "a test stage")
    monkeypatch.setattr(cache, "TIMESTAMP_TICK_NS", -10**18)  # as if the files were old
    assert cache.is_complete(folder)  # hashed, and remembered in the folder
    assert (folder / cache.MEMO).is_file() and cache.MEMO not in json.loads((folder / cache.DONE).read_text())["files"]
    hashed = []
    real = cache.file_sha256
    monkeypatch.setattr(cache, "file_sha256", lambda path: hashed.append(path) or real(path))
    monkeypatch.setattr(cache, "_verified", {})  # a new process: nothing remembered in memory
    assert cache.is_complete(folder) and hashed == []  # trusted from the memo
    monkeypatch.setattr(cache, "_verified", {})
    weights.write_bytes(b"\x02" * 1000)  # the same size: only its times tell
    assert not cache.is_complete(folder) and hashed == [weights]


def test_damaged_training_checkpoint_is_ignored(tmp_path):
    resume.save(tmp_path, {"w": torch.ones(4)}, {"step": 3})
    tensors, state = resume.load(tmp_path)
    assert state == {"step": 3} and torch.equal(tensors["w"], torch.ones(4))
    path = tmp_path / resume.TENSORS
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resume.load(tmp_path) is None
    assert "damaged" in str(caught[0].message)


def test_rerun_with_same_arguments_does_no_work(results, monkeypatch):
    before = run_fast(results, [0, 1])
    forbid(monkeypatch, "train_transformer", "train_sae", "compare_runs", "train_tokenizer")
    again = run_fast(results, [0, 1])
    assert again.summary == pytest.approx(before.summary, rel=0, abs=0, nan_ok=True)  # NaN: an empty token-share bin


def test_new_seed_trains_only_that_seed_and_compares_only_new_pairs(results, monkeypatch):
    trained = record_calls(monkeypatch, "train_transformer")
    compared = record_calls(monkeypatch, "compare_runs")
    result = run_fast(results, [0, 1, 2])
    assert [args[4] for args in trained] == [2]  # train_transformer(train, heldout, model_cfg, cfg, seed, ...)
    assert sorted((args[0], args[3]) for args in compared) == [("seed0", "seed2"), ("seed1", "seed2")]
    assert len(result.pairs) == 3


def test_changing_an_sae_setting_retrains_saes_not_transformers(results, monkeypatch):
    forbid(monkeypatch, "train_transformer")
    saes = record_calls(monkeypatch, "train_sae")
    run_fast(results, [0, 1], fast_cfg().replace(sae={"lr": 1e-3}))
    assert len(saes) == 3  # one per seed and the replicate of seed 0's


def test_adding_sae_replicates_trains_only_the_new_saes(results, monkeypatch):
    forbid(monkeypatch, "train_transformer")
    saes = record_calls(monkeypatch, "train_sae")
    compared = record_calls(monkeypatch, "compare_runs")
    result = run_fast(results, [0, 1], fast_cfg().replace(sae={"replicates": 2}))
    assert len(saes) == 1  # replicate 2 only: replicate 1 and the seeds' own SAEs are cached
    assert sorted((args[0], args[3]) for args in compared) == [("seed0", "seed0-sae2"), ("seed0-sae1", "seed0-sae2")]
    assert [(p.run_a, p.run_b) for p in result.replicate_pairs] == [
        ("seed0", "seed0-sae1"), ("seed0", "seed0-sae2"), ("seed0-sae1", "seed0-sae2")]
    assert result.summary["ceiling.features.max_corr_median_n"] == 3


@pytest.mark.parametrize("compare", [{"tokens": 2048}, {"skip_first_positions": 0}, {"skip_first_positions": 3}])
def test_comparison_settings_re_evaluate_but_never_retrain(results, monkeypatch, compare):
    forbid(monkeypatch, "train_transformer", "train_sae")
    evaluated = record_calls(monkeypatch, "loss_recovered")
    result = run_fast(results, [0, 1], fast_cfg().replace(compare=compare))
    assert len(evaluated) == 3 and result.summary["ceiling.features.max_corr_median_n"] == 1
    tokens = compare.get("tokens", 4096)
    per_context = fast_cfg().data.ctx_len - compare.get("skip_first_positions", 1)
    assert result.saes["seed0"].metrics["tokens"] == tokens // fast_cfg().data.ctx_len * per_context


def test_corrupted_cache_entry_is_recomputed_to_the_same_result(results):
    before = stage_checksums(results, "model", "model.safetensors")
    weights = next((results / "cache" / "model").glob("*/model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    assert any(e.state == "damaged" for e in cache.entries(results, "model"))
    run_fast(results, [0, 1])
    assert stage_checksums(results, "model", "model.safetensors") == before
    assert all(e.state == "complete" for e in cache.entries(results))


def test_cache_ls_and_clear_commands(results):
    runner = CliRunner()
    listed = runner.invoke(main, ["cache", "ls", "--results-dir", str(results)])
    assert listed.exit_code == 0
    assert "transformer seed0" in listed.output and "SAE of seed1" in listed.output
    assert "held-out activations of seed0" in listed.output and "seed0 vs seed1" in listed.output
    cleared = runner.invoke(main, ["cache", "clear", "--stage", "sae", "--results-dir", str(results)])
    assert cleared.exit_code == 0 and "removed 3" in cleared.output
    assert cache.entries(results, "sae") == [] and len(cache.entries(results, "model")) == 2
    bad = runner.invoke(main, ["cache", "clear", "--stage", "nope", "--results-dir", str(results)])
    assert bad.exit_code != 0
