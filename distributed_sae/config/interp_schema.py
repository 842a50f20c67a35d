"""Config of the autointerpretability stage (`dsae-interp`, or `dsae-run eval.interp=true`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from distributed_sae.config.checks import choice as _choice
from distributed_sae.config.checks import device as _device
from distributed_sae.config.checks import non_negative as _non_negative
from distributed_sae.config.checks import positive as _positive
from distributed_sae.config.errors import ConfigError

BACKENDS = ("local", "openai")
SCORERS = ("detection", "fuzzing", "simulation")


@dataclass
class InterpConfig:
    """Explain a sample of each member's features, and the neurons of the same layer as the
    baseline, with an LLM; score each explanation on held-out windows the explainer never saw.
    Results: out_dir/interp/ (per member, the neuron baselines, summary.md, histograms) and an
    `interp` entry per explained feature in eval/<member>/features.json."""

    # Features explained per member: a seeded sample of those that fire on the scanned rows.
    features: int = 50
    # Neurons of the member's layer explained as the baseline (a seeded sample): the MLP's
    # neurons (blocks.L.mlp.hook_post, from a forward pass of the model) and, where the member
    # reads the residual stream, its basis directions. 0 = no baseline.
    neurons: int = 50
    # Members to explain (folder names under out_dir/train); empty = every member.
    members: list[str] = field(default_factory=list)
    # 'local': a transformers chat model in this process (interp.model: a built-in name, a hub
    # id or a folder; the default ships with the default model's package). 'openai': any
    # OpenAI-compatible server (vLLM, llama.cpp's server, TGI, hosted APIs) at interp.base_url.
    backend: str = "local"
    model: str = "smollm2-135m"
    base_url: str = "http://127.0.0.1:8000/v1"
    # Environment variable holding the API key (read at call time, never written anywhere).
    api_key_env: str = "OPENAI_API_KEY"
    # Requests in flight at once (the local backend runs one at a time whatever this is), the
    # retries of a failed request (exponential back-off), requests per minute (0 = no limit) and
    # the per-request timeout.
    concurrency: int = 8
    max_retries: int = 5
    requests_per_minute: int = 0
    timeout_s: float = 120.0
    # Price per 1000 prompt / completion tokens, for the cost line of the summary (0 = free).
    cost_per_1k_prompt: float = 0.0
    cost_per_1k_completion: float = 0.0
    # Device of the local backend's model.
    device: str = "cpu"
    # Scorers run on every explanation: detection and fuzzing (balanced accuracy of the LLM's
    # yes/no per window / per highlighted span, delphi's scorers) and simulation (Bills et al.
    # 2023: correlation of predicted per-token levels with the true activations).
    scorers: list[str] = field(default_factory=lambda: list(SCORERS))
    # Held-out tokens scanned for examples (whole contexts from the start of the held-out part;
    # 0 = all). Activations of the sampled units are kept dense: tokens x units x 4 bytes.
    tokens: int = 32768
    # Tokens per example window (contexts are cut into windows of this length).
    window: int = 24
    # Windows shown to the explainer: the top-activating ones, then samples over the quantiles.
    explain_top: int = 6
    explain_quantile: int = 4
    # Held-out windows per scorer: activating ones (sampled over the quantiles) and windows
    # where the unit does not fire.
    score_active: int = 6
    score_inactive: int = 6
    # Seed of the samples (units, windows, fuzzing marks).
    seed: int = 0
    # Every request and response, keyed by backend, model and prompt: a rerun makes no calls.
    cache_dir: str = "${out_dir}/interp/cache"
    # The blind rating page (out_dir/interp/rate.html, its key in rate_key.json): this many of
    # each member's explained features and of each layer's MLP neurons, shuffled, unlabelled,
    # for a person to rate on the paper's rubric. 0 = no page.
    rate_units: int = 20
    # A ratings file saved from rate.html: the stage then only turns it into the
    # features-vs-neurons comparison (interp/ratings_summary.*), with no LLM call.
    ratings: str = ""

    def __post_init__(self) -> None:
        _choice("interp", "backend", self.backend, BACKENDS)
        _device("interp", "device", self.device)
        _non_negative("interp", seed=self.seed)  # numpy's generators take no negative seed
        bad = [s for s in self.scorers if s not in SCORERS]
        if bad or not self.scorers:
            raise ConfigError(f"interp.scorers={list(self.scorers)}: choose from {list(SCORERS)}")
        if self.features < 0 or self.neurons < 0 or self.tokens < 0 or self.rate_units < 0:
            raise ConfigError(f"interp.features={self.features}, interp.neurons={self.neurons}, "
                              f"interp.tokens={self.tokens} and interp.rate_units="
                              f"{self.rate_units} must be >= 0")
        _positive("interp", concurrency=self.concurrency, timeout_s=self.timeout_s,
                  window=self.window, explain_top=self.explain_top,
                  score_active=self.score_active, score_inactive=self.score_inactive)
        if self.max_retries < 0 or self.requests_per_minute < 0 or self.explain_quantile < 0:
            raise ConfigError(f"interp.max_retries={self.max_retries}, interp.requests_per_minute="
                              f"{self.requests_per_minute} and interp.explain_quantile="
                              f"{self.explain_quantile} must be >= 0")
        if self.cost_per_1k_prompt < 0 or self.cost_per_1k_completion < 0:
            raise ConfigError(f"interp.cost_per_1k_prompt={self.cost_per_1k_prompt} and "
                              f"interp.cost_per_1k_completion={self.cost_per_1k_completion} "
                              f"must be >= 0")
        if self.backend == "openai" and not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"interp.base_url={self.base_url!r} must start with http:// or "
                              f"https:// (e.g. http://127.0.0.1:8000/v1)")
