"""One latent-sharded member's checkpoint on its own, and gathering a sharded member whole.

save_sharded / load_sharded write and read `<dir>/step_<step:09d>/` in the engine's member
format (train/checkpoint.py: one safetensors file per shard plus member.json; shard 0 renames
the folder into place once every shard has written). Resharding: shard r' of R' reads just the
overlapping latent ranges of the old shards' files and concatenates them; Adam's moments have
their parameter's shape and are split alike, so training continues exactly as if never
resharded. Replicated tensors (b_dec, Adam's step, BatchTopK's threshold) come from old shard 0.

`gather_full` turns a sharded member back into the ordinary SparseAutoencoder on shard 0, which
sae.serialization.save_sae exports like any other member.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from distributed_sae.parallel.latent_shard import LatentShardedSAE, latent_axis
from distributed_sae.sae import SparseAutoencoder
from distributed_sae.sae.registry import sae_class
from distributed_sae.train.checkpoint import read_member, write_member

log = logging.getLogger(__name__)

STATE = "state.json"


def save_sharded(folder: str | Path, step: int, model: LatentShardedSAE,
                 opt: torch.optim.Optimizer | None = None,
                 since_fired: torch.Tensor | None = None,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write this shard's part of checkpoint `step` of one member under `folder` (collective
    over the shards; with data parallelism only one replica's shards should call it), in the
    engine's member format (train/checkpoint.py). Returns the folder."""
    comm = model.comm
    final = Path(folder) / f"step_{step:09d}"
    tmp = Path(folder) / f".tmp_step_{step:09d}"
    if comm.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    comm.barrier()  # the folder exists before anyone writes into it
    write_member(tmp, model, opt, {} if since_fired is None else {"since_fired": since_fired},
                 comm.rank, comm.size, extra={"step": step, "extra": extra or {}})
    comm.barrier()  # every shard's file is complete
    if comm.rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    comm.barrier()  # nobody reads the checkpoint before it is in place
    return final


def load_sharded(path: str | Path, model: LatentShardedSAE,
                 opt: torch.optim.Optimizer | None = None,
                 since_fired: torch.Tensor | None = None) -> dict[str, Any]:
    """Load a checkpoint written with any shard count into this shard (weights, and Adam state
    and the dead counters when given); returns its member.json."""
    state = read_member(Path(path), model, opt,
                        {} if since_fired is None else {"since_fired": since_fired})
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
                                 dtype=model.local.W_enc.dtype, form=model.local.form)
    full.load_state_dict(full_state)
    if hasattr(model.local, "threshold_updates"):
        full.threshold_updates = model.local.threshold_updates
    full.train(model.training)
    return full
