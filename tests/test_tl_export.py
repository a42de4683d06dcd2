"""The TransformerLens / SAELens export without those libraries: names and shapes, a forward pass written
from TransformerLens's equations on the exported weights against univ's, the config dict, and
``univ export --models`` (the round trips through the real libraries are in tests/test_transformer_lens.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file

from models.transformer import LayerNorm, OneLayerTransformer, TransformerConfig
from universality.cli import main
from universality.outputs import transformer_lens as tl

CFG = TransformerConfig(vocab_size=13, ctx_len=9, d_model=12, d_mlp=20, n_heads=3)


def random_model(cfg: TransformerConfig) -> OneLayerTransformer:
    """A model with every parameter random (biases and LayerNorm gains too: an identity or zero would hide a
    mis-mapped one)."""
    torch.manual_seed(0)
    model = OneLayerTransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return model


def test_names_and_shapes_are_transformer_lens_s():
    fields = tl.hooked_config(CFG, "m")
    weights = tl.hooked_state_dict(OneLayerTransformer(CFG).state_dict(), CFG)
    D, H, d, M, V, C = (fields[k] for k in ("d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx"))
    qkv = {f"blocks.0.attn.{w}_{p}": shape for p in "QKV" for w, shape in (("W", (H, D, d)), ("b", (H, d)))}
    assert {name: tuple(t.shape) for name, t in weights.items()} == {
        "embed.W_E": (V, D), "pos_embed.W_pos": (C, D),
        "blocks.0.ln1.w": (D,), "blocks.0.ln1.b": (D,), **qkv,
        "blocks.0.attn.W_O": (H, d, D), "blocks.0.attn.b_O": (D,),
        "blocks.0.ln2.w": (D,), "blocks.0.ln2.b": (D,),
        "blocks.0.mlp.W_in": (D, M), "blocks.0.mlp.b_in": (M,), "blocks.0.mlp.W_out": (M, D), "blocks.0.mlp.b_out": (D,),
        "ln_final.w": (D,), "ln_final.b": (D,), "unembed.W_U": (D, V), "unembed.b_U": (V,),
    }
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in weights.values())  # safetensors needs contiguous


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    centred = x - x.mean(-1, keepdim=True)
    return centred / (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt() * w + b


def transformer_lens_forward(W: dict[str, torch.Tensor], fields: dict, tokens_BT: torch.Tensor):
    """(logits, hook_post) of a one-layer HookedTransformer, written out from TransformerLens's equations."""
    eps, T = fields["eps"], tokens_BT.shape[1]
    act = {"relu": F.relu, "gelu": F.gelu}[fields["act_fn"]]
    resid = W["embed.W_E"][tokens_BT] + W["pos_embed.W_pos"][:T]
    x = layer_norm(resid, W["blocks.0.ln1.w"], W["blocks.0.ln1.b"], eps)
    q, k, v = (torch.einsum("btd,hde->bthe", x, W[f"blocks.0.attn.W_{p}"]) + W[f"blocks.0.attn.b_{p}"] for p in "QKV")
    scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / fields["d_head"] ** 0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    z = torch.einsum("bhqk,bkhe->bqhe", scores.softmax(-1), v)
    resid = resid + torch.einsum("bqhe,hed->bqd", z, W["blocks.0.attn.W_O"]) + W["blocks.0.attn.b_O"]
    x = layer_norm(resid, W["blocks.0.ln2.w"], W["blocks.0.ln2.b"], eps)
    post = act(x @ W["blocks.0.mlp.W_in"] + W["blocks.0.mlp.b_in"])
    resid = resid + post @ W["blocks.0.mlp.W_out"] + W["blocks.0.mlp.b_out"]
    logits = layer_norm(resid, W["ln_final.w"], W["ln_final.b"], eps) @ W["unembed.W_U"] + W["unembed.b_U"]
    return logits, post


