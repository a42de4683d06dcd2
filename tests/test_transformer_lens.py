"""TransformerLens runs the transformers of ``univ export --models`` as univ does, and SAELens runs their SAEs
on its MLP hook as univ does: the README's snippet, on a tracked run's comparison tokens. Needs the optional
extra (``pip install 'univ[transformer-lens]'``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient
from safetensors.torch import load_file

from sae.checkpoint import load_sae
from universality.analysis.heldout import eval_contexts
from universality.tracking import lookups, store
from universality.cli import main
from universality.outputs.transformer_lens import HOOK_NAME
from universality.stages.model import load_transformer

transformer_lens = pytest.importorskip("transformer_lens")
sae_lens = pytest.importorskip("sae_lens")

TOLERANCE = 1e-4  # the bound on logits and feature activations


@pytest.mark.slow
def test_transformer_lens_and_saelens_give_univ_s_logits_and_features(tracked_tiny, tmp_path):
    results, _ = tracked_tiny
    out = CliRunner().invoke(main, ["export", "latest", "--models", str(tmp_path), "--results-dir", str(results)])
    assert out.exit_code == 0, out.output
    client = MlflowClient(store.embedded_uri(results))
    run = lookups.find_run(client, "latest")
    params = run.data.params
    for seed in map(int, params["seeds"].split(",")):
        data_dir, model_dir, sae_dir, _ = lookups.seed_folders(client, run, seed, results)
        tokens = eval_contexts(np.load(data_dir / "heldout.npy"), int(params["data.ctx_len"]), int(params["compare.tokens"]))
        ours, our_sae = load_transformer(model_dir), load_sae(sae_dir)

        folder = tmp_path / f"seed{seed}"
        cfg = transformer_lens.HookedTransformerConfig(**json.load(open(folder / "config.json")))
        model = transformer_lens.HookedTransformer(cfg)
        keys = model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
        assert keys.unexpected_keys == [] and {k.rsplit(".", 1)[1] for k in keys.missing_keys} <= {"mask", "IGNORE"}
        sae = sae_lens.SAE.load_from_disk(str(folder / "sae"), device="cpu")
        assert sae.cfg.metadata.hook_name == HOOK_NAME

        with torch.no_grad():
            want = ours(tokens, return_mlp=True)
            want_features = our_sae.encode(want.mlp_acts.flatten(0, 1))  # [B*T, F]
            logits, cache = model.run_with_cache(tokens)
            features = sae.encode(cache[HOOK_NAME]).flatten(0, 1)
        logit_diff, feature_diff = (logits - want.logits).abs().max().item(), (features - want_features).abs().max().item()
        print(f"seed{seed}: {tokens.numel()} comparison tokens, max |logit diff| {logit_diff:.2e}, "
              f"max |feature diff| {feature_diff:.2e}")
        assert logit_diff <= TOLERANCE and feature_diff <= TOLERANCE
        assert (want_features > 0).float().mean() > 0.001  # features that never fire would prove nothing
