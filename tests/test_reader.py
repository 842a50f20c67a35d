"""The streaming reader: coverage, rank split, prefetch thread, exact resume, follow mode."""

from __future__ import annotations

import gc
import json
import os
import threading
import time

import numpy as np
import pytest
import torch

from distributed_sae.store import (
    ActivationReader, ActivationStore, StoreDamagedError, commit_unit, split_rows,
)
from distributed_sae.store.block_pool import BlockPool
from distributed_sae.store.buffers import RowSource, ShardFiles
from conftest import HANG_S

HOOK = "blocks.1.hook_resid_post"
D, UNIT_ROWS, CHUNK, N_UNITS = 24, 64, 16, 5
TOTAL = N_UNITS * UNIT_ROWS


def unit_rows(u: int) -> tuple[torch.Tensor, np.ndarray]:
    """Row r holds r * 32 + column (exact in float32) and token id r % 50."""
    rows = torch.arange(u * UNIT_ROWS, (u + 1) * UNIT_ROWS, dtype=torch.float32)
    x = rows[:, None] * 32 + torch.arange(D, dtype=torch.float32)  # (unit_rows, D)
    return x, (rows.numpy() % 50).astype(np.int64)


def empty_store(path, dtype="float32") -> ActivationStore:
    return ActivationStore.create(
        path, hook_dims={HOOK: D}, n_units=N_UNITS, unit_rows=UNIT_ROWS, chunk_rows=CHUNK,
        dtype=dtype, compression="none", metadata={"context_size": 8, "exclude_token_ids": [0]})


def write_unit(store: ActivationStore, u: int) -> None:
    x, tokens = unit_rows(u)
    files = store.write_unit(u, {HOOK: x}, tokens)  # sizes and checksums: reads check them
    commit_unit(store.path, u, {"stats": {HOOK: {"sum": x.sum(0).tolist(),
                                                 "sum_sq_norm": float(x.pow(2).sum()),
                                                 "count": UNIT_ROWS}}, "files": files})


def full_store(path, dtype="float32", units=range(N_UNITS)) -> ActivationStore:
    store = empty_store(path, dtype)
    for u in units:
        write_unit(store, u)
    return ActivationStore.open(path)


@pytest.fixture
def store(tmp_path):
    return full_store(tmp_path / "s")


def row_ids(batches) -> torch.Tensor:
    x = torch.cat(list(batches))
    assert torch.equal(x - x[:, :1], torch.arange(D, dtype=torch.float32).expand_as(x))
    return (x[:, 0] / 32).long()  # rows stay whole: every column belongs to the same row


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("activation-prefetch")]


def no_threads_left() -> bool:
    deadline = time.monotonic() + 5
    while prefetch_threads() and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.01)
    return not prefetch_threads()


@pytest.mark.parametrize("batch,buffer_chunks,exclude,world,prefetch", [
    (7, 3, [0], 1, 2), (16, 1, [], 1, 0), (50, 4, [0, 1, 2], 3, 2), (1, 2, [], 2, 1),
    (500, 16, [0], 1, 2)])
def test_every_row_once_per_epoch_on_every_rank_split(store, batch, buffer_chunks, exclude,
                                                      world, prefetch):
    want = torch.tensor([r for r in range(TOTAL) if r % 50 not in exclude])
    for epoch in (0, 1):
        parts, chunks = [], []
        for rank in range(world):
            reader = ActivationReader(store, HOOK, range(TOTAL), batch, exclude_token_ids=exclude,
                                      buffer_chunks=buffer_chunks, drop_last=False, rank=rank,
                                      world_size=world, prefetch=prefetch)
            batches = list(reader.iter_epoch(epoch))
            assert all(len(b) == batch for b in batches[:-1]) and 0 < len(batches[-1]) <= batch
            parts.append(row_ids(batches))
            chunks.append(len(reader.chunk_starts(epoch)))
        assert torch.equal(torch.cat(parts).sort().values, want)
        assert max(chunks) - min(chunks) <= 1
    assert no_threads_left()


