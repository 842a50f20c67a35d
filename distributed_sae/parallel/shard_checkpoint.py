"""Checkpoints of latent-sharded members, loadable into another shard count, and export.

A checkpoint is a folder `<dir>/step_<step:09d>/` (shared filesystem: every shard writes into it)
    shard_<r:03d>_of_<R:03d>.safetensors   shard r's tensors: param.<name>, opt.<name>.<key>
                                           (Adam moments and step), since_fired
    state.json                             step, kind, d_in, d_sae, shards, hyperparameters,
                                           each tensor's latent axis (null: replicated), extra
As in train/checkpoint.py: no pickles (safetensors + JSON, so loading runs no code), written to a
temporary folder that shard 0 renames into place once every shard has written.

Resharding: shard r' of R' needs latents [r'·n/R', (r'+1)·n/R'); it reads just the overlapping
ranges of the old shards' files (safetensors reads slices without loading whole files) and
concatenates them; Adam's moments have their parameter's shape and are split alike, so training
continues exactly as if never resharded. Replicated tensors (b_dec, Adam's step, BatchTopK's
threshold) come from old shard 0.

`gather_full` turns a sharded member back into the ordinary SparseAutoencoder on shard 0, which
sae.serialization.save_sae exports like any other member.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from distributed_sae.parallel.latent_shard import LatentShardedSAE, latent_axis, shard_range
from distributed_sae.sae import SparseAutoencoder
from distributed_sae.sae.registry import sae_class

log = logging.getLogger(__name__)

STATE = "state.json"


def shard_file(shard: int, shards: int) -> str:
    return f"shard_{shard:03d}_of_{shards:03d}.safetensors"


def _shard_tensors(model: LatentShardedSAE, opt: torch.optim.Optimizer | None,
                   since_fired: torch.Tensor | None) -> tuple[dict[str, torch.Tensor],
                                                           dict[str, int | None]]:
    """(this shard's tensors by name, each name's latent axis)."""
    n_local = model.stop - model.start
    tensors, axes = {}, {}
    params = dict(model.local.named_parameters())
    for name, t in model.local.state_dict().items():
        tensors[f"param.{name}"] = t.detach().cpu().contiguous()
        axes[f"param.{name}"] = latent_axis(name, t, n_local)
    if opt is not None:
        names = {id(p): n for n, p in params.items()}
        for group in opt.param_groups:
            for p in group["params"]:
                for key, value in opt.state.get(p, {}).items():
                    t = value if torch.is_tensor(value) else torch.tensor(value)
                    name = f"opt.{names[id(p)]}.{key}"
                    tensors[name] = t.detach().cpu().contiguous()
                    # Moments have the parameter's shape, hence its latent axis; step is a scalar.
                    axes[name] = (latent_axis(names[id(p)], p, n_local)
                                  if t.shape == p.shape else None)
    if since_fired is not None:
        tensors["since_fired"], axes["since_fired"] = since_fired.detach().cpu().contiguous(), 0
    return tensors, axes


def save_sharded(folder: str | Path, step: int, model: LatentShardedSAE,
                 opt: torch.optim.Optimizer | None = None,
                 since_fired: torch.Tensor | None = None,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write this shard's part of checkpoint `step` under `folder` (collective over the shards;
    with data parallelism only one replica's shards should call it). Returns the folder."""
    comm = model.comm
    final = Path(folder) / f"step_{step:09d}"
    tmp = Path(folder) / f".tmp_step_{step:09d}"
    if comm.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    comm.barrier()  # the folder exists before anyone writes into it
    tensors, axes = _shard_tensors(model, opt, since_fired)
    save_file(tensors, str(tmp / shard_file(comm.rank, comm.size)))
    comm.barrier()  # every shard's file is complete
    if comm.rank == 0:
        state = {"step": step, "kind": model.kind, "d_in": model.d_in, "d_sae": model.d_sae,
                 "shards": comm.size, "hparams": model.extra_state(), "latent_axis": axes,
                 "threshold_updates": getattr(model.local, "threshold_updates", None),
                 "extra": extra or {}}
        (tmp / STATE).write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    comm.barrier()  # nobody reads the checkpoint before it is in place
    return final


