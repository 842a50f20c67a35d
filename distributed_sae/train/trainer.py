"""Train a bank of SAEs on one pass over the store: every batch read feeds every member.

Reading and normalising a batch is paid once for the whole bank; each member then takes its own
Adam step. Inputs are scaled so that their mean squared norm is d_in (the store's statistics give
the scale), which makes one learning rate fit every model and hook; the scale is folded back into
the weights when a member is saved, so saved SAEs act on raw activations.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from distributed_sae.config import RunConfig
from distributed_sae.sae import MemberSpec, SparseAutoencoder, build_sae, expand_bank, save_sae
from distributed_sae.store import ActivationReader, ActivationStore, split_rows

log = logging.getLogger(__name__)


@dataclass
class Member:
    """One SAE of the bank with its optimiser and dead-latent tracking."""

    spec: MemberSpec
    sae: SparseAutoencoder
    opt: torch.optim.Optimizer
    since_fired: torch.Tensor  # (d_sae,) tokens since each latent last fired
    last: dict[str, float] = field(default_factory=dict)

    def dead(self, dead_tokens: int) -> torch.Tensor:
        return self.since_fired >= dead_tokens  # (d_sae,) bool


def build_members(cfg: RunConfig, d_in: int, b_dec_init: torch.Tensor) -> list[Member]:
    members = []
    for spec in expand_bank(cfg.sae, cfg.sae_hook):
        sae = build_sae(spec, d_in, cfg.train).to(cfg.train.device)
        with torch.no_grad():
            sae.b_dec.copy_(b_dec_init)
        opt = torch.optim.Adam(sae.parameters(), lr=cfg.train.lr, betas=(0.9, 0.999))
        members.append(Member(spec, sae, opt, torch.zeros(spec.width, dtype=torch.long)))
    return members


def lr_at(step: int, total: int, cfg: RunConfig) -> float:
    """Linear warm-up, then constant, then linear decay to 0 over the last 20% of steps."""
    base = cfg.train.lr
    warm = min(cfg.train.warmup_steps, max(1, total // 10))
    if step < warm:
        return base * (step + 1) / warm
    decay_start = int(total * 0.8)
    if step >= decay_start:
        return base * max(0.0, (total - step) / max(1, total - decay_start))
    return base


def train_step(member: Member, x: torch.Tensor, lr: float, dead_tokens: int) -> None:
    """One Adam step of one member on a batch x (batch, d_in)."""
    for group in member.opt.param_groups:
        group["lr"] = lr
    out = member.sae.loss(x, dead=member.dead(dead_tokens))
    member.opt.zero_grad(set_to_none=True)
    out.loss.backward()
    member.sae.remove_parallel_grad()
    member.opt.step()
    member.sae.normalize_decoder()
    with torch.no_grad():
        member.since_fired += x.shape[0]
        member.since_fired[out.fired] = 0
        err = (out.x_hat - x).pow(2).sum()
        var = (x - x.mean(0)).pow(2).sum()
        member.last = {"loss": float(out.loss), "fvu": float(err / var),
                       **{k: float(v) for k, v in out.terms.items()}}


def _input_stats(store: ActivationStore, hook: str) -> tuple[float, torch.Tensor]:
    """Scale that brings the mean squared norm to d_in, and the scaled mean (b_dec's start)."""
    stats = store.stats(hook)
    scale = math.sqrt(store.d(hook) / stats["mean_sq_norm"])
    return scale, torch.as_tensor(stats["mean"], dtype=torch.float32) * scale


def train(cfg: RunConfig) -> list[Path]:
    """Run the training stage; returns the folders of the saved members."""
    torch.manual_seed(cfg.train.seed)
    store = ActivationStore.open(cfg.store.path)
    hook = cfg.sae_hook
    train_rows, _ = split_rows(store, cfg.train.holdout_fraction)
    scale, mean = _input_stats(store, hook)
    reader = ActivationReader(store, hook, train_rows, cfg.train.batch_size, seed=cfg.train.seed,
                              scale=scale, exclude_token_ids=store.metadata["exclude_token_ids"])
    members = build_members(cfg, store.d(hook), mean)
    budget = cfg.train.tokens or len(train_rows)
    total_steps = max(1, budget // cfg.train.batch_size)
    log.info("training %d members %s on %s: %d steps of %d tokens", len(members),
             [m.spec.member_id for m in members], hook, total_steps, cfg.train.batch_size)
    step, seen, start = 0, 0, time.perf_counter()
    bar = tqdm(total=total_steps, desc="train", unit="step")
    epoch = 0
    while step < total_steps:
        for x in reader.iter_epoch(epoch):
            x = x.to(cfg.train.device)
            lr = lr_at(step, total_steps, cfg)
            for member in members:
                train_step(member, x, lr, cfg.train.dead_tokens)
            step, seen = step + 1, seen + x.shape[0]
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == total_steps:
                _log_progress(members, step, seen / (time.perf_counter() - start), cfg)
            if step >= total_steps:
                break
        epoch += 1
    bar.close()
    return _save_members(cfg, store, members, scale, seen)


def _log_progress(members: list[Member], step: int, rate: float, cfg: RunConfig) -> None:
    for m in members:
        dead = float(m.dead(cfg.train.dead_tokens).float().mean())
        log.info("step %d %s fvu %.4f loss %.4f dead %.3f (%.0f tok/s)", step, m.spec.member_id,
                 m.last["fvu"], m.last["loss"], dead, rate)


def _save_members(cfg: RunConfig, store: ActivationStore, members: list[Member], scale: float,
                  seen: int) -> list[Path]:
    folders = []
    meta = provenance(cfg, store)
    for m in members:
        m.sae.fold_input_scale(scale)
        extra = {"training_tokens": seen, "input_scale": scale, "member_id": m.spec.member_id,
                 "seed": m.spec.seed}
        folders.append(save_sae(m.sae, Path(cfg.out_dir) / "train" / m.spec.member_id,
                                metadata={**meta, **extra}))
    (Path(cfg.out_dir) / "train" / "bank.json").write_text(
        json.dumps({"members": [m.spec.member_id for m in members], "hook": cfg.sae_hook}, indent=2))
    log.info("saved %d members under %s", len(folders), Path(cfg.out_dir) / "train")
    return folders


def provenance(cfg: RunConfig, store: ActivationStore) -> dict[str, Any]:
    """The metadata SAELens and a reader of the model card need: model, hook, corpus."""
    meta = store.metadata
    return {"model_name": meta["model_name"], "model_revision": meta.get("model_revision"),
            "hook_name": cfg.sae_hook, "hook_head_index": None,
            "context_size": meta["context_size"], "prepend_bos": meta["corpus"]["prepend_bos"],
            "dataset_path": meta["corpus"]["name"], "store_path": str(store.path)}
