"""The reader's mapped buffers (store/mapped.py): chunks mmap'ed from the shard files give the
same batches as chunks read with pread, fall back to pread where chunks are not page-sized, and
never write to the store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distributed_sae.store import ActivationReader, ActivationStore, commit_unit
from distributed_sae.store.buffers import RowSource
from distributed_sae.store.mapped import PAGE, MappedRange

HOOK = "blocks.0.hook_resid_post"
UNIT_ROWS, CHUNK, N_UNITS = 64, 16, 4
TOTAL = UNIT_ROWS * N_UNITS

pytestmark = pytest.mark.skipif(MappedRange.create(PAGE) is None,
                                reason="no mmap with MAP_FIXED on this platform")


def make_store(path, dtype: str, d: int) -> ActivationStore:
    """Row r holds r + column / 1000 (unique rows); unit 1 has a chunk of zeros (not written
    by zarr) and unit 3 is all zeros (no shard file)."""
    store = ActivationStore.create(path, hook_dims={HOOK: d}, n_units=N_UNITS,
                                   unit_rows=UNIT_ROWS, chunk_rows=CHUNK, dtype=dtype,
                                   compression="none", metadata={})
    for u in range(N_UNITS):
        rows = torch.arange(u * UNIT_ROWS, (u + 1) * UNIT_ROWS, dtype=torch.float32)
        x = rows[:, None] + torch.arange(d, dtype=torch.float32) / 1000  # (UNIT_ROWS, d)
        if u == 1:
            x[CHUNK:2 * CHUNK] = 0
        if u == 3:
            x[:] = 0
        store.write_unit(u, {HOOK: x}, (rows.numpy() % 50).astype(np.int64))
        commit_unit(store.path, u, {"stats": {}})
    return ActivationStore.open(path)


def counting(monkeypatch) -> dict[str, int]:
    calls = {"file": 0, "zeros": 0}
    for name in calls:
        real = getattr(MappedRange, f"map_{name}")

        def spy(self, *a, _real=real, _name=name):
            calls[_name] += 1
            return _real(self, *a)
        monkeypatch.setattr(MappedRange, f"map_{name}", spy)
    return calls


# Chunks of 16 rows x 256 bytes = one 4 KiB page each.
@pytest.mark.parametrize("dtype,d", [("float32", 64), ("float16", 128), ("bfloat16", 128)])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_mapped_batches_equal_read_batches(tmp_path, monkeypatch, dtype, d, prefetch):
    store = make_store(tmp_path / "s", dtype, d)
    calls = counting(monkeypatch)
    kw = dict(store=store, hook=HOOK, rows=range(CHUNK, TOTAL), batch_size=23, buffer_chunks=3,
              seed=4, scale=0.5, exclude_token_ids=[7], max_norm=150.5 * d ** 0.5,
              drop_last=False, prefetch=prefetch)
    mapped = list(ActivationReader(**kw).iter_epoch(1))
    assert calls["file"] > 0 and calls["zeros"] > 0  # the mapped path, holes included
    calls.update(file=0, zeros=0)
    read = list(ActivationReader(**kw, mmap=False).iter_epoch(1))
    assert calls == {"file": 0, "zeros": 0}
    assert all(torch.equal(x, y) for x, y in zip(mapped, read, strict=True))
    rows = torch.cat(mapped)[:, 0] * 2  # every kept row once (zero rows: unit 1's chunk, unit 3)
    want = [r for r in range(CHUNK, TOTAL) if r % 50 != 7 and r <= 150]
    nonzero = sorted(int(v) for v in rows[rows > 0].tolist())
    assert nonzero == [r for r in want if not (UNIT_ROWS + CHUNK <= r < UNIT_ROWS + 2 * CHUNK)
                       and r < 3 * UNIT_ROWS]


def test_chunks_that_are_not_pages_are_read(tmp_path, monkeypatch):
    store = make_store(tmp_path / "s", "float32", 24)  # 16 x 96-byte rows: not a page
    calls = counting(monkeypatch)
    kw = dict(store=store, hook=HOOK, rows=range(TOTAL), batch_size=16, buffer_chunks=2)
    mapped = list(ActivationReader(**kw).iter_epoch(0))
    assert calls == {"file": 0, "zeros": 0}
    read = list(ActivationReader(**kw, mmap=False).iter_epoch(0))
    assert all(torch.equal(x, y) for x, y in zip(mapped, read, strict=True))


def test_writes_to_a_mapped_buffer_never_reach_the_store(tmp_path):
    store = make_store(tmp_path / "s", "float32", 64)
    before = store.read(HOOK, 0, 2 * CHUNK)
    rng = MappedRange.create(2 * CHUNK * 64 * 4)
    raw = RowSource(store, HOOK).map([(0, 2 * CHUNK)], rng)  # (32, 64) float32, no copy
    assert raw is not None and np.array_equal(raw, before.numpy())
    raw[:] = -1  # a private copy of the pages
    assert (raw == -1).all()
    assert torch.equal(ActivationStore.open(store.path).read(HOOK, 0, 2 * CHUNK), before)
    with pytest.raises(ValueError, match="unaligned"):
        rng.map_zeros(100, PAGE)
