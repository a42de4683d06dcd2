"""The crosscoder in a run: its statistics (measures/crosscoder.py), its controls and seed stability on planted
models, the cached stage in a tracked tiny run (MLflow child run, export table, report section), and
``univ crosscoder`` on bring-your-own activations."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from fast_pipeline import fast_cfg, run_fast
from sae.crosscoder import evaluate_crosscoder
from sae.training import train_sae
from test_crosscoder import epochs, planted_models
from universality import plans
from universality.analysis.crosscoder import seed_stability
from universality.cli import main
from universality.core.config import ExperimentConfig, SAEConfig
from universality.core.errors import ConfigError
from universality.core.run_names import crosscoder_role
from universality.measures.crosscoder import class_fractions, mutual_matches_one_latent
from universality.measures.matching import NO_PARTNER, match
from universality.measures.correlation import to_csr
from universality.outputs.crosscoder_report import latent_columns
from universality.runtime import cache

# ---- statistics against brute force ------------------------------------------------------------


def test_class_fractions_count_live_latents():
    classes = np.array(["shared", "dead", "exclusive-0", "exclusive-1", "shared-2of3", "shared", "dead", "shared"])
    fractions = class_fractions(classes)
    live = [c for c in classes if c != "dead"]
    assert fractions["frac_shared"] == pytest.approx(live.count("shared") / len(live))
    assert fractions["frac_exclusive"] == pytest.approx(sum(c.startswith("exclusive-") for c in live) / len(live))
    assert fractions["frac_shared"] + fractions["frac_exclusive"] + fractions["frac_shared_kofm"] == pytest.approx(1)
    assert fractions["frac_dead"] == pytest.approx(2 / len(classes))
    assert np.isnan(class_fractions(np.array(["dead", "dead"]))["frac_shared"])


def test_mutual_matches_one_latent_follows_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(20):
        pair = match(rng.standard_normal((12, 10)))
        best_a, best_b = rng.integers(-1, 12, 30), rng.integers(-1, 10, 30)
        shared = rng.random(30) < 0.6
        mutual = list(zip(*pair.mutual_pairs()))
        brute = np.mean([any(shared[i] and best_a[i] == a and best_b[i] == b and best_a[i] != NO_PARTNER
                             for i in range(30)) for a, b in mutual])
        assert mutual_matches_one_latent(pair, best_a, best_b, shared) == pytest.approx(brute)


# ---- controls and seed stability on planted models ---------------------------------------------


@dataclass
class Encoded:
    """What ``seed_stability`` reads of a crosscoder: its latents' activations on some tokens, and the crosscoder."""

    crosscoder: torch.nn.Module
    x: torch.Tensor

    def latent_activations(self) -> sp.csr_matrix:
        with torch.no_grad():
            return to_csr(self.crosscoder.encode(self.x))


def planted_cfg(**kw) -> SAEConfig:
    return SAEConfig(**{**dict(arch="crosscoder-batchtopk", dict_size=96, batch_size=256, samples=100_000, lr=3e-3, k=2,
                               dead_window_fraction=0.05), **kw})


@pytest.fixture(scope="module")
def planted():
    return planted_models(40_000)


def test_two_crosscoder_seeds_agree_on_planted_models(planted, one_thread):
    """The seed-stability control: two crosscoder seeds on the same planted models find the same latents (median max
    correlation and one-to-one decoder cosine near 1), well above an untrained crosscoder's agreement with one."""
    x, _, _ = planted
    held = x[-4096:]
    trained = [train_sae(epochs(x[:-4096], 256, seed), planted_cfg(), 32, seed=seed, progress=False).sae for seed in (0, 1)]
    untrained = train_sae(epochs(x[:-4096], 256), planted_cfg(samples=256), 32, seed=2, progress=False).sae
    cfg = ExperimentConfig().compare
    stable = seed_stability(Encoded(trained[0], held), Encoded(trained[1], held), cfg)
    baseline = seed_stability(Encoded(trained[0], held), Encoded(untrained, held), cfg)
    assert stable["max_corr_median"] > 0.9 and stable["decoder_cos_hungarian_median"] > 0.8
    assert stable["max_corr_median"] > baseline["max_corr_median"] + 0.3


