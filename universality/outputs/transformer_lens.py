"""univ's transformers as TransformerLens opens them, each with its SAE as SAELens opens it on that model.

Per seed, ``<out>/seed<N>/`` holds ``config.json`` (``HookedTransformerConfig`` fields), ``model.safetensors``
(the weights under TransformerLens's parameter names and shapes), ``tokenizer.json`` (univ's tokenizer, in
the ``tokenizers`` format) and ``sae/`` (SAELens's ``cfg.json`` + ``sae_weights.safetensors``, hooked on
``blocks.0.mlp.hook_post``: the MLP neurons after the nonlinearity, which univ's SAEs decompose).

The mapping is exact, nothing is folded: univ's block is TransformerLens's standard pre-LayerNorm
sequential block (learned positions, LayerNorm with eps 1e-5 and affine weights, attention scaled by
1/sqrt(d_head), causal), and its embedding and unembedding are untied; univ's unembedding has no bias,
so ``b_U`` is zero. Shapes: V vocab, C context, D d_model, H heads, d d_head, M d_mlp.

This module does not import TransformerLens or SAELens (the core install has neither): it writes plain
JSON and safetensors that they read.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file
from torch import Tensor

from models.transformer import OneLayerTransformer, TransformerConfig
from sae.checkpoint import CFG_FILE as SAE_CFG_FILE
from sae.checkpoint import SAELENS_ARCHITECTURES
from sae.checkpoint import WEIGHTS_FILE as SAE_WEIGHTS_FILE
from universality.core.errors import UnivError
from universality.runtime.atomic import atomic_path, write_text

HOOK_NAME = "blocks.0.mlp.hook_post"  # where an exported SAE reads its inputs in the exported model
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which univ's LayerNorm keeps
ACT_FNS = {"relu": "relu", "gelu": "gelu"}  # univ's act_fn -> TransformerLens's (nn.GELU() is the exact, erf GELU)
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, SAE_FOLDER = "config.json", "model.safetensors", "tokenizer.json", "sae"


def hooked_config(cfg: TransformerConfig, model_name: str) -> dict[str, Any]:
    """The ``HookedTransformerConfig`` fields of a univ transformer: a JSON-serializable dict (dtype is left at
    TransformerLens's default, float32, the dtype univ trains and saves in). ``default_prepend_bos`` is off:
    univ's contexts are windows of one token stream, with no BOS token."""
    if cfg.act_fn not in ACT_FNS:
        raise UnivError(f"act_fn {cfg.act_fn!r} has no TransformerLens equivalent here (known: {', '.join(ACT_FNS)})")
    return {
        "model_name": model_name, "n_layers": 1, "d_model": cfg.d_model, "n_heads": cfg.n_heads,
        "d_head": cfg.d_model // cfg.n_heads, "d_mlp": cfg.d_mlp, "d_vocab": cfg.vocab_size, "n_ctx": cfg.ctx_len,
        "act_fn": ACT_FNS[cfg.act_fn], "normalization_type": "LN", "eps": LAYER_NORM_EPS,
        "positional_embedding_type": "standard", "attn_only": False, "parallel_attn_mlp": False,
        "use_attn_scale": True, "attention_dir": "causal", "tie_word_embeddings": False, "default_prepend_bos": False,
    }


def hooked_state_dict(state: Mapping[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    """univ's ``OneLayerTransformer.state_dict()`` under TransformerLens's names and shapes (contiguous float32 copies).

    univ's ``W_qkv`` is one ``nn.Linear`` [3D, D] whose output splits into q, k, v, each read as H heads of d
    consecutive dims; TransformerLens keeps one [H, D, d] matrix per projection. ``W_o`` [D, H*d] reads the
    heads the same way: TransformerLens's ``W_O`` is [H, d, D]. ``nn.Linear`` weights are [out, in],
    TransformerLens's are [in, out]."""
    D, H = cfg.d_model, cfg.n_heads
    d = D // H
    W_q, W_k, W_v = state["attn.W_qkv.weight"].split(D)  # each [H*d, D]
    b_q, b_k, b_v = state["attn.W_qkv.bias"].split(D)
    names = {
        "embed.W_E": state["W_E.weight"],  # [V, D]
        "pos_embed.W_pos": state["W_pos.weight"],  # [C, D]
        "blocks.0.ln1.w": state["ln_attn.weight"], "blocks.0.ln1.b": state["ln_attn.bias"],
        "blocks.0.attn.W_Q": _heads_in(W_q, H), "blocks.0.attn.W_K": _heads_in(W_k, H), "blocks.0.attn.W_V": _heads_in(W_v, H),
        "blocks.0.attn.b_Q": b_q.reshape(H, d), "blocks.0.attn.b_K": b_k.reshape(H, d), "blocks.0.attn.b_V": b_v.reshape(H, d),
        "blocks.0.attn.W_O": state["attn.W_o.weight"].T.reshape(H, d, D),
        "blocks.0.attn.b_O": state["attn.W_o.bias"],
        "blocks.0.ln2.w": state["ln_mlp.weight"], "blocks.0.ln2.b": state["ln_mlp.bias"],
        "blocks.0.mlp.W_in": state["mlp.W_in.weight"].T, "blocks.0.mlp.b_in": state["mlp.W_in.bias"],  # [D, M], [M]
        "blocks.0.mlp.W_out": state["mlp.W_out.weight"].T, "blocks.0.mlp.b_out": state["mlp.W_out.bias"],  # [M, D], [D]
        "ln_final.w": state["ln_final.weight"], "ln_final.b": state["ln_final.bias"],
        "unembed.W_U": state["W_U.weight"].T,  # [D, V]
        "unembed.b_U": torch.zeros(cfg.vocab_size),
    }
    return {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in names.items()}


def _heads_in(W: Tensor, n_heads: int) -> Tensor:
    """A projection's ``nn.Linear`` weight [H*d, D] as TransformerLens's per-head [H, D, d]."""
    return W.reshape(n_heads, -1, W.shape[1]).transpose(1, 2)


def saelens_cfg(sae_cfg: Mapping[str, Any], model_name: str, ctx_len: int) -> dict[str, Any]:
    """A univ SAE's ``cfg.json`` (already in SAELens's layout, see ``sae.checkpoint.saelens_fields``) hooked on
    the exported model: the hook, the model and its context as top-level fields, where SAELens before 6 reads
    them and from which SAELens 6 builds its ``metadata`` (a cfg without ``sae_lens_version``). An SAE SAELens has no
    architecture for (the tokenized SAE's per-token decoder bias) is a one-line error."""
    if sae_cfg["architecture"] not in SAELENS_ARCHITECTURES.values():
        raise UnivError(f"an SAE of architecture {sae_cfg['architecture']!r} has no SAELens equivalent: export and "
                        "visualize the 'relu' or 'topk' SAEs of a run")
    return {**sae_cfg, "hook_name": HOOK_NAME, "hook_layer": 0, "hook_head_index": None, "model_name": model_name,
            "model_class_name": "HookedTransformer", "context_size": ctx_len, "prepend_bos": False}


@dataclass(frozen=True)
class SeedExport:
    """One seed's export, everything read and converted before anything is written: the model's
    ``HookedTransformerConfig`` fields and weights, its SAE's SAELens cfg, and the files copied as they are."""

    seed: int
    config: dict[str, Any]
    weights: dict[str, Tensor]
    sae_cfg: dict[str, Any]
    sae_weights: Path
    tokenizer: Path


def seed_export(seed: int, model: OneLayerTransformer, sae_dir: Path, tokenizer: Path) -> SeedExport:
    """A seed's export from its model, its SAE's checkpoint folder and its tokenizer file."""
    name = f"univ-seed{seed}"
    sae_cfg = saelens_cfg(json.loads((sae_dir / SAE_CFG_FILE).read_text()), name, model.cfg.ctx_len)
    return SeedExport(seed, hooked_config(model.cfg, name), hooked_state_dict(model.state_dict(), model.cfg), sae_cfg,
                      sae_dir / SAE_WEIGHTS_FILE, tokenizer)


def write_seed(out_dir: Path, item: SeedExport) -> Path:
    """Write ``<out_dir>/seed<N>/`` (each file atomically); returns that folder."""
    folder = Path(out_dir) / f"seed{item.seed}"
    (folder / SAE_FOLDER).mkdir(parents=True, exist_ok=True)
    write_text(folder / CONFIG_FILE, json.dumps(item.config, indent=2))
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(item.weights, str(tmp))
    _copy(item.tokenizer, folder / TOKENIZER_FILE)
    write_text(folder / SAE_FOLDER / SAE_CFG_FILE, json.dumps(item.sae_cfg, indent=2))
    _copy(item.sae_weights, folder / SAE_FOLDER / SAE_WEIGHTS_FILE)
    return folder


def _copy(source: Path, final: Path) -> None:
    with atomic_path(final) as tmp:
        shutil.copyfile(source, tmp)


def run_exports(seed_folders: dict[int, list[Path]]) -> list[SeedExport]:
    """Every seed's export of a univ run (its own SAE of the primary size; replicates and controls are not
    exported), read from the stage folders the run recorded (seed -> its data, model, SAE and activations
    folders), all before anything is written."""
    from universality.stages.model import load_transformer

    return [seed_export(seed, load_transformer(model_dir), sae_dir, data_dir / TOKENIZER_FILE)
            for seed, (data_dir, model_dir, sae_dir, _) in seed_folders.items()]


def write_models(out_dir: Path, exports: list[SeedExport]) -> list[Path]:
    """Write every seed's folder into ``out_dir``, created if needed (not its parent); returns the folders."""
    out_dir = Path(out_dir)
    out_dir.mkdir(exist_ok=True)
    return [write_seed(out_dir, item) for item in exports]
