"""The train stage: ONE engine. One pass over the store feeds every member of the bank.

    source (BankReader: every hook of the bank read once per batch, the same rows in each)
      -> step every member (BankTrainer) -> log -> checkpoint -> save

Reading and normalising a batch is paid once for the whole bank; each member then takes its own
step on its hook's rows. Whatever depends on where the members live (one process, members
placed on workers by cost, data-parallel replicas, latent shards) is the Plan's
(parallel/plan.py): which members this process builds, which rows it reads, how metrics are
gathered, who writes which part of a checkpoint, who saves. This file holds no collective.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Mapping

import torch
from tqdm.auto import tqdm

from distributed_sae.config import RunConfig
from distributed_sae.parallel.plan import Plan
from distributed_sae.store import ActivationReader, ActivationStore, split_rows
from distributed_sae.store.bank_reader import BankReader
from distributed_sae.train.bank_trainer import BankTrainer, Member
from distributed_sae.train.metrics_log import MetricsLog
from distributed_sae.train.norm import (InputNorm, input_norm, input_norms, input_scale,
                                        member_inits)
from distributed_sae.train.saving import save_members

log = logging.getLogger(__name__)

__all__ = ["InputNorm", "input_norm", "input_scale", "run", "train"]


def train(cfg: RunConfig) -> list[Path]:
    """Run the training stage; returns the folders of the saved members."""
    if cfg.train.workers > 1:
        from distributed_sae.parallel import init_ray
        from distributed_sae.parallel.ray_train import train_ray

        init_ray(cfg.cluster)
        return train_ray(cfg)
    return run(cfg, Plan(cfg, cfg.bank())) or []


def _source(cfg: RunConfig, plan: Plan, store: ActivationStore, rows: range,
            norms: Mapping[str, InputNorm]) -> BankReader:
    """The batches this process reads: its share of every global batch, every hook."""
    hooks = list(norms)
    max_norm = norms[hooks[0]].max_norm if len(hooks) == 1 else None
    return BankReader(store, hooks, rows, plan.local_batch(cfg.train.batch_size),
                      seed=cfg.train.seed, scales={h: n.scale for h, n in norms.items()},
                      max_norm=max_norm, exclude_token_ids=store.metadata["exclude_token_ids"],
                      rank=plan.read_rank, world_size=plan.read_world)


def run(cfg: RunConfig, plan: Plan) -> list[Path] | None:
    """Train the bank under `plan` on this process; returns the folders this process saved."""
    torch.manual_seed(cfg.train.seed)
    store = ActivationStore.open(cfg.store.path)
    train_rows, _ = split_rows(store, cfg.train.holdout_fraction)
    norms = input_norms(cfg, store, train_rows)
    source = _source(cfg, plan, store, train_rows, norms)
    total = max(1, (cfg.train.tokens or len(train_rows)) // cfg.train.batch_size)
    bank = plan.build_bank({h: store.d(h) for h in norms},
                           member_inits(cfg, store, train_rows, norms), total)
    plan.resume(bank, source)
    if plan.is_logger:
        log.info("training %d members %s on %s (%s, %d workers): %d steps of %d tokens (from "
                 "step %d)", len(plan.bank_ids), plan.bank_ids, list(norms), plan.name,
                 plan.world, total, cfg.train.batch_size, bank.step_count)
    _loop(cfg, plan, bank, source, lambda hook: _resample_inputs(
        cfg, store, train_rows, norms[hook], hook, bank.step_count), total)

    def write(members: list[Member], bank_ids: list[str]) -> list[Path]:
        return save_members(cfg, store, members, norms, bank.tokens_seen, bank_ids)

    return plan.save(bank, write)


def _loop(cfg: RunConfig, plan: Plan, bank: BankTrainer, source: BankReader,
          sample_inputs, total: int) -> None:
    """Step until `total`: log every train.log_every steps (and the last), then checkpoint every
    train.checkpoint_every steps (logging first, so a resumed job's density windows continue
    from the same counts)."""
    metrics = MetricsLog(cfg) if plan.is_logger else None
    bar = tqdm(total=total, initial=bank.step_count, desc="train", unit="step",
               disable=not plan.is_logger)
    start, start_tokens = time.perf_counter(), bank.tokens_seen
    batches = source.iter_batches()
    device = cfg.train.device
    while bank.step_count < total:
        batch = {h: x.to(device) for h, x in next(batches).items()}
        # A one-hook bank steps on the bare tensor (BankTrainer.step takes either).
        bank.step(batch if len(batch) > 1 else next(iter(batch.values())),
                  record=bank.logs_next())
        bar.update(1)
        plan.after_step(bank.step_count)
        if bank.resample_due():
            bank.resample(sample_inputs)
        if bank.step_count % cfg.train.log_every == 0 or bank.step_count == total:
            rate = (bank.tokens_seen - start_tokens) / (time.perf_counter() - start)
            records = plan.records(bank, rate)
            if metrics is not None:
                metrics.emit(records, bank.step_count)
        every = cfg.train.checkpoint_every
        if every and bank.step_count % every == 0 and bank.step_count < total:
            plan.checkpoint(bank, source)
    bar.close()
    if metrics is not None:
        metrics.close()


def _resample_inputs(cfg: RunConfig, store: ActivationStore, rows: range, norm: InputNorm,
                     hook: str, step: int) -> torch.Tensor:
    """A fresh random sample of training inputs of `hook` for resampling (at most
    train.resample_inputs rows)."""
    reader = ActivationReader(store, hook, rows, cfg.train.batch_size,
                              seed=cfg.train.seed + 1 + step, scale=norm.scale,
                              max_norm=norm.max_norm,
                              exclude_token_ids=store.metadata["exclude_token_ids"])
    parts, n = [], 0
    for x in reader.iter_epoch(0):
        parts.append(x)
        n += x.shape[0]
        if n >= cfg.train.resample_inputs:
            break
    return torch.cat(parts)[:cfg.train.resample_inputs]
