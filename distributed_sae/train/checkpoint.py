"""Checkpoints without pickles: tensors in safetensors, everything else in JSON.

A checkpoint is a folder `<dir>/step_<step:09d>/` with
    <member>/             each member, as shards of its latents (the member format below)
    rng.safetensors       the torch RNG states (as uint8)
    state.json            format, step, tokens seen, members, the layout that wrote it and one
                          reader position per share of the store (parallel/plan.py writes it)
It is written to a temporary folder and renamed into place, so a crash while saving leaves the
previous checkpoint as the latest one, never a half-written one. Loading uses safetensors only
(no torch.load of pickles), so a checkpoint from an untrusted source cannot run code.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from distributed_sae.faults import fault_point
from distributed_sae.sae.serialization import fsync_path

log = logging.getLogger(__name__)

STATE = "state.json"


def rng_tensors() -> dict[str, torch.Tensor]:
    """The global torch RNG states (CPU, and CUDA when present)."""
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def load_rng_tensors(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def staging(folder: str | Path, step: int) -> Path:
    """The temporary folder that checkpoint `step` is written into before its rename."""
    return Path(folder) / f".tmp_step_{step:09d}"


def begin_checkpoint(folder: str | Path, step: int) -> Path:
    """Create (emptied) the staging folder of checkpoint `step`."""
    tmp = staging(folder, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_part(tmp: Path, tensors: dict[str, torch.Tensor], part: str = "tensors") -> None:
    """One tensor file of a checkpoint being written (each rank of a job writes its own part)."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / f"{part}.safetensors"))


def finish_checkpoint(tmp: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write state.json last and rename the folder into place; keep the newest `keep`."""
    fault_point("checkpoint_write")  # the tensors written, not state.json nor the rename
    folder = tmp.parent
    final = folder / f"step_{step:09d}"
    (tmp / STATE).write_text(json.dumps(dict(state, step=step), indent=1))
    for path in sorted(tmp.rglob("*")):  # on the disk before the rename makes it the latest
        fsync_path(path)
    fsync_path(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_path(folder)
    for old in sorted(folder.glob("step_*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(folder: str | Path, step: int, tensors: dict[str, torch.Tensor],
                    state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step` under `folder` atomically; keep the newest `keep` checkpoints."""
    tmp = begin_checkpoint(folder, step)
    write_part(tmp, tensors)
    return finish_checkpoint(tmp, step, state, keep)


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint under `folder`, or None."""
    done = [p for p in sorted(Path(folder).glob("step_*")) if (p / STATE).is_file()]
    return done[-1] if done else None


# ---- members: one format for whole and latent-sharded members ---------------------------------
# A member's part of checkpoint step_<N>/ is the folder step_<N>/<member_id>/ with
#     shard_<r:03d>_of_<R:03d>.safetensors   latents [r·n/R, (r+1)·n/R) of every per-latent tensor
#                                           (param.*, opt.<param>.<key>, since_fired, fire_counts)
#                                           and, in shard 0, the replicated ones (b_dec, Adam's step)
#     member.json                           kind, d_in, d_sae, shards, each tensor's latent axis
# A whole member is shard 0 of 1. Loading takes the latents a process holds, [start, stop), from
# whichever shards overlap them (safetensors reads slices), so any layout resumes any other:
# one process, members placed whole on workers, any number of latent shards.
MEMBER_META = "member.json"


def shard_file(shard: int, shards: int) -> str:
    return f"shard_{shard:03d}_of_{shards:03d}.safetensors"


@dataclass
class LatentSlice:
    """The latents [start, stop) of a d_sae-wide member that this process holds in `local` (an
    SAE of width stop - start: the member itself, or a latent shard's local SAE)."""

    local: Any
    start: int
    stop: int
    d_sae: int


def latent_slice(sae: Any) -> LatentSlice:
    """A member's module as a LatentSlice: a latent-sharded member (parallel/latent_shard.py)
    has `local`, `start`, `stop`; a whole SAE holds all its latents."""
    if hasattr(sae, "local"):
        return LatentSlice(sae.local, sae.start, sae.stop, sae.d_sae)
    return LatentSlice(sae, 0, sae.d_sae, sae.d_sae)


def member_tensors(sae: Any, opt: torch.optim.Optimizer | None,
                   counters: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                                dict[str, int | None]]:
    """(this process's tensors of a member by name, each name's latent axis or None)."""
    from distributed_sae.parallel.latent_shard import latent_axis

    sl = latent_slice(sae)
    n_local = sl.stop - sl.start
    tensors: dict[str, torch.Tensor] = {}
    axes: dict[str, int | None] = {}
    params = dict(sl.local.named_parameters())
    for name, t in sl.local.state_dict().items():
        tensors[f"param.{name}"] = t.detach().cpu().contiguous()
        axes[f"param.{name}"] = latent_axis(name, t, n_local)
    names = {id(p): n for n, p in params.items()}
    for group in (opt.param_groups if opt is not None else []):
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                t = value if torch.is_tensor(value) else torch.tensor(value)
                name = f"opt.{names[id(p)]}.{key}"
                tensors[name] = t.detach().cpu().contiguous()
                # Moments have the parameter's shape, hence its latent axis; step is a scalar.
                axes[name] = latent_axis(names[id(p)], p, n_local) if t.shape == p.shape else None
    for name, t in counters.items():  # (n_local,) per-latent counters
        tensors[name], axes[name] = t.detach().cpu().contiguous(), 0
    return tensors, axes


def write_member(folder: Path, sae: Any, opt: torch.optim.Optimizer | None,
                 counters: dict[str, torch.Tensor], shard: int = 0, shards: int = 1,
                 extra: dict[str, Any] | None = None) -> None:
    """Write this process's shard of a member into `folder` (created); shard 0 adds
    member.json (with `extra`). Every shard must be written for the checkpoint to load."""
    tensors, axes = member_tensors(sae, opt, counters)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / shard_file(shard, shards)))
    if shard == 0:
        sl = latent_slice(sae)
        meta = {"kind": sl.local.kind, "d_in": sl.local.d_in, "d_sae": sl.d_sae,
                "shards": shards, "hparams": sae.extra_state(), "latent_axis": axes,
                "threshold_updates": getattr(sl.local, "threshold_updates", None),
                "opt_group": _running_group_state(opt), **(extra or {})}
        (folder / MEMBER_META).write_text(json.dumps(meta, indent=1))


