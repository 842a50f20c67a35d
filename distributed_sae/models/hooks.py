"""Named hook points, one scheme across Llama, GPT-2, GPT-NeoX and BERT, and a truncated forward.

Names are `blocks.<layer>.<kind>` (parsed by `distributed_sae.config.parse_hook`):

* `hook_resid_pre`  - input of layer L (the residual stream before it), width d_model.
* `hook_resid_post` - output of layer L (first element if the layer returns a tuple), d_model.
* `hook_attn_out`   - what the attention sublayer adds to the residual stream, d_model.
* `hook_mlp_out`    - what the MLP adds to the residual stream, d_model.
* `mlp.hook_post`   - MLP neurons after the nonlinearity (input of the down projection), d_mlp.
* `ln2.hook_normalized` - the MLP's input after its pre-MLP norm (what a transcoder reads),
  d_model; for post-LN BERT, the attention sublayer's output after its LayerNorm.

`patch_hook` is the write side: inside it, every forward pass of the model sees `fn(activations)`
in place of the activations at a hook point (SAE splicing, ablation, steering). `patch_mlp`
(distributed_sae.models.replace) replaces whole MLPs by functions of their inputs (transcoders).

`run_with_hooks` stops the forward pass as soon as every requested hook has fired, so layers after
the deepest requested one (and the LM head) never run: harvesting a middle layer costs only the
layers below it. (Not for ZeRO-3 partitioned models, which `registry.truncate_layers` cuts instead.)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from distributed_sae.config.errors import ConfigError
from distributed_sae.config.schema import parse_hook
from distributed_sae.models.architectures import ArchSpec, arch_spec, layer_modules
from distributed_sae.models.registry import LoadedModel


class _StopForward(Exception):
    """Raised by the capture hook that completes the set, to skip the rest of the forward pass."""


def check_hooks(hooks: Sequence[str], n_layers: int) -> None:
    """ConfigError for a malformed hook name or a layer outside 0..n_layers-1."""
    for hook in hooks:
        layer, _ = parse_hook(hook)
        if layer >= n_layers:
            raise ConfigError(
                f"{hook}: layer {layer} is out of range for a {n_layers}-layer model "
                f"(layers 0..{n_layers - 1})"
            )


def hook_dim(loaded: LoadedModel, hook: str) -> int:
    """Width of the activations at `hook`: d_mlp for mlp.hook_post, d_model otherwise (the
    residual kinds, the sublayer outputs, and ln2.hook_normalized, the MLP's normed input)."""
    check_hooks([hook], loaded.n_layers)
    _, kind = parse_hook(hook)
    return loaded.d_mlp if kind == "mlp.hook_post" else loaded.d_model


def _first_tensor(value: Any) -> Tensor:
    # Layers and attention modules return (hidden, weights, ...) tuples in some versions.
    if isinstance(value, (tuple, list)):
        value = value[0]
    if not isinstance(value, Tensor):
        raise TypeError(f"hooked module produced {type(value).__name__}, expected a Tensor")
    return value


def _attach(
    block: nn.Module, spec: ArchSpec, kind: str, store: Callable[[Tensor], None]
) -> RemovableHandle:
    """Register on `block` the torch hook that hands the activation at `kind` to `store`."""

    def on_input(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        # Decoder layers get hidden_states positionally or by keyword depending on the model.
        store(_first_tensor(args) if args else kwargs["hidden_states"])

    def on_output(_module: nn.Module, _args: tuple, output: Any) -> None:
        store(_first_tensor(output))

    if kind == "hook_resid_pre":
        return block.register_forward_pre_hook(on_input, with_kwargs=True)
    if kind == "hook_resid_post":
        return block.register_forward_hook(on_output)
    if kind == "hook_attn_out":
        return block.get_submodule(spec.attn_out).register_forward_hook(on_output)
    if kind == "hook_mlp_out":
        return block.get_submodule(spec.mlp_out).register_forward_hook(on_output)
    if kind == "mlp.hook_post":
        return block.get_submodule(spec.mlp_down).register_forward_pre_hook(on_input, with_kwargs=True)
    if kind == "ln2.hook_normalized":
        return block.get_submodule(spec.mlp_in).register_forward_pre_hook(on_input, with_kwargs=True)
    raise ConfigError(f"unknown hook kind {kind!r}")  # parse_hook already rejects these


def is_partitioned(model: nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 partitions `model`'s parameters (they carry a `ds_id`)."""
    first = next(model.parameters(), None)
    return first is not None and hasattr(first, "ds_id")


def _input_device(loaded: LoadedModel) -> torch.device:
    # With a device_map the first parameter need not sit where the forward starts; the input
    # embedding is the module that consumes input_ids.
    base = getattr(loaded.model, "base_model", loaded.model)
    try:
        embed = base.get_input_embeddings()
        device = embed.weight.device
    except (AttributeError, NotImplementedError):
        return loaded.device
    # An embedding offloaded by accelerate has meta weights and runs where its hook says.
    execution = getattr(getattr(embed, "_hf_hook", None), "execution_device", None)
    if execution is not None:
        return torch.device(execution)
    return torch.device("cpu") if device.type == "meta" else device


def _forward_kwargs(
    loaded: LoadedModel, spec: ArchSpec, input_ids: Tensor, attention_mask: Optional[Tensor]
) -> dict[str, Any]:
    device = _input_device(loaded)
    kwargs: dict[str, Any] = {"input_ids": input_ids.to(device)}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask.to(device)
    if spec.causal:
        # A KV cache is wasted work and memory when every forward is a fresh full context.
        kwargs["use_cache"] = False
    return kwargs


def run_with_hooks(
    loaded: LoadedModel,
    input_ids: Tensor,
    hooks: Sequence[str],
    attention_mask: Optional[Tensor] = None,
    stop_early: Optional[bool] = None,
) -> dict[str, Tensor]:
    """Run the model on `input_ids` (batch, seq) and return {hook: activations (batch, seq, d)}.

    The pass stops once every hook has fired, so later layers never run. Returned tensors are
    detached, on the device of the module that produced them (with a device_map, hooks in
    different layers may come back on different devices), in the model's dtype, and ordinary (not
    inference-mode) tensors, so they may be fed to modules that train.

    `stop_early` None means: stop early unless the model is ZeRO-3 partitioned. There an exception
    raised mid-forward skips DeepSpeed's post-forward hooks: measured on a 2-rank tiny Llama, the
    activations stayed right but the whole embedding matrix stayed gathered on every rank after
    each pass (ds_status AVAILABLE), which defeats the partitioning; so the forward runs to the
    end, and `truncate_layers` removes the layers not needed instead. ZeRO-3 models run under
    no_grad, DeepSpeed's own inference setting, since it swaps `param.data` during the forward
    (inference_mode also gave right results in that test, but is not what DeepSpeed supports).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    wanted = list(dict.fromkeys(hooks))  # drop repeats, keep order
    if not wanted:
        return {}
    check_hooks(wanted, loaded.n_layers)
    spec = arch_spec(loaded.arch)
    blocks = layer_modules(loaded.model, spec)
    partitioned = is_partitioned(loaded.model)
    stop = not partitioned if stop_early is None else stop_early
    captured: dict[str, Tensor] = {}

    def storer(name: str) -> Callable[[Tensor], None]:
        def store(t: Tensor) -> None:
            captured[name] = t.detach()  # (batch, seq, d)
            if stop and len(captured) == len(wanted):
                raise _StopForward

        return store

    handles: list[RemovableHandle] = []
    try:
        for name in wanted:
            layer, kind = parse_hook(name)
            handles.append(_attach(blocks[layer], spec, kind, storer(name)))
        base = getattr(loaded.model, "base_model", loaded.model)  # skip the LM head outright
        with torch.no_grad() if partitioned else torch.inference_mode():
            try:
                base(**_forward_kwargs(loaded, spec, input_ids, attention_mask))
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()

    missing = [name for name in wanted if name not in captured]
    if missing:
        raise RuntimeError(f"hooks {missing} never fired on {type(loaded.model).__name__}")
    # clone() outside inference mode turns inference tensors into ordinary ones; otherwise autograd
    # refuses to save them for backward when a downstream SAE trains on them directly.
    return {name: captured[name].clone() for name in wanted}


def _replaced(
    old: Tensor, fn: Callable[[Tensor], Tensor], hook: str, caller: str = "patch_hook"
) -> Tensor:
    """fn(old), checked to keep the shape, and cast back to old's dtype and device."""
    new = fn(old)
    if not isinstance(new, Tensor) or new.shape != old.shape:
        got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
        raise ValueError(f"{caller}({hook!r}): fn must return a tensor of the activations' "
                         f"shape {tuple(old.shape)}, got {got}")
    return new.to(dtype=old.dtype, device=old.device)


@contextmanager
def patch_hook(loaded: LoadedModel, hook: str, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Inside the block, the activations at `hook` (batch, seq, d) are replaced by fn(activations).

    fn sees exactly what `run_with_hooks` would capture there (same dtype and device) and must
    return the same shape; to add a vector, return `x + v`. The rest of the forward pass runs on
    the replacement, e.g. `with patch_hook(loaded, h, sae): loaded.model(ids).logits` gives the
    logits with the SAE spliced in. The torch hook is removed on exit, also after an error.
    Each forward pass inside the block is patched (with a KV cache: each new token's slice).
    """
    check_hooks([hook], loaded.n_layers)
    layer, kind = parse_hook(hook)
    spec = arch_spec(loaded.arch)
    block = layer_modules(loaded.model, spec)[layer]

    def on_input(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        # Replace hidden_states wherever the caller put it (positionally or by keyword).
        if args:
            return (_replaced(_first_tensor(args), fn, hook), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": _replaced(kwargs["hidden_states"], fn, hook)}

    def on_output(_module: nn.Module, _args: tuple, output: Any) -> Any:
        # Layers and attention modules may return (hidden, weights, ...): replace the first only.
        if isinstance(output, tuple):
            return (_replaced(_first_tensor(output), fn, hook), *output[1:])
        return _replaced(_first_tensor(output), fn, hook)

    if kind == "hook_resid_pre":
        handle = block.register_forward_pre_hook(on_input, with_kwargs=True)
    elif kind == "hook_resid_post":
        handle = block.register_forward_hook(on_output)
    elif kind in ("hook_attn_out", "hook_mlp_out"):
        path = spec.attn_out if kind == "hook_attn_out" else spec.mlp_out
        handle = block.get_submodule(path).register_forward_hook(on_output)
    else:  # mlp.hook_post / ln2.hook_normalized: inputs (parse_hook allows nothing else)
        path = spec.mlp_down if kind == "mlp.hook_post" else spec.mlp_in
        handle = block.get_submodule(path).register_forward_pre_hook(on_input, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
