"""User errors as one line and a non-zero exit; nothing half-written; resume after kill -9.

The bad-input suite runs the real command in its own process, as a user would: stderr must be one
line starting "Error:" (click's usage errors, exit status 2, print the usage before it) and no traceback."""

from __future__ import annotations

import errno
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fast_pipeline import fast_cfg, run_fast

from models.training import train_transformer
from models.transformer import TransformerConfig
from universality.runtime import cache
from universality.core.config import load_config, load_preset
from universality.core.errors import TrainingDiverged, UnivError


def univ(*args, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``univ ARGS`` in a fresh process, with no tracking URI from this environment unless ``env`` sets one."""
    environ = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | (env or {})
    return subprocess.run([sys.executable, "-c", "from universality.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, timeout=600, env=environ, cwd=cwd)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str, status: int = 1,
                          trained: bool = False) -> None:
    """Exit ``status``, no traceback, and stderr one line "Error: ..." (the last line, after click's usage
    text for status 2, or after progress lines when the command ``trained`` before failing)."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == status, output
    lines = [line for line in re.split(r"[\r\n]", result.stderr) if line.strip()]
    assert lines and lines[-1].startswith("Error: "), result.stderr
    assert len(lines) == 1 or status == 2 or trained and not any("Error" in line for line in lines[:-1]), result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], result.stderr


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"", "no readable text"),
    (bytes(range(256)) * 40, "not UTF-8"),
], ids=["missing", "empty", "binary"])
def test_bad_corpus_is_one_line_error(tmp_path, content, message):
    corpus = tmp_path / "corpus.txt"
    if content is not None:
        corpus.write_bytes(content)
    result = univ("run", "--preset", "tiny", "--corpus", corpus, "--results-dir", tmp_path / "r")
    assert_one_line_error(result, message)


@pytest.mark.parametrize("args, message", [
    (["run", "--seeds", "0"], "--seeds"),
    (["run", "--preset", "nonexistent"], "--preset"),
    (["run", "--seed-list", "-1"], "--seed-list"),
    (["run", "--seed-list", str(2**64)], "--seed-list"),  # would overflow torch.manual_seed
    (["train-sae", "acts.npy", "--out", "sae", "--seed", "-1"], "--seed"),
    (["train-sae", "acts.npy", "--out", "sae", "--seed", str(2**64)], "--seed"),
])
def test_bad_options_are_usage_errors(tmp_path, args, message):
    result = univ(*args, "--results-dir", tmp_path / "r") if args[0] == "run" else univ(*args, cwd=tmp_path)
    assert_one_line_error(result, message, status=2)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text, message", [
    ("[train\nsteps = 3", "malformed config"),
    ("[train]\nsteps = -1", "train.steps"),
    ("[nope]\nx = 1", "unknown config section"),
    ("[model]\nn_heads = 0", "model dimensions must be positive"),
    ("[model]\nn_heads = 'four'", "model.n_heads must be an integer, not 'four'"),
    ("[train]\neval_every = 0", "train.eval_every"),
    ("[sae]\nresample_inputs = 0", "sae.resample_inputs"),
    ("[sae]\nresample_fractions = [0.5, 1.5]", "sae.resample_fractions"),
    ("[compare]\nn_bootstrap = 0", "compare.n_bootstrap"),
    ("[train]\nsteps = 2.5", "train.steps must be an integer, not 2.5"),
    ("[sae]\nsamples = 4.0965e3", "sae.samples must be an integer, not 4096.5"),
    ("[data]\ncorpus = 5", "data.corpus must be a string, not 5"),
    ("[compare]\nrandomized_baseline = 1", "compare.randomized_baseline must be true or false"),
    ("[compare]\nthresholds = 0.5", "compare.thresholds must be a list"),
    ("[compare]\ntokens = 20_000", "compare.tokens (20000) must not exceed data.heldout_tokens (16384)"),
    (b"[data]\ncorpus = '\xff\xfe'", "not UTF-8 text"),
])
def test_malformed_config_is_one_line_error(tmp_path, text, message):
    config = tmp_path / "bad.toml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    result = univ("run", "--preset", "tiny", "--config", config, "--results-dir", tmp_path / "r")
    assert_one_line_error(result, message)
    assert not (tmp_path / "r").exists()  # rejected before any work


