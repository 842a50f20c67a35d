"""Configs of the stages after training: evaluation, export (and the Hub), steering."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from distributed_sae.config.checks import DTYPES
from distributed_sae.config.checks import choice as _choice
from distributed_sae.config.checks import positive as _positive
from distributed_sae.config.errors import ConfigError


@dataclass
class EvalConfig:
    """Metrics of every member on the held-out tail of the store."""

    # Held-out tokens to evaluate on at most (0 = all of the held-out part).
    tokens: int = 0
    # Activations per evaluation batch.
    batch_size: int = 4096
    # Spliced language-model loss: run the model with each SAE's reconstruction in place of its
    # hook's activations (clean, spliced, zero-ablated CE, loss recovered, KL). Needs the model.
    spliced: bool = True
    # Held-out tokens (whole contexts) the spliced loss runs on. Each SAE costs one full forward
    # pass over them, plus two shared ones: 8192 tokens take ~13 s per pass for SmolLM2 on the
    # 2-core build machine (630 tok/s, all 30 layers, fp32).
    spliced_tokens: int = 8192
    # Contexts per forward pass of the spliced loss.
    spliced_batch_size: int = 8
    # Feature analysis (top contexts, quantiles, density, logit effects) -> eval/<member>/features.json.
    features: bool = True
    # Top-activating contexts kept per feature, and tokens shown either side of each.
    n_top_contexts: int = 8
    context_window: int = 8
    # Feature splitting across the bank's widths (decoder cosine above this) -> eval/splitting.json.
    split_threshold: float = 0.5
    # Static HTML dashboards: eval/index.html and eval/<member>/dashboard.html.
    dashboard: bool = True
    # Autointerpretability after the metrics (the interp stage, settings under interp.*): LLM
    # explanations and scores of sampled features against the layer's neurons.
    interp: bool = False

    def __post_init__(self) -> None:
        if self.tokens < 0:
            raise ConfigError(f"eval.tokens must be >= 0 (0 = all held-out tokens), got {self.tokens}")
        _positive("eval", batch_size=self.batch_size, spliced_tokens=self.spliced_tokens,
                  spliced_batch_size=self.spliced_batch_size, n_top_contexts=self.n_top_contexts)
        if self.context_window < 0 or not -1.0 <= self.split_threshold <= 1.0:
            raise ConfigError(f"eval.context_window={self.context_window} must be >= 0 and "
                              f"eval.split_threshold={self.split_threshold} a cosine in [-1, 1]")


@dataclass
class ExportConfig:
    """SAELens-compatible files for every member."""

    # Where the export goes; '${out_dir}/export' by default.
    path: str = "${out_dir}/export"
    # dtype of the exported weights.
    dtype: str = "float32"
    # Hugging Face Hub repo ('org/name') to push the exported bank to; None = no push. The
    # token comes from HF_TOKEN (or `huggingface-cli login`) and is never written or logged.
    hub_repo_id: Optional[str] = None
    # Branch to push to (created if missing; None = main) and whether a new repo is private.
    hub_revision: Optional[str] = None
    hub_private: bool = False

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("export.path is empty: give a directory, e.g. export.path=/data/export")
        _choice("export", "dtype", self.dtype, DTYPES)
        if self.hub_repo_id is not None and self.hub_repo_id.count("/") != 1:
            raise ConfigError(f"export.hub_repo_id={self.hub_repo_id!r} must be 'org/name'")


@dataclass
class SteerConfig:
    """dsae-steer: generate text with one feature's decoder direction added at its hook point."""

    # Member folder under out_dir/train (or a path to any SAE folder); None = the bank's first.
    member: Optional[str] = None
    # The feature (latent index) whose decoder direction is added.
    feature: int = 0
    # Multiple of the decoder direction added at every position (the direction has unit norm for
    # unit-norm kinds; activations at SmolLM2's layer 15 have norms of ~20-60).
    scale: float = 8.0
    # Text the generation continues, clean and steered.
    prompt: str = "The function returns"
    # Tokens generated after the prompt.
    max_new_tokens: int = 32
    # Sampling temperature; 0 = greedy (the clean and steered texts then differ only by the
    # steering).
    temperature: float = 0.0

    def __post_init__(self) -> None:
        if self.feature < 0:
            raise ConfigError(f"steer.feature must be >= 0, got {self.feature}")
        _positive("steer", max_new_tokens=self.max_new_tokens)
        if self.temperature < 0:
            raise ConfigError(f"steer.temperature must be >= 0, got {self.temperature}")