def test_unrelated_models_give_exclusive_latents(planted, one_thread):
    """The weight-shuffled control's logic: a model beside one that shares none of its features (here: the other
    planted model's activations at other tokens) leaves almost no latent shared; each model's own features are exclusive."""
    x, _, _ = planted
    unrelated = torch.stack([x[:, 0], x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0)), 1]], dim=1)
    trained = train_sae(epochs(unrelated[:-4096], 256), planted_cfg(), 32, seed=0, progress=False)
    fractions = class_fractions(evaluate_crosscoder(trained.sae, unrelated[-4096:].split(1024))["latents"]["class"])
    assert fractions["frac_exclusive"] >= 0.8 and fractions["frac_shared"] < 0.2  # planted aligned: half of them shared


# ---- the config and the plan -------------------------------------------------------------------


def test_crosscoder_plan_follows_the_config(tiny_cfg):
    on = tiny_cfg.replace(crosscoder={"enabled": True, "identity_control": True, "shuffled_control": True, "replicates": 2},
                          compare={"randomized_baseline": True})
    plan = plans.crosscoder_plan([3, 5], on)
    assert plan == [("crosscoder", ["seed3", "seed5"], 0), ("crosscoder-r1", ["seed3", "seed5"], 1),
                    ("crosscoder-r2", ["seed3", "seed5"], 2), ("crosscoder-identity", ["seed3", "seed3"], 0),
                    ("crosscoder-shuffled", ["seed3", "shuffled-seed3-1"], 0)]
    assert plans.crosscoder_plan([3, 5], tiny_cfg) == [] and plans.crosscoder_plan([3], on) == []
    assert [crosscoder_role(name) for name, *_ in plan] == ["main", "replicate", "replicate", "identity", "shuffled"]
    with pytest.raises(ConfigError, match="randomized_baseline"):
        tiny_cfg.replace(crosscoder={"enabled": True, "shuffled_control": True})
    with pytest.raises(ConfigError, match=r"crosscoder\.k"):
        tiny_cfg.replace(crosscoder={"k": 256})


# ---- the stage in a tracked tiny run ------------------------------------------------------------


def stage_folders(results, stages) -> set:
    return {(stage, f.name) for stage in stages for f in (results / "cache" / stage).glob("*") if f.is_dir()}


