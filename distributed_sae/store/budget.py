"""A streamed run's disk bound (store.max_bytes): which units may go, and may another one start.

Two sides of one rule, "a unit is deleted once every member has trained on it, and a resume
would not need it":

- the trainer (train/stream_source.py) deletes, after each checkpoint, the training units whose
  every chunk lies in a buffer before the checkpoint's reader position, for every data-parallel
  share (`consumed_before`). A resume restarts at that position and rebuilds only buffers from it
  on, so it never needs a deleted unit; units holding held-out rows are never deleted.
- the harvest (harvest/pool.py) starts a unit only if the store's bytes, plus an upper bound for
  the units being written, stay under the bound (`DiskBudget.admit`); otherwise it waits for
  the trainer's next deletion (train/stream_source.py says why that always comes).

Bytes are apparent file sizes: each committed unit's shard files as its commit record lists
them, plus everything else in the store (metadata, commit records), measured once at start and
grown by each record written.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from distributed_sae.store.activation_store import ActivationStore
from distributed_sae.store.commits import record_path
from distributed_sae.store.stream_files import consumed_units

log = logging.getLogger(__name__)


def record_bytes(record: Mapping[str, Any]) -> int:
    """Bytes of a committed unit's shard files, as its commit record lists them."""
    return sum(int(f["bytes"]) for f in record.get("files", {}).values())


def record_bytes_bound(store: ActivationStore) -> int:
    """An upper bound of one commit record's bytes: each hook's statistics are d float64 sums
    as JSON (at most 25 characters each: "-1.2345678901234567e-05, "), plus fixed fields
    (measured: at most 926 bytes for one 32-wide hook and two arrays, bound 1,248; a 576-wide
    hook's record: ~13.5 kB, bound 15.4 kB)."""
    hooks = store.hook_points
    return 128 + sum(96 + 26 * store.d(h) for h in hooks) + 96 * (len(hooks) + 1)


def unit_bytes_bound(store: ActivationStore) -> int:
    """An upper bound of what one unit being written adds to the disk: its rows uncompressed
    in every array, each shard's index (16 bytes per chunk and a crc32c), and its commit record
    twice (the record and the temporary file it is renamed from)."""
    itemsize = np.dtype(str(store.metadata["storage_dtype"])).itemsize
    width = sum(store.d(h) for h in store.hook_points)
    chunks = store.unit_rows // store.chunk_rows
    arrays = len(store.hook_points) + 1
    return (store.unit_rows * (width * itemsize + 4) + arrays * (16 * chunks + 4)
            + 2 * record_bytes_bound(store))


def store_bytes(path: str | Path, metadata_only: bool = False) -> int:
    """Apparent size of every file under `path`. metadata_only: only the store's own files
    (array metadata), which no unit adds or removes: every file but shard files (under a `c/`
    folder), commit records and consumed markers; the same at any moment of a run, unlike the
    whole, which counts whatever is written by then."""
    total = 0
    for folder, _, files in os.walk(path):
        rel = Path(folder).relative_to(path).parts
        if metadata_only and (rel and rel[0] in ("_commits", "_consumed") or "c" in rel):
            continue
        for name in files:
            try:
                total += os.stat(os.path.join(folder, name)).st_size
            except FileNotFoundError:  # deleted meanwhile
                continue
    return total


class DiskBudget:
    """Whether the harvest may start more units under `max_bytes`; thread-safe.

    The harvest calls admit(in_flight, n) before starting n units and committed(unit, record)
    after each commit. `peak` is the most bytes the store held (or had reserved for units being
    written) at any admit, the figure a bounded run reports.
    """

    def __init__(self, store: ActivationStore, max_bytes: int) -> None:
        self.root, self.max_bytes = Path(store.path), int(max_bytes)
        self.estimate = unit_bytes_bound(store)
        gone = consumed_units(self.root)
        self._live = {u: record_bytes(r) for u, r in store.commits.items() if u not in gone}
        self._other = max(0, store_bytes(self.root) - sum(self._live.values()))
        self._lock = threading.Lock()
        self.peak = 0
        self.waiting = False

    def used(self) -> int:
        """Bytes on disk now: live units' files and everything else."""
        with self._lock:
            gone = consumed_units(self.root)
            for unit in gone & self._live.keys():
                del self._live[unit]
            return self._other + sum(self._live.values())

    def admit(self, in_flight: int, n: int = 1) -> bool:
        """Whether n more units may start while `in_flight` are being written (always, with
        max_bytes 0: the budget then only reports the store's fill)."""
        need = self.used() + (in_flight + n) * self.estimate
        ok = need <= self.max_bytes or not self.max_bytes
        if ok:
            self.peak = max(self.peak, need)
        self.waiting = not ok
        return ok

    def committed(self, unit: int, record: Mapping[str, Any]) -> None:
        with self._lock:
            self._live[unit] = record_bytes(record)
            try:
                self._other += os.stat(record_path(self.root, unit)).st_size
            except FileNotFoundError:
                pass

    def describe(self) -> str:
        """The buffer's fill, for the harvest's progress bar."""
        bound = f"/{self.max_bytes / 1e6:.1f}" if self.max_bytes else ""
        return (f"store {self.used() / 1e6:.1f}{bound} MB, {len(self._live)} units"
                f"{', waiting for room' if self.waiting else ''}")


def chunks_before(buffers: Sequence[np.ndarray], state: Mapping[str, Any]) -> np.ndarray:
    """Chunk starts of the buffers before a reader position (`state`, a reader's state_dict):
    all chunks once the position is past epoch 0. (chunks,) int64."""
    if int(state["epoch"]) > 0:
        return np.concatenate(list(buffers)) if len(buffers) else np.zeros(0, np.int64)
    done = list(buffers[:int(state["buffer"])])
    return np.concatenate(done) if done else np.zeros(0, np.int64)


def deletable_units(store: ActivationStore, rows: range, consumed_chunks: Iterable[np.ndarray],
                    ) -> list[int]:
    """Units whose every row is in `rows` (training rows) and whose every chunk is consumed,
    not yet marked consumed."""
    done = set(int(c) for part in consumed_chunks for c in part)
    u, c = store.unit_rows, store.chunk_rows
    gone = consumed_units(store.path)
    out = []
    for unit in range(-(-rows.start // u), rows.stop // u):  # units wholly inside rows
        if unit not in gone and all(s in done for s in range(unit * u, (unit + 1) * u, c)):
            out.append(unit)
    return out
