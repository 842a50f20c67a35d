"""Unit commit records and the single-writer lock of an activation store.

A work unit is committed by writing `_commits/u<unit>.json` atomically (write a temp file, then
os.replace), only after all of the unit's rows are on disk. A reader or a restarted job trusts
exactly the units that have a record, so a crash between the data write and the record costs one
unit's recomputation and never a half-written unit. One small file per unit (not a growing list in
zarr.json) keeps each commit O(1): a 1B-token store with 32k-token units has ~30k records.

The lock is a file beside the store (`.<store name>.lock`, outside it so that store.overwrite can
delete the store while holding it), created with O_EXCL and holding the owner's host and pid. A second job
on the same store is refused while the owner is alive; a lock left by a dead process on this host
is taken over (a killed job must be restartable without manual clean-up).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

COMMITS_DIR = "_commits"


class StoreLockedError(RuntimeError):
    """Another live job holds the store's writer lock."""


def _atomic_write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def commit_unit(root: Path, unit: int, record: dict[str, Any]) -> None:
    """Mark `unit` as durably written; `record` holds its statistics."""
    folder = root / COMMITS_DIR
    folder.mkdir(exist_ok=True)
    _atomic_write_json(folder / f"u{unit:08d}.json", {"unit": unit, **record})


def read_commits(root: Path) -> dict[int, dict[str, Any]]:
    """unit -> its commit record, for every committed unit."""
    folder = root / COMMITS_DIR
    if not folder.is_dir():
        return {}
    records = {}
    for entry in sorted(folder.glob("u*.json")):
        with open(entry) as fh:
            rec = json.load(fh)
        records[int(rec["unit"])] = rec
    return records


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class WriterLock:
    """Exclusive writer lock on a store directory (a context manager)."""

    def __init__(self, store_path: str | Path) -> None:
        store_path = Path(store_path)
        self.store = store_path
        self.path = store_path.parent / f".{store_path.name}.lock"
        self.held = False

    def acquire(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                self._check_owner()
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return
        raise StoreLockedError(f"could not take the writer lock {self.path}")

    def _check_owner(self) -> None:
        """Raise if a live job owns the lock; remove the lock of a dead one."""
        try:
            owner = json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            owner = {}
        same_host = owner.get("host") == socket.gethostname()
        if not same_host or _pid_alive(int(owner.get("pid", -1))):
            raise StoreLockedError(
                f"store {self.store} is being written by another job (host "
                f"{owner.get('host')!r}, pid {owner.get('pid')}): wait for it to finish, or use "
                f"another store.path; if that job is dead, delete {self.path}"
            )
        log.warning("taking over the writer lock of dead process %s", owner.get("pid"))
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "WriterLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
