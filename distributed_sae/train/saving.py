"""Saving trained members as SAELens folders, with the input scale folded in and provenance."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

from distributed_sae.config import RunConfig
from distributed_sae.sae import save_sae
from distributed_sae.store import ActivationStore
from distributed_sae.train.norm import InputNorm

log = logging.getLogger(__name__)


def save_members(cfg: RunConfig, store: ActivationStore, members: list[Any],
                 norms: Mapping[str, InputNorm], tokens_seen: int,
                 bank_ids: list[str] | None = None) -> list[Path]:
    """Save `members` (Members holding whole SAEs) with their hook's input scale folded in;
    `bank_ids` (default: their ids; [] writes none) go to out_dir/train/bank.json, which the
    eval and export stages read."""
    folders = []
    for m in members:
        norm = norms[m.spec.hook]
        m.sae.eval()
        m.sae.fold_input_scale(norm.scale)
        extra = {"training_tokens": tokens_seen, "input_scale": norm.scale,
                 "outlier_max_norm": norm.max_norm,
                 "member_id": m.spec.member_id, "seed": m.spec.seed}
        folders.append(save_sae(m.sae, Path(cfg.out_dir) / "train" / m.spec.member_id,
                                metadata={**provenance(cfg, store, m.spec.hook), **extra}))
    if bank_ids is None:
        bank_ids = [m.spec.member_id for m in members]
    if bank_ids:
        (Path(cfg.out_dir) / "train" / "bank.json").write_text(json.dumps(
            {"members": bank_ids, "hooks": cfg.sae_hooks}, indent=2))
    log.info("saved %d members under %s", len(folders), Path(cfg.out_dir) / "train")
    return folders


def provenance(cfg: RunConfig, store: ActivationStore, hook: str) -> dict[str, Any]:
    """The metadata SAELens and a reader of the model card need: model, hook, corpus."""
    meta = store.metadata
    return {"model_name": meta["model_name"], "model_revision": meta.get("model_revision"),
            "hook_name": hook, "hook_head_index": None,
            "context_size": meta["context_size"], "prepend_bos": meta["corpus"]["prepend_bos"],
            "dataset_path": meta["corpus"]["name"], "store_path": str(store.path)}
