"""Read batches of activations out of a store: shuffled for training, in order for evaluation.

Random row reads from zarr are ~500x slower than chunk reads (4096 random rows: 1271 ms from zarr
against 2.4 ms from a memmap, measured on the 2-core build machine), so shuffling is two-level:
the order of chunks is shuffled, `buffer_chunks` chunks are read whole, and the rows of that
buffer are shuffled there (buffers.py), by default in background threads ahead of training.

Every random choice is a pure function of (seed, epoch, index): the chunk order of an epoch, the
row permutation of each buffer. A saved position (epoch, buffer, row offset) therefore resumes
bit-exactly by rebuilding one buffer, without reading the ones before it.

A ledger of the rows yielded over the reader's life (count, order-independent digest: ledger.py)
is saved with the position: a resumed run can be checked to yield the rows of a clean one.

follow=True reads a store that a harvest job is still writing: only committed units, sleeping
until the chunks it needs next are committed. Its first epoch shuffles chunks within windows of
`window_units` consecutive units rather than globally (a global order would wait for most of the
store); harvest commits units roughly in ascending order, so the reader trails it by about one
window. Later epochs read a complete store in the global order.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, Sequence, TypeVar

import numpy as np
import torch

from distributed_sae.store.activation_store import ActivationStore
from distributed_sae.store.block_pool import BlockPool, single_threaded_torch
from distributed_sae.store.buffers import (
    BufferFiller, BufferSpec, Filled, RowSource, UnitWaiter, cuts, loads,
)
from distributed_sae.store.ledger import (
    MASK, combine_ledgers, digest_hex, parse_digest, row_sum, rows_digest,
)

log = logging.getLogger(__name__)

STATE_VERSION = 1
T = TypeVar("T")
__all__ = ["ActivationReader", "Prefetcher", "STATE_VERSION", "combine_ledgers", "rows_digest",
           "split_rows"]


def split_rows(store: ActivationStore, holdout_fraction: float, *,
               require_complete: bool = True) -> tuple[range, range]:
    """(train, held-out) row ranges of a store, cut at a chunk boundary.

    The held-out part is the tail, so it comes from corpus contexts never trained on. The cut
    depends only on the store's planned size, so require_complete=False gives the same ranges for
    a store still being harvested (train on it with follow=True).
    """
    if require_complete and not store.is_complete:
        raise ValueError(
            f"store {store.path} is incomplete ({len(store.commits)} of "
            f"{store.metadata['n_units']} units committed): finish it with dsae-harvest "
            f"store.path={store.path} (a restarted harvest skips committed units)")
    total, chunk = int(store.metadata["total_rows"]), store.chunk_rows
    cut = int(total * (1.0 - holdout_fraction)) // chunk * chunk
    if cut <= 0 or cut >= total:
        raise ValueError(
            f"holdout_fraction={holdout_fraction} leaves no training or no held-out chunk in "
            f"{total} rows of {chunk}-row chunks: harvest more tokens or change the fraction")
    return range(0, cut), range(cut, total)


@dataclass
class _Failure:
    exc: BaseException


_END = object()


class Prefetcher(Generic[T]):
    """Runs an iterator in a daemon thread, at most `depth` items ahead of the consumer.

    File reads, np.take and torch's copies release the GIL, so the next buffer is read while the
    consumer trains on the current one. The thread runs torch ops on one core
    (single_threaded_torch): its own OpenMP team beside the consumer's oversubscribes the cores.
    An exception in the thread is re-raised by the consumer; close()
    (also called when the consuming generator is closed or collected) stops and joins it.
    """

    def __init__(self, make: Callable[[threading.Event], Iterator[T]], depth: int,
                 name: str = "activation-prefetch", parent: threading.Event | None = None
                 ) -> None:
        self._stop = threading.Event()
        self._parent = parent  # the stop event of the stage that consumes this one, if any
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._thread = threading.Thread(target=self._run, args=(make,), name=name, daemon=True)
        self._thread.start()

    def _run(self, make: Callable[[threading.Event], Iterator[T]]) -> None:
        try:
            single_threaded_torch()
            for item in make(self._stop):
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises
            self._put(_Failure(exc))

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[T]:
        while True:
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set() or (self._parent is not None and self._parent.is_set()):
                    return
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError(f"{self._thread.name} ended without a result") from None
                continue
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread and wait for it (it finishes at most the buffer it is reading)."""
        self._stop.set()
        while not self._queue.empty():  # unblocks a producer waiting to put
            self._queue.get_nowait()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("prefetch thread %s still running %.0f s after close", self._thread.name,
                        timeout)


