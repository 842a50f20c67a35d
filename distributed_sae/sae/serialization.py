"""Save and load one SAE as a SAELens 6.x folder: cfg.json + sae_weights.safetensors.

cfg.json carries SAELens's keys (architecture, d_in, d_sae, dtype, device, apply_b_dec_to_input,
normalize_activations, reshape_activations and the kind's own, e.g. k) and a free-form `metadata`
object with the provenance (model, hook, corpus) and what this project needs to rebuild the exact
training-time class (`dsae_kind`, `dsae_params`). `metadata.sae_lens_version` must be >= 6.0.0 or
SAELens's loader treats the folder as its old format and renames keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from distributed_sae.sae.base import SparseAutoencoder
from distributed_sae.sae.registry import sae_class

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"


def save_sae(sae: SparseAutoencoder, folder: str | Path, metadata: dict[str, Any] | None = None,
             dtype: torch.dtype | None = None) -> Path:
    """Write `sae` into `folder` (created); input scaling must already be folded in."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = dtype or sae.W_enc.dtype
    # The kind names its SAELens tensors: the four weights, plus `threshold` (d_sae,) for kinds
    # exported as 'jumprelu'.
    tensors = {name: t.detach().to("cpu", dtype).contiguous()
               for name, t in sae.saelens_tensors().items()}
    meta = dict(metadata or {}, sae_lens_version=SAELENS_FORMAT_VERSION, dsae_kind=sae.kind,
                dsae_params=sae.extra_state())
    cfg = {**sae.saelens_cfg(), "d_in": sae.d_in, "d_sae": sae.d_sae,
           "dtype": str(dtype).removeprefix("torch."), "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none", "metadata": meta}
    save_file(tensors, str(folder / WEIGHTS_FILE))
    (folder / CFG_FILE).write_text(json.dumps(cfg, indent=2))
    return folder


def load_sae(folder: str | Path) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Rebuild an SAE saved by `save_sae`; returns (sae, cfg). Refuses mismatched files."""
    folder = Path(folder)
    if not (folder / CFG_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {CFG_FILE}: not an SAE folder")
    cfg = json.loads((folder / CFG_FILE).read_text())
    meta = cfg.get("metadata", {})
    kind = meta.get("dsae_kind", cfg["architecture"])
    cls = sae_class(kind)
    tensors = load_file(str(folder / WEIGHTS_FILE))
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    dtype = tensors["W_enc"].dtype if "W_enc" in tensors else torch.float32
    sae = cls(d_in, d_sae, **meta.get("dsae_params", {}), dtype=dtype)
    # Expected names and shapes come from the kind built at cfg.json's sizes.
    want = {name: tuple(t.shape) for name, t in sae.saelens_tensors().items()}
    if set(tensors) != set(want):
        raise ValueError(f"{folder / WEIGHTS_FILE} holds {sorted(tensors)}, expected {sorted(want)}")
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{folder / WEIGHTS_FILE}: {name} has shape "
                             f"{tuple(tensors[name].shape)} but cfg.json says {shape}")
    sae.load_saelens_tensors(tensors)
    # A loaded SAE is for inference: eval mode makes BatchTopK-style kinds use their threshold.
    sae.eval()
    return sae, cfg
