"""Running only the top of the model: capture a block's input once, resume from it many times.

The spliced loss (eval/spliced.py) runs, per batch of contexts, one clean pass and then one pass
per baseline and per member, each changing the model only at or above one block L. The blocks
below L compute the same thing in every one of those passes, so they run once: the clean pass
records the hidden states entering block L (`capture_block_inputs`), and each later pass starts
there (`resume_at`), running blocks L.. and the head. For SmolLM2-135M (30 blocks, tied head of
576 x 49,152) at layer 15 a resumed pass does 15 blocks + the head, ~0.6 of the full pass's
multiply-adds; the measured time is in docs/eval.md.

How: inside `resume_at` the model's layer list is swapped for its tail layers[L:], so the
model's own forward still builds its masks and position embeddings (cheap: an embedding lookup
and the rotary table) and calls the tail in order; a forward pre-hook on block L, registered
first so it runs before any patch on that block, replaces the hidden states it is given (the
embeddings) by the captured ones. The result equals the full pass bit for bit (the same
operations on the same inputs; tests/test_eval_spliced.py checks it). Works for the
architectures of models/architectures.py whose forward iterates the list (Llama, GPT-2,
GPT-NeoX, BERT).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from distributed_sae.models.architectures import arch_spec, layer_modules
from distributed_sae.models.hooks import _first_tensor
from distributed_sae.models.registry import LoadedModel


def _hidden(args: tuple, kwargs: dict) -> Tensor:
    """The hidden states a block was called with (positionally or by keyword)."""
    return _first_tensor(args) if args else kwargs["hidden_states"]


@contextmanager
def capture_block_inputs(loaded: LoadedModel, layers: Sequence[int]) -> Iterator[dict[int, Tensor]]:
    """Inside the block, each forward pass records the hidden states entering each block of
    `layers` (batch, seq, d_model) into the yielded dict (the last pass's, by layer)."""
    blocks = layer_modules(loaded.model, arch_spec(loaded.arch))
    captured: dict[int, Tensor] = {}
    handles: list[RemovableHandle] = []

    def recorder(layer: int):  # noqa: ANN202 - a torch hook
        def on_input(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured[layer] = _hidden(args, kwargs)

        return on_input

    try:
        for layer in sorted(set(layers)):
            if not 0 <= layer < len(blocks):
                raise ValueError(f"layer {layer} is not a block of {loaded.name} "
                                 f"(0..{len(blocks) - 1})")
            handles.append(blocks[layer].register_forward_pre_hook(recorder(layer),
                                                                    with_kwargs=True))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _layer_parent(loaded: LoadedModel) -> tuple[nn.Module, str]:
    """(the module holding the layer list, its attribute name), e.g. (LlamaModel, 'layers')."""
    base = getattr(loaded.model, "base_model", loaded.model)
    path = arch_spec(loaded.arch).layers  # 'layers', 'h', or 'encoder.layer'
    parent_path, _, name = path.rpartition(".")
    return (base.get_submodule(parent_path) if parent_path else base), name


@contextmanager
def resume_at(loaded: LoadedModel, layer: int, hidden: Tensor) -> Iterator[None]:
    """Inside the block, a forward pass skips blocks 0..layer-1 and feeds `hidden` (batch, seq,
    d_model: what `capture_block_inputs` recorded for `layer`) to block `layer`.

    Enter it inside any patch of the model (patch_hook, patch_mlp): those find their blocks by
    index in the full layer list, which is swapped here. The list is restored on exit, also
    after an error.
    """
    blocks = layer_modules(loaded.model, arch_spec(loaded.arch))
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer {layer} is not a block of {loaded.name} (0..{len(blocks) - 1})")
    parent, name = _layer_parent(loaded)

    def feed(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if _hidden(args, kwargs).shape[:2] != hidden.shape[:2]:
            raise ValueError(f"resume_at: block {layer} got (batch, seq) "
                             f"{tuple(_hidden(args, kwargs).shape[:2])} but the captured states "
                             f"are {tuple(hidden.shape[:2])}: resume with the same token ids")
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    # prepend: runs before a patch's pre-hook on the same block (e.g. hook_resid_pre of `layer`),
    # so the patch sees the captured states, as it would in the full pass.
    handle = blocks[layer].register_forward_pre_hook(feed, with_kwargs=True, prepend=True)
    setattr(parent, name, nn.ModuleList(list(blocks)[layer:]))
    try:
        yield
    finally:
        setattr(parent, name, blocks)
        handle.remove()