@pytest.mark.parametrize("act_fn", ["relu", "gelu"])
def test_transformer_lens_equations_on_the_exported_weights_give_univ_s_logits_and_neurons(act_fn):
    cfg = TransformerConfig(**{**CFG.to_dict(), "act_fn": act_fn})
    model = random_model(cfg)
    weights = tl.hooked_state_dict(model.state_dict(), cfg)
    tokens = torch.randint(0, cfg.vocab_size, (4, cfg.ctx_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens, return_mlp=True)
        logits, post = transformer_lens_forward(weights, tl.hooked_config(cfg, "m"), tokens)
    torch.testing.assert_close(post, ours.mlp_acts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, ours.logits, atol=1e-5, rtol=1e-5)
    assert ours.logits.std() > 0.1  # a test on near-constant logits would prove little


def test_config_dict_is_json_and_describes_the_model():
    fields = tl.hooked_config(CFG, "univ-seed0")
    assert json.loads(json.dumps(fields)) == fields
    assert fields["d_head"] * fields["n_heads"] == CFG.d_model and fields["n_layers"] == 1
    assert (fields["d_vocab"], fields["n_ctx"], fields["d_mlp"]) == (CFG.vocab_size, CFG.ctx_len, CFG.d_mlp)
    norms = [m for m in OneLayerTransformer(CFG).modules() if isinstance(m, LayerNorm)]
    assert len(norms) == 3 and all(m.eps == fields["eps"] for m in norms)


def test_an_activation_function_transformer_lens_lacks_is_a_one_line_error():
    with pytest.raises(tl.UnivError, match="swish"):
        tl.hooked_config(TransformerConfig(**{**CFG.to_dict(), "act_fn": "swish"}), "m")


def test_the_sae_cfg_keeps_univ_s_fields_and_names_the_hook():
    ours = {"architecture": "standard", "d_in": 20, "d_sae": 64, "dict_size": 64, "l1_coefficient": 0.004}
    cfg = tl.saelens_cfg(ours, "univ-seed3", 9)
    assert cfg | ours == cfg  # univ's fields kept as they are
    assert cfg["hook_name"] == "blocks.0.mlp.hook_post" and cfg["model_name"] == "univ-seed3"
    assert cfg["context_size"] == 9 and cfg["prepend_bos"] is False


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.slow
def test_export_models_writes_each_seed_s_model_and_sae(tracked_tiny, tmp_path):
    results, _ = tracked_tiny
    out = invoke("export", "latest", "--models", tmp_path / "models", "--results-dir", results)
    assert out.exit_code == 0, out.output
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["seed0", "seed1"]
    for seed in (0, 1):
        folder = tmp_path / "models" / f"seed{seed}"
        assert sorted(p.name for p in folder.rglob("*")) == sorted(
            ["config.json", "model.safetensors", "tokenizer.json", "sae", "cfg.json", "sae_weights.safetensors"])
        fields = json.loads((folder / "config.json").read_text())
        weights = load_file(str(folder / "model.safetensors"))
        assert fields["model_name"] == f"univ-seed{seed}" and weights["embed.W_E"].shape == (fields["d_vocab"], fields["d_model"])
        sae_cfg = json.loads((folder / "sae" / "cfg.json").read_text())
        assert sae_cfg["hook_name"] == "blocks.0.mlp.hook_post" and sae_cfg["d_in"] == fields["d_mlp"]


@pytest.mark.slow
def test_export_models_bad_inputs_are_one_line_errors_and_write_nothing(tracked_tiny, tmp_path):
    results, _ = tracked_tiny
    cases = [
        (("export", "latest", "--models", tmp_path / "missing" / "models"), 1, "does not exist"),
        (("export", "latest", "--out", tmp_path / "a.csv", "--models", tmp_path / "missing" / "models"), 1, "does not exist"),
        (("export", "0123abc", "--models", tmp_path / "models"), 1, "unknown run id"),
        (("export", "latest"), 2, "give --out, --models or both"),
    ]
    for args, code, message in cases:
        out = invoke(*args, "--results-dir", results)
        assert out.exit_code == code, (args, out.output)
        assert message in out.output
        if code == 1:
            assert len(out.output.strip().splitlines()) == 1, out.output
    assert list(tmp_path.iterdir()) == []


def test_the_export_module_needs_neither_library():
    code = "import sys, universality.outputs.transformer_lens; assert not {'transformer_lens', 'sae_lens'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
