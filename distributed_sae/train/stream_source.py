"""The trainer's side of a streamed run (stream=true): the store is still being harvested.

- The reader follows the store (reader.py's follow mode): its first epoch shuffles chunks within
  windows of consecutive units and waits for each window's units to be committed. Its order is a
  pure function of the seed, never of when units land, so a run with a killed harvest actor, or
  a resumed one, trains on exactly the batches of a clean run.
- The input norm (and skip-transcoders' least-squares start) cannot wait for the whole store:
  they come from the first window's units, once those are committed, and are kept in
  out_dir/train/stream_init.pt, since a bounded run may have deleted those rows before a resume.
- A bounded store (store.max_bytes > 0): after each checkpoint, rank 0 deletes the training units
  behind every share's checkpointed reader position (store/budget.py); StreamControl says when
  to checkpoint so that the harvest never waits for room the trainer needs. When training
  ends, one last checkpoint, after which every training unit may go.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from distributed_sae.config import ConfigError, RunConfig
from distributed_sae.store import ActivationStore, split_rows
from distributed_sae.store.bank_reader import BankReader
from distributed_sae.store.budget import (chunks_before, deletable_units,
                                          record_bytes_bound, store_bytes, unit_bytes_bound)
from distributed_sae.store.buffers import UnitWaiter
from distributed_sae.train.checkpoint import STATE, latest_checkpoint
from distributed_sae.train.norm import InputNorm, MemberInit, input_norms, member_inits

log = logging.getLogger(__name__)

INIT_FILE = "stream_init.pt"
POLL_S = 0.5  # seconds between looks at the commit records while waiting for units


def wait_for_rows(store: ActivationStore, rows: range) -> None:
    """Block until every unit holding `rows` is committed (HarvestFailedError if the harvest
    recorded a failure meanwhile); the store's records are re-read after."""
    starts = list(range(rows.start, rows.stop, store.chunk_rows))
    UnitWaiter(store, rows.stop, None, POLL_S)(starts, threading.Event())
    store.refresh()


def _pack(norms: Mapping[str, InputNorm], init: MemberInit) -> dict[str, Any]:
    return {"norms": {h: {"scale": n.scale, "mean": n.mean, "max_norm": n.max_norm}
                      for h, n in norms.items()},
            "skips": [[list(i), list(t), w, b] for (i, t), (w, b) in init.skips.items()]}


def _unpack(saved: dict[str, Any]) -> tuple[dict[str, InputNorm], MemberInit]:
    norms = {h: InputNorm(float(n["scale"]), n["mean"], n["max_norm"])
             for h, n in saved["norms"].items()}
    skips = {(tuple(i), tuple(t)): (w, b) for i, t, w, b in saved["skips"]}
    return norms, MemberInit({h: n.mean for h, n in norms.items()}, skips)


def _init_key(cfg: RunConfig, rows: range) -> str:
    """What the saved start depends on: another value recomputes it."""
    return json.dumps({"hooks": cfg.bank_hooks, "rows": [rows.start, rows.stop],
                       "outlier_norm_ratio": cfg.train.outlier_norm_ratio,
                       "skip_init": cfg.train.skip_init,
                       "skips": sorted({f"{s.inputs}->{s.targets}" for s in cfg.bank()
                                        if s.form == "skip_transcoder"})})


def stream_inits(cfg: RunConfig, store: ActivationStore, train_rows: range, window_units: int
                 ) -> tuple[dict[str, InputNorm], MemberInit]:
    """The norms and member starts of a streamed run, from its first `window_units` units (or
    loaded from a previous attempt of the same run)."""
    rows = range(train_rows.start, min(train_rows.stop, window_units * store.unit_rows))
    path = Path(cfg.out_dir) / "train" / INIT_FILE
    key = _init_key(cfg, rows)
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved.get("key") == key:
            return _unpack(saved)
    log.info("streaming: waiting for the first %d unit(s) to set the input norm", window_units)
    wait_for_rows(store, rows)
    units = list(store.units_of(rows.start, rows.stop))
    norms = input_norms(cfg, store, rows, units)
    init = member_inits(cfg, store, rows, norms)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{INIT_FILE}.{os.getpid()}.tmp")
    torch.save({"key": key, **_pack(norms, init)}, tmp)
    os.replace(tmp, path)  # every rank computes the same; whoever writes last, writes that
    return norms, init


def window_bytes(store: ActivationStore, window: int) -> int:
    """An upper bound of one shuffling window's bytes on disk."""
    return window * unit_bytes_bound(store)


def min_bytes(cfg: RunConfig, store: ActivationStore, window: int, slots: int) -> int:
    """The least store.max_bytes with which a streamed run cannot stall: the store's metadata,
    every commit record the run will write (they stay after their units go: a resume and
    verify() read them), the held-out units, and two windows (the one being trained on, the
    next being harvested) plus the `slots` units the actors write at once. A function of the
    config and the store's geometry only, not of how far the harvest has got: the start-up
    check and every rank's trainer (started later, after a resume) agree."""
    _, held_out = split_rows(store, cfg.train.holdout_fraction, require_complete=False)
    holdout_units = len(store.units_of(held_out.start, held_out.stop))
    records = int(store.metadata["n_units"]) * record_bytes_bound(store)
    return (store_bytes(store.path, metadata_only=True) + records
            + (holdout_units + slots) * unit_bytes_bound(store)
            + 2 * window_bytes(store, window))


