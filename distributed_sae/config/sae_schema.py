"""The bank's config: hooks x kinds x widths x the kinds' swept parameters, or explicit members.

The grammar itself (expansion into members, their ids and seeds) is sae/bank.py's; this file holds
the typed fields, their documentation and the checks that need no model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from distributed_sae.config.checks import RELU_RECIPES, parse_hook
from distributed_sae.config.checks import choice as _choice
from distributed_sae.config.checks import positive as _positive
from distributed_sae.config.checks import sweep as _sweep
from distributed_sae.config.errors import ConfigError


@dataclass
class SAEConfig:
    """The bank of sparse autoencoders: a cross product of hooks, kinds, widths and the kinds'
    swept parameters, or an explicit list of members (sae/bank.py has the grammar)."""

    # SAE kind: topk (Gao et al. 2024), batchtopk (Bussmann et al. 2024), relu (Towards
    # Monosemanticity, or its April 2024 update), jumprelu (Gemma Scope), matryoshka, gated
    # (Rajamanoharan et al. 2024). The one-kind shorthand of `kinds`.
    kind: str = "topk"
    # Kinds of the bank, e.g. [topk,batchtopk]: every kind gets every hook and width. None = [kind].
    kinds: Optional[List[str]] = None
    # Dictionary sizes; each width is one member per hook, kind and swept parameter (a width
    # listed twice gives two seeds of one dictionary).
    widths: List[int] = field(default_factory=lambda: [2304, 4608])
    # Active latents per token for topk, batchtopk (on average) and matryoshka; a list sweeps
    # it (sae.k=[16,64]: one member per value). Other kinds ignore it.
    k: Any = 32
    # Hook point the bank reads: the one-hook shorthand of `hooks`.
    hook: Optional[str] = None
    # Hook points the bank reads, each a harvested hook; None = [hook], or every harvested hook
    # when hook is unset too.
    hooks: Optional[List[str]] = None
    # Seed of the weight initialisation (the members of width i use seed + i).
    seed: int = 0
    # Norm of each latent's encoder column at the start (decoder rows start as random unit
    # vectors, the encoder as their transpose times this). None = by optimiser: 0.3 with
    # signum_sf (loss recovered up to 0.005 higher than 1.0 at equal steps; sparsify starts at
    # 1/sqrt(3) = 0.577: docs/training.md, "Initialisation"), 1.0 with Adam (Gao et al.'s tied
    # start).
    encoder_init_norm: Optional[float] = None
    # relu and gated: coefficient lambda of the L1 sparsity penalty (a list sweeps it). Inputs are
    # scaled to E||x||^2 = d and the MSE is a mean over elements, so lambda is ~d times smaller
    # than the paper's 5 (a summed error). Measured on SmolLM2 layer 15 (100 steps of 1024, width 2304):
    # 0.003 -> L0 102, 0.01 -> L0 25 (FVU 0.50), 0.03 -> L0 11.
    l1_coefficient: Any = 0.01
    # relu: 'towards_monosemanticity' (unit-norm decoder, neuron resampling) or 'april_2024'
    # (L1 weighted by decoder norms, no norm constraint, no resampling, lambda warm-up).
    recipe: str = "towards_monosemanticity"
    # jumprelu: coefficient of the L0 penalty (a list sweeps it).
    l0_coefficient: Any = 0.01
    # jumprelu: initial per-feature threshold and the straight-through estimator's bandwidth, in
    # units of the scaled inputs (E||x||^2 = d, so pre-activations are ~sqrt(d) larger than with
    # Gemma Scope's unit-norm inputs). Measured as above: threshold 0.1 -> L0 456, 0.5 -> L0 83,
    # 1.0 -> L0 23 (FVU 0.26); in 100 steps the start threshold sets L0 more than the penalty.
    jumprelu_threshold: float = 1.0
    jumprelu_bandwidth: float = 0.1
    # matryoshka: nested prefixes of the dictionary as fractions of the width (ascending, last 1.0).
    matryoshka_fractions: List[float] = field(default_factory=lambda: [0.0625, 0.25, 1.0])
    # Forms of the product's members (sae/forms.py): sae (reads and reconstructs its hook),
    # transcoder and skip_transcoder (for a hook of layer L: read blocks.L.ln2.hook_normalized,
    # reconstruct blocks.L.hook_mlp_out). E.g. [sae,transcoder,skip_transcoder] over
    # sae.hooks=[blocks.15.hook_mlp_out] trains all three side by side. Crosscoders and
    # cross-layer transcoders span hooks: give them in `members`.
    forms: List[str] = field(default_factory=lambda: ["sae"])
    # An explicit bank instead of the product above: a list of {kind, width, form, hook (or
    # inputs and targets; a transcoder may give `layer`, a clt `layers`), seed, lr, name, and the
    # kind's parameters, e.g. k}; missing keys come from the scalars above (seed: sae.seed + the
    # entry's index).
    members: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def kind_list(self) -> list[str]:
        """The bank's kinds: `kinds`, or [kind]."""
        return list(self.kinds) if self.kinds else [self.kind]

    def __post_init__(self) -> None:
        from distributed_sae.sae.forms import FORMS
        from distributed_sae.sae.registry import k_kinds, kinds  # the registry names the kinds

        product_forms = ("sae", "transcoder", "skip_transcoder")
        for form in self.forms:
            if form not in FORMS:
                raise ConfigError(f"sae.forms has {form!r}: forms are {', '.join(FORMS)}")
            if form not in product_forms:
                raise ConfigError(f"sae.forms has {form!r}, which spans several hooks: give it "
                                  f"as an entry of sae.members (e.g. {{form: {form}, inputs: "
                                  f"[...], ...}}); sae.forms takes {', '.join(product_forms)}")
        if not self.forms or len(set(self.forms)) != len(self.forms):
            raise ConfigError(f"sae.forms={list(self.forms)} must be non-empty without repeats")

        for kind in [self.kind, *(self.kinds or [])]:
            _choice("sae", "kind" if kind == self.kind else "kinds", kind, kinds())
        if self.kinds is not None and (not self.kinds or len(set(self.kinds)) != len(self.kinds)):
            raise ConfigError(f"sae.kinds={list(self.kinds)} must be non-empty without repeats")
        _choice("sae", "recipe", self.recipe, RELU_RECIPES)
        for i, entry in enumerate(self.members):  # the other keys are sae/bank.py's to check
            if "kind" in entry:
                _choice(f"sae.members[{i}]", "kind", entry["kind"], kinds())
        for key in ("k", "l1_coefficient", "l0_coefficient"):
            setattr(self, key, _sweep("sae", key, getattr(self, key), int if key == "k" else float))
        if self.encoder_init_norm is not None and not self.encoder_init_norm > 0:
            raise ConfigError(f"sae.encoder_init_norm={self.encoder_init_norm} must be positive "
                              f"(e.g. 0.577), or null for the optimiser's default")
        _positive("sae", jumprelu_threshold=self.jumprelu_threshold,
                  jumprelu_bandwidth=self.jumprelu_bandwidth)
        fr = list(self.matryoshka_fractions)
        if not fr or fr != sorted(fr) or fr[-1] != 1.0 or fr[0] <= 0:
            raise ConfigError(f"sae.matryoshka_fractions={fr} must be ascending in (0, 1], ending at 1.0")
        if not self.widths:
            raise ConfigError("sae.widths is empty: give at least one width, e.g. sae.widths=[2304]")
        for width in self.widths:
            if width <= 0:
                raise ConfigError(f"sae.widths has {width}: every width must be positive")
        top_k = max(self.k) if isinstance(self.k, list) else self.k
        too_small = [w for w in self.widths if w < top_k]
        if too_small and set(self.kind_list) & set(k_kinds()):
            raise ConfigError(
                f"sae.k={self.k} is larger than width(s) {too_small}: lower sae.k or raise the width"
            )
        for hook in ([self.hook] if self.hook else []) + list(self.hooks or []):
            parse_hook(hook)
        if self.hook and self.hooks and self.hook not in self.hooks:
            raise ConfigError(f"sae.hook={self.hook!r} is not in sae.hooks={list(self.hooks)}: "
                              f"set one of them")
