"""The reader's producer side: read a buffer of chunks, shuffle its rows, cut it into batches.

A buffer is `buffer_chunks` whole chunks. Its rows (minus excluded tokens) are permuted with a
generator seeded by (seed, epoch, buffer index), so any buffer can be rebuilt alone: resuming
skips whole buffers without reading them. The epoch is the concatenation of the shuffled buffers
cut into consecutive batches; a batch that straddles two buffers takes the tail of one and the
head of the next, so no row is dropped or repeated and nothing but the cut position carries over.

The producer hands over a buffer as blocks already cut at batch boundaries, each a float32 tensor
of at most `batch_size` rows from a BlockPool (reused once the consumer drops it: no page faults)
with the global store row index of each of its rows (the reader's ledger of rows yielded).
A block is gathered and cast tile by tile (TILE rows): np.take copies whole rows in the storage
dtype into a small reused array that stays in cache, and one torch copy casts it to float32.
Measured on the 2-core build machine (float16, d 576, one thread): torch.index_select then a cast
of whole 4096-row blocks 2.9 GB/s of float16 bytes; np.take tiles of 1024 rows + cast 5.2 GB/s.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import zarr
from zarr.core.buffer.cpu import NDBuffer

from distributed_sae.store.activation_store import ActivationStore
from distributed_sae.store.block_pool import BlockPool
from distributed_sae.store.shard_files import ShardFiles
from distributed_sae.store.stream_files import check_harvest_alive

__all__ = ["BlockPool", "BufferFiller", "BufferSpec", "Filled", "Loaded", "RowSource",
           "ShardFiles", "UnitWaiter", "cuts", "loads", "row_order", "span_rows", "spans_of"]

log = logging.getLogger(__name__)

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

    Before a unit's rows are first read, its shard file is checked against the size in its commit
    record (StoreDamagedError if missing or of another size: otherwise a deleted file reads as
    zeros). One stat per unit and array, again after recheck() (the reader calls it per epoch);
    a buffer's check costs one set of its units, nothing per chunk.
    """

    def __init__(self, store: ActivationStore, hook: str) -> None:
        # Its own handle: commit records are read in the producer thread, and the caller's
        # handle is never changed from there (as in UnitWaiter).
        self._own = store.handle()
        self.d = store.d(hook)
        self.dtype = str(store.metadata["dtype"])
        self._acts_name = f"acts/{hook}"
        self._acts = self._own.array(self._acts_name)
        self._tokens = self._own.array("token_ids")
        self._acts_files = ShardFiles.open(Path(store.path) / "acts" / hook)
        self._token_files = ShardFiles.open(Path(store.path) / "token_ids")

    def recheck(self) -> None:
        """Check file sizes again before the next reads (a file may go while training runs)."""
        self._own.recheck()

    def _check(self, name: str, spans: Sequence[tuple[int, int]]) -> None:
        units = {k for start, stop in spans for k in self._own.units_of(start, stop)}
        self._own.check_units(name, sorted(units))

    def read(self, spans: Sequence[tuple[int, int]], out: np.ndarray) -> None:
        """Rows of every [start, stop) span, one after another, into out (rows, d)."""
        self._check(self._acts_name, spans)
        _read_spans(self._acts_files, self._acts, spans, out)

    def advise(self, spans: Sequence[tuple[int, int]], with_tokens: bool) -> None:
        """Start reading these spans from the disk in the background (uncompressed stores; a
        hint that is dropped on any error: the reads that follow check everything)."""
        for files in (self._acts_files, self._token_files if with_tokens else None):
            if files is not None:
                try:
                    for start, stop in spans:
                        files.advise(start, stop)
                except (OSError, ValueError):
                    return

    def tokens(self, spans: Sequence[tuple[int, int]]) -> np.ndarray:
        """Token ids of every span, concatenated: (rows,) int32."""
        self._check("token_ids", spans)
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
    max_norm: float | None = None  # rows whose norm exceeds it are dropped (before scaling)


@dataclass
class Filled:
    """One buffer, shuffled and cut: blocks[i] = (row offset after it, (<= batch, d) float32,
    (<= batch,) int64 global store rows of the block's rows, in the tensor's order)."""

    index: int
    rows: int
    blocks: list[tuple[int, torch.Tensor, np.ndarray]]


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