def test_integral_floats_in_a_config_are_integers(tmp_path):
    config = tmp_path / "floats.toml"
    config.write_text('preset = "tiny"\n[sae]\nsamples = 4.096e4\n[train]\nsteps = 1e2\n')
    cfg = load_config(config)
    assert (cfg.sae.samples, cfg.train.steps) == (40_960, 100)
    assert type(cfg.sae.samples) is int and type(cfg.train.steps) is int  # range() and cache keys see ints


@pytest.mark.parametrize("name", ["medium", "long"])
def test_a_preset_on_another_preset_changes_only_its_own_fields(name):
    """medium and long are quick with the SAE recipe their numbers were measured with (2,048 features in batches of
    1,024) and more SAE samples: everything else (and later edits to quick) carries over."""
    quick, preset = load_preset("quick"), load_preset(name)
    assert preset.sae.samples > quick.sae.samples
    measured = {"samples": preset.sae.samples, "dict_size": 2048, "batch_size": 1024}
    assert preset.to_dict() == quick.replace(sae=measured).to_dict() | {"name": name}


def test_mlflow_problems_are_one_line_errors(tmp_path):
    from mlflow import MlflowClient

    from universality.tracking import store

    results = tmp_path / "results"
    client = store.open_client(results, None)
    client.delete_experiment(store.experiment_id(client, "gone", results))
    cases = [
        (["--tracking-uri", "foo://bar"], {}, "unsupported MLflow tracking URI 'foo://bar'"),
        ([], {"MLFLOW_TRACKING_URI": "foo://bar"}, "unsupported MLflow tracking URI 'foo://bar'"),
        (["--tracking-uri", "sqlite:////proc/univ-test.db"], {}, "cannot write the MLflow store /proc/univ-test.db"),
        (["--experiment", "gone"], {}, "MLflow experiment 'gone' is deleted"),
    ]
    for args, env, message in cases:
        result = univ("run", "--preset", "tiny", "--results-dir", results, *args, env=env)
        assert_one_line_error(result, message)
    assert not (results / "cache").exists()  # every one failed before any work
    assert [e.name for e in MlflowClient(store.embedded_uri(results)).search_experiments()] == ["Default"]


def test_read_only_commands_on_a_mistyped_results_dir_create_nothing(tmp_path):
    typo = tmp_path / "reslts"
    for args in (["export", "--out", tmp_path / "m.csv"], ["features", "latest", "0", "1"], ["ui"]):
        assert_one_line_error(univ(*args, "--results-dir", typo), f"no results at {typo}")
    assert list(tmp_path.iterdir()) == []
    from universality.tracking import store

    uri = store.open_client(tmp_path / "store", None).tracking_uri  # with a tracking URI, the folder is not needed
    assert_one_line_error(univ("export", "--out", tmp_path / "m.csv", "--tracking-uri", uri, "--results-dir", typo),
                          "no finished univ run")
    assert not typo.exists()


def test_results_dir_under_a_file_is_one_line_error_naming_it(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = univ("run", "--preset", "tiny", "--results-dir", blocker / "sub")
    assert_one_line_error(result, str(blocker))


def test_full_disk_is_one_line_error_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    def no_space(file, array, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), getattr(file, "name", str(file)))
    monkeypatch.setattr(np, "save", no_space)
    with pytest.raises(UnivError, match="No space left on device") as caught:
        run_fast(tmp_path / "results", [0])
    assert "\n" not in str(caught.value)
    assert not list((tmp_path / "results").rglob("*.tmp"))
    assert [e.state for e in cache.entries(tmp_path / "results")] == ["partial"]  # not complete: redone next time


def test_nan_divergence_stops_and_names_the_step(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"diverged at step \d+"):
        run_fast(tmp_path / "results", [0], fast_cfg().replace(train={"lr": 1e12}))
    config = tmp_path / "diverge.toml"
    config.write_text("[sae]\nlr = 1e12\n")  # the SAE step too (a CLI run: one line, exit 1)
    result = univ("run", "--preset", "tiny", "--seeds", "1", "--jobs", "1", "--config", config, "--results-dir", tmp_path / "r")
    assert_one_line_error(result, "diverged at step", trained=True)


