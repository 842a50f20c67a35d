"""The reader's ledger of rows yielded: (count, order-independent digest of global store rows).

Row identity is recovered from the batches themselves: every row of the synthetic store is a
distinct random float vector, read back bit-exactly (float32 store, scale 1), so a lookup of the
row's bytes in the whole store names its global row. The ledger must equal rows_digest() of
exactly those rows, whatever the shuffle, prefetch, resume or rank split.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import SECOND_HOOK, write_sparse_store
from distributed_sae.store import ActivationReader
from distributed_sae.store.bank_reader import BankReader
from distributed_sae.store.ledger import splitmix64
from distributed_sae.store.reader import combine_ledgers, rows_digest

HOOK = "blocks.0.hook_resid_post"
N_UNITS, UNIT_ROWS = 8, 512
TOTAL = N_UNITS * UNIT_ROWS  # 4096 rows in 32 chunks of 128; token id = row % 512
ALL = rows_digest(np.arange(TOTAL))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_sparse_store(tmp_path_factory.mktemp("ledger") / "s", N_UNITS, UNIT_ROWS)


@pytest.fixture(scope="module")
def row_of(store):
    """bytes of a row -> its global store row."""
    table = store.read(HOOK, 0, TOTAL).numpy()  # (TOTAL, d) float32
    index = {row.tobytes(): i for i, row in enumerate(table)}
    assert len(index) == TOTAL  # rows are distinct: identity is recoverable
    return index


def rows_in(row_of, batch: torch.Tensor) -> np.ndarray:
    """(batch,) int64 global rows of a batch's rows."""
    return np.array([row_of[r.tobytes()] for r in batch.numpy()], dtype=np.int64)


def reader(store, batch: int, **kw) -> ActivationReader:
    return ActivationReader(store, HOOK, range(TOTAL), batch, **{"seed": 3, **kw})


def test_digest_helpers():
    assert int(splitmix64(np.array([0]))[0]) == 0xE220A8397B1DCDAF  # splitmix64's first output
    rows = np.random.default_rng(0).permutation(TOTAL)
    assert rows_digest(rows) == ALL and rows_digest(rows[::-1].copy()) == ALL  # order-free
    assert ALL[0] == TOTAL and len(ALL[1]) == 16 and ALL[1] == ALL[1].lower()
    assert rows_digest(np.append(rows[1:], rows[2]))[1] != ALL[1]  # one row lost, one twice
    assert combine_ledgers([rows_digest(rows[:1000]), rows_digest(rows[1000:])]) == ALL
    assert combine_ledgers([]) == rows_digest(np.empty(0, dtype=np.int64)) == (0, "0" * 16)


@pytest.mark.parametrize("batch,exclude,drop_last,prefetch", [
    (256, [], True, 2),  # 16 batches, nothing dropped: every row exactly once
    (100, [0, 5, 7], True, 0),  # 4072 kept rows: 40 batches, 72 rows dropped
    (100, [0, 5, 7], False, 2),  # the same, the 72-row tail yielded
    (128, [], True, 0),  # batches never straddle buffers
])
def test_ledger_is_the_digest_of_the_rows_in_the_batches(store, row_of, batch, exclude,
                                                          drop_last, prefetch):
    r = reader(store, batch, exclude_token_ids=exclude, drop_last=drop_last, prefetch=prefetch,
               buffer_chunks=3)
    assert r.rows_ledger() == (0, "0" * 16)
    seen: list[np.ndarray] = []
    for x in r.iter_epoch(0):
        seen.append(rows_in(row_of, x))
        state = json.loads(json.dumps(r.state_dict()))  # after every batch: exactly those so far
        want = rows_digest(np.concatenate(seen))
        assert r.rows_ledger() == want == (state["rows_seen"], state["rows_digest"])
    got = np.concatenate(seen)
    kept = np.array([i for i in range(TOTAL) if i % UNIT_ROWS not in exclude])
    assert len(np.unique(got)) == len(got) and np.isin(got, kept).all()
    dropped = 0 if not drop_last else len(kept) % batch
    assert r.rows_ledger()[0] == len(kept) - dropped == sum(len(s) for s in seen)
    assert (r.rows_ledger() == rows_digest(kept)) == (dropped == 0)
    if not exclude:
        assert r.rows_ledger() == ALL