class StreamControl:
    """What the engine's loop does differently when it streams into a bounded store.

    Deadlock-free by one invariant: the units the reader has wholly passed since the last
    checkpoint (which cannot be deleted yet) never hold more than the bound's slack over
    min_bytes. The trainer checkpoints, and then deletes, as soon as they would: at the step
    its reader enters a new window, before it can block waiting for that window's units. Then
    the disk holds at most min_bytes + slack: the harvest always has room for the window the
    trainer waits for. A looser bound means fewer checkpoints: about one per
    slack / window_bytes windows.

    Every rank calls next_batch() and checkpoint_wanted() each step (collectives under a group
    plan) and after_checkpoint() after each checkpoint; only rank 0 deletes.
    """

    def __init__(self, cfg: RunConfig, plan: Any, store: ActivationStore, rows: range,
                 source: BankReader) -> None:
        self.bounded = bool(cfg.stream and cfg.store.max_bytes)
        self.cfg, self.plan, self.store, self.rows, self.source = cfg, plan, store, rows, source
        self.deleted = 0
        reader = next(iter(source.readers.values()))
        if self.bounded:
            self._buffers = reader.buffers(0)  # this rank's first-epoch plan
            self._window_rows = reader.window * store.unit_rows
            slots = cfg.harvest.num_actors
            need = min_bytes(cfg, store, reader.window, slots)
            spare = cfg.store.max_bytes - need
            if spare < 0:  # dsae-run checked this already; a dsae-train following a harvest not
                raise ConfigError(f"store.max_bytes={cfg.store.max_bytes} is under the {need} "
                                  f"bytes this streamed run needs: set store.max_bytes >= {need}")
            self._every = max(1, spare // window_bytes(store, reader.window))  # windows
            log.info("streaming into a bound of %d bytes: a checkpoint every %d window(s) of "
                     "%d units frees the units behind it", cfg.store.max_bytes, self._every,
                     reader.window)
        self._last = self._window() if self.bounded else 0  # the window at the last checkpoint

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """The engine's batches: endless epochs, or one pass for a bounded store (a second
        would read deleted units), which a resume past its end finds empty."""
        if not self.bounded:
            return self.source.iter_batches()
        if self._state()["epoch"] > 0:
            return iter(())
        return self.source.iter_epoch(0)

    def next_batch(self, batches: Iterator[dict[str, torch.Tensor]]
                   ) -> dict[str, torch.Tensor] | None:
        """The next batch, or None once the pass is over on any rank (ranks' passes differ by
        the tokens each excludes; all stop together)."""
        batch = next(batches, None)
        if not self.bounded:
            assert batch is not None  # iter_batches never ends
            return batch
        return batch if self.plan.agree(batch is not None) else None

    def _state(self) -> dict[str, Any]:
        return next(iter(self.source.state_dict()["hooks"].values()))

    def _window(self) -> int:
        """The window holding the reader's next rows (past the last one: the pass is over)."""
        state = self._state()
        b = int(state["buffer"])
        if int(state["epoch"]) > 0 or b >= len(self._buffers):
            return -(-self.rows.stop // self._window_rows)
        return int(self._buffers[b][0]) // self._window_rows

    def checkpoint_wanted(self) -> bool:
        """Whether every rank's reader has passed `_every` windows since the last checkpoint."""
        if not self.bounded:
            return False
        return self.plan.agree(self._window() - self._last >= self._every)

    def after_checkpoint(self, done: bool = False) -> None:
        """Delete the units the newest checkpoint no longer needs (done: every training unit,
        the run being over)."""
        if not self.bounded:
            return
        self._last = self._window()
        if not self.plan.is_logger:
            return
        if done:
            units = deletable_units(self.store, self.rows, [self._all_chunks()])
        else:
            units = deletable_units(self.store, self.rows, self._consumed_chunks())
        if units:
            self.store.delete_units(units)
            self.deleted += len(units)
            log.debug("streaming: deleted %d consumed unit(s) (%d so far)", len(units),
                      self.deleted)

    def _consumed_chunks(self) -> list:
        latest = latest_checkpoint(Path(self.cfg.out_dir) / "train" / "checkpoints")
        if latest is None:
            return []
        states = json.loads((latest / STATE).read_text())["readers"]
        reader = next(iter(self.source.readers.values()))
        out = []
        for share, state in enumerate(states):
            own = state["hooks"][reader.hook] if "hooks" in state else state
            other = replace(reader, rank=share, prefetch=0)
            out.append(chunks_before(other.buffers(0), own))
        return out

    def _all_chunks(self) -> list[int]:
        return list(range(self.rows.start, self.rows.stop, self.store.chunk_rows))
