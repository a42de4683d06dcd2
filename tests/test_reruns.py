"""A re-run answered by the run it repeats: the request key changes with everything the answer depends on, and a
recorded answer holds only while its stage folders are complete and its MLflow run is finished and not deleted."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from universality.core.config import load_preset
from universality.runtime import cache
from universality.tracking import reruns, store


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("def f(x):\n    return x + 1\n" * 50)
    return path


def key_of(cfg, corpus, seeds=(0, 1), device="auto", results="r", tracking_uri=None, experiment="univ"):
    return reruns.request_key(cfg.replace(data={"corpus": str(corpus)}), list(seeds), device, corpus.parent / results,
                              tracking_uri, experiment)


def test_the_request_key_changes_with_everything_the_answer_depends_on(corpus):
    cfg = load_preset("tiny")
    key = key_of(cfg, corpus)
    assert key_of(cfg, corpus) == key  # nothing changed: the same request
    changed = {
        "a setting": key_of(cfg.replace(compare={"n_bootstrap": 7}), corpus),
        "the seeds": key_of(cfg, corpus, seeds=(0, 2)),
        "their order": key_of(cfg, corpus, seeds=(1, 0)),
        "the device": key_of(cfg, corpus, device="cpu"),
        "the results folder": key_of(cfg, corpus, results="elsewhere"),
        "the store": key_of(cfg, corpus, tracking_uri="http://127.0.0.1:5999"),
        "the experiment": key_of(cfg, corpus, experiment="other"),
    }
    corpus.write_text(corpus.read_text() + "y = 2\n")
    changed["the corpus's content"] = key_of(cfg, corpus)
    assert key not in changed.values() and len(set(changed.values())) == len(changed), changed


def test_the_code_digest_covers_every_file_of_the_packages(tmp_path, monkeypatch):
    package = tmp_path / "fakepkg"
    (package / "assets").mkdir(parents=True)
    (package / "__init__.py").write_text("x = 1\n")
    (package / "assets" / "page.html").write_text("<p>")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(reruns, "PACKAGES", ("fakepkg",))
    first = reruns.code_digest()
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "x.pyc").write_bytes(b"\0")  # compiled files are not the code
    assert reruns.code_digest() == first
    (package / "assets" / "page.html").write_text("<p>!")
    assert reruns.code_digest() != first


def test_the_gpus_the_driver_lists_are_part_of_the_request(tmp_path, monkeypatch, corpus):
    cfg = load_preset("tiny")
    monkeypatch.setattr(reruns, "NVIDIA_GPUS", tmp_path / "gpus")
    without = key_of(cfg, corpus)
    (tmp_path / "gpus" / "0000:01:00.0").mkdir(parents=True)  # "auto" would now run on CUDA
    assert key_of(cfg, corpus) != without


def stage_folder(results, stage, key):
    folder = cache.stage_dir(results, stage, key)
    folder.mkdir(parents=True)
    (folder / "out.bin").write_bytes(b"\1" * 64)
    cache.mark_complete(folder, {}, stage)
    return folder


def test_a_recorded_answer_holds_while_its_folders_and_run_do(tmp_path):
    results = tmp_path / "results"
    folders = [stage_folder(results, "data", "k1"), stage_folder(results, "pair", "k2")]
    client = MlflowClient(store.embedded_uri(results))
    experiment = client.create_experiment("univ")
    run = client.create_run(experiment).info.run_id
    answer = reruns.Answer(run, experiment, store.embedded_uri(results), "the summary",
                           tuple(map(cache.folder_name, folders)))
    assert reruns.recorded(results, "req") is None  # nothing recorded
    reruns.record(results, "req", answer)
    assert reruns.recorded(results, "req") is None  # the run is still RUNNING
    client.set_terminated(run)
    assert reruns.recorded(results, "req") == answer
    assert reruns.recorded(results, "another") is None

    (folders[1] / "out.bin").write_bytes(b"\2" * 64)  # damaged since: the answer no longer holds
    assert reruns.recorded(results, "req") is None
    (folders[1] / "out.bin").write_bytes(b"\1" * 64)
    assert reruns.recorded(results, "req") == answer
    client.delete_run(run)  # deleted in the UI
    assert reruns.recorded(results, "req") is None
    client.restore_run(run)
    assert reruns.recorded(results, "req") == answer

    (results / reruns.COMMANDS / "req.json").write_text("{not json")
    assert reruns.recorded(results, "req") is None


def test_only_sqlite_stores_are_asked_without_mlflow(tmp_path):
    assert not store.is_finished_run("http://127.0.0.1:5999", "abc")  # a server: only MLflow can ask
    assert not store.is_finished_run(f"sqlite:///{tmp_path / 'absent.db'}", "abc")
    assert not (tmp_path / "absent.db").exists()  # asking created nothing