def test_transformer_divergence_names_the_step_where_it_began(monkeypatch):
    """The loss turns NaN at step 7, between evaluations (every 20 steps in tiny): the error says step 7."""
    import models.training as training

    real, calls = training.cross_entropy, itertools.count(1)
    def nan_at_step_7(logits, tokens):
        loss = real(logits, tokens)
        return loss * float("nan") if torch.is_grad_enabled() and next(calls) == 7 else loss  # training steps only
    monkeypatch.setattr(training, "cross_entropy", nan_at_step_7)
    cfg = load_preset("tiny")
    tokens = np.random.default_rng(0).integers(0, 512, 20_000)
    model_cfg = TransformerConfig(vocab_size=512, ctx_len=32, **vars(cfg.model))
    with pytest.raises(TrainingDiverged, match=r"diverged at step 7 "):
        train_transformer(tokens, tokens[:2048], model_cfg, cfg.train, 0, progress=False)


# --- kill -9 mid-training, then resume: the same weights as a run that never stopped -------------

TRAIN_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np, torch
    from safetensors.torch import save_file
    from torch.optim.optimizer import register_optimizer_step_post_hook
    import models.training
    from models.training import train_transformer
    from models.transformer import TransformerConfig
    from sae.training import train_sae
    from universality.core.config import load_preset

    which, checkpoints, out, slow = sys.argv[1], Path(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    cfg = load_preset("tiny")
    steps_taken = []  # optimizer steps this process takes: fewer than the run's when it resumed
    register_optimizer_step_post_hook(lambda *args: steps_taken.append(1))
    if which == "transformer":
        real = models.training.training_batch
        def slow_batch(*args):
            time.sleep(slow)
            return real(*args)
        models.training.training_batch = slow_batch
        tokens = np.random.default_rng(0).integers(0, 512, 50_000)
        train_cfg = cfg.train.__class__(**{**vars(cfg.train), "steps": 40, "checkpoint_every": 5})
        model_cfg = TransformerConfig(vocab_size=512, ctx_len=32, **vars(cfg.model))
        result = train_transformer(tokens, tokens[:4096], model_cfg, train_cfg, 0, checkpoint_dir=checkpoints, progress=False)
        state, extra = result.model.state_dict(), {"eval_loss": result.eval_loss, "history": result.history}
    else:
        def stream():
            g = torch.Generator().manual_seed(0)
            W = torch.randn(16, 64, generator=g)
            while True:
                time.sleep(slow)
                yield torch.relu(torch.randn(cfg.sae.batch_size, 16, generator=g) @ W)
        trained = train_sae(stream(), cfg.sae, 64, seed=1, progress=False, checkpoint_dir=checkpoints)
        state = trained.sae.state_dict()
        extra = {"history": trained.history, "events": trained.resampling_events}
    save_file({k: v.contiguous() for k, v in state.items()}, out)
    Path(out + ".json").write_text(repr(extra))
    Path(out + ".steps").write_text(str(len(steps_taken)))
""")
TOTAL_STEPS = {"transformer": 40, "sae": load_preset("tiny").sae.samples // load_preset("tiny").sae.batch_size}


def train(script: Path, which: str, checkpoints: Path, out: Path, slow: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), which, str(checkpoints), str(out), str(slow)],
                            cwd=Path(__file__).parent.parent)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["transformer", "sae"])
def test_kill_9_mid_training_then_resume_matches_uninterrupted(tmp_path, which):
    from safetensors.torch import load_file

    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    reference = train(script, which, tmp_path / "ref_ckpt", tmp_path / "ref.safetensors", 0.0)
    killed = train(script, which, tmp_path / "ckpt", tmp_path / "never.safetensors", 0.2)
    deadline = time.time() + 120
    while not (tmp_path / "ckpt" / "checkpoint.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL  # it really died mid-training
    assert not (tmp_path / "never.safetensors").exists()
    saved_step = json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())["step"]  # where a resume starts
    assert 0 < saved_step < TOTAL_STEPS[which]
    assert train(script, which, tmp_path / "ckpt", tmp_path / "resumed.safetensors", 0.0).wait() == 0
    assert reference.wait() == 0
    steps_taken = {name: int((tmp_path / f"{name}.safetensors.steps").read_text()) for name in ("ref", "resumed")}
    assert steps_taken == {"ref": TOTAL_STEPS[which], "resumed": TOTAL_STEPS[which] - saved_step}  # resumed, not restarted
    ref, resumed = load_file(str(tmp_path / "ref.safetensors")), load_file(str(tmp_path / "resumed.safetensors"))
    assert all(torch.equal(ref[k], resumed[k]) for k in ref)
    assert (tmp_path / "ref.safetensors.json").read_text() == (tmp_path / "resumed.safetensors.json").read_text()
