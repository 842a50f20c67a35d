"""The export stage: one SAELens-loadable folder per member, with metrics and a model card.

Each folder holds cfg.json + sae_weights.safetensors (see sae/serialization.py), and when the eval
stage ran: sparsity.safetensors (log10 feature density, shape (d_sae,)), metrics.json and a
README.md model card. SAELens loads a folder with `SAE.load_from_disk(path)`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from distributed_sae.config import RunConfig
from distributed_sae.eval import trained_members
from distributed_sae.sae import load_sae, save_sae

log = logging.getLogger(__name__)


def _card(name: str, cfg: dict[str, Any], metrics: dict[str, Any] | None) -> str:
    meta = cfg["metadata"]
    lines = [
        "---", "library_name: saelens", "tags: [sparse-autoencoder, distributed-sae]", "---", "",
        f"# {name}", "",
        f"A {cfg['architecture']} sparse autoencoder with {cfg['d_sae']} latents on "
        f"`{meta['hook_name']}` of `{meta['model_name']}`, trained with distributed-sae on "
        f"{meta.get('training_tokens')} tokens of `{meta['dataset_path']}`.", "",
    ]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {metrics[k]:.4g} |" for k in ("fvu", "mse", "l0", "dead_fraction")]
        lines.append("")
    lines += ["Load it:", "", "```python", "from distributed_sae.sae import load_sae",
              "sae, cfg = load_sae('.')", "# or with SAELens: SAE.load_from_disk('.')", "```", ""]
    return "\n".join(lines)


def export(cfg: RunConfig) -> list[Path]:
    """Write every trained member to cfg.export.path; returns the folders."""
    dtype = getattr(torch, cfg.export.dtype)
    folders = []
    for src in trained_members(cfg.out_dir):
        sae, sae_cfg = load_sae(src)
        dst = save_sae(sae, Path(cfg.export.path) / src.name, metadata=sae_cfg["metadata"],
                       dtype=dtype)
        metrics_file = Path(cfg.out_dir) / "eval" / src.name / "metrics.json"
        metrics = None
        if metrics_file.is_file():
            metrics = json.loads(metrics_file.read_text())
            density = torch.tensor(metrics.pop("log10_density"), dtype=torch.float32)
            save_file({"sparsity": density}, str(dst / "sparsity.safetensors"))
            (dst / "metrics.json").write_text(json.dumps(metrics, indent=2))
        else:
            log.warning("no metrics for %s (run dsae-eval first): exporting weights only", src.name)
        (dst / "README.md").write_text(_card(src.name, json.loads((dst / "cfg.json").read_text()),
                                             metrics))
        folders.append(dst)
    log.info("exported %d SAEs to %s", len(folders), cfg.export.path)
    return folders