def read_latents(folder: Path, meta: dict[str, Any], name: str, start: int,
                 stop: int) -> torch.Tensor:
    """Latents [start, stop) of tensor `name` assembled from the member's shard files."""
    from distributed_sae.parallel.latent_shard import shard_range

    axis, old = meta["latent_axis"][name], int(meta["shards"])
    if axis is None:
        with safe_open(str(folder / shard_file(0, old)), framework="pt") as f:
            return f.get_tensor(name)
    pieces = []
    for r in range(old):
        lo, hi = shard_range(int(meta["d_sae"]), old, r)
        a, b = max(lo, start), min(hi, stop)
        if a < b:
            with safe_open(str(folder / shard_file(r, old)), framework="pt") as f:
                sl = f.get_slice(name)
                pieces.append(sl[a - lo:b - lo] if axis == 0 else sl[:, a - lo:b - lo])
    return torch.cat(pieces, dim=axis)


def read_member(folder: Path, sae: Any, opt: torch.optim.Optimizer | None,
                counters: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Load the latents this process holds of a member written with any shard count (weights,
    Adam state, the counters present in the checkpoint, in place); returns member.json."""
    meta = json.loads((folder / MEMBER_META).read_text())
    sl = latent_slice(sae)
    got = (meta["kind"], int(meta["d_in"]), int(meta["d_sae"]))
    want = (sl.local.kind, sl.local.d_in, sl.d_sae)
    if got != want:
        raise ValueError(f"checkpoint {folder} holds (kind, d_in, d_sae) = {got}, this member is "
                         f"{want}: resume with the same sae config, or use another out_dir")
    start, stop = sl.start, sl.stop
    with torch.no_grad():
        sl.local.load_state_dict({name: read_latents(folder, meta, f"param.{name}", start, stop)
                                  for name in sl.local.state_dict()})
    if meta.get("threshold_updates") is not None and hasattr(sl.local, "threshold_updates"):
        sl.local.threshold_updates = int(meta["threshold_updates"])
    for name, p in sl.local.named_parameters() if opt is not None else []:
        head = f"opt.{name}."
        keys = [k for k in meta["latent_axis"] if k.startswith(head)]
        if keys:
            opt.state[p] = {k[len(head):]: read_latents(folder, meta, k, start, stop).to(p.device)
                            for k in keys}
    for name, t in counters.items():
        if name in meta["latent_axis"]:
            t.copy_(read_latents(folder, meta, name, start, stop))
    for group in opt.param_groups if opt is not None else []:
        group.update(meta.get("opt_group") or {})
    return meta


def _running_group_state(opt: torch.optim.Optimizer | None) -> dict[str, Any]:
    """The scalars an optimiser keeps per parameter group and updates as it steps (its
    `running_keys`: schedule-free's step count and weight sum, train/optim.py); Adam keeps its
    step per parameter, so it has none. JSON floats round-trip exactly."""
    keys = getattr(opt, "running_keys", ())
    return {k: opt.param_groups[0][k] for k in keys} if keys else {}
