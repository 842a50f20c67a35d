"""Loading transformers and reading activations at named hook points (one scheme for all archs)."""

from distributed_sae.models.architectures import ARCHITECTURES, ArchSpec, arch_spec
from distributed_sae.models.hooks import check_hooks, hook_dim, run_with_hooks
from distributed_sae.models.registry import (
    LoadedModel,
    from_hf_model,
    load_model,
    load_tokenizer,
    model_dims,
    register_model,
    registered_models,
    torch_dtype,
    truncate_layers,
)

__all__ = [
    "ARCHITECTURES", "ArchSpec", "LoadedModel", "arch_spec", "check_hooks", "from_hf_model",
    "hook_dim", "load_model", "load_tokenizer", "model_dims", "register_model", "registered_models",
    "run_with_hooks", "torch_dtype", "truncate_layers",
]