@pytest.mark.parametrize("prefetch", [0, 2])
def test_rows_above_max_norm_are_dropped_exactly(store, prefetch):
    norms = store.read(HOOK, 0, TOTAL).norm(dim=1)  # (TOTAL,) grows with the row id
    limit = float(norms[TOTAL // 2])
    want = [r for r in range(TOTAL) if r % 50 not in (0, 3) and norms[r] <= limit]
    reader = ActivationReader(store, HOOK, range(TOTAL), 5, buffer_chunks=2, drop_last=False,
                              exclude_token_ids=[0, 3], max_norm=limit, prefetch=prefetch)
    got = row_ids(reader.iter_epoch(1))
    assert sorted(got.tolist()) == want and len(want) < TOTAL // 2
    with pytest.raises(ValueError, match="max_norm=0"):
        ActivationReader(store, HOOK, range(TOTAL), 5, max_norm=0)


def test_drop_last_and_new_order_each_epoch(store):
    reader = ActivationReader(store, HOOK, range(16, TOTAL - 3), 32, buffer_chunks=2)
    e0, e1 = list(reader.iter_epoch(0)), list(reader.iter_epoch(1))
    assert [len(b) for b in e0] == [32] * ((TOTAL - 19) // 32) and len(e1) == len(e0)
    assert not torch.equal(row_ids(e0), row_ids(e1))
    again = list(reader.iter_epoch(0))
    assert all(torch.equal(a, b) for a, b in zip(e0, again))
    reader.load_state_dict(dict(reader.state_dict(), epoch=0, batch=0, buffer=0, offset=0))
    it = reader.iter_batches()
    endless = [next(it) for _ in range(2 * len(e0) + 1)]
    e2_first = next(ActivationReader(store, HOOK, range(16, TOTAL - 3), 32, buffer_chunks=2,
                                     prefetch=0).iter_epoch(2))
    assert all(torch.equal(a, b) for a, b in zip(endless, e0 + e1 + [e2_first], strict=True))
    it.close()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_in_order_scaled_reading_matches_store_read(tmp_path, dtype):
    store = full_store(tmp_path / "s", dtype)
    reader = ActivationReader(store, HOOK, range(5, 200), 64, shuffle=False, drop_last=False,
                              scale=0.25, buffer_chunks=3)
    got = torch.cat(list(reader))
    assert torch.equal(got, store.read(HOOK, 5, 200) * 0.25)


def test_direct_shard_reads_match_zarr(tmp_path, monkeypatch):
    stores = []
    for name, compression in (("plain", "none"), ("zstd", "zstd")):
        store = ActivationStore.create(
            tmp_path / name, hook_dims={HOOK: D}, n_units=2, unit_rows=UNIT_ROWS,
            chunk_rows=CHUNK, dtype="float16", compression=compression, metadata={})
        for u in range(2):
            x, tokens = unit_rows(u)
            x[CHUNK:2 * CHUNK] = 0  # a chunk of fill values: zarr does not write it
            if u == 1:
                x[:] = 0  # nor a shard of them: no file at all
            store.write_unit(u, {HOOK: x}, tokens)
            commit_unit(store.path, u, {"stats": {}})
        stores.append(ActivationStore.open(tmp_path / name))
    assert RowSource(stores[0], HOOK)._acts_files is not None  # read from the shard files
    assert RowSource(stores[1], HOOK)._acts_files is None  # compressed: through zarr
    kw = dict(hook=HOOK, rows=range(3, 2 * UNIT_ROWS - 5), batch_size=13, buffer_chunks=3,
              exclude_token_ids=[1], drop_last=False)
    direct = list(ActivationReader(stores[0], **kw).iter_epoch(2))
    in_order = torch.cat(list(ActivationReader(stores[0], **{**kw, "shuffle": False,
                                                             "exclude_token_ids": []})))
    assert torch.equal(in_order, stores[0].read(HOOK, 3, 2 * UNIT_ROWS - 5))
    shard = tmp_path / "plain" / "acts" / HOOK / "c" / "0" / "0"
    good = shard.read_bytes()
    shard.write_bytes(good[:-20] + bytes([good[-20] ^ 1]) + good[-19:])  # one bit of the index
    with pytest.raises(StoreDamagedError, match="unit 0: .* has a corrupt index: run dsae-harvest"):
        list(ActivationReader(stores[0], **{**kw, "prefetch": 0}))
    shard.write_bytes(good)
    monkeypatch.setattr(ShardFiles, "open", classmethod(lambda cls, root: None))
    for store in stores:
        via_zarr = list(ActivationReader(store, **kw).iter_epoch(2))
        assert all(torch.equal(x, y) for x, y in zip(direct, via_zarr, strict=True))


def test_read_ahead_hints_cover_exactly_the_bytes_then_read(tmp_path, monkeypatch):
    """ShardFiles.advise asks the kernel (posix_fadvise WILLNEED) for the very byte ranges that
    read() then preads, across shards, partial chunks and never-written ones; and a reader epoch
    hints every chunk before reading it."""
    from distributed_sae.store import shard_files

    store = ActivationStore.create(
        tmp_path / "s", hook_dims={HOOK: D}, n_units=3, unit_rows=UNIT_ROWS, chunk_rows=CHUNK,
        dtype="float16", compression="none", metadata={})
    for u in range(3):
        x, tokens = unit_rows(u)
        x[CHUNK:2 * CHUNK] = 0  # a chunk of fill values: not written
        if u == 1:
            x[:] = 0  # a shard of fill values: no file
        store.write_unit(u, {HOOK: x}, tokens)
        commit_unit(store.path, u, {"stats": {}})
    store = ActivationStore.open(tmp_path / "s")
    files = RowSource(store, HOOK)._acts_files
    hinted, read = [], []
    ino = lambda fd: os.fstat(fd).st_ino  # noqa: E731  (which shard file)
    monkeypatch.setattr(shard_files.os, "posix_fadvise",
                        lambda fd, off, n, advice: hinted.append((ino(fd), off, n, advice)),
                        raising=False)
    real_pread = shard_files._pread_into
    monkeypatch.setattr(shard_files, "_pread_into", lambda fd, buf, off: (
        read.append((ino(fd), off, len(buf))), real_pread(fd, buf, off)))
    start, stop = 5, 3 * UNIT_ROWS - 7
    files.advise(start, stop)
    out = np.empty((stop - start, D), dtype=np.float16)
    files.read(start, stop, out)
    assert hinted and [h[:3] for h in hinted] == read
    assert {h[3] for h in hinted} == {shard_files.os.POSIX_FADV_WILLNEED}
    assert np.array_equal(out, store.read(HOOK, start, stop).numpy().astype(np.float16))
    hinted.clear(), read.clear()
    list(ActivationReader(store, HOOK, range(3 * UNIT_ROWS), 16, buffer_chunks=2,
                          prefetch=0).iter_epoch(0))
    assert sorted(read) == sorted(h[:3] for h in hinted)  # each chunk hinted exactly once


def test_prefetch_gives_the_same_batches(store):
    kw = dict(exclude_token_ids=[0, 7], buffer_chunks=3, seed=5, drop_last=False)
    a = list(ActivationReader(store, HOOK, range(TOTAL), 11, prefetch=0, **kw).iter_epoch(1))
    b = list(ActivationReader(store, HOOK, range(TOTAL), 11, prefetch=3, **kw).iter_epoch(1))
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("prefetch,follow", [(0, False), (2, False), (0, True)])
def test_resume_is_exact_at_every_batch(store, prefetch, follow):
    kw = dict(exclude_token_ids=[0, 3], buffer_chunks=3, seed=1, drop_last=False, prefetch=prefetch,
              follow=follow)
    ref_reader = ActivationReader(store, HOOK, range(TOTAL), 9, **kw)
    n_epoch = len(list(ActivationReader(store, HOOK, range(TOTAL), 9, **kw).iter_epoch(0)))
    ref_it, ref, states = ref_reader.iter_batches(), [], []
    for _ in range(2 * n_epoch + 3):  # crosses two epoch boundaries
        states.append(json.loads(json.dumps(ref_reader.state_dict())))
        ref.append(next(ref_it))
    ref_it.close()
    assert states[n_epoch]["epoch"] == 0 and states[n_epoch + 1]["epoch"] == 1
    for k, state in enumerate(states[:-2]):
        reader = ActivationReader(store, HOOK, range(TOTAL), 9, **kw)
        reader.load_state_dict(state)
        it = reader.iter_batches()
        got = [next(it) for _ in range(3)]
        it.close()
        assert all(torch.equal(x, y) for x, y in zip(got, ref[k:k + 3])), f"resume at batch {k}"
    assert no_threads_left()


def test_resume_reads_only_from_the_saved_buffer_on(store, monkeypatch):
    reader = ActivationReader(store, HOOK, range(TOTAL), 10, buffer_chunks=4, prefetch=0,
                              drop_last=False)
    it = reader.iter_epoch(0)
    for _ in range(27):  # 320 rows = 5 buffers of 64: batch 27 ends inside the last buffer
        next(it)
    state = reader.state_dict()
    assert state["buffer"] == 4 and state["offset"] == 14 and state["batch"] == 27
    rest = list(it)
    read = []
    monkeypatch.setattr(RowSource, "read", lambda self, spans, out, orig=RowSource.read:
                        read.append(sum(e - s for s, e in spans)) or orig(self, spans, out))
    again = ActivationReader(store, HOOK, range(TOTAL), 10, buffer_chunks=4, prefetch=0,
                             drop_last=False)
    again.load_state_dict(state)
    got = list(again.iter_epoch(0))
    assert read == [64] and all(torch.equal(x, y) for x, y in zip(got, rest))
    assert again.state_dict()["epoch"] == 1 and again.state_dict()["batch"] == 0


@pytest.mark.parametrize("field,value", [("seed", 3), ("rows", range(0, 256)), ("world_size", 2),
                                         ("batch_size", 8), ("exclude_token_ids", [1]),
                                         ("max_norm", 1e4)])
def test_state_of_another_config_is_refused(store, field, value):
    state = ActivationReader(store, HOOK, range(TOTAL), 7, exclude_token_ids=[0]).state_dict()
    kw = dict(store=store, hook=HOOK, rows=range(TOTAL), batch_size=7, exclude_token_ids=[0])
    other = ActivationReader(**{**kw, field: value})
    with pytest.raises(ValueError, match=field):
        other.load_state_dict(state)


def test_thread_errors_reach_the_consumer_and_threads_stop(store, monkeypatch):
    reader = ActivationReader(store, HOOK, range(TOTAL), 8, buffer_chunks=2)
    it = reader.iter_batches()
    next(it)
    assert len(prefetch_threads()) == 2  # shuffling and reading
    del it  # abandoned mid-epoch: the generator's close stops the thread
    assert no_threads_left()
    for _ in reader.iter_epoch(0):
        break  # a for loop left early
    assert no_threads_left()

    def broken(self, spans, out):
        raise OSError("disk vanished")

    monkeypatch.setattr(RowSource, "read", broken)
    with pytest.raises(OSError, match="disk vanished"):
        next(ActivationReader(store, HOOK, range(TOTAL), 8).iter_batches())
    assert no_threads_left()


def test_incomplete_store_needs_follow(tmp_path):
    store = full_store(tmp_path / "s", units=[0, 1])
    assert split_rows(store, 0.2, require_complete=False) == (range(0, 256), range(256, TOTAL))
    with pytest.raises(ValueError, match="follow=True"):
        next(iter(ActivationReader(store, HOOK, range(TOTAL), 8)))
    assert len(list(ActivationReader(store, HOOK, range(0, 128), 8))) == 16  # committed part: fine
    reader = ActivationReader(store, HOOK, range(TOTAL), 8, follow=True, follow_timeout=0.2,
                              poll_interval=0.02, buffer_chunks=2, prefetch=2, shuffle=False)
    got = []
    with pytest.raises(TimeoutError, match="follow_timeout"):
        for x in reader:
            got.append(x)
    assert torch.equal(row_ids(got), torch.arange(128))  # everything committed, in order
    assert no_threads_left()
    waiting = iter(ActivationReader(store, HOOK, range(TOTAL), 8, follow=True, shuffle=False,
                                    poll_interval=0.02, buffer_chunks=2))
    assert len([next(waiting) for _ in range(16)]) == 16  # the committed part
    time.sleep(0.1)  # the producer threads now wait for unit 2 ...
    waiting.close()  # ... until the iterator is closed
    assert no_threads_left()


@pytest.mark.parametrize("window_units,world_size", [(None, 1), (2, 2)])
def test_follow_reads_while_a_writer_commits(tmp_path, window_units, world_size):
    store = empty_store(tmp_path / "s")
    readers = [ActivationReader(store, HOOK, range(TOTAL), 10, exclude_token_ids=[0],
                                buffer_chunks=2, drop_last=False, follow=True, poll_interval=0.01,
                                follow_timeout=30, rank=r, world_size=world_size,
                                window_units=window_units) for r in range(world_size)]
    commit_times = []

    def writer() -> None:
        for u in range(N_UNITS):
            time.sleep(0.15)
            write_unit(store, u)
            commit_times.append(time.monotonic())

    thread = threading.Thread(target=writer)
    thread.start()
    parts, first_batch = [], None
    for reader in readers:
        parts.append([])
        for x in reader.iter_epoch(0):
            first_batch = first_batch or time.monotonic()
            parts[-1].append(x)
    thread.join()
    assert first_batch < commit_times[-1]  # training started before the harvest ended
    want = torch.tensor([r for r in range(TOTAL) if r % 50])
    assert torch.equal(row_ids(sum(parts, [])).sort().values, want)
    window = readers[0].window * UNIT_ROWS  # the first batch comes from the first window
    assert int(row_ids(parts[0][:1]).max()) < window < TOTAL
    # The first epoch's order depends only on the config, not on when units arrived.
    again = full_store(tmp_path / "t")
    same = ActivationReader(again, HOOK, range(TOTAL), 10, exclude_token_ids=[0], buffer_chunks=2,
                            drop_last=False, follow=True, world_size=world_size,
                            window_units=window_units)
    assert torch.equal(torch.cat(list(same.iter_epoch(0))), torch.cat(parts[0]))
    assert no_threads_left()


def test_followed_state_resumes_without_follow_after_the_first_epoch(store):
    kw = dict(store=store, hook=HOOK, rows=range(TOTAL), batch_size=16, buffer_chunks=2)
    followed = ActivationReader(follow=True, **kw)
    it = followed.iter_batches()
    for _ in range(3):
        next(it)
    with pytest.raises(ValueError, match="window_units"):  # epoch 0 orders differ
        ActivationReader(**kw).load_state_dict(followed.state_dict())
    for _ in range(TOTAL // 16):
        next(it)
    state, want = followed.state_dict(), next(it)
    it.close()
    assert state["epoch"] == 1
    plain = ActivationReader(**kw)
    plain.load_state_dict(state)
    assert torch.equal(next(plain.iter_batches()), want)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_shard_file_path_equals_zarr_path_row_for_row(tmp_path, monkeypatch, dtype):
    store = full_store(tmp_path / "s", dtype)
    kw = dict(hook=HOOK, rows=range(5, TOTAL - 7), batch_size=23, buffer_chunks=3, seed=3,
              scale=0.5, exclude_token_ids=[0, 9], drop_last=False)
    direct = list(ActivationReader(store, **kw).iter_epoch(1))
    assert RowSource(store, HOOK)._acts_files is not None
    monkeypatch.setattr(ShardFiles, "open", classmethod(lambda cls, root: None))
    via_zarr = list(ActivationReader(store, **{**kw, "prefetch": 0}).iter_epoch(1))
    assert all(torch.equal(x, y) for x, y in zip(direct, via_zarr, strict=True))
    if dtype != "float32":
        return  # row ids above 2048 are not exact in 16-bit floats
    ids = row_ids(x * 2 for x in direct)  # every kept row once, whole and scaled exactly
    assert torch.equal(ids.sort().values, torch.tensor(
        [r for r in range(5, TOTAL - 7) if r % 50 not in (0, 9)]))


def test_block_pool_reuses_an_array_only_when_nothing_refers_to_it():
    pool = BlockPool(8, 3, cap=2)
    a = pool.take(8)
    ptr = a.data_ptr()
    del a
    b = pool.take(5)
    assert b.data_ptr() == ptr and b.shape == (5, 3)  # released: handed out again
    view, as_numpy = b[1:], b.numpy()
    del b
    c, d = pool.take(8), pool.take(8)
    assert ptr not in (c.data_ptr(), d.data_ptr())  # a view and a numpy array keep it busy
    del view, as_numpy
    assert len(pool) == 2 and pool.take(8).data_ptr() == ptr  # cap 2: d was not pooled
    assert pool.take(9).shape == (9, 3)  # larger than the pooled rows: a fresh tensor


def test_kept_batches_survive_later_epochs_and_threads_keep_torch_threads(store):
    threads = torch.get_num_threads()
    reader = ActivationReader(store, HOOK, range(TOTAL), 16, buffer_chunks=2, prefetch=2)
    e0 = [x.clone() for x in reader.iter_epoch(0)]
    kept = list(reader.iter_epoch(0))
    for epoch in (1, 2):
        for x in reader.iter_epoch(epoch):
            x.fill_(-1)  # a consumer may change its batches in place
    assert all(torch.equal(x, y) for x, y in zip(e0, kept, strict=True))
    assert torch.get_num_threads() == threads  # reader threads went one-thread only themselves


def test_bench_reader_script_runs(tmp_path):
    """scripts/bench_reader.py end to end on a tiny store (a smoke test: timings are its output,
    never asserted)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_reader.py"
    out = subprocess.run([sys.executable, str(script), "--tokens", "8192", "--d", "64",
                          "--batch", "512", "--no-training", "--repeats", "1", "--dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=HANG_S)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "reader / memmap float32" in out.stdout and "(e) ceiling" in out.stdout
