"""What a commit record holds to verify its unit later, and the checks that use it.

A unit owns exactly one shard file of every store array: `acts/<hook>/c/<unit>/0` and
`token_ids/c/<unit>`. When a unit is written its record gets, per array, the file's size and
crc32c (`files: {"acts/<hook>": {"bytes": n, "crc32c": c}, "token_ids": {...}}`; bytes 0: no file,
which is how zarr stores a shard of fill values only). Without these, a deleted shard file reads
as fill values (zeros for activations) through zarr and through ShardFiles alike, and training
silently learns from zeros.

Two levels, because a checksum costs a read of every byte:
- before rows are read (ActivationStore.read/tokens, the reader's RowSource), each shard file of
  the units read exists with its recorded size: one stat per file, once per unit (per epoch for
  the reader). This catches deleted and truncated files.
- ActivationStore.verify() reads every byte and compares crc32c checksums (a flipped byte).
  google_crc32c is zarr's own dependency: 13.5 GB/s on the 2-core build machine, against 5.2 GB/s
  for zlib.crc32 (xxhash, 26.6 GB/s, is only installed as wandb's dependency).

Measured on the 2-core build machine (load average 4-7 from other jobs), a 1.21 GB store of 256
units of 4096 rows, d 576, float16: verify() 0.18-0.49 s from the page cache (2.5-6.7 GB/s), 1.3-2.2
s with the files evicted (0.56-0.96 GB/s: the disk's rate); at that rate a 1e9-token store of
the same shape (1.15 TB) takes 20-35 minutes, which every harvest run on an existing store pays.
The read-time size checks: 5 us per unit per epoch (a stat), 15 us per 16-chunk buffer once
cached (0.2% of that buffer's ~8 ms read); reader epochs with and without them: 1.66 and 1.71 GB
per CPU-second (medians of 10, spread 1.5-1.9).

Older records: an entry with "bytes" but no "crc32c" is checked by size, by verify() too; a record
without "files" (a store written before they were recorded) cannot be checked at all, and reads as
before (a missing file of such a unit still reads as fill values).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c

# Bytes per read while checksumming. google_crc32c takes only immutable bytes, so each block is
# a fresh copy; at 1 MB it stays in cache: 12.9 GB/s from the page cache on the 2-core build
# machine, against 9.1 GB/s with 8 MB blocks.
_BLOCK = 1 << 20


class StoreDamagedError(ValueError):
    """A store's files or commit records do not match what was committed."""


def repair_hint(root: Path) -> str:
    """The command that repairs a damaged store (harvest re-verifies and re-harvests)."""
    return (f"run dsae-harvest store.path={root} (with the settings that made the store) to "
            f"re-harvest the damaged unit(s)")


@dataclass(frozen=True)
class Damage:
    """One damaged file: a unit's shard file, or a commit record (unit -1: its name has none)."""

    unit: int
    file: Path
    problem: str  # completes "<file> ...", e.g. "is missing (its commit record says 4 bytes)"

    def __str__(self) -> str:
        return f"unit {self.unit}: {self.file} {self.problem}"

    def error(self, root: Path) -> StoreDamagedError:
        """The one-line error that names the store, the unit, the file and the fix."""
        return StoreDamagedError(f"store {root} is damaged: {self}: {repair_hint(root)}")


def file_crc32c(path: Path) -> int:
    """crc32c of a whole file, read in 1 MB blocks."""
    crc = 0
    with open(path, "rb", buffering=0) as fh:
        while block := fh.read(_BLOCK):
            crc = google_crc32c.extend(crc, block)
    return crc


def fingerprint(path: Path) -> dict[str, int]:
    """What a commit record keeps of one shard file: its size and crc32c (0, 0: no file)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return {"bytes": 0, "crc32c": 0}
    return {"bytes": size, "crc32c": file_crc32c(path)}


def size_problem(path: str | Path, entry: dict[str, Any]) -> str | None:
    """Why `path` does not have the size its record entry says (one stat), or None."""
    want = int(entry["bytes"])
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return None if want == 0 else f"is missing (its commit record says {want} bytes)"
    if size != want:
        return f"has {size} bytes where its commit record says {want}"
    return None


def content_problem(path: Path, entry: dict[str, Any]) -> str | None:
    """Why `path` does not match its record entry: size, then crc32c where one was recorded."""
    problem = size_problem(path, entry)
    if problem or "crc32c" not in entry or not int(entry["bytes"]):
        return problem
    try:
        crc = file_crc32c(path)
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    want = int(entry["crc32c"])
    if crc != want:
        return f"has crc32c {crc:#010x} where its commit record says {want:#010x}"
    return None


def check_contents(checks: list[tuple[int, Path, dict[str, Any]]]) -> list[Damage]:
    """Damage found by content_problem in (unit, shard file, record entry) checks, in order.

    Hinting the next file to the kernel (posix_fadvise WILLNEED) while one is checksummed was
    tried: 0.4-1.6 GB/s against 0.6-1.0 GB/s without, evicted from the page cache, on the loaded
    2-core build machine; no clear gain, so it is not done.
    """
    damage = []
    for unit, path, entry in checks:
        problem = content_problem(path, entry)
        if problem:
            damage.append(Damage(unit, path, problem))
    return damage


def is_disk_full(err: BaseException | None) -> bool:
    """Whether `err` is the disk filling up (ENOSPC; EDQUOT, a quota, reads the same to a user)."""
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_message(err: OSError) -> str:
    """One line for a full disk: what was being written, and that a rerun resumes."""
    where = f" writing {err.filename}" if err.filename else ""
    return (f"disk full{where} ({os.strerror(err.errno)}): free space, or point store.path / "
            "out_dir at a larger disk and move what is there, then rerun the same command: "
            "committed units and complete checkpoints are kept and the job resumes from them")