@pytest.mark.slow
def test_crosscoder_stage_in_a_tracked_tiny_run(tmp_path, monkeypatch):
    from universality.outputs.terminal import describe
    from universality.publish import publish
    from universality.tracking import store
    from universality.tracking.tracker import tracked_run

    results = tmp_path / "results"
    base = fast_cfg().replace(sae={"replicates": 0})
    run_fast(results, [0, 1], base)
    others = [s for s in cache.STAGES if not s.startswith("crosscoder")]
    before = stage_folders(results, others)
    cfg = base.replace(crosscoder={"enabled": True, "samples": 8192, "identity_control": True, "replicates": 1})
    with tracked_run(results, None, "univ", cfg, [0, 1]) as tracker:
        result = run_fast(results, [0, 1], cfg)
        assert publish(tracker, result) is None  # logged in full: no earlier run logged the same
    assert stage_folders(results, others) == before  # the new section changed no other stage's key
    assert len(stage_folders(results, ["crosscoder"])) == len(stage_folders(results, ["crosscoder_eval"])) == 3
    assert list(result.crosscoders) == ["crosscoder", "crosscoder-r1", "crosscoder-identity"]
    s = result.summary
    assert s["crosscoder.frac_shared"] + s["crosscoder.frac_exclusive"] + s["crosscoder.frac_shared_kofm"] == pytest.approx(1)
    assert s["crosscoder.identity.frac_exclusive"] < 0.01  # identical inputs: no exclusive latents
    assert 0 < s["crosscoder.fvu_seed0"] and 0 < s["crosscoder.fvu_seed1"]
    assert -1 <= s["crosscoder.seed_stability.max_corr_median"] <= 1 and s["crosscoder.seconds"] > 0
    assert 0 <= s["crosscoder.frac_mutual_matches_one_latent"] <= 1
    assert "crosscoder over seed0, seed1: live latents shared" in describe(result)

    # Re-run: both crosscoder stages are looked up, not rebuilt.
    monkeypatch.setattr("universality.stages.crosscoder.train_sae", lambda *a, **k: pytest.fail("retrained"))
    monkeypatch.setattr("universality.stages.crosscoder.evaluate_crosscoder", lambda *a, **k: pytest.fail("re-evaluated"))
    again = run_fast(results, [0, 1], cfg)
    assert again.summary["crosscoder.frac_shared"] == s["crosscoder.frac_shared"]

    # MLflow: a crosscoder child run per crosscoder, with curves, evaluation, latents table and checkpoint.
    client = store.open_client(results, None, read_only=True)
    children = client.search_runs([client.get_run(tracker.run_id).info.experiment_id],
                                  filter_string="tags.`univ.kind` = 'crosscoder'")
    assert sorted(r.info.run_name for r in children) == sorted(result.crosscoders)
    child = next(r for r in children if r.info.run_name == "crosscoder")
    assert {"crosscoder_eval/l0", "crosscoder_eval/fvu_seed0", "crosscoder_eval/frac_shared", "crosscoder/mse"} <= set(child.data.metrics)
    assert len(client.get_metric_history(child.info.run_id, "crosscoder/mse")) == len(result.crosscoders["crosscoder"].history)
    artifacts = {a.path for folder in ("latents", "crosscoder") for a in client.list_artifacts(child.info.run_id, folder)}
    assert {"latents/latents.parquet", "latents/relative_norms.png", "crosscoder/crosscoder.safetensors"} <= artifacts
    report = (results / "reports" / tracker.run_id / "report" / "report.html").read_text()
    assert "Crosscoder: one dictionary over every model" in report and "crosscoder-identity" in report

    # univ export: OUT.crosscoder.csv beside the matched table, a row per latent.
    out = tmp_path / "export" / "matched.csv"
    out.parent.mkdir()
    exported = CliRunner().invoke(main, ["export", tracker.run_id, "--out", str(out), "--results-dir", str(results)])
    assert exported.exit_code == 0, exported.output
    table = pd.read_csv(out.with_name("matched.crosscoder.csv"), keep_default_na=False, na_values={"sae_corr_0": [""]})
    assert list(table.columns) == list(latent_columns(2))
    assert len(table) == cfg.crosscoder.dict_size and set(table["class"]) <= {"shared", "exclusive-0", "exclusive-1", "dead"}
    live = table["class"] != "dead"
    assert (table.loc[live, "top_tokens"] != "").all()

    # univ features --crosscoder: one latent's card, its numbers those of the exported row.
    latent = int(table.loc[live, "latent"].iloc[0])
    row = table.iloc[latent]
    shown = CliRunner().invoke(main, ["features", tracker.run_id, "--crosscoder", str(latent), "--results-dir", str(results)])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[0].startswith(f"crosscoder latent {latent}  {row['class']}  density {row['density']:.3g}")
    assert lines[1].startswith(f"  seed0: decoder norm {row['norm_0']:.3f}") and lines[2].startswith(f"  seed1: decoder norm {row['norm_1']:.3f}")
    examples = lines[lines.index("top activating contexts:") + 1 :]
    assert len(examples) == cfg.compare.top_k_examples and row["top_tokens"].split(" | ")[0] in examples[0]
    for args, code, message in ((["--crosscoder", str(cfg.crosscoder.dict_size)], 1, "out of range"),
                                (["0", "3", "--crosscoder", "1"], 2, "without SEED FEATURE"), (["0"], 2, "give SEED and FEATURE")):
        refused = CliRunner().invoke(main, ["features", tracker.run_id, *args, "--results-dir", str(results)])
        assert refused.exit_code == code and message in refused.output, refused.output


# ---- univ crosscoder --------------------------------------------------------------------------


@pytest.fixture
def acts(tmp_path):
    x, _, _ = planted_models(4000)
    paths = {}
    for name, array in (("a", x[:, 0]), ("b", x[:, 1]), ("short", x[:3000, 1])):
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], array.numpy())
    bad = x[:, 1].numpy().copy()
    bad[7, 3] = np.inf
    np.save(tmp_path / "inf.npy", bad)
    paths["inf"] = tmp_path / "inf.npy"
    return paths


