"""Replacing MLPs by functions of their inputs: the "replacement model" of a transcoder.

A transcoder's features read the MLP's input (`blocks.L.ln2.hook_normalized`) and write its output
(`blocks.L.hook_mlp_out`). `patch_mlp` splices such a model in: inside the block, the output of
each listed MLP is `fn(L, recorded, own)`, computed from the MLP inputs recorded so far in the
pass (and the MLP's own output, which positions that must stay clean keep). A
single-layer transcoder uses `recorded[L]` only; a cross-layer transcoder, whose output at layer L
depends on the inputs of every covered layer <= L, uses them all.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from distributed_sae.models.architectures import arch_spec, layer_modules
from distributed_sae.models.hooks import _first_tensor, _replaced, check_hooks
from distributed_sae.models.registry import LoadedModel


@contextmanager
def patch_mlp(
    loaded: LoadedModel, layers: Sequence[int],
    fn: Callable[[int, dict[int, Tensor], Tensor], Tensor],
) -> Iterator[None]:
    """Inside the block, the MLP output of each layer L in `layers` is replaced by
    fn(L, recorded, own), `own` being what the MLP computed itself (batch, seq, d_model).

    On every forward pass the MLP input of each listed layer (batch, seq, d_model; what
    `blocks.L.ln2.hook_normalized` captures) is recorded; `recorded` is reset when the lowest listed
    layer's MLP input arrives, i.e. at the start of each pass. fn gets a fresh dict {layer: input}
    of the listed layers <= L (all seen so far in this pass, since layers run in order) and must
    return what `blocks.L.hook_mlp_out` would capture there: shape (batch, seq, d_model); it is
    cast to the original output's dtype and device (inputs of different layers may lie on
    different devices under a device_map). The real MLP still runs and its output is discarded:
    simpler than replacing each architecture's MLP module, at the cost of its compute. Recorded
    inputs are not detached, so gradients flow through fn when the caller enables them. While fn
    runs the patch is off, so fn may call the model's own modules. The torch hooks are removed on
    exit, also after an error.
    """
    order = sorted(set(layers))
    if not order:
        raise ValueError("patch_mlp: layers must name at least one layer")
    check_hooks([f"blocks.{layer}.hook_mlp_out" for layer in order], loaded.n_layers)
    spec = arch_spec(loaded.arch)
    blocks = layer_modules(loaded.model, spec)
    recorded: dict[int, Tensor] = {}
    # True while fn runs: fn may call the hooked modules themselves (e.g. `block.mlp(x)` for an
    # identity check, where mlp_in and mlp_out are one module), which must then run unpatched
    # rather than recurse into fn or reset `recorded`.
    in_fn = [False]

    def recorder(layer: int) -> Callable[[nn.Module, tuple, dict], None]:
        def on_input(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            if in_fn[0]:
                return
            if layer == order[0]:
                recorded.clear()  # a new forward pass (or, with a KV cache, a new token's slice)
            # The MLP modules take their input positionally; the keyword is a fallback.
            recorded[layer] = _first_tensor(args) if args else kwargs["hidden_states"]

        return on_input

    def replacer(layer: int) -> Callable[[nn.Module, tuple, Any], Any]:
        hook = f"blocks.{layer}.hook_mlp_out"

        def on_output(_module: nn.Module, _args: tuple, output: Any) -> Any:
            if in_fn[0]:
                return None  # None keeps the module's own output
            if layer not in recorded:
                raise RuntimeError(f"patch_mlp: the MLP output of layer {layer} came before its "
                                   f"input on {type(loaded.model).__name__}")
            # A copy limited to layers <= L, so fn can neither see nor disturb later entries.
            seen = {k: x for k, x in recorded.items() if k <= layer}
            in_fn[0] = True
            try:
                new = _replaced(_first_tensor(output), lambda old: fn(layer, seen, old), hook, "patch_mlp")
            finally:
                in_fn[0] = False
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return on_output

    handles: list[RemovableHandle] = []
    try:
        for layer in order:
            block = blocks[layer]
            handles.append(block.get_submodule(spec.mlp_in).register_forward_pre_hook(
                recorder(layer), with_kwargs=True))
            handles.append(block.get_submodule(spec.mlp_out).register_forward_hook(replacer(layer)))
        yield
    finally:
        for handle in handles:
            handle.remove()
