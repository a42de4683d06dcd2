"""One SAE feature in the field's visualizer, ``sae-dashboard``: ``univ features RUN SEED FEATURE --dashboard OUT.html``.

The seed's model and SAE go through ``univ export --models`` (``outputs.transformer_lens``) into a temporary
folder and are loaded from there as TransformerLens and SAELens load them (the README's snippet); sae-dashboard's
``SaeVisRunner`` then runs them on the run's own comparison tokens (the data stage's held-out contexts, the first
``compare.skip_first_positions`` positions of each left out, as univ's feature cards do) and writes its
feature-centric page: activation histogram, top and quantile-sampled contexts, logit effects, correlated
neurons and features.

``sae_dashboard``, ``sae_lens`` and ``transformer_lens`` are optional (``pip install 'univ[dashboard]'``) and
imported only inside ``render``. sae-dashboard's page loads d3 and plotly.js from their CDNs; here both are
inlined, so the page works offline: plotly.js from the ``plotly`` package (a dependency of SAELens) and
``d3-selection`` (all the page uses of d3), vendored in ``assets/`` under its BSD license.
"""

from __future__ import annotations

import html as html_lib
import importlib
import json
import tempfile
from pathlib import Path
from typing import Mapping

from universality.core.errors import UnivError, first_line
from universality.runtime.atomic import write_text

EXTRA = "dashboard"  # pyproject.toml's optional extra
ASSETS = Path(__file__).parent / "assets"
D3_TAG = '<script src="https://d3js.org/d3.v6.min.js"></script>'
PLOTLY_TAG = '<script src="https://cdn.plot.ly/plotly-latest.min.js"></script>'


def check_libraries() -> None:
    """A one-line error naming the extra to install unless sae-dashboard, SAELens and TransformerLens import."""
    try:
        for library in ("sae_dashboard", "sae_lens", "transformer_lens"):
            importlib.import_module(library)
    except ImportError as exc:  # not installed, or installed but broken (e.g. a torchvision built for another torch)
        reason = f"{exc.name} is not installed" if exc.name else f"they do not import: {first_line(exc)}"
        raise UnivError(f"--dashboard needs sae-dashboard, SAELens and TransformerLens ({reason}): "
                        f"pip install 'univ[{EXTRA}]'") from None


def check_out(out: Path) -> None:
    """sae-dashboard writes one .html page; its folder must exist (univ creates none)."""
    if out.suffix != ".html":
        raise UnivError(f"--dashboard writes an HTML page: {out} does not end in .html")
    if not out.parent.is_dir():
        raise UnivError(f"folder {out.parent} does not exist")


class _Tokenizer:
    """What sae-dashboard reads of a Hugging Face tokenizer: ``vocab.items()`` as (string, id) pairs, which it
    inverts to show each token id. univ's tokenizer is a ``tokenizers`` one; its tokens decoded one by one
    (``feature_cards.vocab_strings``) can repeat (byte pieces decode to U+FFFD), so these are pairs, not a dict."""

    def __init__(self, vocab: list[str]):
        self.vocab = _Pairs(vocab)


class _Pairs:
    def __init__(self, vocab: list[str]):
        self._items = [(text, i) for i, text in enumerate(vocab)]

    def items(self):
        return iter(self._items)


def render(out: Path, seed: int, feature: int, folders: list[Path], params: Mapping[str, str], title: str) -> Path:
    """Write ``out`` (atomically): sae-dashboard's page of ``feature`` of ``seed``'s SAE, from the seed's stage
    folders (data, model, SAE, activations) and the run's logged config. Checks before any work: the libraries,
    ``out`` and the feature's index."""
    check_libraries()
    check_out(out)
    import torch
    from sae_dashboard.data_writing_fns import save_feature_centric_vis
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner
    from sae_lens import SAE
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from safetensors.torch import load_file

    from universality.analysis.heldout import eval_contexts
    from universality.outputs import transformer_lens as tl_export
    from universality.outputs.feature_cards import vocab_strings
    from universality.stages.data import heldout_tokens
    from universality.text.tokenization import load_tokenizer

    data_dir = folders[0]
    contexts = eval_contexts(heldout_tokens(data_dir), int(params["data.ctx_len"]), int(params["compare.tokens"]))
    skip = int(params["compare.skip_first_positions"])
    with tempfile.TemporaryDirectory(prefix=".univ-dashboard-") as tmp:
        exported = tl_export.write_models(Path(tmp), tl_export.run_exports({seed: folders}))[0]
        cfg = HookedTransformerConfig(**json.loads((exported / tl_export.CONFIG_FILE).read_text()))
        model = HookedTransformer(cfg)
        model.load_state_dict(load_file(str(exported / tl_export.WEIGHTS_FILE)), strict=False)  # the mask buffers
        model.eval()
        sae = SAE.load_from_disk(str(exported / tl_export.SAE_FOLDER), device="cpu")
        if not 0 <= feature < sae.cfg.d_sae:
            raise UnivError(f"feature {feature} is out of range: seed {seed} has {sae.cfg.d_sae} features "
                            f"(0..{sae.cfg.d_sae - 1})")
        config = SaeVisConfig(hook_point=sae.cfg.metadata.hook_name, features=[feature], minibatch_size_features=1,
                              minibatch_size_tokens=64, device="cpu", ignore_positions=list(range(skip)),
                              verbose=False)
        with torch.no_grad():
            data = SaeVisRunner(config).run(encoder=sae, model=model, tokens=torch.as_tensor(contexts))
        # set only now: TransformerLens's forward pass reads a Hugging Face tokenizer's settings when it has one
        model.tokenizer = _Tokenizer(vocab_strings(load_tokenizer(data_dir / tl_export.TOKENIZER_FILE)))
        page = Path(tmp) / "dashboard.html"
        save_feature_centric_vis(sae_vis_data=data, filename=page)
        html = offline(page.read_text(encoding="utf-8"), title)
    write_text(out, html)
    return out


def offline(html: str, title: str) -> str:
    """sae-dashboard's page with its two CDN scripts inlined and a title line naming the feature."""
    import plotly.offline

    scripts = {D3_TAG: (ASSETS / "d3-selection.min.js").read_text(encoding="utf-8"),
               PLOTLY_TAG: plotly.offline.get_plotlyjs()}
    for tag, js in scripts.items():
        if tag not in html:
            raise UnivError(f"this sae-dashboard's page does not load {tag!r}: univ's inlining of its scripts needs updating")
        html = html.replace(tag, f"<script>\n{js}\n</script>")
    header = html_lib.escape(title)
    return (f"<!DOCTYPE html>\n<html>\n<head>\n<meta charset='utf-8'>\n<title>{header}</title>\n</head>\n<body>\n"
            f"<h3 style='font-family: sans-serif'>{header}</h3>\n{html}\n</body>\n</html>\n")
