"""User errors as one line and a non-zero exit; nothing half-written; resume after kill -9."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from fast_pipeline import fast_cfg, run_fast

from universality import cache, pipeline
from universality.cli import main
from universality.errors import TrainingDiverged, UnivError


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert result.output.count("Error: ") == 1, result.output  # (after any progress bar's carriage returns)
    assert result.output.split("Error: ")[1].strip().count("\n") == 0, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"", "no readable text"),
    (bytes(range(256)) * 40, "not UTF-8"),
])
def test_bad_corpus_is_one_line_error(tmp_path, content, message):
    corpus = tmp_path / "corpus.txt"
    if content is not None:
        corpus.write_bytes(content)
    result = invoke("run", "--preset", "tiny", "--corpus", str(corpus), "--results-dir", str(tmp_path / "r"))
    assert_one_line_error(result, message)


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0"], "--seeds"),
    (["--preset", "nonexistent"], "--preset"),
])
def test_bad_options_are_usage_errors(tmp_path, args, message):
    result = invoke("run", *args, "--results-dir", str(tmp_path / "r"))
    assert_one_line_error(result, message)


@pytest.mark.parametrize("text, message", [
    ("[train\nsteps = 3", "malformed config"),
    ("[train]\nsteps = -1", "train.steps"),
    ("[nope]\nx = 1", "unknown config section"),
    ("[model]\nn_heads = 0", "model dimensions must be positive"),
    ("[model]\nn_heads = 'four'", "bad value in [model]"),
    ("[train]\neval_every = 0", "train.eval_every"),
    ("[sae]\nresample_inputs = 0", "sae.resample_inputs"),
    ("[sae]\nresample_fractions = [0.5, 1.5]", "sae.resample_fractions"),
    ("[compare]\nn_bootstrap = 0", "compare.n_bootstrap"),
])
def test_malformed_config_is_one_line_error(tmp_path, text, message):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    result = invoke("run", "--preset", "tiny", "--config", str(config), "--results-dir", str(tmp_path / "r"))
    assert_one_line_error(result, message)


def test_results_dir_under_a_file_is_one_line_error_naming_it(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = invoke("run", "--preset", "tiny", "--results-dir", str(blocker / "sub"))
    assert_one_line_error(result, str(blocker))


def test_full_disk_is_one_line_error_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    def no_space(file, array, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), getattr(file, "name", str(file)))
    monkeypatch.setattr(pipeline.np, "save", no_space)
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
    result = invoke("run", "--preset", "tiny", "--seeds", "1", "--config", str(config), "--results-dir", str(tmp_path / "r"))
    assert_one_line_error(result, "diverged at step")


# --- kill -9 mid-training, then resume: the same weights as a run that never stopped -------------

TRAIN_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np, torch
    from safetensors.torch import save_file
    import models.training
    from models.training import train_transformer
    from models.transformer import TransformerConfig
    from sae.training import train_sae
    from universality.config import load_preset

    which, checkpoints, out, slow = sys.argv[1], Path(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    cfg = load_preset("tiny")
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
""")


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
    assert train(script, which, tmp_path / "ckpt", tmp_path / "resumed.safetensors", 0.0).wait() == 0
    assert reference.wait() == 0
    ref, resumed = load_file(str(tmp_path / "ref.safetensors")), load_file(str(tmp_path / "resumed.safetensors"))
    assert all(torch.equal(ref[k], resumed[k]) for k in ref)
    assert (tmp_path / "ref.safetensors.json").read_text() == (tmp_path / "resumed.safetensors.json").read_text()
