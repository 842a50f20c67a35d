"""A bounded store's bookkeeping on real zarr stores, without Ray: which units a checkpointed
reader position frees, deleting them, and what reading or verifying them does after."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distributed_sae.harvest.worker import unit_stats
from distributed_sae.store import ActivationStore, commit_unit
from distributed_sae.store.bank_reader import BankReader
from distributed_sae.store.budget import (DiskBudget, chunks_before, deletable_units,
                                          record_bytes_bound, store_bytes, unit_bytes_bound)
from distributed_sae.store.commits import record_path
from distributed_sae.store.stream_files import UnitConsumedError, consumed_units

HOOK = "blocks.0.hook_resid_post"
UNIT, CHUNK, UNITS = 512, 128, 8


def make_store(path, units: int = UNITS) -> ActivationStore:
    """`units` of 8 committed units of 512 rows (4 chunks each), with file sizes in their
    records."""
    store = ActivationStore.create(
        path, hook_dims={HOOK: 16}, n_units=UNITS, unit_rows=UNIT, chunk_rows=CHUNK,
        dtype="float32", compression="none",
        metadata={"context_size": 64, "exclude_token_ids": [], "model_name": "synthetic"})
    g = torch.Generator().manual_seed(0)
    for u in range(units):
        x = torch.randn(UNIT, 16, generator=g) + 1
        files = store.write_unit(u, {HOOK: x}, np.arange(UNIT))
        keep = torch.ones(UNIT, dtype=torch.bool)
        commit_unit(store.path, u, {"stats": {HOOK: unit_stats(x, keep)}, "files": files})
    return ActivationStore.open(path)


def reader(store, rank: int) -> BankReader:
    # Windows of 2 readers x 2 chunks x 128 rows = one unit: rank r reads 2 chunks per unit.
    return BankReader(store, [HOOK], range(0, 7 * UNIT), 64, seed=3, scales={HOOK: 1.0},
                      rank=rank, world_size=2, follow=True, buffer_chunks=2, prefetch=0)


def position(state: dict, epoch: int, buffer: int) -> dict:
    return dict(state, epoch=epoch, buffer=buffer)


def test_a_unit_goes_only_once_every_share_has_passed_all_its_chunks(tmp_path):
    store = make_store(tmp_path / "s")
    readers = [reader(store, r).readers[HOOK] for r in (0, 1)]
    assert readers[0].window == 1
    states = [r.state_dict() for r in readers]
    # Rank 0 has passed 3 buffers (windows 0-2), rank 1 two: units 0 and 1 are wholly behind.
    done = [chunks_before(r.buffers(0), position(s, 0, b))
            for r, s, b in zip(readers, states, (3, 2))]
    assert deletable_units(store, range(0, 7 * UNIT), done) == [0, 1]
    # Past the pass: every unit of training rows, never unit 7 (held out: outside the rows).
    done = [chunks_before(r.buffers(0), position(s, 1, 0)) for r, s in zip(readers, states)]
    assert deletable_units(store, range(0, 7 * UNIT), done) == list(range(7))
    store.delete_units([0, 1])  # marked units are not offered again
    assert deletable_units(store, range(0, 7 * UNIT), done) == list(range(2, 7))


def test_deleted_units_read_as_a_clear_error_and_verify_as_sound(tmp_path):
    store = make_store(tmp_path / "s")
    before = store_bytes(store.path)
    store.delete_units([2, 3])
    assert consumed_units(store.path) == {2, 3}
    assert store_bytes(store.path) < before
    assert set(store.commits) == set(range(UNITS))  # records stay: a harvest skips these units
    assert store.verify() == []  # so a restarted harvest's repair re-harvests nothing
    fresh = ActivationStore.open(store.path)
    with pytest.raises(UnitConsumedError, match="unit 2 of store .* was deleted by a streamed"):
        fresh.read(HOOK, 2 * UNIT, 2 * UNIT + 10)
    assert fresh.read(HOOK, 4 * UNIT, 4 * UNIT + 10).abs().sum() > 0
    assert fresh.stats(HOOK, [2, 3])["count"] == 2 * UNIT  # statistics outlive the rows


def test_the_budget_admits_units_while_they_fit(tmp_path):
    store = make_store(tmp_path / "s")
    size = store_bytes(store.path)
    budget = DiskBudget(store, size + unit_bytes_bound(store))
    assert budget.admit(0, 1) and not budget.admit(1, 1)
    assert "waiting for room" in budget.describe()
    store.delete_units([0, 1])
    assert budget.admit(1, 1)  # the deleted units' bytes came back (a bound counts records too)
    assert DiskBudget(store, 0).admit(10**6, 10**6)  # 0: no bound, it only reports



def test_the_minimum_bound_does_not_depend_on_how_far_the_harvest_has_got(tmp_path):
    """The start-up check runs before any unit, a trainer after some (and after a resume, after
    all): they must agree, or a bound accepted at start-up stops the trainer later. Commit
    records stay after their units go, so the minimum counts every record of the run."""
    from types import SimpleNamespace

    from distributed_sae.train.stream_source import min_bytes
    cfg = SimpleNamespace(train=SimpleNamespace(holdout_fraction=0.125))
    needs = [min_bytes(cfg, make_store(tmp_path / f"s{n}", n), 1, 1) for n in (0, 3, UNITS)]
    assert needs[0] == needs[1] == needs[2], needs
    store = ActivationStore.open(tmp_path / f"s{UNITS}")
    sizes = [record_path(store.path, u).stat().st_size for u in range(UNITS)]
    assert max(sizes) <= record_bytes_bound(store) < 2 * max(sizes), sizes
