"""The whole configuration surface of an experiment, as dataclasses.

Every field's comment is its documentation. Presets live in ``experiments/*.toml``;
a user config file is a TOML (or JSON) document with the same sections, and any field
left out keeps the preset's (or the default's) value.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from universality.core.errors import ConfigError

DEFAULT_PRESET = "quick"
DEFAULT_EXPERIMENT = "univ"  # the MLflow experiment univ runs are logged to
UI_HOST, UI_PORT = "127.0.0.1", 5000  # where `univ ui` serves a results folder's embedded store by default


@dataclass(frozen=True)
class DataConfig:
    """Corpus, tokenizer and the token splits shared by every seed."""

    corpus: str = "stdlib"  # "stdlib", a file or folder path, or "hf:NAME[:SPLIT]"
    vocab_size: int = 4096  # byte-level BPE vocabulary size
    tokenizer_chars: int = 10_000_000  # corpus characters the BPE is trained on (0 = all)
    max_tokens: int = 4_000_000  # cap on corpus tokens kept (0 = no cap)
    heldout_tokens: int = 131_072  # fixed held-out tail, identical for every seed
    ctx_len: int = 128  # context length of the transformer

    def __post_init__(self) -> None:
        _require(self.vocab_size >= 300, "data.vocab_size must be at least 300 (256 bytes + merges)")
        _require(self.max_tokens >= 0 and self.tokenizer_chars >= 0, "data.max_tokens and data.tokenizer_chars must be >= 0")
        _require(self.ctx_len >= 2, "data.ctx_len must be at least 2")
        _require(self.heldout_tokens >= 2 * self.ctx_len, "data.heldout_tokens must cover two contexts")


@dataclass(frozen=True)
class ModelConfig:
    """The one-layer transformer (the paper: d_model 128, d_mlp 512, ReLU)."""

    d_model: int = 128
    d_mlp: int = 512  # MLP neurons: the activations the SAE decomposes
    n_heads: int = 4
    act_fn: str = "relu"  # "relu" | "gelu"

    def __post_init__(self) -> None:
        _require(self.act_fn in ("relu", "gelu"), f"model.act_fn must be 'relu' or 'gelu', not {self.act_fn!r}")
        _require(self.d_mlp >= 1 and self.d_model >= 1 and self.n_heads >= 1, "model dimensions must be positive")
        _require(self.d_model % self.n_heads == 0, "model.d_model must be divisible by model.n_heads")


@dataclass(frozen=True)
class TrainConfig:
    """Transformer training: AdamW, linear warm-up then cosine decay, gradient clipping."""

    steps: int = 2000
    batch_size: int = 32  # sequences per step
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    grad_clip: float = 1.0
    eval_every: int = 200  # steps between held-out evaluations
    eval_batches: int = 8  # held-out batches per intermediate evaluation (the final one uses all)
    checkpoint_every: int = 500  # steps between resumable checkpoints

    def __post_init__(self) -> None:
        _require(self.steps >= 1, "train.steps must be >= 1")
        _require(min(self.eval_every, self.eval_batches, self.checkpoint_every) >= 1,
                 "train.eval_every, train.eval_batches and train.checkpoint_every must be >= 1")
        _require(self.batch_size >= 1, "train.batch_size must be >= 1")
        _require(self.lr > 0, "train.lr must be > 0")
        _require(0 <= self.warmup_steps <= self.steps, "train.warmup_steps must be within [0, train.steps]")


SAE_ARCHITECTURES = ("relu", "topk", "relu-tokenized", "crosscoder-l1", "crosscoder-batchtopk")
TOP_K_ARCHITECTURES = ("topk", "crosscoder-batchtopk")  # the architectures that use sae.k


@dataclass(frozen=True)
class SAEConfig:
    """Sparse autoencoder on the MLP activations ("Towards Monosemanticity"; TopK after Gao et al.)."""

    # "relu" (ReLU + L1, the paper's) | "topk" | "relu-tokenized" (the paper's with a per-token decoder bias,
    # Dooms & Wilhelm 2025: sae/tokenized.py) | a crosscoder over several models' activations at the same tokens
    # (sae/crosscoder.py): "crosscoder-l1" (Lindsey et al. 2024: L1 weighted by the summed decoder norms) or
    # "crosscoder-batchtopk" (Minder et al. 2025: the k · batch largest activations of the batch, AuxK). A crosscoder
    # reuses dict_size (latents), l1_coeff (L1), k and aux_k_coeff (BatchTopK) and every training field.
    arch: str = "relu"
    dict_size: int = 4096  # number of features (the paper's A/1: 4096 = 8 x 512)
    l1_coeff: float = 0.004  # lambda of the L1 penalty (the paper's value, for normalized inputs)
    k: int = 32  # active features per token, TopK only (BatchTopK: per token on average over the batch)
    aux_k_coeff: float = 1 / 32  # AuxK loss coefficient, TopK and BatchTopK only
    lr: float = 3e-3  # Adam learning rate
    batch_size: int = 512  # activations per step (the paper: 8192, for 1M steps; small batches converge in fewer samples)
    samples: int = 2_000_000  # activation vectors seen in training
    buffer_size: int = 262_144  # shuffling buffer of activations
    # Resampling points, as run fractions: through the first part of the run, where features die of a bad
    # start. Not later: on the quick preset's transformer at 4x its samples, the dead count levels off at
    # ~13% by mid-run (the equilibrium λ and the dictionary size set), and resampling every 5-10% until
    # 50-75% only churned: hundreds of features per event, most of them dead again by the next one, with a
    # worse FVU (0.17-0.19 against 0.166) and more ultralow features. The learning-rate decay is what
    # settles the dictionary (final vs 75% snapshot: median max correlation 0.98, against 0.96 without).
    resample_fractions: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4)
    # "No firing in the previous N steps", as a run fraction. 8%, not the paper's 1.25% of 1M steps: a short
    # run's 1.25% is too few inputs (quick: 10K) to tell a dead feature from a rare one.
    dead_window_fraction: float = 0.08
    resample_inputs: int = 81_920  # inputs on which the loss is computed to pick resampling targets
    # The within-model ceiling: extra SAEs on the same transformer that differ only in the SAE's seed
    # (initialization and activation order). Replicate 0 is the run's SAE; these are not in its cache key.
    replicates: int = 1  # extra SAEs per transformer that gets them (0: no ceiling)
    replicates_on: str = "first"  # "first": only the first seed's model | "all": every seed's model
    # Matmul precision: "auto" (bf16 where the hardware runs it fast: CUDA, CPUs with AVX512-BF16 or AMX;
    # else fp32) | "fp32" | "bf16". Weights and Adam state are float32 either way; a cached SAE records the
    # resolved one (sae.training.resolve_precision).
    precision: str = "auto"
    # Linear learning-rate warm-up over this first fraction of the steps. Off by default: measured on the
    # planted-dictionary data of tests/test_sae.py, even 1% of warm-up ends in a denser, higher-loss
    # dictionary (recovery 0.94 and loss 0.272 against 0.97 and 0.266 without); Adam needs none here.
    lr_warmup_fraction: float = 0.0
    # Linear learning-rate decay to 0 over this last fraction of the steps (Anthropic's April 2024 update:
    # the last 20%), so that the dictionary has stopped moving by the last step
    lr_decay_fraction: float = 0.2
    snapshot_fraction: float = 0.75  # keep a copy of the SAE at this fraction of the steps, for the convergence diagnostic (0: none)
    # A dictionary family (the paper's A/0..A/5): one SAE of each of these sizes per model, all trained with the same
    # SAE seed on the same activation stream, each its own cached stage. Empty: one SAE of sae.dict_size (one size).
    # When set, sae.dict_size becomes its largest: the primary size, which keeps the single-size run names ("seed0"),
    # summary keys, headline and matched table; another size N is "seed0-dN" with summary keys "sizeN.<key>".
    # Not in an SAE's cache key: each SAE's key is that of a single-size run of its size. Replicates (the ceiling)
    # are fitted at every size; the weight-shuffled control only at the primary size.
    dict_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _require(self.arch in SAE_ARCHITECTURES, f"sae.arch must be one of {', '.join(SAE_ARCHITECTURES)}, not {self.arch!r}")
        _require(all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in self.dict_sizes),
                 f"sae.dict_sizes must be positive integers, not {list(self.dict_sizes)}")
        _require(len(set(self.dict_sizes)) == len(self.dict_sizes), f"sae.dict_sizes repeats a size: {list(self.dict_sizes)}")
        object.__setattr__(self, "dict_sizes", tuple(sorted(self.dict_sizes)))
        if self.dict_sizes:
            object.__setattr__(self, "dict_size", self.dict_sizes[-1])
        _require(self.dict_size >= 1, "sae.dict_size must be >= 1")
        _require(self.arch not in TOP_K_ARCHITECTURES or 1 <= self.k < self.sizes[0],
                 f"sae.k ({self.k}) must be in [1, the smallest of sae.dict_sizes ({self.sizes[0]}))" if self.dict_sizes
                 else "sae.k must be in [1, sae.dict_size)")
        _require(self.l1_coeff >= 0, "sae.l1_coeff must be >= 0")
        _require(self.lr > 0, "sae.lr must be > 0")
        _require(self.batch_size >= 1 and self.samples >= self.batch_size, "sae.samples must be >= sae.batch_size")
        _require(self.resample_inputs >= 1 and self.buffer_size >= 1, "sae.resample_inputs and sae.buffer_size must be >= 1")
        _require(all(0 < f < 1 for f in self.resample_fractions), "sae.resample_fractions must lie in (0, 1)")
        _require(0 < self.dead_window_fraction <= 1, "sae.dead_window_fraction must lie in (0, 1]")
        _require(self.replicates >= 0, "sae.replicates must be >= 0")
        _require(self.replicates_on in ("first", "all"), f"sae.replicates_on must be 'first' or 'all', not {self.replicates_on!r}")
        _require(self.precision in ("auto", "fp32", "bf16"), f"sae.precision must be 'auto', 'fp32' or 'bf16', not {self.precision!r}")
        _require(self.lr_warmup_fraction >= 0 and self.lr_decay_fraction >= 0
                 and self.lr_warmup_fraction + self.lr_decay_fraction <= 1,
                 "sae.lr_warmup_fraction and sae.lr_decay_fraction must be >= 0 and sum to at most 1")
        _require(0 <= self.snapshot_fraction < 1, "sae.snapshot_fraction must lie in [0, 1)")
        object.__setattr__(self, "resample_fractions", tuple(self.resample_fractions))

    @property
    def sizes(self) -> tuple[int, ...]:
        """Every dictionary size fitted per model, ascending: ``dict_sizes``, or ``(dict_size,)``."""
        return self.dict_sizes or (self.dict_size,)

    def training_fields(self) -> dict[str, Any]:
        """The fields that decide one SAE's weights (the replicate settings and the family only say how many SAEs)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("replicates", "replicates_on", "dict_sizes")}