def test_rows_dropped_by_max_norm_are_not_counted(tmp_path):
    s = write_sparse_store(tmp_path / "o", 2, UNIT_ROWS, outlier_every=7)
    table = s.read(HOOK, 0, 2 * UNIT_ROWS)  # (1024, d)
    small = np.flatnonzero((table.norm(dim=1) <= 200).numpy())
    assert 0 < len(small) < len(table)
    r = ActivationReader(s, HOOK, range(2 * UNIT_ROWS), 64, max_norm=200.0, drop_last=False)
    got = torch.cat(list(r.iter_epoch(0)))
    assert len(got) == len(small) and r.rows_ledger() == rows_digest(small)


def test_prefetch_and_order_do_not_change_the_ledger(store):
    kw = dict(exclude_token_ids=[0, 9], drop_last=False, buffer_chunks=3)
    ledgers = []
    for prefetch, shuffle in [(0, True), (2, True), (2, False)]:
        r = reader(store, 90, prefetch=prefetch, shuffle=shuffle, **kw)
        first = next(iter(r.iter_epoch(1)))  # a partial epoch, then a whole one afresh
        ledgers.append((first, r.rows_ledger()))
        list(r.iter_epoch(1))
        ledgers[-1] += (r.rows_ledger(),)
    (a, a1, a2), (b, b1, b2), (c, c1, c2) = ledgers
    assert torch.equal(a, b) and a1 == b1 and a2 == b2  # prefetch: the same batches and ledger
    assert not torch.equal(a, c) and a1 != c1  # unshuffled: other rows first ...
    kept = [i for i in range(TOTAL) if i % UNIT_ROWS not in (0, 9)]
    assert c1 == rows_digest(kept[:90])  # in order: the first 90 kept rows
    epoch = rows_digest(kept)  # ... but a whole epoch has the same rows either way
    assert a2 == combine_ledgers([a1, epoch]) and c2 == combine_ledgers([c1, epoch])


@pytest.mark.parametrize("prefetch", [0, 2])
def test_interrupted_and_resumed_epoch_has_the_clean_ledger(store, prefetch):
    kw = dict(exclude_token_ids=[3], buffer_chunks=3, prefetch=prefetch)
    clean = reader(store, 100, **kw)
    n = len(list(clean.iter_epoch(0)))
    for k in (0, 1, 7, n - 1, n):  # batch 7 straddles buffers 1 and 2 (384-row buffers)
        first = reader(store, 100, **kw)
        it = first.iter_epoch(0)
        for _ in range(k):
            next(it)
        it.close()
        state = json.loads(json.dumps(first.state_dict()))
        again = reader(store, 100, **kw)
        again.load_state_dict(state)
        list(again.iter_epoch(0))
        assert again.rows_ledger() == clean.rows_ledger(), f"resumed after {k} batches"
        assert again.state_dict()["epoch"] == 1
    assert clean.rows_ledger()[0] == n * 100


def test_a_replayed_or_skipped_batch_changes_the_ledger(store):
    clean = reader(store, 100, prefetch=0)
    it = clean.iter_epoch(0)
    states = []
    for _ in range(2):
        next(it)
        states.append(json.loads(json.dumps(clean.state_dict())))  # after batch 1, after 2
    list(it)
    for pos, ledger in [(0, 1), (1, 0)]:  # position of one state, ledger of another
        bad = reader(store, 100, prefetch=0)
        bad.load_state_dict({**states[pos], "rows_seen": states[ledger]["rows_seen"],
                             "rows_digest": states[ledger]["rows_digest"]})
        list(bad.iter_epoch(0))
        assert bad.rows_ledger()[0] != clean.rows_ledger()[0]
        assert bad.rows_ledger()[1] != clean.rows_ledger()[1]


