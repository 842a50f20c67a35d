"""The train stage: one pass over the store feeds every member of the bank.

Reading and normalising a batch is paid once for the whole bank; each member then takes its own
step. Inputs are scaled so that their mean squared norm is d_in (the store's statistics give the
scale), which makes one learning rate fit every model and hook; the scale is folded back into the
weights when a member is saved, so saved SAEs act on raw activations.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from distributed_sae.config import RunConfig
from distributed_sae.sae import expand_bank, save_sae
from distributed_sae.store import ActivationReader, ActivationStore, split_rows
from distributed_sae.train.bank_trainer import BankTrainer, Member
from distributed_sae.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from distributed_sae.train.metrics_log import MetricsLog

log = logging.getLogger(__name__)


def input_scale(store: ActivationStore, hook: str) -> tuple[float, torch.Tensor]:
    """Scale that brings the mean squared norm to d_in, and the scaled mean (b_dec's start)."""
    stats = store.stats(hook)
    scale = math.sqrt(store.d(hook) / stats["mean_sq_norm"])
    return scale, torch.as_tensor(stats["mean"], dtype=torch.float32) * scale


def _reader(cfg: RunConfig, store: ActivationStore, rows: range, scale: float,
            seed: int) -> ActivationReader:
    return ActivationReader(store, cfg.sae_hook, rows, cfg.train.batch_size, seed=seed,
                            scale=scale, exclude_token_ids=store.metadata["exclude_token_ids"])


def _resample_inputs(cfg: RunConfig, store: ActivationStore, rows: range, scale: float,
                     step: int) -> torch.Tensor:
    """A fresh random sample of training inputs for resampling (at most train.resample_inputs)."""
    parts, n = [], 0
    for x in _reader(cfg, store, rows, scale, seed=cfg.train.seed + 1 + step).iter_epoch(0):
        parts.append(x)
        n += x.shape[0]
        if n >= cfg.train.resample_inputs:
            break
    return torch.cat(parts)[:cfg.train.resample_inputs]


def train(cfg: RunConfig) -> list[Path]:
    """Run the training stage; returns the folders of the saved members."""
    if cfg.train.workers > 1:
        from distributed_sae.parallel import init_ray
        from distributed_sae.train.distributed import train_ray

        init_ray(cfg.cluster)
        return train_ray(cfg, cfg.train.workers, cfg.train.data_parallel,
                         use_gpu=cfg.train.device.startswith("cuda"))
    torch.manual_seed(cfg.train.seed)
    store = ActivationStore.open(cfg.store.path)
    train_rows, _ = split_rows(store, cfg.train.holdout_fraction)
    scale, mean = input_scale(store, cfg.sae_hook)
    reader = _reader(cfg, store, train_rows, scale, cfg.train.seed)
    total = max(1, (cfg.train.tokens or len(train_rows)) // cfg.train.batch_size)
    bank = BankTrainer(cfg, expand_bank(cfg.sae, cfg.sae_hook), store.d(cfg.sae_hook), mean, total)
    ckpt_dir = Path(cfg.out_dir) / "train" / "checkpoints"
    if (latest := resume(cfg, bank, reader, ckpt_dir)) is not None:
        log.info("resumed from %s (step %d)", latest, bank.step_count)
    log.info("training %d members %s on %s: %d steps of %d tokens (from step %d)",
             len(bank.members), [m.spec.member_id for m in bank.members], cfg.sae_hook, total,
             cfg.train.batch_size, bank.step_count)
    metrics = MetricsLog(cfg)
    bar = tqdm(total=total, initial=bank.step_count, desc="train", unit="step")
    start, start_tokens = time.perf_counter(), bank.tokens_seen
    batches = reader.iter_batches()
    while bank.step_count < total:
        bank.step(next(batches).to(cfg.train.device), record=bank.logs_next())
        bar.update(1)
        if bank.resample_due():
            bank.resample(lambda: _resample_inputs(cfg, store, train_rows, scale, bank.step_count))
        if bank.step_count % cfg.train.log_every == 0 or bank.step_count == total:
            rate = (bank.tokens_seen - start_tokens) / (time.perf_counter() - start)
            metrics.write(bank, rate)
        every = cfg.train.checkpoint_every
        if every and bank.step_count % every == 0 and bank.step_count < total:
            _checkpoint(cfg, bank, reader, ckpt_dir)
    bar.close()
    metrics.close()
    return _save_members(cfg, store, bank, scale)


def _checkpoint(cfg: RunConfig, bank: BankTrainer, reader: ActivationReader, folder: Path) -> None:
    tensors, state = bank.state()
    state["reader"] = reader.state_dict()
    save_checkpoint(folder, bank.step_count, tensors, state, keep=cfg.train.keep_checkpoints)


def resume(cfg: RunConfig, bank: BankTrainer, reader: ActivationReader, folder: Path,
           bank_ids: list[str] | None = None) -> Path | None:
    """Load the newest checkpoint under `folder` into `bank` and `reader` (unless
    train.resume=false); returns it, or None when there is none. `bank_ids`: see
    BankTrainer.load_state (a rank holding part of the bank). Latent-sharded checkpoints
    (train/sharded.py) hold other files and are refused."""
    latest = latest_checkpoint(folder) if cfg.train.resume else None
    if latest is None:
        return None
    tensors, state = load_checkpoint(latest)
    if "latent_shards" in state:
        raise ValueError(f"checkpoint {latest} holds latent-sharded members (train.latent_shards="
                         f"{state['latent_shards']}): resume with train.latent_shards > 1, or "
                         f"use another out_dir")
    bank.load_state(tensors, state, bank_ids=bank_ids)
    reader.load_state_dict(state["reader"])
    return latest


def _save_members(cfg: RunConfig, store: ActivationStore, bank: BankTrainer, scale: float,
                  members: list[Member] | None = None,
                  bank_ids: list[str] | None = None) -> list[Path]:
    """Save `members` (default: the whole bank) with the input scale folded in; `bank_ids` (default:
    their ids) go to out_dir/train/bank.json, which the eval and export stages read."""
    folders = []
    meta = provenance(cfg, store)
    members = bank.members if members is None else members
    for m in members:
        m.sae.eval()
        m.sae.fold_input_scale(scale)
        extra = {"training_tokens": bank.tokens_seen, "input_scale": scale,
                 "member_id": m.spec.member_id, "seed": m.spec.seed}
        folders.append(save_sae(m.sae, Path(cfg.out_dir) / "train" / m.spec.member_id,
                                metadata={**meta, **extra}))
    if bank_ids is None:
        bank_ids = [m.spec.member_id for m in members]
    if bank_ids:
        (Path(cfg.out_dir) / "train" / "bank.json").write_text(json.dumps(
            {"members": bank_ids, "hook": cfg.sae_hook}, indent=2))
    log.info("saved %d members under %s", len(folders), Path(cfg.out_dir) / "train")
    return folders


def provenance(cfg: RunConfig, store: ActivationStore) -> dict[str, Any]:
    """The metadata SAELens and a reader of the model card need: model, hook, corpus."""
    meta = store.metadata
    return {"model_name": meta["model_name"], "model_revision": meta.get("model_revision"),
            "hook_name": cfg.sae_hook, "hook_head_index": None,
            "context_size": meta["context_size"], "prepend_bos": meta["corpus"]["prepend_bos"],
            "dataset_path": meta["corpus"]["name"], "store_path": str(store.path)}