@dataclass(frozen=True)
class CompareConfig:
    """Cross-seed matching on the shared held-out tokens."""

    tokens: int = 131_072  # held-out tokens over which activations are correlated
    thresholds: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9)
    min_firings: int = 10  # features firing on fewer held-out tokens are too rare to correlate
    randomized_baseline: bool = True  # also compare SAEs on two weight-shuffled copies of a model
    n_bootstrap: int = 1000  # bootstrap resamples for confidence intervals
    top_k_examples: int = 10  # top activating contexts kept per feature
    context_tokens: int = 8  # tokens of context on each side of an example
    # Positions at the start of every context left out of the comparison statistics, the top examples and
    # the SAE's evaluation: at position 0 the model sees one token and no context, and features that
    # fire there with the same value whatever the token crowd the "universal" lists (0: keep them).
    skip_first_positions: int = 1
    # Causal universality in every pair (0: off): the top N mutual matches by activation correlation are
    # ablated in both models and the per-token changes of next-token log-probability correlated on the
    # comparison tokens; the median, beside the same for N random feature pairs. Cost on quick-sized models:
    # one pass of each model over the comparison tokens, and ~0.1 s per ablated feature (4N per pair).
    causal_top_n: int = 0

    def __post_init__(self) -> None:
        _require(self.tokens >= 1, "compare.tokens must be >= 1")
        _require(self.causal_top_n >= 0, "compare.causal_top_n must be >= 0")
        _require(min(self.min_firings, self.n_bootstrap, self.top_k_examples) >= 1,
                 "compare.min_firings, compare.n_bootstrap and compare.top_k_examples must be >= 1")
        _require(self.context_tokens >= 0, "compare.context_tokens must be >= 0")
        _require(self.skip_first_positions >= 0, "compare.skip_first_positions must be >= 0")
        _require(all(0 < t < 1 for t in self.thresholds), "compare.thresholds must lie in (0, 1)")
        object.__setattr__(self, "thresholds", tuple(self.thresholds))


