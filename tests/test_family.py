"""Dictionary families (``sae.dict_sizes``): one SAE per size per model on the same activation stream,
universality and the ceiling per size, the by-size table and figure in a run and in a sweep over
architectures; a single size exactly as before (same cache keys, tasks and pairs); bad sizes rejected
before any work."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from fast_pipeline import fast_cfg
from universality.outputs import by_size
from universality import pipeline, plans
from universality.runtime import memory
from universality.stages import sae as sae_stage
from universality.stages.data import Dataset
from universality.tracking import lookups, names, store
from universality.cli import main
from universality.core.config import ExperimentConfig, SAEConfig, load_preset
from universality.core.errors import ConfigError
from universality.core.run_names import model_name, replica_name, replicate_of, size_of

# sae_key of fast_cfg (fp32) for model key "m" * 16, as the code before dictionary families computed it (commit
# 5c235f2): a change means every cached SAE is retrained. Only on purpose: bump SAE_VERSION and update these.
KEY_BEFORE_FAMILIES = {(256, 0): "559002440f8358b2", (256, 1): "45fa5c9eb6a40579", (128, 0): "38214fab28b8c278"}  # sae stage version 4


def fp32(**sae) -> ExperimentConfig:
    return fast_cfg().replace(sae={"precision": "fp32", **sae})


def test_a_single_size_keeps_its_sae_keys_and_a_family_member_has_the_key_of_its_size_alone():
    for (size, replicate), key in KEY_BEFORE_FAMILIES.items():
        assert sae_stage.key("m" * 16, fp32(dict_size=size), "cpu", replicate) == key
    family = fp32(dict_sizes=[128, 256])
    assert family.sae.dict_size == 256 and family.sae.sizes == (128, 256)
    assert sae_stage.key("m" * 16, family, "cpu") == KEY_BEFORE_FAMILIES[(256, 0)]  # the primary: the largest
    assert sae_stage.key("m" * 16, family, "cpu", 1) == KEY_BEFORE_FAMILIES[(256, 1)]
    assert sae_stage.key("m" * 16, family, "cpu", size=128) == KEY_BEFORE_FAMILIES[(128, 0)]
    assert sae_stage.size_config(family, 128).sae == fp32(dict_size=128).sae


def _dataset():
    return Dataset(None, "data", "", "", 512, np.zeros(1), np.zeros(1), {})


def test_a_single_size_plans_exactly_the_tasks_and_pairs_it_did():
    cfg = fast_cfg().replace(compare={"randomized_baseline": True})
    tasks = pipeline.run_tasks(cfg, _dataset(), [0, 1], "cpu", None, False)
    names = [t.name for t in tasks]
    assert names == ["seed0", "seed1", "seed0-sae1", "shuffled-seed0-1", "shuffled-seed0-2", "untrained-seed0",
                     "untrained-seed1"]
    assert all(t.dict_size is None for t in tasks) and [t.untrained for t in tasks] == [False] * 5 + [True] * 2
    assert plans.pair_plan(names, ["seed0", "seed1"], cfg) == [
        ("seed0", "seed1", "cross-model"), ("seed0", "seed0-sae1", "same-model"),
        ("shuffled-seed0-1", "shuffled-seed0-2", "randomized"), ("untrained-seed0", "untrained-seed1", "untrained")]


def test_a_family_plans_every_size_with_its_replicates_and_the_control_only_at_the_primary_size():
    cfg = fast_cfg().replace(sae={"dict_sizes": [64, 128, 256]}, compare={"randomized_baseline": True})
    tasks = pipeline.run_tasks(cfg, _dataset(), [0, 1], "cpu", None, False)
    names = [t.name for t in tasks]
    assert names == ["seed0", "seed1", "seed0-sae1", "shuffled-seed0-1", "shuffled-seed0-2", "untrained-seed0",
                     "untrained-seed1", "seed0-d128", "seed1-d128", "seed0-d128-sae1", "seed0-d64", "seed1-d64", "seed0-d64-sae1"]
    plan = plans.pair_plan(names, ["seed0", "seed1"], cfg)
    assert [(a, b) for a, b, kind in plan if kind == "cross-model"] == [
        ("seed0", "seed1"), ("seed0-d128", "seed1-d128"), ("seed0-d64", "seed1-d64")]
    assert [(a, b) for a, b, kind in plan if kind == "same-model"] == [
        ("seed0", "seed0-sae1"), ("seed0-d128", "seed0-d128-sae1"), ("seed0-d64", "seed0-d64-sae1")]
    assert plans.family(names, cfg, "seed1") == {64: "seed1-d64", 128: "seed1-d128", 256: "seed1"}


def test_run_names_carry_the_size_of_other_sizes():
    assert replica_name("seed3", 2, 512) == "seed3-d512-sae2" and replica_name("seed3", 0, 512) == "seed3-d512"
    for name, parts in {"seed3-d512-sae2": ("seed3", 2, 512), "seed3-d512": ("seed3", 0, 512),
                        "seed3-sae1": ("seed3", 1, None), "shuffled-seed0-1": ("shuffled-seed0-1", 0, None)}.items():
        assert (model_name(name), replicate_of(name), size_of(name)) == parts


@pytest.mark.parametrize("sae, message", [
    ({"dict_sizes": (0, 64)}, "sae.dict_sizes must be positive integers, not [0, 64]"),
    ({"dict_sizes": (64, 32, 64)}, "sae.dict_sizes repeats a size: [64, 32, 64]"),
    ({"dict_sizes": (64, 2.5)}, "sae.dict_sizes must be positive integers"),
    ({"arch": "topk", "k": 32, "dict_sizes": (32, 256)}, "sae.k (32) must be in [1, the smallest of sae.dict_sizes (32))"),
    ({"arch": "topk", "k": 256, "dict_size": 256}, "sae.k must be in [1, sae.dict_size)"),
    ({"arch": "gated"}, "sae.arch must be one of relu, topk, relu-tokenized, crosscoder-l1, crosscoder-batchtopk, not 'gated'"),
])
def test_bad_sizes_are_one_line_config_errors(sae, message):
    with pytest.raises(ConfigError) as info:
        SAEConfig(**sae)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_memory_estimate_counts_weights_adam_and_the_batch():
    assert memory.sae_training_bytes(d_in=10, size=100, batch_size=8, buffer_size=50, resample_inputs=50) == (
        4 * (4 * (2 * 10 * 100 + 100 + 10) + 4 * 8 * 100 + 100 * 10))
    cfg = fast_cfg().replace(sae={"dict_sizes": [64, 2**40]})
    with pytest.raises(ConfigError, match=r"^an SAE of 1,099,511,627,776 features needs about [\d,.]+ GiB to train"):
        memory.check_memory(cfg, "cpu")
    memory.check_memory(fast_cfg(), "cpu")


@pytest.mark.parametrize("args, code, message", [
    (["--dict-sizes", "64,abc"], 2, "expected comma-separated positive integers"),
    (["--dict-sizes", "64,64"], 2, "expected distinct positive integers"),
    (["--dict-sizes", "0,64"], 2, "expected distinct positive integers"),
    (["--dict-sizes", "4,64", "--config", "topk"], 1, "Error: sae.k (8) must be in [1, the smallest of sae.dict_sizes (4))"),
    (["--dict-sizes", "64,1099511627776"], 1, "Error: an SAE of 1,099,511,627,776 features needs about"),
])
@pytest.mark.parametrize("command", [["run"], ["sweep", "--grid", "sae.lr=1e-3"]])
def test_cli_rejects_bad_sizes_before_any_work(tmp_path, command, args, code, message):
    topk = tmp_path / "topk.toml"
    topk.write_text('[sae]\narch = "topk"\n')
    args = [str(topk) if a == "topk" else a for a in args]
    results = tmp_path / "results"
    out = CliRunner().invoke(main, [*command, "--preset", "tiny", "--device", "cpu", "--results-dir", str(results), *args])
    assert out.exit_code == code, out.output
    assert message in out.output.strip().splitlines()[-1] and "Traceback" not in out.output
    assert not results.exists()


def _parents(client: MlflowClient) -> dict[str | None, list]:
    runs = client.search_runs([client.get_experiment_by_name("univ").experiment_id])
    by_parent: dict[str | None, list] = {}
    for run in runs:
        by_parent.setdefault(run.data.tags.get(MLFLOW_PARENT_RUN_ID), []).append(run)
    return by_parent


@pytest.mark.slow
def test_a_family_run_and_a_sweep_over_architectures(tmp_path, monkeypatch):
    config = tmp_path / "fast.json"
    config.write_text(json.dumps(fast_cfg().to_dict()))
    results = tmp_path / "results"
    common = ["--config", str(config), "--seeds", "2", "--jobs", "1", "--device", "cpu", "--results-dir", str(results),
              "--dict-sizes", "64,128"]
    trained, streams, real_train, real_stream = [], [], sae_stage.train_sae, sae_stage.model_activations
    monkeypatch.setattr(sae_stage, "train_sae", lambda batches, cfg, *a, **k: trained.append(cfg.dict_size) or
                        real_train(batches, cfg, *a, **k))
    monkeypatch.setattr(sae_stage, "model_activations", lambda *a, seed, **k: streams.append(seed) or
                        real_stream(*a, seed=seed, **k))
    out = CliRunner().invoke(main, ["run", *common])
    assert out.exit_code == 0, out.output
    assert sorted(trained) == [64, 64, 64, 128, 128, 128]  # 2 seeds and seed 0's replicate, at each size
    assert streams.count(0) == 2 and streams.count(1) == 2  # each seed's two sizes: the same activation stream
    assert "seed0-d64 (64-feature SAE of seed0)" in out.output and "by dictionary size" in out.output

    client = MlflowClient(store.embedded_uri(results))
    parent = lookups.find_run(client, "latest")
    children = {r.info.run_name: r for r in _parents(client)[parent.info.run_id]}
    kinds = {name: r.data.tags[names.KIND] for name, r in children.items()}
    assert kinds == {"seed0": "seed", "seed1": "seed", "seed0-sae1": "sae-replicate", "seed0-d64": "sae-size",
                     "seed1-d64": "sae-size", "seed0-d64-sae1": "sae-replicate", "seed0-vs-seed1": "pair",
                     "seed0-vs-seed0-sae1": "replicate-pair", "seed0-d64-vs-seed1-d64": "pair",
                     "seed0-d64-vs-seed0-d64-sae1": "replicate-pair"}
    assert children["seed0-d64"].data.tags["univ.dict_size"] == "64" and children["seed0"].data.tags["univ.dict_size"] == "128"
    assert children["seed0-d64-vs-seed1-d64"].data.tags["univ.dict_size"] == "64"
    metrics = parent.data.metrics
    small = metrics["size64/features_max_corr_median_mean"]
    assert small == pytest.approx(children["seed0-d64-vs-seed1-d64"].data.metrics["Universality/features_median_max_corr"])
    assert metrics["Universality/features_median_max_corr"] == pytest.approx(
        children["seed0-vs-seed1"].data.metrics["Universality/features_median_max_corr"])
    assert "size64/ceiling_features_max_corr_median_mean" in metrics
    table = pd.read_parquet(client.download_artifacts(parent.info.run_id, f"tables/{by_size.TABLE_FILE}.parquet", str(tmp_path)))
    assert table.dict_size.tolist() == [64, 128] and table.primary.tolist() == [False, True]
    assert table.across_models.tolist() == pytest.approx([small, metrics["Universality/features_median_max_corr"]])
    assert table.ceiling.notna().all() and (table.n_ceiling_pairs == 1).all() and table.l0.gt(0).all()
    report = client.download_artifacts(parent.info.run_id, "report/report.html", str(tmp_path))
    assert "Universality by dictionary size" in open(report).read()
    assert f"report/{by_size.FIGURE_FILE}" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}

    trained.clear()
    out = CliRunner().invoke(main, ["sweep", *common, "--grid", "sae.arch=relu,topk"])
    assert out.exit_code == 0, out.output
    assert sorted(trained) == [64, 64, 64, 128, 128, 128]  # the relu point's SAEs are the run's: only topk trains
    [sweep] = [r for r in _parents(client)[None] if r.data.tags[names.KIND] == "sweep"]
    folder = results / "reports" / sweep.info.run_id
    sizes = pd.read_parquet(folder / f"{by_size.TABLE_FILE}.parquet")
    assert sizes[["label", "dict_size"]].values.tolist() == [
        ["sae.arch=relu", 64], ["sae.arch=relu", 128], ["sae.arch=topk", 64], ["sae.arch=topk", 128]]
    assert sizes.across_models.iloc[:2].tolist() == pytest.approx(table.across_models.tolist())
    assert {f"summary/{by_size.TABLE_FILE}.parquet", f"summary/{by_size.FIGURE_FILE}"} <= {
        a.path for a in client.list_artifacts(sweep.info.run_id, "summary")}


def test_the_by_size_figure_draws_a_line_per_architecture_and_the_paper_point():
    rows = [{"label": arch, "arch": arch, "dict_size": size, "primary": size == 2048, "across_models": 0.3 + 0.01 * i,
             "across_ci_low": np.nan, "across_ci_high": np.nan, "ceiling": 0.5, "across_over_ceiling": 0.6, "n_pairs": 1,
             "n_ceiling_pairs": 1, "l0": 10.0, "fvu": 0.2, "dead_fraction": 0.0}
            for i, (arch, size) in enumerate((a, s) for a in ("relu", "topk") for s in (512, 1024, 2048))]
    table = by_size.combined([pd.DataFrame(rows[:3]), pd.DataFrame(rows[3:])])
    figure = by_size.size_figure(table)
    assert figure.name == by_size.FIGURE_FILE and figure.png.startswith(b"\x89PNG")
    table.loc[0, ["across_ci_low", "across_ci_high"]] = (0.25, 0.35)
    section = by_size.size_section(table, figure)
    assert section.count("<tr>") == 7 and "0.350" in section and "data:image/png" in section
    assert "<th>same model (ceiling)</th>" in section and "0.300 [0.250, 0.350]" in section and "2,048 (primary)" in section


def test_dict_sizes_is_a_grid_axis(tiny_cfg):
    from universality.core import grid

    axes = grid.parse_grid(["sae.dict_sizes=[64,128],[128,256]", "sae.arch=relu,topk"])
    points = grid.grid_points(tiny_cfg, axes)
    assert [(p.cfg.sae.sizes, p.cfg.sae.dict_size, p.cfg.sae.arch) for p in points] == [
        ((64, 128), 128, "relu"), ((64, 128), 128, "topk"), ((128, 256), 256, "relu"), ((128, 256), 256, "topk")]
    with pytest.raises(ConfigError, match=r"grid point sae.dict_sizes=\[4,128\]: sae.k \(8\) must be in"):
        grid.grid_points(tiny_cfg.replace(sae={"arch": "topk"}), grid.parse_grid(["sae.dict_sizes=[4,128]"]))
    with pytest.raises(ConfigError, match=r"^grid point sae.dict_size=64: sae.dict_size is the largest of sae.dict_sizes"):
        grid.grid_points(tiny_cfg.replace(sae={"dict_sizes": [128, 256]}), grid.parse_grid(["sae.dict_size=64,128"]))
    assert load_preset("tiny").sae.sizes == (256,)
