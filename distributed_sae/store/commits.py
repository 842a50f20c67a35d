"""Unit commit records and the single-writer lock of an activation store.

A work unit is committed by writing `_commits/u<unit>.json` atomically (write a temp file, then
os.replace), only after all of the unit's rows are on disk. A reader or a restarted job trusts
exactly the units that have a record, so a crash between the data write and the record costs one
unit's recomputation and never a half-written unit. One small file per unit (not a growing list in
zarr.json) keeps each commit O(1): a 1B-token store with 32k-token units has ~30k records.
A record also holds the size and checksum of each of the unit's shard files (integrity.py). A
record that is not valid JSON is a StoreDamagedError naming the file; `uncommit` removes a
damaged unit's record so that the next harvest re-harvests it.

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

from distributed_sae.store.integrity import Damage

log = logging.getLogger(__name__)

COMMITS_DIR = "_commits"


class StoreLockedError(RuntimeError):
    """Another live job holds the store's writer lock."""


def _atomic_write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as fh:
            json.dump(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError:  # disk full: leave no half-written record beside the real ones
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def record_path(root: Path, unit: int) -> Path:
    """Where unit's commit record lives (whether or not it exists)."""
    return root / COMMITS_DIR / f"u{unit:08d}.json"


def commit_unit(root: Path, unit: int, record: dict[str, Any]) -> None:
    """Mark `unit` as durably written; `record` holds its statistics and file checksums."""
    (root / COMMITS_DIR).mkdir(exist_ok=True)
    _atomic_write_json(record_path(root, unit), {"unit": unit, **record})


def fsync_path(path: str | Path) -> None:
    """Flush a file (or a folder's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def uncommit(record: Path) -> None:
    """Remove a commit record, durably: unlink is atomic (a reader sees the record or none), and
    the folder's fsync makes the removal outlive a crash before the unit is written again."""
    record.unlink(missing_ok=True)
    fsync_path(record.parent)


def _unit_of(entry: Path) -> int:
    """The unit a record's file name gives (u00000042.json -> 42), -1 if none."""
    try:
        return int(entry.name[1:-len(".json")])
    except ValueError:
        return -1


def _load_record(entry: Path) -> tuple[dict[str, Any] | None, str]:
    """(record, "") or (None, why it is damaged)."""
    try:
        rec = json.loads(entry.read_text())
    except json.JSONDecodeError as err:
        return None, f"is not valid JSON ({err.msg} at byte {err.pos})"
    except (OSError, UnicodeDecodeError) as err:
        return None, f"cannot be read ({err})"
    unit = _unit_of(entry)
    if not isinstance(rec, dict) or rec.get("unit") != unit or unit < 0:
        got = rec.get("unit") if isinstance(rec, dict) else type(rec).__name__
        return None, f"is not the commit record of unit {unit} (its unit: {got!r})"
    files = rec.get("files", {})
    if not isinstance(files, dict) or not all(
            isinstance(f, dict) and isinstance(f.get("bytes"), int) for f in files.values()):
        return None, 'has a malformed "files" entry'
    return rec, ""


def scan_commits(root: Path) -> tuple[dict[int, dict[str, Any]], list[Damage]]:
    """unit -> record for every sound commit record, and a Damage for each damaged one."""
    folder = root / COMMITS_DIR
    records: dict[int, dict[str, Any]] = {}
    damaged: list[Damage] = []
    if not folder.is_dir():
        return records, damaged
    for entry in sorted(folder.glob("u*.json")):
        rec, problem = _load_record(entry)
        if rec is None:
            damaged.append(Damage(_unit_of(entry), entry, problem))
        else:
            records[int(rec["unit"])] = rec
    return records, damaged


def read_commits(root: Path) -> dict[int, dict[str, Any]]:
    """unit -> its commit record, for every committed unit; StoreDamagedError if one is damaged."""
    records, damaged = scan_commits(root)
    if damaged:
        raise damaged[0].error(root)
    return records


def read_commit(root: Path, unit: int) -> dict[str, Any] | None:
    """One unit's commit record (None: not committed); StoreDamagedError if it is damaged."""
    entry = record_path(root, unit)
    if not entry.is_file():
        return None
    rec, problem = _load_record(entry)
    if rec is None:
        raise Damage(unit, entry, problem).error(root)
    return rec


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