CROSSCODER_ARCHITECTURES = ("crosscoder-l1", "crosscoder-batchtopk")


@dataclass(frozen=True)
class CrosscoderConfig:
    """One sparse crosscoder over every seed's trained model (sae/crosscoder.py): one dictionary whose latents each
    have a decoder per model, read off as shared by all models or exclusive to one (Lindsey et al. 2024; Minder et
    al. 2025). Trained on the models' MLP activations at the same training tokens with the SAE trainer and the
    ``sae`` section's other training fields (lr, batch_size, buffer_size, resampling, precision); evaluated on the
    comparison tokens. A section of its own: no other stage's cache key reads it."""

    enabled: bool = False  # fit it at all (off: no crosscoder stage runs)
    # "crosscoder-batchtopk" (Minder et al.: the k · batch largest latents of the batch, AuxK; fewer artifact
    # exclusives) | "crosscoder-l1" (Lindsey et al.: L1 weighted by the summed decoder norms, resampling)
    arch: str = "crosscoder-batchtopk"
    dict_size: int = 4096  # latents (one dictionary for all models: more than one model's SAE needs)
    k: int = 32  # BatchTopK: latents per token, on average over a batch
    l1_coeff: float = 0.004  # L1: lambda of the decoder-norm-weighted penalty (per-model normalized inputs)
    samples: int = 2_000_000  # training tokens seen (each token's activations in every model at once)
    seed: int = 0  # the crosscoder's seed (initialization and the order tokens arrive in)
    # Controls, each one more crosscoder of the same settings (each costs about as much as the main one):
    identity_control: bool = False  # the first seed's model with itself (identical inputs): exclusives should be ~0
    shuffled_control: bool = False  # the first seed's model with its weight-shuffled copy (needs compare.randomized_baseline)
    replicates: int = 0  # extra crosscoder seeds on the same models: the crosscoder's own seed stability (its ceiling)

    def __post_init__(self) -> None:
        _require(self.arch in CROSSCODER_ARCHITECTURES,
                 f"crosscoder.arch must be one of {', '.join(CROSSCODER_ARCHITECTURES)}, not {self.arch!r}")
        _require(self.dict_size >= 1, "crosscoder.dict_size must be >= 1")
        _require(self.arch != "crosscoder-batchtopk" or 1 <= self.k < self.dict_size,
                 f"crosscoder.k ({self.k}) must be in [1, crosscoder.dict_size ({self.dict_size}))")
        _require(self.l1_coeff >= 0, "crosscoder.l1_coeff must be >= 0")
        _require(self.samples >= 1 and self.seed >= 0 and self.replicates >= 0,
                 "crosscoder.samples must be >= 1, crosscoder.seed and crosscoder.replicates >= 0")

    def sae_config(self, sae: SAEConfig) -> SAEConfig:
        """The SAEConfig the trainer gets: this section's fields over the ``sae`` section's training fields."""
        return dataclasses.replace(sae, arch=self.arch, dict_size=self.dict_size, dict_sizes=(), k=self.k,
                                   l1_coeff=self.l1_coeff, samples=self.samples, replicates=0)


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: the same corpus and settings for every seed."""

    name: str = DEFAULT_PRESET
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    crosscoder: CrosscoderConfig = field(default_factory=CrosscoderConfig)

    def __post_init__(self) -> None:
        _require(self.compare.skip_first_positions < self.data.ctx_len,
                 f"compare.skip_first_positions must be below data.ctx_len ({self.data.ctx_len})")
        _require(not self.compare.causal_top_n or self.compare.skip_first_positions < self.data.ctx_len - 1,
                 "compare.causal_top_n needs a scored token per context: compare.skip_first_positions below data.ctx_len - 1")
        _require(self.compare.tokens <= self.data.heldout_tokens,
                 f"compare.tokens ({self.compare.tokens}) must not exceed data.heldout_tokens ({self.data.heldout_tokens}): "
                 "activations are compared on held-out tokens")
        _require(self.sae.arch not in CROSSCODER_ARCHITECTURES,
                 f"sae.arch {self.sae.arch!r} is a crosscoder: the per-model SAEs need 'relu', 'topk' or 'relu-tokenized'; "
                 "a run's crosscoder is the [crosscoder] section")
        _require(self.crosscoder.samples >= self.sae.batch_size,
                 f"crosscoder.samples must be >= sae.batch_size ({self.sae.batch_size})")
        _require(not (self.crosscoder.enabled and self.crosscoder.shuffled_control) or self.compare.randomized_baseline,
                 "crosscoder.shuffled_control needs the weight-shuffled models: set compare.randomized_baseline = true")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted ``section.field`` -> value, for MLflow params and cache keys."""
        return {
            f"{section}.{key}" if isinstance(values, dict) else section: value
            for section, values in self.to_dict().items()
            for key, value in (values.items() if isinstance(values, dict) else [(None, values)])
        }

    def replace(self, **sections: Any) -> "ExperimentConfig":
        """A copy with some sections' fields replaced: ``cfg.replace(sae={"arch": "topk"})``."""
        return from_dict(_merge(self.to_dict(), sections))