def test_ledger_spans_epochs_and_resumes_and_old_states_start_from_zero(store):
    r = reader(store, 256, prefetch=0)
    it = r.iter_batches()
    for _ in range(16 + 5):  # one epoch and 5 batches of the next
        next(it)
    it.close()
    mid = r.rows_ledger()
    assert mid[0] == 21 * 256 and mid != ALL
    state = r.state_dict()
    assert state["epoch"] == 1 and "rows_seen" not in r._config()
    old = {k: v for k, v in state.items() if k not in ("rows_seen", "rows_digest")}
    fresh, resumed = reader(store, 256, prefetch=0), reader(store, 256, prefetch=0)
    fresh.load_state_dict(old)  # saved before the ledger: position kept, ledger from 0
    resumed.load_state_dict(state)
    rest = fresh.iter_epoch(1)
    resumed_rest = resumed.iter_epoch(1)
    list(rest), list(resumed_rest)
    assert fresh.rows_ledger()[0] == 11 * 256
    assert resumed.rows_ledger() == combine_ledgers([ALL, ALL])  # two whole epochs
    assert combine_ledgers([mid, fresh.rows_ledger()]) == resumed.rows_ledger()
    with pytest.raises(ValueError, match="16 hex digits"):
        reader(store, 256).load_state_dict({**state, "rows_digest": ""})


def test_rank_ledgers_add_up_to_every_row(store):
    for kw in (dict(), dict(exclude_token_ids=[0, 1, 2], drop_last=False)):
        ledgers = []
        for rank in (0, 1):
            r = reader(store, 256, rank=rank, world_size=2, buffer_chunks=4, **kw)
            list(r.iter_epoch(0))  # 16 chunks of 128 rows a rank: 8 whole batches, none dropped
            ledgers.append(r.rows_ledger())
        kept = [i for i in range(TOTAL) if i % UNIT_ROWS not in kw.get("exclude_token_ids", [])]
        assert ledgers[0] != ledgers[1]
        assert combine_ledgers(ledgers) == rows_digest(kept)
        single = reader(store, 256, buffer_chunks=4, **kw)
        list(single.iter_epoch(0))
        assert combine_ledgers(ledgers) == single.rows_ledger()


def test_bank_reader_ledger_is_its_rows(tmp_path):
    s = write_sparse_store(tmp_path / "b", 4, UNIT_ROWS, second_hook=16)
    kw = dict(seed=2, exclude_token_ids=[1], drop_last=False, buffer_chunks=3, prefetch=2)
    bank = BankReader(s, [HOOK, SECOND_HOOK], range(4 * UNIT_ROWS), 100,
                      scales={HOOK: 1.0, SECOND_HOOK: 1.0}, **kw)
    one = ActivationReader(s, HOOK, range(4 * UNIT_ROWS), 100, **kw)
    it = bank.iter_epoch(0)
    for _ in range(3):
        next(it)
    it.close()
    state = json.loads(json.dumps(bank.state_dict()))
    bank = BankReader(s, [HOOK, SECOND_HOOK], range(4 * UNIT_ROWS), 100,
                      scales={HOOK: 1.0, SECOND_HOOK: 1.0}, **kw)
    bank.load_state_dict(state)
    assert bank.rows_ledger()[0] == 300
    list(bank.iter_epoch(0))
    list(one.iter_epoch(0))
    assert bank.rows_ledger() == one.rows_ledger()
    assert one.rows_ledger()[0] == 4 * UNIT_ROWS - 4
    bank.readers[SECOND_HOOK].rows_seen += 1  # hooks out of step: refused, not averaged
    with pytest.raises(RuntimeError, match="different rows"):
        bank.rows_ledger()
