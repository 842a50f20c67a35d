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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
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
    """Scale that brings the mean squared norm to d_in, and the scaled mean (b_dec's start), from
    the store's statistics (every row but special tokens)."""
    stats = store.stats(hook)
    scale = math.sqrt(store.d(hook) / stats["mean_sq_norm"])
    return scale, torch.as_tensor(stats["mean"], dtype=torch.float32) * scale


SAMPLE_CHUNKS = 64  # chunks read, evenly spaced, to set the outlier threshold and the scale


@dataclass(frozen=True)
class InputNorm:
    """How training rows are prepared: rows whose raw norm exceeds max_norm are dropped (None:
    none), the rest are multiplied by scale; mean is the scaled mean of the rows (b_dec's start)."""

    scale: float
    mean: torch.Tensor  # (d_in,)
    max_norm: float | None = None


def input_norm(cfg: RunConfig, store: ActivationStore, rows: range) -> InputNorm:
    """The scale that brings the mean squared norm of training rows to d_in.

    Without an outlier threshold it comes from the store's statistics (every row). With
    train.outlier_norm_ratio, from SAMPLE_CHUNKS chunks spread over `rows` (special tokens
    dropped): the threshold is that ratio times their median norm, and the scale and mean are
    those of the rows under it. A pure function of the store and the config, so a resumed job
    gets the same numbers.
    """
    hook, ratio = cfg.sae_hook, cfg.train.outlier_norm_ratio
    if not ratio:
        return InputNorm(*input_scale(store, hook))
    starts = list(range(rows.start, rows.stop, store.chunk_rows))
    picks = np.unique(np.linspace(0, len(starts) - 1, min(SAMPLE_CHUNKS, len(starts))).astype(int))
    exclude = store.metadata["exclude_token_ids"]
    parts = []
    for s in (starts[i] for i in picks):
        e = min(s + store.chunk_rows, rows.stop)
        keep = ~np.isin(np.asarray(store.tokens(s, e)), exclude)
        parts.append(store.read(hook, s, e)[torch.from_numpy(keep)])
    x = torch.cat(parts)  # (sampled rows, d_in) float32, raw
    norms = x.norm(dim=1)  # (sampled rows,)
    max_norm = ratio * float(norms.median())
    kept = x[norms <= max_norm]
    scale = math.sqrt(store.d(hook) / float(kept.pow(2).sum(1).mean()))
    log.info("outliers: rows with norm > %.4g (%.3g x the median) dropped: %.3f%% of %d sampled "
             "rows; input scale %.4g (store statistics, every row: %.4g)", max_norm, ratio,
             100 * (1 - len(kept) / len(x)), len(x), scale, input_scale(store, hook)[0])
    return InputNorm(scale, kept.mean(0) * scale, max_norm)


def _reader(cfg: RunConfig, store: ActivationStore, rows: range, norm: InputNorm,
            seed: int) -> ActivationReader:
    return ActivationReader(store, cfg.sae_hook, rows, cfg.train.batch_size, seed=seed,
                            scale=norm.scale, max_norm=norm.max_norm,
                            exclude_token_ids=store.metadata["exclude_token_ids"])


def _resample_inputs(cfg: RunConfig, store: ActivationStore, rows: range, norm: InputNorm,
                     step: int) -> torch.Tensor:
    """A fresh random sample of training inputs for resampling (at most train.resample_inputs)."""
    parts, n = [], 0
    for x in _reader(cfg, store, rows, norm, seed=cfg.train.seed + 1 + step).iter_epoch(0):
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
    norm = input_norm(cfg, store, train_rows)
    reader = _reader(cfg, store, train_rows, norm, cfg.train.seed)
    total = max(1, (cfg.train.tokens or len(train_rows)) // cfg.train.batch_size)
    bank = BankTrainer(cfg, expand_bank(cfg.sae, cfg.sae_hook), store.d(cfg.sae_hook), norm.mean,
                       total)
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
            bank.resample(lambda: _resample_inputs(cfg, store, train_rows, norm, bank.step_count))
        if bank.step_count % cfg.train.log_every == 0 or bank.step_count == total:
            rate = (bank.tokens_seen - start_tokens) / (time.perf_counter() - start)
            metrics.write(bank, rate)
        every = cfg.train.checkpoint_every
        if every and bank.step_count % every == 0 and bank.step_count < total:
            _checkpoint(cfg, bank, reader, ckpt_dir)
    bar.close()
    metrics.close()
    return _save_members(cfg, store, bank, norm)


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


def _save_members(cfg: RunConfig, store: ActivationStore, bank: BankTrainer, norm: InputNorm,
                  members: list[Member] | None = None,
                  bank_ids: list[str] | None = None) -> list[Path]:
    """Save `members` (default: the whole bank) with the input scale folded in; `bank_ids` (default:
    their ids) go to out_dir/train/bank.json, which the eval and export stages read."""
    folders = []
    meta = provenance(cfg, store)
    members = bank.members if members is None else members
    for m in members:
        m.sae.eval()
        m.sae.fold_input_scale(norm.scale)
        extra = {"training_tokens": bank.tokens_seen, "input_scale": norm.scale,
                 "outlier_max_norm": norm.max_norm,
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
