"""The reader's producer side: read a buffer of chunks, shuffle its rows, cut it into batches.

A buffer is `buffer_chunks` whole chunks. Its rows (minus excluded tokens) are permuted with a
generator seeded by (seed, epoch, buffer index), so any buffer can be rebuilt alone: resuming
skips whole buffers without reading them. The epoch is the concatenation of the shuffled buffers
cut into consecutive batches; a batch that straddles two buffers takes the tail of one and the
head of the next, so no row is dropped or repeated and nothing but the cut position carries over.

The producer hands over a buffer as blocks already cut at batch boundaries, each its own float32
tensor of at most `batch_size` rows. Measured on the 2-core build machine: allocating and filling
one 16384 x 576 float32 buffer (38 MB) takes 18-25 ms, mostly page faults, since glibc maps every
allocation above 32 MB afresh; four 4096-row blocks (9 MB each) take ~1 ms, as malloc recycles them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import google_crc32c
import numpy as np
import torch
import zarr
from zarr.core.buffer.cpu import NDBuffer

from distributed_sae.store.activation_store import ActivationStore

log = logging.getLogger(__name__)

_MISSING = 2 ** 64 - 1  # shard index entry of a chunk that was never written


class ShardFiles:
    """Reads rows of an uncompressed zarr v3 sharded array straight from its files.

    Measured on the 2-core build machine (1024 x 576 float16 chunks): zarr 3.1.6 spends ~1 ms of
    Python per chunk read (1.0-1.4 GB/s), a pread of the same bytes ~0.12-0.16 ms (7-10 GB/s).
    The layout is the zarr v3 sharding spec: a shard file holds raw inner chunks and ends with an
    index of (offset, nbytes) uint64 pairs and its crc32c (checked, as zarr does). `open` returns
    None for any other layout (compression, big-endian, ...) and the caller keeps using zarr.
    """

    def __init__(self, root: Path, meta: dict, shard_rows: int, chunk_rows: int) -> None:
        self.root, self.shard_rows, self.chunk_rows = root, shard_rows, chunk_rows
        self.dtype = np.dtype(meta["data_type"])
        self.row_shape = tuple(meta["shape"][1:])
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.row_shape, dtype=np.int64))
        self.n_inner = shard_rows // chunk_rows
        self.fill = meta.get("fill_value", 0)
        self.crc = len(meta["codecs"][0]["configuration"]["index_codecs"]) == 2
        self.index_bytes = 16 * self.n_inner + 4 * self.crc

    @classmethod
    def open(cls, root: Path) -> "ShardFiles | None":
        try:
            meta = json.loads((root / "zarr.json").read_text())
            (shard_cfg,) = meta["codecs"]
            cfg = shard_cfg["configuration"]
            little = [{"name": "bytes", "configuration": {"endian": "little"}}]
            plain = (shard_cfg["name"] == "sharding_indexed" and cfg["codecs"] == little
                     and cfg.get("index_location", "end") == "end"
                     and cfg["index_codecs"] in (little, little + [{"name": "crc32c"}])
                     and meta["chunk_key_encoding"] == {"name": "default",
                                                        "configuration": {"separator": "/"}}
                     and meta["chunk_grid"]["name"] == "regular"
                     and not meta.get("storage_transformers") and sys.byteorder == "little")
            shard = meta["chunk_grid"]["configuration"]["chunk_shape"]
            inner = cfg["chunk_shape"]
            whole_rows = shard[1:] == inner[1:] == meta["shape"][1:] and shard[0] % inner[0] == 0
            if plain and whole_rows:
                return cls(root, meta, int(shard[0]), int(inner[0]))
        except (OSError, KeyError, TypeError, ValueError):
            pass
        return None

    def read(self, start: int, stop: int, out: np.ndarray) -> None:
        """Rows [start, stop) into out (stop - start, *row_shape), C-contiguous."""
        if not out.flags.c_contiguous or out.dtype != self.dtype:
            raise ValueError("ShardFiles.read needs a C-contiguous array of the array's dtype")
        view = memoryview(out.reshape(-1).view(np.uint8))
        row = start
        while row < stop:
            shard = row // self.shard_rows
            end = min(stop, (shard + 1) * self.shard_rows)
            key = "/".join(["c", str(shard)] + ["0"] * len(self.row_shape))
            try:
                fd = os.open(self.root / key, os.O_RDONLY)
            except FileNotFoundError:  # a shard of fill values only is not written
                out[row - start:end - start] = self.fill
                row = end
                continue
            try:
                index = self._index(fd, self.root / key)
                while row < end:
                    inner, in_chunk = divmod(row - shard * self.shard_rows, self.chunk_rows)
                    stop_c = min(end, row - in_chunk + self.chunk_rows)
                    offset = int(index[inner, 0])
                    lo, hi = (row - start) * self.row_bytes, (stop_c - start) * self.row_bytes
                    if offset == _MISSING:
                        out[row - start:stop_c - start] = self.fill
                    else:
                        _pread_into(fd, view[lo:hi], offset + in_chunk * self.row_bytes)
                    row = stop_c
            finally:
                os.close(fd)

    def _index(self, fd: int, path: Path) -> np.ndarray:
        """The shard's (n_inner, 2) uint64 (offset, nbytes) index, checked against the file."""
        size = os.fstat(fd).st_size
        raw = os.pread(fd, self.index_bytes, max(0, size - self.index_bytes))
        ok = len(raw) == self.index_bytes and (
            not self.crc or google_crc32c.value(raw[:-4]) == int.from_bytes(raw[-4:], "little"))
        index = np.zeros((self.n_inner, 2), dtype=np.uint64)
        if ok:
            index = np.frombuffer(raw[:16 * self.n_inner], dtype="<u8").reshape(self.n_inner, 2)
            written = index[:, 0] != _MISSING
            ok = bool(np.all(index[written, 1] == self.chunk_rows * self.row_bytes)) and bool(
                np.all(index[written, 0] + index[written, 1] <= size - self.index_bytes))
        if not ok:
            raise ValueError(f"shard {path} has a corrupt index: re-harvest its unit")
        return index


