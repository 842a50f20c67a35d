"""The zarr activation store: layout, exact dtype round trips, commits, the lock, the reader."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from distributed_sae.store import (
    ActivationReader,
    ActivationStore,
    StoreLockedError,
    WriterLock,
    commit_unit,
    split_rows,
)

HOOK = "blocks.1.hook_resid_post"
D, UNIT_ROWS, CHUNK, N_UNITS = 24, 64, 16, 5


def make_store(path, dtype="float32", n_units=N_UNITS, commit=True, compression="none"):
    """A store whose row r holds the value r in every column and token id r % 50."""
    store = ActivationStore.create(
        path, hook_dims={HOOK: D}, n_units=n_units, unit_rows=UNIT_ROWS, chunk_rows=CHUNK,
        dtype=dtype, compression=compression,
        metadata={"context_size": 8, "exclude_token_ids": [0], "model_name": "m"})
    for u in range(n_units):
        rows = torch.arange(u * UNIT_ROWS, (u + 1) * UNIT_ROWS, dtype=torch.float32)
        x = rows[:, None].expand(-1, D).contiguous()
        files = store.write_unit(u, {HOOK: x}, (rows.numpy() % 50).astype(np.int64))
        if commit:
            commit_unit(store.path, u, {"stats": {HOOK: {"sum": x.sum(0).tolist(),
                                                         "sum_sq_norm": float(x.pow(2).sum()),
                                                         "count": UNIT_ROWS}}, "files": files})
    return ActivationStore.open(path)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("compression", ["none", "zstd", "blosc"])
def test_round_trip_is_exact_in_the_storage_dtype(tmp_path, dtype, compression):
    store = ActivationStore.create(
        tmp_path / "s", hook_dims={HOOK: D}, n_units=1, unit_rows=UNIT_ROWS, chunk_rows=CHUNK,
        dtype=dtype, compression=compression, metadata={"context_size": 8})
    x = torch.randn(UNIT_ROWS, D) * 100
    x[0, :4] = torch.tensor([1e-30, 3e38 if dtype != "float16" else 6e4, -0.0, 1.0])
    store.write_unit(0, {HOOK: x}, np.zeros(UNIT_ROWS, dtype=np.int64))
    back = ActivationStore.open(tmp_path / "s").read(HOOK, 0, UNIT_ROWS)
    want = x.to(getattr(torch, dtype)).float()
    assert torch.equal(back, want)  # bit-exact after one rounding to the storage dtype
    if dtype == "bfloat16":
        assert ActivationStore.open(tmp_path / "s").metadata["storage_dtype"] == "uint16"


def test_geometry_metadata_and_stats(tmp_path):
    store = make_store(tmp_path / "s")
    assert store.hook_points == [HOOK] and store.d(HOOK) == D
    assert store.is_complete and store.n_tokens == N_UNITS * UNIT_ROWS
    assert store.committed_units == list(range(N_UNITS))
    assert torch.equal(store.read(HOOK, 70, 73)[:, 0], torch.tensor([70.0, 71.0, 72.0]))
    assert list(store.tokens(98, 102)) == [48, 49, 0, 1]
    rows = np.arange(N_UNITS * UNIT_ROWS, dtype=np.float64)
    stats = store.stats(HOOK)
    assert np.allclose(stats["mean"], rows.mean()) and stats["count"] == len(rows)
    assert np.isclose(stats["mean_sq_norm"], (rows ** 2).mean() * D)
    with pytest.raises(KeyError, match="blocks.9.hook_mlp_out"):
        store.read("blocks.9.hook_mlp_out", 0, 1)


def test_uncommitted_units_are_not_trusted(tmp_path):
    store = make_store(tmp_path / "s", commit=False)
    assert store.n_tokens == 0 and not store.is_complete
    commit_unit(store.path, 3, {"stats": {}})
    store.refresh()
    assert store.committed_units == [3]
    with pytest.raises(ValueError, match="incomplete"):
        split_rows(store, 0.2)


def test_open_missing_store_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="run dsae-harvest"):
        ActivationStore.open(tmp_path / "nothing")


def test_second_writer_is_refused_and_dead_lock_taken_over(tmp_path):
    with WriterLock(tmp_path / "s"):
        with pytest.raises(StoreLockedError, match="being written by another job"):
            WriterLock(tmp_path / "s").acquire()
    # A lock left by a process that no longer exists is taken over.
    lock = WriterLock(tmp_path / "s")
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    lock.path.write_text(f'{{"host": "{os.uname().nodename}", "pid": {pid}}}')
    with WriterLock(tmp_path / "s") as again:
        assert again.held


def _all_rows(reader, epoch=0):
    return torch.cat(list(reader.iter_epoch(epoch)))[:, 0]


def test_reader_covers_every_row_once_and_drops_excluded(tmp_path):
    store = make_store(tmp_path / "s")
    train, held = split_rows(store, 0.2)
    assert train.stop == held.start and held.stop == N_UNITS * UNIT_ROWS
    assert train.stop % CHUNK == 0
    reader = ActivationReader(store, HOOK, train, batch_size=7, drop_last=False,
                              exclude_token_ids=[0], buffer_chunks=3)
    got = _all_rows(reader).long().sort().values
    want = torch.tensor([r for r in train if r % 50 != 0])
    assert torch.equal(got, want)
    first, again, other = _all_rows(reader), _all_rows(reader), _all_rows(reader, epoch=1)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_reader_splits_ranks_without_overlap_or_gap(tmp_path):
    store = make_store(tmp_path / "s")
    rows = range(0, N_UNITS * UNIT_ROWS)
    parts = [_all_rows(ActivationReader(store, HOOK, rows, batch_size=5, drop_last=False,
                                        rank=r, world_size=3)) for r in range(3)]
    got = torch.cat(parts).long().sort().values
    assert torch.equal(got, torch.arange(len(rows)))


def test_reader_in_order_and_scaled(tmp_path):
    store = make_store(tmp_path / "s", dtype="float16")
    reader = ActivationReader(store, HOOK, range(0, 40), batch_size=16, shuffle=False,
                              drop_last=False, scale=0.5)
    batches = list(reader)
    assert [len(b) for b in batches] == [16, 16, 8]
    assert torch.equal(torch.cat(batches)[:, 0], torch.arange(40.0) * 0.5)
