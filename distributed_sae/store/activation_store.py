"""The zarr activation store: one zarr v3 group per store, written unit by unit.

Layout under `path/`:
    zarr.json                  group attributes = the store's metadata (model, hooks, corpus, ...)
    acts/<hook>                (rows, d) activations, one array per hook point
    token_ids                  (rows,) int32, the token behind each row
    _commits/u<unit>.json      one record per committed work unit (see commits.py)

While a harvest job writes, `.<name>.lock` beside the store holds its pid (see commits.py).

Row r belongs to context r // context_size at position r % context_size: contexts are stored in
corpus order, so the (context, position) of a row needs no array of its own.

Sharding: a shard holds exactly one work unit's rows, so every shard has one writer. Two writers
in one shard silently lose chunks (measured with zarr 3.1.6: 8 of 256 chunks lost), and one writer
filling a shard chunk by chunk rewrites the shard each time (0.08 GB/s against 0.5-0.76 GB/s for
whole shards), so an actor writes its unit in one call per array.

bfloat16: zarr 3.1 has no bfloat16 dtype, so the bits are stored as uint16 (`storage_dtype`) and
`metadata["dtype"]` says bfloat16; reading reinterprets them, which is exact.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
import zarr.codecs as zc

from distributed_sae.store.commits import read_commits

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
        """Re-read the commit records (a harvest job may have committed more units)."""
        self._commits = None

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

    def stats(self, hook: str) -> dict[str, Any]:
        """Running statistics over committed, non-excluded rows: mean (d,), mean_sq_norm, count."""
        self._check_hook(hook)
        total = np.zeros(self.d(hook), dtype=np.float64)
        sq, count = 0.0, 0
        for rec in self.commits.values():
            s = rec["stats"][hook]
            total += np.asarray(s["sum"], dtype=np.float64)
            sq += float(s["sum_sq_norm"])
            count += int(s["count"])
        if count == 0:
            raise ValueError(f"store {self.path} has no committed rows for {hook}")
        return {"mean": total / count, "mean_sq_norm": sq / count, "count": count}

    # ---- reading and writing -------------------------------------------------------------
    def read(self, hook: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of `hook` as float32 (stop - start, d)."""
        self._check_hook(hook)
        return from_storage(self._group[f"acts/{hook}"][start:stop], self.metadata["dtype"])

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Token ids of rows [start, stop), int32 (stop - start,)."""
        return self._group["token_ids"][start:stop]

    def write_unit(self, unit: int, acts: dict[str, torch.Tensor], token_ids: np.ndarray) -> None:
        """Write one unit's rows: acts[hook] is (unit_rows, d). Commit is the caller's next step."""
        lo, hi = unit * self.unit_rows, (unit + 1) * self.unit_rows
        for hook, x in acts.items():
            self._group[f"acts/{hook}"][lo:hi] = to_storage(x, self.metadata["dtype"])
        self._group["token_ids"][lo:hi] = token_ids.astype(np.int32)
