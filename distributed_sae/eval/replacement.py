"""Splicing members of every form into the model: the replacement model of a transcoder or CLT,
and a crosscoder's per-hook splice.

    sae              its hook's activations replaced by x_hat (eval/spliced.py's sae_splice)
    transcoder,      layer L's MLP output replaced by the member's output computed from that
    skip_transcoder  pass's own MLP input (models/replace.py's patch_mlp): the MLP is gone, the
                     rest of the model runs on what the transcoder writes
    clt              every covered layer's MLP output replaced, each from the MLP inputs of the
                     covered layers <= it in the same pass (a latent of layer l only reads layer l
                     and only writes layers >= l, so the later layers' inputs, not yet computed,
                     enter as zeros and reach no output that is read)
    crosscoder       acausal (every hook's reconstruction reads every hook): one splice per hook,
                     its reconstruction computed from the clean pass's activations of all hooks

Baselines (loss_recovered's zero point): the zero ablation of the same place, i.e. the MLP's
output set to 0 at the replaced layer(s), or the hook's activations set to 0. Positions of
ignored tokens keep their clean values everywhere, as in eval/spliced.py.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from distributed_sae.config.checks import parse_hook
from distributed_sae.eval.spliced import Splice, _splice_fn, sae_splice
from distributed_sae.models.hooks import patch_hook, run_with_hooks
from distributed_sae.models.registry import LoadedModel
from distributed_sae.models.replace import patch_mlp
from distributed_sae.sae.base import SparseAutoencoder
from distributed_sae.sae.forms import split_hooks

log = logging.getLogger(__name__)


def member_io(cfg: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(input hooks, target hooks) of a saved member's cfg.json (an SAE: its hook twice)."""
    meta = cfg.get("metadata") or {}
    inputs = tuple(meta.get("dsae_inputs") or [meta["hook_name"]])
    return inputs, tuple(meta.get("dsae_targets") or inputs)


def _mlp_layers(inputs: Sequence[str], targets: Sequence[str]) -> list[int] | None:
    """The layers whose MLP the member replaces, when it reads each one's ln2.hook_normalized and
    writes its hook_mlp_out (None otherwise)."""
    parsed_in, parsed_out = [parse_hook(h) for h in inputs], [parse_hook(h) for h in targets]
    layers = [layer for layer, _ in parsed_out]
    if [k for _, k in parsed_in] != ["ln2.hook_normalized"] * len(inputs) or \
            [k for _, k in parsed_out] != ["hook_mlp_out"] * len(targets) or \
            [layer for layer, _ in parsed_in] != layers:
        return None
    return layers


def _flat(sae: SparseAutoencoder, x: Tensor) -> Tensor:
    """(batch, seq, d) activations as the member's (batch * seq, d) input, on its device/dtype."""
    return x.reshape(-1, x.shape[-1]).to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)


def mlp_splice(loaded: LoadedModel, sae: SparseAutoencoder, layers: list[int]) -> Splice:
    """A transcoder (one layer) or CLT (several) replacing the MLPs of `layers`."""
    dims = sae.form.targets_dims

    def patch(ids: Tensor, keep: Tensor) -> Any:
        def fn(layer: int, recorded: dict[int, Tensor], own: Tensor) -> Tensor:
            first = recorded[layer]  # (batch, seq, d_model)
            xs = [recorded.get(l, torch.zeros_like(first)) for l in layers]
            y = sae(_flat(sae, torch.cat(xs, -1)))  # (batch * seq, d_out)
            block = split_hooks(y, dims)[layers.index(layer)].reshape(own.shape)
            clean = keep.to(own.device)[..., None]  # (batch, seq, 1)
            return torch.where(clean, own, block.to(device=own.device, dtype=own.dtype))

        return patch_mlp(loaded, layers, fn)

    def zero(ids: Tensor, keep: Tensor) -> Any:
        return _patch_all(loaded, [f"blocks.{l}.hook_mlp_out" for l in layers], keep)

    label = f"mlp {layers[0]}" if len(layers) == 1 else f"mlps {layers[0]}-{layers[-1]}"
    return Splice(label, patch, zero, ("mlp", tuple(layers)), min(layers))


@contextmanager
def _patch_all(loaded: LoadedModel, hooks: Sequence[str], keep: Tensor) -> Iterator[None]:
    """Zero-ablate every hook of `hooks` (ignored positions kept) inside the block."""
    if not hooks:
        yield
        return
    with patch_hook(loaded, hooks[0], _splice_fn(None, keep)):
        with _patch_all(loaded, hooks[1:], keep):
            yield


def crosscoder_splices(loaded: LoadedModel, sae: SparseAutoencoder,
                       inputs: Sequence[str]) -> list[Splice]:
    """One splice per hook of an acausal crosscoder (see the module docstring)."""
    splices = []
    for j, hook in enumerate(inputs):
        def patch(ids: Tensor, keep: Tensor, j: int = j, hook: str = hook) -> Any:
            acts = run_with_hooks(loaded, ids, list(inputs))  # the clean pass, every hook
            x = torch.cat([acts[h] for h in inputs], -1)  # (batch, seq, d_in)
            recon = split_hooks(sae(_flat(sae, x)), sae.form.targets_dims)[j]
            recon = recon.reshape(acts[hook].shape)

            def fn(act: Tensor) -> Tensor:
                new = recon.to(device=act.device, dtype=act.dtype)
                return torch.where(keep.to(act.device)[..., None], act, new)

            return patch_hook(loaded, hook, fn)

        zero = sae_splice(loaded, None, hook)
        splices.append(Splice(hook, patch, zero.zero, zero.zero_key, zero.first_layer))
    return splices


def member_splices(loaded: LoadedModel, sae: SparseAutoencoder, cfg: dict[str, Any],
                   max_norm: float | None = None) -> list[tuple[str | None, Splice]]:
    """(target hook or None for the whole member, its splice) for a saved member: one for an
    SAE, transcoder or CLT, one per hook for a crosscoder; [] (and a warning) for a transcoder
    between hooks that are not an MLP's input and output."""
    inputs, targets = member_io(cfg)
    form = sae.form.name
    if form == "sae":
        return [(None, sae_splice(loaded, sae, inputs[0], max_norm))]
    if form == "crosscoder":
        return list(zip(inputs, crosscoder_splices(loaded, sae, inputs)))
    layers = _mlp_layers(inputs, targets)
    if layers is None:
        log.warning("%s reads %s and writes %s, not an MLP's input and output: no spliced "
                    "loss (FVU only)", form, list(inputs), list(targets))
        return []
    return [(None, mlp_splice(loaded, sae, layers))]