def _pread_into(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        n = os.preadv(fd, [buf], offset)
        if n <= 0:
            raise OSError(f"short read at byte {offset} of a shard file")
        buf, offset = buf[n:], offset + n


def _read_spans(files: ShardFiles | None, array: zarr.Array, spans: Sequence[tuple[int, int]],
                out: np.ndarray) -> None:
    pos = 0
    for start, stop in spans:
        part = out[pos:pos + stop - start]
        if files is not None:
            files.read(start, stop, part)
        else:
            array.get_basic_selection(slice(start, stop), out=NDBuffer.from_numpy_array(part))
        pos += stop - start


class RowSource:
    """Reads rows of one hook (in the storage dtype) and their token ids into caller arrays.

    It reads the arrays itself rather than calling ActivationStore.read, which returns a fresh
    float32 tensor per call: reading into one reused storage-dtype array and converting once per
    block halves the bytes touched and avoids an allocation per chunk. Uncompressed stores are
    read from the shard files directly (ShardFiles), others through zarr.
    """

    def __init__(self, store: ActivationStore, hook: str) -> None:
        group = zarr.open_group(str(store.path), mode="r")
        self.d = store.d(hook)
        self.dtype = str(store.metadata["dtype"])
        self._acts = group[f"acts/{hook}"]
        self._tokens = group["token_ids"]
        self._acts_files = ShardFiles.open(Path(store.path) / "acts" / hook)
        self._token_files = ShardFiles.open(Path(store.path) / "token_ids")

    def read(self, spans: Sequence[tuple[int, int]], out: np.ndarray) -> None:
        """Rows of every [start, stop) span, one after another, into out (rows, d)."""
        _read_spans(self._acts_files, self._acts, spans, out)

    def tokens(self, spans: Sequence[tuple[int, int]]) -> np.ndarray:
        """Token ids of every span, concatenated: (rows,) int32."""
        out = np.empty(sum(e - s for s, e in spans), dtype=np.int32)
        _read_spans(self._token_files, self._tokens, spans, out)
        return out

    def empty(self, rows: int) -> np.ndarray:
        """An uninitialised (rows, d) array in the storage dtype."""
        return np.empty((rows, self.d), dtype=self._acts.dtype)

    def as_torch(self, raw: np.ndarray) -> torch.Tensor:
        """A torch view of storage rows (bfloat16 is kept as uint16 bits on disk)."""
        if self.dtype == "bfloat16":
            return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(raw)


@dataclass(frozen=True)
class BufferSpec:
    """Everything that decides a buffer's batches, besides the chunks it holds."""

    chunk_rows: int
    stop_row: int  # the reader's rows.stop: the last chunk may be short
    batch_size: int
    seed: int
    epoch: int
    shuffle: bool
    scale: float
    exclude: np.ndarray  # (n,) token ids whose rows are dropped


@dataclass
class Filled:
    """One buffer, shuffled and cut: blocks[i] = (row offset after it, (<= batch, d) float32)."""

    index: int
    rows: int
    blocks: list[tuple[int, torch.Tensor]]


def spans_of(starts: Sequence[int], spec: BufferSpec) -> list[tuple[int, int]]:
    """[start, stop) row spans of chunks in reading order, merging chunks that follow each other."""
    spans: list[tuple[int, int]] = []
    for s in map(int, starts):
        e = min(s + spec.chunk_rows, spec.stop_row)
        if spans and spans[-1][1] == s:
            spans[-1] = (spans[-1][0], e)
        else:
            spans.append((s, e))
    return spans


def row_order(keep: np.ndarray | None, rows: int, spec: BufferSpec, index: int
              ) -> np.ndarray | None:
    """Buffer positions in batch order: (kept rows,) int64, or None for 'all rows, in order'."""
    order = np.flatnonzero(keep) if keep is not None else None
    if not spec.shuffle:
        return order
    n = len(order) if order is not None else rows
    # Tag 1 keeps these streams apart from the reader's chunk-window orders (tag 2).
    perm = np.random.default_rng([spec.seed, spec.epoch, 1, index]).permutation(n)
    return order[perm] if order is not None else perm


@dataclass
class Loaded:
    """One buffer's rows as read, before shuffling and casting."""

    index: int
    raw: np.ndarray  # (rows, d) storage dtype: one of the filler's reused slots
    order: np.ndarray | None  # (kept rows,) int64 buffer positions in batch order; None: all


class BufferFiller:
    """Reads buffers (load) and turns them into batch blocks (cut); owns the reused arrays.

    load and cut may run in two threads (produce): three raw slots cover the buffer being read,
    the one queued between the threads and the one being cut.
    """

    SLOTS = 3

    def __init__(self, source: RowSource, spec: BufferSpec) -> None:
        self.source, self.spec = source, spec
        self._raws: list[np.ndarray | None] = [None] * self.SLOTS  # (rows, d) storage dtype
        self._tmp: torch.Tensor | None = None  # (batch, d) storage dtype, gather target

    def load(self, index: int, starts: Sequence[int]) -> Loaded:
        """Read the chunks of buffer `index` and draw its row order."""
        spans = spans_of(starts, self.spec)
        rows = sum(e - s for s, e in spans)
        slot = index % self.SLOTS
        if self._raws[slot] is None or len(self._raws[slot]) < rows:
            self._raws[slot] = self.source.empty(rows)
        raw = self._raws[slot][:rows]
        self.source.read(spans, raw)
        keep = None
        if len(self.spec.exclude):
            keep = ~np.isin(self.source.tokens(spans), self.spec.exclude)
        return Loaded(index, raw, row_order(keep, rows, self.spec, index))

    def cut(self, loaded: Loaded, skip: int, filled_rows: int) -> Filled:
        """Shuffle, cast and cut one buffer into blocks.

        skip: rows of this buffer's order already consumed (a resumed position); filled_rows:
        rows already in the pending batch, which this buffer's first block completes.
        """
        spec, raw, order = self.spec, loaded.raw, loaded.order
        n = len(raw) if order is None else len(order)
        first = spec.batch_size - filled_rows if filled_rows else spec.batch_size
        edges = [skip, *range(skip + first, n, spec.batch_size), n] if skip < n else [n]
        blocks = [(b, self._convert(raw, order, a, b)) for a, b in zip(edges, edges[1:])]
        return Filled(loaded.index, n, blocks)

    def _convert(self, raw: np.ndarray, order: np.ndarray | None, a: int, b: int) -> torch.Tensor:
        """Rows a..b of the buffer's order as scaled float32 (b - a, d): one gather, one cast.

        The gather runs in the storage dtype (half the bytes of float32) on the buffer, which at
        16 x 1024 x 576 float16 = 19 MB stays in the 32 MB L3 of the build machine. torch's
        multi-threaded ops beat one-thread ones here even against a 2-thread matmul hogging both
        cores (1.7 against 1.3 GB/s; idle: 2.7 against 1.7 GB/s; 2-core build machine).
        """
        raw_t = self.source.as_torch(raw)  # (rows, d) storage dtype, no copy
        out = torch.empty(b - a, raw.shape[1], dtype=torch.float32)  # (b - a, d)
        if order is None:
            out.copy_(raw_t[a:b])
        elif raw_t.dtype == torch.float32:
            torch.index_select(raw_t, 0, torch.from_numpy(order[a:b]), out=out)
        else:
            if self._tmp is None or len(self._tmp) < b - a:
                self._tmp = torch.empty(self.spec.batch_size, raw.shape[1], dtype=raw_t.dtype)
            tmp = self._tmp[:b - a]  # (b - a, d) storage dtype
            torch.index_select(raw_t, 0, torch.from_numpy(order[a:b]), out=tmp)
            out.copy_(tmp)
        if self.spec.scale != 1.0:
            out.mul_(self.spec.scale)
        return out


class UnitWaiter:
    """Follow mode: blocks until the units under some chunks are committed.

    It polls the commit records through its own store handle, so the caller's store is never
    refreshed from a producer thread.
    """

    def __init__(self, store: ActivationStore, stop_row: int, timeout: float | None,
                 poll: float) -> None:
        self.store, self.stop_row, self.timeout, self.poll = store, stop_row, timeout, poll
        self._watch: ActivationStore | None = None
        self._committed: set[int] = set()

    def __call__(self, starts: Sequence[int], halt: threading.Event) -> bool:
        """Wait for the units of chunks `starts`; False if `halt` was set meanwhile."""
        u, c = self.store.unit_rows, self.store.chunk_rows
        need = {k for s in map(int, starts)
                for k in range(s // u, (min(s + c, self.stop_row) - 1) // u + 1)}
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        logged = False
        while need - self._committed:
            if self._watch is None:
                self._watch = ActivationStore.open(self.store.path)
            self._watch.refresh()
            self._committed = set(self._watch.committed_units)
            missing = sorted(need - self._committed)
            if not missing:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"units {missing[:5]} of {self.store.path} were not committed within "
                    f"follow_timeout={self.timeout} s: is the harvest job still running?")
            if not logged:
                log.info("waiting for unit(s) %s of %s (%d of %s units committed)", missing[:5],
                         self.store.path, len(self._committed), self.store.metadata["n_units"])
                logged = True
            if halt.wait(self.poll):
                return False
        return True


def loads(filler: BufferFiller, buffers: Sequence[Sequence[int]], first: int,
          ready: Callable[[Sequence[int], threading.Event], bool] | None, halt: threading.Event
          ) -> Iterator[Loaded]:
    """Read buffers first, first + 1, ... of an epoch.

    `ready(starts, halt)` blocks until the chunks may be read (follow mode) and returns False if
    `halt` was set meanwhile, which ends the stream.
    """
    for index in range(first, len(buffers)):
        if halt.is_set() or (ready is not None and not ready(buffers[index], halt)):
            return
        yield filler.load(index, buffers[index])


def cuts(filler: BufferFiller, loaded: Iterable[Loaded], first: int, skip: int
         ) -> Iterator[Filled]:
    """Shuffle and cut read buffers, the first of them (index `first`) from row `skip` on."""
    filled = 0  # rows in the batch being assembled when the next buffer starts
    for buf in loaded:
        start = skip if buf.index == first else 0
        out = filler.cut(buf, start, filled)
        filled = (filled + max(0, out.rows - start)) % filler.spec.batch_size
        yield out
