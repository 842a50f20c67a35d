"""Where each hook point lives inside each supported transformers architecture.

One table maps a `config.model_type` to the module paths that the hook scheme of
`distributed_sae.models.hooks` needs. Paths are relative to `model.base_model` (the bare
transformer without an LM head), so a `*ForCausalLM` and its bare `*Model` share one entry.
Adding an architecture whose layout matches one of these is one more table row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from distributed_sae.config.errors import ConfigError


def _intermediate_size(config: object) -> int:
    return int(getattr(config, "intermediate_size"))


def _gpt2_inner(config: object) -> int:
    # GPT-2 leaves n_inner as None to mean the classic 4x expansion.
    n_inner = getattr(config, "n_inner", None)
    return int(n_inner) if n_inner is not None else 4 * int(getattr(config, "n_embd"))


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one architecture; block-relative paths start at one transformer layer."""

    # The ModuleList of transformer layers, relative to model.base_model.
    layers: str
    # Module whose output (first element if a tuple) is what attention adds to the residual.
    attn_out: str
    # Module whose output is what the MLP adds to the residual.
    mlp_out: str
    # Linear layer whose *input* is the MLP neurons after the nonlinearity (d_mlp wide).
    mlp_down: str
    # Module whose *input* is the MLP's input, after the pre-MLP norm (d_model wide): what a
    # transcoder reads (hook `ln2.hook_normalized`).
    mlp_in: str
    # Causal LMs load through AutoModelForCausalLM and take use_cache=False; encoders through AutoModel.
    causal: bool
    # config -> d_mlp, because the config field's name differs between architectures.
    d_mlp: Callable[[object], int] = _intermediate_size


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(
        layers="layers", attn_out="self_attn", mlp_out="mlp", mlp_down="mlp.down_proj", mlp_in="mlp",
        causal=True,
    ),
    "gpt2": ArchSpec(
        layers="h", attn_out="attn", mlp_out="mlp", mlp_down="mlp.c_proj", mlp_in="mlp",
        causal=True, d_mlp=_gpt2_inner,
    ),
    # With use_parallel_residual the MLP reads post_attention_layernorm(resid_pre) instead of
    # post_attention_layernorm(resid_pre + attn_out); either way that is the mlp module's input.
    "gpt_neox": ArchSpec(
        layers="layers", attn_out="attention", mlp_out="mlp", mlp_down="mlp.dense_4h_to_h",
        mlp_in="mlp", causal=True,
    ),
    # BERT is post-LayerNorm: attention.output.dense / output.dense give the sublayer outputs
    # *before* the residual add and LayerNorm, the closest analogue of attn_out / mlp_out. The MLP
    # (intermediate, then output.dense) reads the attention sublayer's output after its residual
    # add and LayerNorm, which is the input of `intermediate`; BERT has no separate pre-MLP norm.
    "bert": ArchSpec(
        layers="encoder.layer", attn_out="attention.output.dense", mlp_out="output.dense",
        mlp_down="output.dense", mlp_in="intermediate", causal=False,
    ),
}


def arch_spec(model_type: str) -> ArchSpec:
    """The table row of `model_type`; ConfigError naming the supported ones otherwise."""
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise ConfigError(
            f"unsupported architecture model_type={model_type!r}: hook points are defined for "
            f"{', '.join(sorted(ARCHITECTURES))} (see distributed_sae/models/architectures.py)"
        )
    return spec


def dims_from_config(config: object) -> tuple[str, int, int, int]:
    """A transformers config -> (model_type, n_layers, d_model, d_mlp), validating the architecture."""
    model_type = str(getattr(config, "model_type", None))
    spec = arch_spec(model_type)
    # num_hidden_layers / hidden_size are aliased by attribute_map on GPT-2 (n_layer / n_embd).
    n_layers = int(getattr(config, "num_hidden_layers"))
    d_model = int(getattr(config, "hidden_size"))
    return model_type, n_layers, d_model, spec.d_mlp(config)


def layer_modules(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    """The transformer layers of `model` (a bare model or one with a head)."""
    base = getattr(model, "base_model", model)
    layers = base.get_submodule(spec.layers)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__}.{spec.layers} is {type(layers).__name__}, not a ModuleList")
    return layers
