"""The files through which a streamed run's harvest and trainer talk: consumed units and the
harvest's failure.

    _consumed/u<unit>      a training unit that every member has trained on, past a checkpoint,
                           and whose shard files were then deleted (store.max_bytes > 0)
    _stream/failed.json    the harvest of a streamed run stopped with an error: a reader that
                           waits for units raises it instead of waiting forever

Only files, no sockets: harvest and trainer may be different processes (Ray Train workers, or a
dsae-harvest and a dsae-train on one store), even on different machines with a shared disk.

A consumed unit keeps its commit record (a restarted harvest must not harvest it again, and the
record's statistics still give the input norm); its marker is written and fsynced before the
shard files are unlinked, so a crash in between leaves a marked unit whose remaining files the
next delete_units removes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from distributed_sae.store.commits import fsync_path
from distributed_sae.store.integrity import StoreDamagedError

CONSUMED_DIR = "_consumed"
STREAM_DIR = "_stream"
FAILED = "failed.json"


class UnitConsumedError(StoreDamagedError):
    """Rows of a unit that a bounded streamed run deleted after training on it were asked for."""


class HarvestFailedError(RuntimeError):
    """The harvest that a streamed trainer follows has stopped with an error."""


def consumed_units(root: str | Path) -> set[int]:
    """The units marked consumed (one listdir)."""
    folder = Path(root) / CONSUMED_DIR
    if not folder.is_dir():
        return set()
    return {int(p.name[1:]) for p in folder.iterdir() if p.name[:1] == "u" and p.name[1:].isdigit()}


def mark_consumed(root: str | Path, units: Iterable[int]) -> None:
    """Write the markers of `units`, durably (one fsync of the folder for all of them)."""
    folder = Path(root) / CONSUMED_DIR
    folder.mkdir(exist_ok=True)
    for unit in units:
        (folder / f"u{unit:08d}").touch()
    fsync_path(folder)


def consumed_error(root: str | Path, unit: int) -> UnitConsumedError:
    return UnitConsumedError(
        f"unit {unit} of store {root} was deleted by a streamed run with store.max_bytes after "
        f"every member trained on it: its rows are gone. To train on this data again, harvest "
        f"into another store.path (stream with store.max_bytes=0 to keep a reusable cache)")


def _stream_file(root: str | Path, name: str) -> Path:
    return Path(root) / STREAM_DIR / name


def set_failed(root: str | Path, message: str) -> None:
    """Record that the harvest stopped, with its error."""
    path = _stream_file(root, FAILED)
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(f".{FAILED}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"error": message}))
    os.replace(tmp, path)


def clear_stream_state(root: str | Path) -> None:
    """A new streamed run starts: no failure recorded by an earlier one."""
    _stream_file(root, FAILED).unlink(missing_ok=True)


def check_harvest_alive(root: str | Path) -> None:
    """HarvestFailedError if the store's streamed harvest recorded a failure."""
    path = _stream_file(root, FAILED)
    if path.is_file():
        try:
            message = json.loads(path.read_text()).get("error", "?")
        except (OSError, ValueError):
            message = "(its failure record cannot be read)"
        raise HarvestFailedError(f"the harvest writing {root} stopped: {message}")
