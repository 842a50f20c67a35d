"""Checkpoints without pickles: tensors in safetensors, everything else in JSON.

A checkpoint is a folder `<dir>/step_<step:09d>/` with
    tensors.safetensors   every tensor: weights, Adam moments, RNG states (as uint8); a job over
                          several ranks writes one part per rank (rank00001.safetensors, ...)
                          holding the members that rank leads
    state.json            step, tokens seen, the reader's position, schedules, member metadata
It is written to a temporary folder and renamed into place, so a crash while saving leaves the
previous checkpoint as the latest one, never a half-written one. Loading uses safetensors only
(no torch.load of pickles), so a checkpoint from an untrusted source cannot run code.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

STATE = "state.json"


def optimizer_tensors(opt: torch.optim.Optimizer, names: dict[int, str], prefix: str) -> dict[str, torch.Tensor]:
    """Adam-style state of `opt` as flat named tensors: '<prefix>.<param>.<key>'.

    `names` maps id(parameter) -> its name, so the state is keyed by name, not by position.
    """
    out = {}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                t = value if torch.is_tensor(value) else torch.tensor(value)
                out[f"{prefix}.{names[id(p)]}.{key}"] = t.detach().cpu().contiguous()
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, names: dict[int, str], prefix: str,
                           tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of optimizer_tensors: restore each parameter's state from `tensors`."""
    for group in opt.param_groups:
        for p in group["params"]:
            head = f"{prefix}.{names[id(p)]}."
            state = {k[len(head):]: v.to(p.device) for k, v in tensors.items() if k.startswith(head)}
            if state:
                opt.state[p] = state


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
    folder = tmp.parent
    final = folder / f"step_{step:09d}"
    (tmp / STATE).write_text(json.dumps(dict(state, step=step), indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
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


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors of every part, state) of one checkpoint folder."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for part in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(part)))
    return tensors, json.loads((path / STATE).read_text())
