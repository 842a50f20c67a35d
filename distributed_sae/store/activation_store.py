"""The zarr activation store: one zarr v3 group per store, written unit by unit.

Layout under `path/`:
    zarr.json                  group attributes = the store's metadata (model, hooks, corpus, ...)
    acts/<hook>                (rows, d) activations, one array per hook point
    token_ids                  (rows,) int32, the token behind each row
    _commits/u<unit>.json      one record per committed work unit (see commits.py), with the
                               size and crc32c of each of its shard files (see integrity.py)

While a harvest job writes, `.<name>.lock` beside the store holds its pid (see commits.py).

Row r belongs to context r // context_size at position r % context_size: contexts are stored in
corpus order, so the (context, position) of a row needs no array of its own.

Sharding: a shard holds exactly one work unit's rows, so every shard has one writer. Two writers
in one shard silently lose chunks (measured with zarr 3.1.6: 8 of 256 chunks lost), and one writer
filling a shard chunk by chunk rewrites the shard each time (0.08 GB/s against 0.5-0.76 GB/s for
whole shards), so an actor writes its unit in one call per array.

Integrity: read() and tokens() first check that the shard files of the units they read exist
with their recorded sizes (one stat per file, once per unit); verify() compares checksums, and
uncommit() makes the next harvest re-harvest what it found damaged (integrity.py).

bfloat16: zarr 3.1 has no bfloat16 dtype, so the bits are stored as uint16 (`storage_dtype`) and
`metadata["dtype"]` says bfloat16; reading reinterprets them, which is exact.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import zarr
import zarr.codecs as zc

from distributed_sae.store.commits import (
    COMMITS_DIR, read_commit, read_commits, record_path, scan_commits, uncommit,
)
from distributed_sae.faults import fault_point
from distributed_sae.store.integrity import Damage, check_contents, fingerprint, size_problem
from distributed_sae.store.stream_files import consumed_error, consumed_units, mark_consumed

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_STORAGE = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}


def _compressor(name: str) -> Any:
    if name == "zstd":
        return zc.ZstdCodec(level=3)
    if name == "blosc":
        return zc.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
    return None


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """(rows, d) tensor -> numpy array in the store's on-disk dtype (bf16 as uint16 bits)."""
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return x.to(getattr(torch, dtype)).numpy()


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of to_storage; returns float32 (rows, d)."""
    if dtype == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.ascontiguousarray(a)).float()


class ActivationStore:
    """Read (and, for harvest actors, write) access to one store directory."""

    def __init__(self, path: str | Path, group: zarr.Group) -> None:
        self.path = Path(path)
        self._group = group
        self.metadata: dict[str, Any] = dict(group.attrs)
        self._commits: dict[int, dict[str, Any]] | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self._records: dict[int, dict[str, Any]] = {}  # records read one by one (_record)
        self._sized: set[tuple[str, int]] = set()  # (array, unit) whose file sizes were checked

    # ---- creation and opening -------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, *, hook_dims: dict[str, int], n_units: int,
               unit_rows: int, chunk_rows: int, dtype: str, compression: str,
               metadata: dict[str, Any]) -> "ActivationStore":
        """Create an empty store sized for `n_units` units of `unit_rows` rows each."""
        if unit_rows % chunk_rows:
            raise ValueError(f"chunk_rows={chunk_rows} must divide unit_rows={unit_rows}")
        rows = n_units * unit_rows
        group = zarr.open_group(str(path), mode="w")
        for hook, d in hook_dims.items():
            group.create_array(
                f"acts/{hook}", shape=(rows, d), chunks=(chunk_rows, d), shards=(unit_rows, d),
                dtype=_STORAGE[dtype], compressors=_compressor(compression), fill_value=0)
        group.create_array("token_ids", shape=(rows,), chunks=(chunk_rows,), shards=(unit_rows,),
                           dtype="int32", compressors=None, fill_value=-1)
        attrs = dict(metadata, format_version=FORMAT_VERSION, hooks=list(hook_dims),
                     d=dict(hook_dims), dtype=dtype, storage_dtype=_STORAGE[dtype],
                     compression=compression, n_units=n_units, unit_rows=unit_rows,
                     chunk_rows=chunk_rows, total_rows=rows)
        group.attrs.update(attrs)
        return cls(path, zarr.open_group(str(path), mode="r+"))

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> "ActivationStore":
        """Open an existing store; mode 'r' to read, 'r+' for a harvest actor writing units."""
        if not (Path(path) / "zarr.json").is_file():
            raise FileNotFoundError(
                f"no activation store at {path}: run dsae-harvest with store.path={path} first")
        group = zarr.open_group(str(path), mode=mode)
        if group.attrs.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path} is not an activation store of format {FORMAT_VERSION}")
        return cls(path, group)

    def handle(self) -> "ActivationStore":
        """Another read-only handle on this store, for another thread: it starts with the commit
        records loaded so far (re-reading ~30k records of a 1B-token store takes seconds)."""
        other = ActivationStore(self.path, zarr.open_group(str(self.path), mode="r"))
        other._commits = None if self._commits is None else dict(self._commits)
        return other

    # ---- geometry ------------------------------------------------------------------------
    @property
    def hook_points(self) -> list[str]:
        return list(self.metadata["hooks"])

    def d(self, hook: str) -> int:
        self._check_hook(hook)
        return int(self.metadata["d"][hook])

    @property
    def unit_rows(self) -> int:
        return int(self.metadata["unit_rows"])

    @property
    def chunk_rows(self) -> int:
        return int(self.metadata["chunk_rows"])

    @property
    def context_size(self) -> int:
        return int(self.metadata["context_size"])

    def _check_hook(self, hook: str) -> None:
        if hook not in self.metadata["hooks"]:
            raise KeyError(f"hook {hook!r} is not in store {self.path}: it has {self.hook_points}")

    # ---- commits -------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read the commit records (a harvest job may have committed more units) and check
        file sizes again on the next reads."""
        self._commits = None
        self._records.clear()
        self._sized.clear()

    def recheck(self) -> None:
        """Check file sizes again on the next reads (a file may go while a reader runs)."""
        self._sized.clear()

    @property
    def commits(self) -> dict[int, dict[str, Any]]:
        if self._commits is None:
            self._commits = read_commits(self.path)
        return self._commits

    @property
    def committed_units(self) -> list[int]:
        return sorted(self.commits)

    @property
    def is_complete(self) -> bool:
        return len(self.commits) == int(self.metadata["n_units"])

    @property
    def n_tokens(self) -> int:
        """Rows of committed units (all rows once the store is complete)."""
        return len(self.commits) * self.unit_rows

    def stats(self, hook: str, units: Iterable[int] | None = None) -> dict[str, Any]:
        """Running statistics over committed, non-excluded rows (of `units` only, when given):
        mean (d,), mean_sq_norm, count. From the commit records, which outlive a consumed unit."""
        self._check_hook(hook)
        total = np.zeros(self.d(hook), dtype=np.float64)
        sq, count = 0.0, 0
        records = self.commits if units is None else {u: self.commits[u] for u in units}
        for rec in records.values():
            s = rec["stats"][hook]
            total += np.asarray(s["sum"], dtype=np.float64)
            sq += float(s["sum_sq_norm"])
            count += int(s["count"])
        if count == 0:
            raise ValueError(f"store {self.path} has no committed rows for {hook}")
        return {"mean": total / count, "mean_sq_norm": sq / count, "count": count}

    # ---- reading and writing -------------------------------------------------------------
    @property
    def arrays(self) -> list[str]:
        """The store's array names: acts/<hook> for every hook, then token_ids."""
        return [f"acts/{h}" for h in self.hook_points] + ["token_ids"]

    def array(self, name: str) -> zarr.Array:
        """The zarr array `name` (one of `arrays`), opened once per handle."""
        if name not in self._arrays:
            self._arrays[name] = self._group[name]
        return self._arrays[name]

    def read(self, hook: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of `hook` as float32 (stop - start, d)."""
        self._check_hook(hook)
        name = f"acts/{hook}"
        self.check_units(name, self.units_of(start, stop))
        return from_storage(self.array(name)[start:stop], self.metadata["dtype"])

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Token ids of rows [start, stop), int32 (stop - start,)."""
        self.check_units("token_ids", self.units_of(start, stop))
        return self.array("token_ids")[start:stop]

    def write_unit(self, unit: int, acts: dict[str, torch.Tensor], token_ids: np.ndarray
                   ) -> dict[str, dict[str, int]]:
        """Write one unit's rows: acts[hook] is (unit_rows, d). Commit is the caller's next step,
        with the returned size and crc32c of each shard file written (the record's "files").

        The files are read back for their checksums while they are in the page cache: 0.5-0.9 ms
        for a 4096-row float16 unit at d 576 (4.7 MB; 2-core build machine), next to ~5.7 s of
        forward passes for it."""
        lo, hi = unit * self.unit_rows, (unit + 1) * self.unit_rows
        for hook, x in acts.items():
            self.array(f"acts/{hook}")[lo:hi] = to_storage(x, self.metadata["dtype"])
        fault_point("store_write")  # the activations written, not the tokens: a torn unit
        self.array("token_ids")[lo:hi] = token_ids.astype(np.int32)
        names = [f"acts/{hook}" for hook in acts] + ["token_ids"]
        return {name: fingerprint(path) for name, path in self.unit_files(unit, names).items()}

    # ---- integrity -----------------------------------------------------------------------
    def units_of(self, start: int, stop: int) -> range:
        """The units that hold rows [start, stop)."""
        return range(start // self.unit_rows, -(-stop // self.unit_rows))

    def unit_files(self, unit: int, names: Iterable[str] | None = None) -> dict[str, Path]:
        """array name -> the shard file that holds `unit`'s rows of it, for the arrays `names`
        (None: every array)."""
        return {name: Path(self._file(name, unit)) for name in (
            self.arrays if names is None else names)}

    def _file(self, name: str, unit: int) -> str:
        # A str: a Path join costs ~3 us, as much as the stat it is made for.
        arr = self.array(name)
        key = arr.metadata.encode_chunk_key((unit,) + (0,) * (arr.ndim - 1))
        return f"{self.path}/{name}/{key}"

    def check_units(self, name: str, units: Iterable[int]) -> None:
        """StoreDamagedError unless array `name`'s shard file of each committed unit among
        `units` exists with its recorded size. One stat per file, cached per unit until
        recheck() or refresh(); uncommitted units and records without sizes are not checked."""
        for unit in units:
            if (name, unit) in self._sized:
                continue
            rec = self._record(unit)
            if rec is None:
                continue  # uncommitted: the reader's commit checks refuse or wait for it
            entry = rec.get("files", {}).get(name)
            if entry is not None:
                path = self._file(name, unit)
                problem = size_problem(path, entry)
                if problem and unit in consumed_units(self.path):  # listed on failure only
                    raise consumed_error(self.path, unit)
                if problem:
                    raise Damage(unit, Path(path), problem).error(self.path)
            self._sized.add((name, unit))

    def _record(self, unit: int) -> dict[str, Any] | None:
        """unit's commit record: from the loaded records, else its own file (a reader following
        a harvest sees new units without re-reading every record)."""
        rec = self._commits.get(unit) if self._commits is not None else None
        if rec is None and (rec := self._records.get(unit)) is None:
            rec = read_commit(self.path, unit)
            if rec is not None:  # None is not kept: the unit may be committed later
                self._records[unit] = rec
        return rec

    def verify(self, units: Iterable[int] | None = None) -> list[Damage]:
        """Every damaged file of the committed units (all, or those in `units`): shard files
        missing, of another size or another crc32c than their commit records say, and commit
        records that cannot be read. Empty: all sound.

        It reads every byte of those files: cost measured in integrity.py. Records without
        checksums (stores written before they were recorded) are checked by size where they
        hold one, and not at all where they hold neither.
        """
        records, damaged = scan_commits(self.path)
        gone = consumed_units(self.path)  # deleted on purpose by a bounded streamed run
        records = {u: r for u, r in records.items() if u not in gone}
        want = None if units is None else set(units)
        arrays = set(self.arrays)
        checks = []  # (unit, shard file, its record entry)
        for unit, rec in sorted(records.items()):
            if want is None or unit in want:
                recorded = {k: v for k, v in rec.get("files", {}).items() if k in arrays}
                checks += [(unit, path, recorded[name])
                           for name, path in self.unit_files(unit, recorded).items()]
        return [d for d in damaged if want is None or d.unit in want] + check_contents(checks)

    def delete_units(self, units: Iterable[int]) -> list[int]:
        """Delete consumed units' rows (a bounded streamed run, stream_files.py): mark them,
        then unlink their shard files; their commit records stay. Idempotent (a crash between
        the two steps is finished by the next call). Returns the units."""
        units = sorted(set(units))
        mark_consumed(self.path, units)
        for unit in units:
            for path in self.unit_files(unit).values():
                path.unlink(missing_ok=True)
        return units

    def uncommit(self, damage: Iterable[Damage]) -> list[int]:
        """Un-commit the damaged units so that the next harvest writes them again: remove their
        commit records (atomically), then their shard files (all arrays: the rewrite of a shard
        of fill values writes no file, so a stale one must not stay). Returns the units."""
        units: set[int] = set()
        for d in damage:
            if d.file.parent == self.path / COMMITS_DIR:
                uncommit(d.file)  # a damaged record, perhaps under a name that gives no unit
            if d.unit >= 0:
                uncommit(record_path(self.path, d.unit))
                units.add(d.unit)
        for unit in units:
            for path in self.unit_files(unit).values():
                path.unlink(missing_ok=True)
        self.refresh()
        return sorted(units)