def span_rows(spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Global store row of every buffer position: (rows,) int64, the spans one after another."""
    if not spans:
        return np.empty(0, dtype=np.int64)
    return np.concatenate([np.arange(s, e, dtype=np.int64) for s, e in spans])


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
    spans: list[tuple[int, int]]  # the [start, stop) store rows that raw holds, in order


class BufferFiller:
    """Reads buffers (load) and turns them into batch blocks (cut); owns the reused arrays.

    load and cut may run in two threads (produce): three raw slots cover the buffer being read,
    the one queued between the threads and the one being cut. Blocks come from `pool`.
    """

    SLOTS = 3
    TILE = 1024  # rows gathered per step: 1.2 MB of float16 at d 576, about one core's L2

    def __init__(self, source: RowSource, spec: BufferSpec, pool: BlockPool) -> None:
        self.source, self.spec, self.pool = source, spec, pool
        self._raws: list[np.ndarray | None] = [None] * self.SLOTS  # (rows, d) storage dtype
        self._tile = source.empty(self.TILE)  # (TILE, d) storage dtype, gather target
        self._tile_t = source.as_torch(self._tile)  # the same memory as a torch tensor

    def advise(self, starts: Sequence[int]) -> None:
        """Hint the kernel to read these chunks now (see ShardFiles.advise)."""
        self.source.advise(spans_of(starts, self.spec), with_tokens=len(self.spec.exclude) > 0)

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
        if self.spec.max_norm is not None:
            small = self._row_norms(raw) <= self.spec.max_norm
            keep = small if keep is None else keep & small
        return Loaded(index, raw, row_order(keep, rows, self.spec, index), spans)

    def _row_norms(self, raw: np.ndarray) -> np.ndarray:
        """(rows,) float32 norms of raw's rows, computed tile by tile in float32."""
        raw_t = self.source.as_torch(raw)  # (rows, d) storage dtype, no copy
        out = torch.empty(len(raw), dtype=torch.float32)
        for lo in range(0, len(raw), self.TILE):
            hi = lo + self.TILE
            torch.linalg.vector_norm(raw_t[lo:hi].float(), dim=1, out=out[lo:hi])
        return out.numpy()

    def cut(self, loaded: Loaded, skip: int, filled_rows: int) -> Filled:
        """Shuffle, cast and cut one buffer into blocks.

        skip: rows of this buffer's order already consumed (a resumed position); filled_rows:
        rows already in the pending batch, which this buffer's first block completes.
        """
        spec, raw, order = self.spec, loaded.raw, loaded.order
        n = len(raw) if order is None else len(order)
        first = spec.batch_size - filled_rows if filled_rows else spec.batch_size
        edges = [skip, *range(skip + first, n, spec.batch_size), n] if skip < n else [n]
        # One int64 per buffer row, built here (the producer), so the consumer only concatenates
        # a straddling batch's two parts: a slice per block unshuffled, a gather of it shuffled.
        ids = span_rows(loaded.spans)  # (rows,) int64
        blocks = [(b, self._convert(raw, order, a, b),
                   ids[a:b] if order is None else ids[order[a:b]])  # (b - a,) int64
                  for a, b in zip(edges, edges[1:])]
        return Filled(loaded.index, n, blocks)

    def _convert(self, raw: np.ndarray, order: np.ndarray | None, a: int, b: int) -> torch.Tensor:
        """Rows a..b of the buffer's order as scaled float32 (b - a, d), tile by tile.

        Per tile: np.take copies whole rows (memmove per row, GIL released) in the storage dtype
        into the cached tile, and one torch copy casts it into the block (float16/bfloat16 ->
        float32 is exact); the scale is applied while the tile's rows are still in cache.
        """
        out = self.pool.take(b - a)  # (b - a, d) float32
        raw_t = self.source.as_torch(raw)  # (rows, d) storage dtype, no copy
        direct = raw.dtype == np.float32
        # mode="wrap": the indices are in range by construction, and "raise" buffers the output.
        for lo in range(a, b, self.TILE):
            hi = min(b, lo + self.TILE)
            dst = out[lo - a:hi - a]  # (hi - lo, d) float32 view
            if order is None:
                dst.copy_(raw_t[lo:hi])
            elif direct:
                np.take(raw, order[lo:hi], axis=0, out=dst.numpy(), mode="wrap")
            else:
                np.take(raw, order[lo:hi], axis=0, out=self._tile[:hi - lo], mode="wrap")
                dst.copy_(self._tile_t[:hi - lo])
            if self.spec.scale != 1.0:
                dst.mul_(self.spec.scale)
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
            check_harvest_alive(self.store.path)  # a streamed harvest that failed: say so
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
        # Read-ahead hints: the next buffer's chunks while this one is read (this one was
        # hinted on the previous turn), except in follow mode, where the next chunks may still
        # be being written: there each buffer is hinted once ready, all its chunks at once.
        if index == first or ready is not None:
            filler.advise(buffers[index])
        if ready is None and index + 1 < len(buffers):
            filler.advise(buffers[index + 1])
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