@dataclass(frozen=True)
class _Position:
    """Where the next batch starts: batches done in the epoch, and the row that comes next."""

    epoch: int = 0
    batch: int = 0  # batches of `epoch` already yielded
    buffer: int = 0  # buffer holding the next row
    offset: int = 0  # rows of that buffer's shuffled order already yielded


@dataclass
class ActivationReader:
    """Batches of (batch_size, d) float32 rows of one hook over rows [start, stop).

    Rows whose token is in `exclude_token_ids` (BOS/EOS/padding) are dropped, and so are rows
    whose norm (before scaling) exceeds `max_norm` (outliers; None: keep all); `scale` multiplies
    every row (input normalisation). Rank r of `world_size` reads chunks r, r+W, r+2W, ... of the
    (shuffled) chunk order, so ranks never overlap and together cover every chunk, and their
    chunk counts differ by at most one.

    prefetch: buffers made ready ahead by two background threads, one reading the next buffer
    while the other shuffles and casts (0: all in the consumer's thread).
    follow: read a store still being harvested (see the module docstring); follow_timeout: seconds
    to wait for one missing unit before TimeoutError (None: wait forever).

    Iterate with iter_batches() (endless, epochs advance themselves, resumes from state_dict()),
    iter_epoch(epoch), or `for x in reader` (epoch 0, e.g. for evaluation). One iteration at a
    time: they share the position that state_dict() reports. Training with exact resume:

        reader.load_state_dict(checkpoint["reader"])  # when resuming
        for step, x in zip(range(first_step, total_steps), reader.iter_batches()):
            ...  # train; a checkpoint saves reader.state_dict() with the model
    """

    store: ActivationStore
    hook: str
    rows: range
    batch_size: int
    shuffle: bool = True
    seed: int = 0
    buffer_chunks: int = 16
    scale: float = 1.0
    exclude_token_ids: Sequence[int] = field(default_factory=tuple)
    max_norm: float | None = None
    drop_last: bool = True
    rank: int = 0
    world_size: int = 1
    prefetch: int = 2
    follow: bool = False
    follow_timeout: float | None = None
    poll_interval: float = 0.5
    window_units: int | None = None
    _pos: _Position = field(default_factory=_Position, init=False, repr=False)
    _armed: bool = field(default=False, init=False, repr=False)
    # The ledger of every batch yielded over the reader's life (epochs and resumes included):
    # rows, and the sum mod 2**64 of splitmix64 of their global store rows (see rows_ledger).
    rows_seen: int = field(default=0, init=False, repr=False)
    rows_digest: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        total = int(self.store.metadata["total_rows"])
        if self.rows.step != 1 or not 0 <= self.rows.start <= self.rows.stop <= total:
            raise ValueError(f"rows={self.rows} must be a step-1 range inside the store's "
                             f"{total} rows")
        self.rows = range(self.rows.start, self.rows.stop)
        for name in ("batch_size", "buffer_chunks", "world_size", "poll_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} must be in 0..world_size-1={self.world_size - 1}")
        if self.seed < 0 or self.prefetch < 0 or (self.window_units or 0) < 0:
            raise ValueError("seed, prefetch and window_units must be >= 0")
        if self.max_norm is not None and not self.max_norm > 0:
            raise ValueError(f"max_norm={self.max_norm} must be positive (None: keep all rows)")
        self.store.d(self.hook)  # KeyError naming the store's hooks if `hook` is not one
        self._exclude = np.unique(np.asarray(list(self.exclude_token_ids), dtype=np.int64))
        self._source: RowSource | None = None
        self._pool: BlockPool | None = None  # float32 batch arrays, kept across epochs
        self._ready = UnitWaiter(self.store, self.rows.stop, self.follow_timeout,
                                 self.poll_interval) if self.follow else None

    # ---- the plan: a pure function of the config and the epoch ----------------------------
    @property
    def window(self) -> int:
        """Units per shuffling window of a followed store's first epoch (0: one global order)."""
        if not (self.follow and self.shuffle):
            return 0
        if self.window_units:
            return self.window_units
        # One buffer per rank per window: the least the reader must wait for before mixing.
        need = self.world_size * self.buffer_chunks * self.store.chunk_rows
        return max(1, -(-need // self.store.unit_rows))

    def chunk_starts(self, epoch: int = 0) -> list[int]:
        """Start rows of the chunks this rank reads in `epoch`, in reading order."""
        return [int(s) for s in self._plan(epoch)]

    def buffers(self, epoch: int = 0) -> list[np.ndarray]:
        """This rank's chunk starts of `epoch`, grouped into buffers of buffer_chunks."""
        starts = self._plan(epoch)  # (chunks,) int64
        return [starts[i:i + self.buffer_chunks] for i in range(0, len(starts), self.buffer_chunks)]

    def _plan(self, epoch: int) -> np.ndarray:
        starts = np.arange(self.rows.start, self.rows.stop, self.store.chunk_rows)
        if self.shuffle and self.window and epoch == 0:
            per = self.window * self.store.unit_rows // self.store.chunk_rows
            starts = np.concatenate([
                np.random.default_rng([self.seed, epoch, 2, g]).permutation(starts[i:i + per])
                for g, i in enumerate(range(0, len(starts), per))] or [starts])
        elif self.shuffle:
            starts = np.random.default_rng([self.seed, epoch]).permutation(starts)
        return starts[self.rank::self.world_size]

    # ---- exact resume --------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        """The settings a saved position is only valid for (JSON types)."""
        return {"hook": self.hook, "rows": [self.rows.start, self.rows.stop], "seed": self.seed,
                "batch_size": self.batch_size, "buffer_chunks": self.buffer_chunks,
                "shuffle": self.shuffle, "drop_last": self.drop_last,
                "exclude_token_ids": [int(t) for t in self._exclude], "rank": self.rank,
                "max_norm": self.max_norm,
                "world_size": self.world_size, "window_units": self.window,
                "chunk_rows": self.store.chunk_rows}

    def state_dict(self) -> dict[str, Any]:
        """A small JSON-able dict: the position after the last batch yielded, the ledger of the
        rows yielded so far (rows_seen; rows_digest as 16 hex digits), and the config."""
        p = self._pos
        return {"version": STATE_VERSION, "epoch": p.epoch, "batch": p.batch,
                "buffer": p.buffer, "offset": p.offset, "rows_seen": self.rows_seen,
                "rows_digest": digest_hex(self.rows_digest), **self._config()}

    def rows_ledger(self) -> tuple[int, str]:
        """(rows yielded, digest hex) over the reader's life: equal for two readers that yielded
        the same multiset of global store rows, in any order or batching (ledger.py)."""
        return self.rows_seen, digest_hex(self.rows_digest)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at `state`: the next iter_batches(), or iter_epoch(state['epoch']), continues
        with exactly the batches an uninterrupted reader would have yielded next.

        Each rank saves and loads its own state (with excluded tokens, ranks' cursors differ).
        The ledger is restored too; a state older than the ledger (no rows_seen, rows_digest)
        starts it from 0: it then counts only the rows yielded since.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"reader state version {state.get('version')!r} is not "
                             f"{STATE_VERSION}")
        for key, want in self._config().items():
            got = state.get(key)
            got = list(got) if isinstance(got, tuple) else got
            if key == "window_units" and int(state.get("epoch", 0)) > 0:
                continue  # windows shape the first epoch's order only
            if got != want:
                raise ValueError(
                    f"reader state does not match this reader: {key} is {got!r} in the state but "
                    f"{want!r} here; build the reader with the saved {key} to resume exactly")
        self._pos = _Position(*(int(state[k]) for k in ("epoch", "batch", "buffer", "offset")))
        self.rows_seen = int(state.get("rows_seen", 0))
        self.rows_digest = parse_digest(state.get("rows_digest", digest_hex(0)))
        self._armed = True

    # ---- iteration -----------------------------------------------------------------------
    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.iter_epoch(0)

    def iter_epoch(self, epoch: int) -> Iterator[torch.Tensor]:
        """The batches of `epoch` (from the loaded position if load_state_dict() named it)."""
        start = self._pos if self._armed and self._pos.epoch == epoch else _Position(epoch)
        self._armed = False
        return self._run_epoch(start)

    def iter_batches(self) -> Iterator[torch.Tensor]:
        """Batches without end from the current position; each epoch has a new order."""
        while True:
            start, self._armed = self._pos, False
            n = 0
            for x in self._run_epoch(start):
                n += 1
                yield x
            if n == 0 and start.batch == 0:
                raise ValueError(f"epoch {start.epoch} of {self.rows} has no batch of "
                                 f"{self.batch_size} rows on rank {self.rank}")

    def _run_epoch(self, start: _Position) -> Iterator[torch.Tensor]:
        """Assemble batches from the producer's blocks; the position is set before each yield."""
        epoch, batch = start.epoch, start.batch
        buffers = self.buffers(epoch)
        if not self.follow:
            self._check_committed()
        stream, close = self._stream(epoch, buffers, start)
        pending: list[torch.Tensor] = []  # blocks of the batch being assembled, (<= batch, d)
        ids: list[np.ndarray] = []  # their global store rows, (<= batch,) int64 each
        rows = 0
        try:
            for buf in stream:
                for end, x, r in buf.blocks:
                    pending.append(x)
                    ids.append(r)
                    rows += len(x)
                    if rows < self.batch_size:
                        continue
                    out = pending[0] if len(pending) == 1 else self._cat(pending)  # (batch, d)
                    done = end == buf.rows
                    self._count(ids)  # with the position: a state after it covers this batch
                    self._pos = _Position(epoch, batch + 1, buf.index + done, 0 if done else end)
                    pending, ids, rows, batch = [], [], 0, batch + 1
                    yield out
            if pending and not self.drop_last:
                self._count(ids)
                self._pos = _Position(epoch, batch + 1, len(buffers), 0)
                yield self._cat(pending)  # (rows < batch, d)
        finally:
            close()
        self._pos = _Position(epoch + 1)

    def _cat(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        """Blocks of one batch (a batch straddling two buffers) joined into a pooled array."""
        assert self._pool is not None
        return torch.cat(blocks, out=self._pool.take(sum(len(x) for x in blocks)))  # (rows, d)

    def _count(self, ids: list[np.ndarray]) -> None:
        """Add one batch's global rows (its blocks' parts) to the ledger: a sum, so no concat."""
        self.rows_seen += sum(len(r) for r in ids)
        self.rows_digest = (self.rows_digest + sum(row_sum(r) for r in ids)) & MASK

    def _stream(self, epoch: int, buffers: list[np.ndarray], start: _Position
                ) -> tuple[Iterator[Filled], Callable[[], None]]:
        """The filled buffers from `start` on, and the function that stops their producers.

        With prefetch, two threads: one reads buffer b + 1 while the other shuffles and casts
        buffer b; per CPU-second they are balanced (float16, d 576, 2-core build machine: reads
        5.6 GB, gather + cast 4.4 GB). The earlier torch gather measured 2.4 GB/s against
        1.9 GB/s in one thread on a quieter machine; with load average 5-8 from other jobs both
        settings give ~2.4 GB/s now, as the two threads then share about one core.
        """
        if self._source is None or self._pool is None:
            self._source = RowSource(self.store, self.hook)
            # Enough arrays for every block alive at once: the queued buffers, the one being cut,
            # the consumer's current one, a batch being assembled and the one it holds.
            per_buffer = -(-self.buffer_chunks * self.store.chunk_rows // self.batch_size) + 1
            self._pool = BlockPool(self.batch_size, self._source.d,
                                   (self.prefetch + 3) * per_buffer + 2)
        else:
            self._source.recheck()  # file sizes once per epoch (StoreDamagedError if one went)
        spec = BufferSpec(self.store.chunk_rows, self.rows.stop, self.batch_size, self.seed,
                          epoch, self.shuffle, self.scale, self._exclude, self.max_norm)
        filler = BufferFiller(self._source, spec, self._pool)
        if self.prefetch == 0:
            gen = cuts(filler, loads(filler, buffers, start.buffer, self._ready,
                                     threading.Event()), start.buffer, start.offset)
            return gen, gen.close

        def cut_stage(stop: threading.Event) -> Iterator[Filled]:
            reads = Prefetcher(lambda halt: loads(filler, buffers, start.buffer, self._ready, halt),
                               1, f"activation-prefetch-io-r{self.rank}", parent=stop)
            try:
                yield from cuts(filler, reads, start.buffer, start.offset)
            finally:
                reads.close()

        fetcher: Prefetcher[Filled] = Prefetcher(cut_stage, self.prefetch,
                                                 f"activation-prefetch-r{self.rank}")
        return iter(fetcher), fetcher.close

    # ---- commits -------------------------------------------------------------------------
    def _check_committed(self) -> None:
        """Refuse to read rows of uncommitted units (their contents are fill values)."""
        if self.store.is_complete or not len(self.rows):
            return
        u = self.store.unit_rows
        wanted = range(self.rows.start // u, -(-self.rows.stop // u))
        missing = [k for k in wanted if k not in self.store.commits]
        if missing:  # the caller's handle may predate the commits: look again once
            self.store.refresh()
            missing = [k for k in wanted if k not in self.store.commits]
        if missing:
            raise ValueError(
                f"rows {self.rows.start}..{self.rows.stop} of {self.store.path} need "
                f"{len(missing)} uncommitted unit(s) (first {missing[:5]}): finish the harvest, "
                f"or pass follow=True to read while it writes")