@pytest.mark.parametrize("files, flags, code, message", [
    (["a"], [], 2, "at least two activation files"),
    (["a", "short"], [], 1, "row counts are 4000, 3000"),
    (["a", "inf"], [], 1, "NaN or infinite"),
    (["a", "b"], ["--latents", "0"], 2, "--latents"),
    (["a", "b"], ["--latents", "8", "--k", "8"], 2, "--k"),
])
def test_univ_crosscoder_refuses_bad_input_before_any_work(acts, tmp_path, files, flags, code, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["crosscoder", *(str(acts[f]) for f in files), "--out", str(out), *flags])
    assert result.exit_code == code, result.output
    assert message in result.output and result.output.strip().splitlines()[-1].startswith("Error:")
    assert not out.exists()


@pytest.mark.parametrize("arch", ["l1", "batchtopk"])
def test_univ_crosscoder_writes_checkpoint_and_latents(acts, tmp_path, one_thread, arch):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["crosscoder", str(acts["a"]), str(acts["b"]), "--out", str(out), "--arch", arch,
                                       "--latents", "48", "--k", "2", "--samples", "8192", "--batch-size", "256",
                                       "--device", "cpu"])
    assert result.exit_code == 0, result.output
    tensors = load_file(str(out / "crosscoder.safetensors"))
    assert tuple(tensors["W_dec"].shape) == (2, 48, 32)
    latents = pd.read_csv(out / "latents.csv")
    assert list(latents.columns) == ["latent", "norm_0", "norm_1", "class", "density"]
    assert latents["latent"].tolist() == list(range(48))
    norms = tensors["W_dec"].norm(dim=2).T.numpy()
    assert np.allclose(latents[["norm_0", "norm_1"]].to_numpy(), norms, atol=1e-6)
    assert set(latents["class"]) <= {"shared", "exclusive-0", "exclusive-1", "dead"}
    assert latents["density"].between(0, 1).all() and (latents.loc[latents["class"] == "dead", "density"] == 0).all()


def test_per_model_saes_refuse_a_crosscoder_arch(tiny_cfg):
    with pytest.raises(ConfigError, match=r"\[crosscoder\] section"):
        tiny_cfg.replace(sae={"arch": "crosscoder-l1"})


def test_univ_crosscoder_over_files_of_different_dims(tmp_path, one_thread):
    """Models of 20 and 32 dims: the planted latents are recovered and classed in each model's own space, and the
    checkpoint holds one W_dec_<m> [n_latents, d_m] per model, whose norms are latents.csv's."""
    x, dirs, owners = planted_models(60_000)
    narrow = x[:, 0, :20]  # model 0 keeps 20 of its 32 dims: its planted directions are their first 20 coordinates
    dirs_0 = dirs[0, :, :20] / np.linalg.norm(dirs[0, :, :20], axis=1, keepdims=True)
    paths = [tmp_path / "narrow.npy", tmp_path / "wide.npy"]
    np.save(paths[0], narrow.numpy())
    np.save(paths[1], x[:, 1].numpy())
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["crosscoder", *map(str, paths), "--out", str(out), "--latents", "96", "--k", "2",
                                       "--samples", "150000", "--batch-size", "256", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    tensors = load_file(str(out / "crosscoder.safetensors"))
    assert "W_dec" not in tensors
    assert tuple(tensors["W_dec_0"].shape) == (96, 20) and tuple(tensors["W_dec_1"].shape) == (96, 32)
    assert tuple(tensors["W_enc_0"].shape) == (20, 96) and tuple(tensors["b_dec_1"].shape) == (32,)
    latents = pd.read_csv(out / "latents.csv")
    norms = np.stack([tensors[f"W_dec_{m}"].norm(dim=1).numpy() for m in range(2)], axis=1)
    assert np.allclose(latents[["norm_0", "norm_1"]].to_numpy(), norms, atol=1e-6)

    unit = [tensors[f"W_dec_{m}"].numpy() / np.clip(norms[:, m : m + 1], 1e-12, None) for m in range(2)]
    cos_TFM = np.stack([dirs_0 @ unit[0].T, dirs[1] @ unit[1].T], axis=2)  # planted latent x crosscoder latent x model
    worst_TF = np.where(owners[:, None, :] == 1, cos_TFM, np.inf).min(axis=2)
    best, cos = worst_TF.argmax(axis=1), worst_TF.max(axis=1)
    recovered = cos > 0.9
    assert recovered.mean() >= 0.9
    expected = np.array(["shared" if o.all() else f"exclusive-{o.argmax()}" for o in owners])
    classes = latents["class"].to_numpy()
    assert (classes[best[recovered]] == expected[recovered]).mean() >= 0.9
