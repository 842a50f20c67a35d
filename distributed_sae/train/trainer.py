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

import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from tqdm.auto import tqdm

from distributed_sae.config import RunConfig
from distributed_sae.parallel.plan import Plan
from distributed_sae.store import ActivationReader, ActivationStore, split_rows
from distributed_sae.store.bank_reader import BankReader
from distributed_sae.store.ledger import combine_ledgers
from distributed_sae.train.bank_trainer import BankTrainer, Member
from distributed_sae.train.metrics_log import MetricsLog
from distributed_sae.train.norm import (InputNorm, input_norm, input_norms, input_scale,
                                        member_inits)
from distributed_sae.train.optim import to_saved
from distributed_sae.train.saving import save_members
from distributed_sae.train.stream_source import StreamControl, stream_inits

log = logging.getLogger(__name__)

LEDGER_FILE = "trained_rows.json"

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
            norms: Mapping[str, InputNorm] | None) -> BankReader:
    """The batches this process reads: its share of every global batch, every hook; a streamed
    run's reader follows the store as it is harvested. norms=None: unscaled (its geometry only)."""
    hooks = cfg.bank_hooks if norms is None else list(norms)
    max_norm = norms[hooks[0]].max_norm if norms is not None and len(hooks) == 1 else None
    scales = {h: 1.0 if norms is None else norms[h].scale for h in hooks}
    return BankReader(store, hooks, rows, plan.local_batch(cfg.train.batch_size),
                      seed=cfg.train.seed, scales=scales, max_norm=max_norm,
                      exclude_token_ids=store.metadata["exclude_token_ids"],
                      rank=plan.read_rank, world_size=plan.read_world, follow=cfg.stream)


def _norms(cfg: RunConfig, plan: Plan, store: ActivationStore, rows: range
           ) -> tuple[dict[str, InputNorm], Any]:
    """Each hook's input norm and the members' starts: from the whole store, or, streaming,
    from the units of the reader's first window (train/stream_source.py)."""
    if cfg.stream:
        window = next(iter(_source(cfg, plan, store, rows, None).readers.values())).window
        return stream_inits(cfg, store, rows, window)
    norms = input_norms(cfg, store, rows)
    return norms, member_inits(cfg, store, rows, norms)


def run(cfg: RunConfig, plan: Plan) -> list[Path] | None:
    """Train the bank under `plan` on this process; returns the folders this process saved."""
    torch.manual_seed(cfg.train.seed)
    if cfg.train.cpus:
        torch.set_num_threads(cfg.train.cpus)
    store = ActivationStore.open(cfg.store.path)
    train_rows, _ = split_rows(store, cfg.train.holdout_fraction, require_complete=not cfg.stream)
    norms, inits = _norms(cfg, plan, store, train_rows)
    source = _source(cfg, plan, store, train_rows, norms)
    total = max(1, (cfg.train.tokens or len(train_rows)) // cfg.train.batch_size)
    bank = plan.build_bank({h: store.d(h) for h in norms}, inits, total)
    plan.resume(bank, source)
    control = StreamControl(cfg, plan, store, train_rows, source)
    if plan.is_logger:
        log.info("training %d members %s on %s (%s, %d workers): %d steps of %d tokens (from "
                 "step %d)", len(plan.bank_ids), plan.bank_ids, list(norms), plan.name,
                 plan.world, total, cfg.train.batch_size, bank.step_count)
    first = bank.step_count
    _loop(cfg, plan, bank, source, lambda hook: _resample_inputs(
        cfg, store, train_rows, norms[hook], hook, bank.step_count), total, control)
    if control.bounded:  # the run is over: one last checkpoint, then no training unit is needed
        if bank.step_count > first:  # else the checkpoint resumed from is that one
            plan.checkpoint(bank, source)
        control.after_checkpoint(done=True)

    _write_ledger(cfg, plan, source, bank)
    to_saved(bank.members, cfg.train.signum_unit_decoder)  # schedule-free: their averages

    def write(members: list[Member], bank_ids: list[str]) -> list[Path]:
        return save_members(cfg, store, members, norms, bank.tokens_seen, bank_ids)

    return plan.save(bank, write)


def _loop(cfg: RunConfig, plan: Plan, bank: BankTrainer, source: BankReader,
          sample_inputs, total: int, control: StreamControl) -> None:
    """Step until `total`: log every train.log_every steps (and the last), then checkpoint every
    train.checkpoint_every steps (logging first, so a resumed job's density windows continue
    from the same counts), and whenever a bounded streamed harvest waits for room."""
    metrics = MetricsLog(cfg) if plan.is_logger else None
    bar = _bar(cfg, plan, bank, total)
    start, start_tokens = time.perf_counter(), bank.tokens_seen
    batches = control.batches()
    device = cfg.train.device
    logged = bank.step_count
    while bank.step_count < total:
        batch = control.next_batch(batches)
        if batch is None:  # a bounded stream's one pass is over (excluded tokens make it short)
            break
        batch = {h: x.to(device) for h, x in batch.items()}
        # A one-hook bank steps on the bare tensor (BankTrainer.step takes either).
        bank.step(batch if len(batch) > 1 else next(iter(batch.values())),
                  record=bank.logs_next())
        bar.update(cfg.train.batch_size if cfg.stream else 1)
        plan.after_step(bank.step_count)
        if bank.resample_due():
            bank.resample(sample_inputs)
        if bank.step_count % cfg.train.log_every == 0 or bank.step_count == total:
            rate = (bank.tokens_seen - start_tokens) / (time.perf_counter() - start)
            records = plan.records(bank, rate)
            logged = bank.step_count
            if metrics is not None:
                metrics.emit(records, bank.step_count)
        every = cfg.train.checkpoint_every
        wanted = control.checkpoint_wanted()  # collective: every rank asks every step
        if (wanted or every and bank.step_count % every == 0) and bank.step_count < total:
            plan.checkpoint(bank, source)
            control.after_checkpoint()
    if logged < bank.step_count:  # ended before `total`: the last step's metrics still go out
        records = plan.records(bank, (bank.tokens_seen - start_tokens) / (
            time.perf_counter() - start))
        if metrics is not None:
            metrics.emit(records, bank.step_count)
    bar.close()
    if metrics is not None:
        metrics.close()


def _write_ledger(cfg: RunConfig, plan: Plan, source: BankReader, bank: BankTrainer) -> None:
    """out_dir/train/trained_rows.json: how many store rows the final weights were trained on
    and their order-free digest (store/ledger.py), over every share of the store. It survives a
    resume (the reader's checkpointed state holds it), so two runs that trained on the same
    multiset of rows, one of them killed and resumed, write the same file."""
    shares = plan.gather((plan.read_rank, source.rows_ledger()))  # collective
    if shares is None or not plan.is_logger:
        return
    rows, digest = combine_ledgers(dict(shares).values())  # one ledger per share
    path = Path(cfg.out_dir) / "train" / LEDGER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rows": rows, "digest": digest, "steps": bank.step_count,
                                "tokens_seen": bank.tokens_seen}, indent=1))


def _bar(cfg: RunConfig, plan: Plan, bank: BankTrainer, total: int) -> tqdm:
    """Steps, or trained tokens when streaming (beside the harvest's bar of harvested ones)."""
    if cfg.stream:
        return tqdm(total=total * cfg.train.batch_size, initial=bank.tokens_seen, unit="tok",
                    unit_scale=True, desc="train", disable=not plan.is_logger, position=1)
    return tqdm(total=total, initial=bank.step_count, desc="train", unit="step",
                disable=not plan.is_logger)


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