_SECTION_CLASSES = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "sae": SAEConfig,
    "compare": CompareConfig,
    "crosscoder": CrosscoderConfig,
}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    """Build a validated config; unknown sections or fields are errors, not silently ignored."""
    unknown = set(raw) - set(_SECTION_CLASSES) - {"name"}
    if unknown:
        raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown))}")
    sections = {}
    for name, cls in _SECTION_CLASSES.items():
        values = raw.get(name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"config section [{name}] must be a table")
        known = {f.name for f in dataclasses.fields(cls)}
        bad = set(values) - known
        if bad:
            raise ConfigError(f"unknown field(s) in [{name}]: {', '.join(sorted(bad))}")
        hints = typing.get_type_hints(cls)
        sections[name] = cls(**{key: _typed(f"{name}.{key}", value, hints[key]) for key, value in values.items()})
    return ExperimentConfig(name=str(raw.get("name", "custom")), **sections)


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _typed(field_name: str, value: Any, kind: Any) -> Any:
    """``value`` checked against the field's annotation before any work: an integral float (TOML's
    ``samples = 2e6``) becomes the int it names, an int is a valid float; anything else is an error."""
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{field_name} must be a list, not {value!r}")
        return tuple(_typed(field_name, item, typing.get_args(kind)[0]) for item in value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    accepted = (int, float) if kind is float else kind
    if not isinstance(value, accepted) or (isinstance(value, bool) and kind is not bool):  # True is an int to Python
        raise ConfigError(f"{field_name} must be {_TYPE_NAMES[kind]}, not {value!r}")
    return value


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".toml")] for p in resources.files("experiments").iterdir() if p.name.endswith(".toml"))


def load_preset(name: str) -> ExperimentConfig:
    """A named preset from ``experiments/`` (shipped as package data, so it works installed)."""
    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r} (choose from {', '.join(preset_names())})")
    raw = tomllib.loads(resources.files("experiments").joinpath(f"{name}.toml").read_text())
    base = raw.pop("preset", None)  # a preset may be another preset with a few fields changed
    return from_dict({**_merge(load_preset(base).to_dict() if base else {}, raw), "name": name})


def load_config(path: Path, base: ExperimentConfig | None = None) -> ExperimentConfig:
    """A user config file (TOML or JSON) laid over ``base`` (or its own ``preset`` key, or the default)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    try:
        raw = json.loads(text) if str(path).endswith(".json") else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"malformed config file {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"malformed config file {path}: expected a table of sections")
    preset = raw.pop("preset", None)
    start = load_preset(preset) if preset else (base or load_preset(DEFAULT_PRESET))
    merged = _merge(start.to_dict(), raw)
    merged["name"] = raw.get("name", Path(path).stem)
    return from_dict(merged)
