"""Saving trained members as SAELens folders, with the input scale folded in and provenance."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import torch

from distributed_sae.config import RunConfig
from distributed_sae.sae import MemberSpec, save_sae
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
        spec = m.spec
        m.sae.eval()
        m.sae.fold_input_scale(*member_scales(spec, norms, store))
        first = norms[spec.inputs[0]]
        extra = {"training_tokens": tokens_seen, "outlier_max_norm": first.max_norm,
                 "input_scale": first.scale if len(spec.hooks) == 1 else
                 {h: norms[h].scale for h in spec.hooks},
                 "member_id": spec.member_id, "seed": spec.seed}
        meta = {**provenance(cfg, store, spec.inputs[0]), **form_metadata(spec), **extra}
        folders.append(save_sae(m.sae, Path(cfg.out_dir) / "train" / spec.member_id,
                                metadata=meta))
    if bank_ids is None:
        bank_ids = [m.spec.member_id for m in members]
    if bank_ids:
        (Path(cfg.out_dir) / "train" / "bank.json").write_text(json.dumps(
            {"members": bank_ids, "hooks": cfg.bank_hooks}, indent=2))
    log.info("saved %d members under %s", len(folders), Path(cfg.out_dir) / "train")
    return folders


def provenance(cfg: RunConfig, store: ActivationStore, hook: str) -> dict[str, Any]:
    """The metadata SAELens and a reader of the model card need: model, hook, corpus."""
    meta = store.metadata
    return {"model_name": meta["model_name"], "model_revision": meta.get("model_revision"),
            "hook_name": hook, "hook_head_index": None,
            "context_size": meta["context_size"], "prepend_bos": meta["corpus"]["prepend_bos"],
            "dataset_path": meta["corpus"]["name"], "store_path": str(store.path),
            # the second model of a model diff, when the store holds its 'b/...' hooks
            **{k: meta.get(k) for k in ("model_b_name", "model_b_revision") if k in meta}}


def member_scales(spec: MemberSpec, norms: Mapping[str, InputNorm], store: ActivationStore
                  ) -> tuple[float | torch.Tensor, float | torch.Tensor | None]:
    """(input scale, target scale) to fold into a member: floats for an SAE (one hook), else
    per coordinate of the concatenated hooks ((d_in,), (d_out,))."""
    if len(spec.hooks) == 1:
        return norms[spec.hooks[0]].scale, None

    def per_coord(hooks: tuple[str, ...]) -> torch.Tensor:
        return torch.cat([torch.full((store.d(h),), norms[h].scale) for h in hooks])

    return per_coord(spec.inputs), per_coord(spec.outputs)


def form_metadata(spec: MemberSpec) -> dict[str, Any]:
    """What a loader needs to know of a member's form: its hooks in order (hook_name_out is
    SAELens's key for a transcoder's target)."""
    meta: dict[str, Any] = {"dsae_inputs": list(spec.inputs), "dsae_targets": list(spec.outputs)}
    if spec.targets:
        meta["hook_name_out"] = spec.targets[0]
    return meta