def _read_latents(path: Path, state: dict[str, Any], name: str, start: int,
                  stop: int) -> torch.Tensor:
    """Latents [start, stop) of tensor `name` assembled from the old shards' files."""
    axis, old = state["latent_axis"][name], int(state["shards"])
    if axis is None:
        with safe_open(str(path / shard_file(0, old)), framework="pt") as f:
            return f.get_tensor(name)
    pieces = []
    for r in range(old):
        lo, hi = shard_range(int(state["d_sae"]), old, r)
        a, b = max(lo, start), min(hi, stop)
        if a >= b:
            continue
        with safe_open(str(path / shard_file(r, old)), framework="pt") as f:
            sl = f.get_slice(name)
            pieces.append(sl[a - lo:b - lo] if axis == 0 else sl[:, a - lo:b - lo])
    return torch.cat(pieces, dim=axis)


def load_sharded(path: str | Path, model: LatentShardedSAE,
                 opt: torch.optim.Optimizer | None = None,
                 since_fired: torch.Tensor | None = None) -> dict[str, Any]:
    """Load a checkpoint written with any shard count into this shard (weights, and Adam state
    and the dead counters when given); returns its state.json."""
    path = Path(path)
    state = json.loads((path / STATE).read_text())
    got = (state["kind"], int(state["d_in"]), int(state["d_sae"]))
    want = (model.kind, model.d_in, model.d_sae)
    if got != want:
        raise ValueError(f"checkpoint {path} holds (kind, d_in, d_sae) = {got}, this member is "
                         f"{want}: load it into a member built like the one that saved it")
    start, stop = model.start, model.stop
    with torch.no_grad():
        model.local.load_state_dict({
            name: _read_latents(path, state, f"param.{name}", start, stop)
            for name in model.local.state_dict()})
    if state.get("threshold_updates") is not None and hasattr(model.local, "threshold_updates"):
        model.local.threshold_updates = int(state["threshold_updates"])
    if opt is not None:
        for name, p in model.local.named_parameters():
            head = f"opt.{name}."
            keys = [k for k in state["latent_axis"] if k.startswith(head)]
            if keys:
                opt.state[p] = {k[len(head):]: _read_latents(path, state, k, start, stop)
                                .to(p.device) for k in keys}
    if since_fired is not None and "since_fired" in state["latent_axis"]:
        since_fired.copy_(_read_latents(path, state, "since_fired", start, stop))
    log.info("loaded %s (%d shards) into shard %d of %d", path, state["shards"], model.comm.rank,
             model.comm.size)
    return state


@torch.no_grad()
def gather_full(model: LatentShardedSAE) -> SparseAutoencoder | None:
    """The whole member as an ordinary SAE on shard 0 (None on the others); collective.

    Shard 0 then exports it with sae.serialization.save_sae like an unsharded member. Memory: the
    full member (d_sae x d_in x 2 weights) must fit on shard 0's host.
    """
    comm, n_local = model.comm, model.stop - model.start
    full_state = {}
    for name, t in model.local.state_dict().items():
        axis = latent_axis(name, t, n_local)
        # Gathered where the tensor lives (NCCL moves device tensors only), then to the host one
        # tensor at a time.
        parts = comm.gather_to_first(t.detach()) if axis is not None else [t.detach()]
        if parts is not None:
            full_state[name] = (torch.cat(parts, dim=axis) if axis is not None else parts[0]).cpu()
    if comm.rank != 0:
        return None
    full = sae_class(model.kind)(model.d_in, model.d_sae, **model.extra_state(),
                                 dtype=model.local.W_enc.dtype)
    full.load_state_dict(full_state)
    if hasattr(model.local, "threshold_updates"):
        full.threshold_updates = model.local.threshold_updates
    full.train(model.training)
    return full
