"""Reads check a unit's shard files against its commit record; verify() checks checksums; a
damaged unit is un-committed and written again. Stores are built through the harvest's own
commit path (write_unit_checked, then commit_unit)."""

from __future__ import annotations

import json
import logging

import google_crc32c
import numpy as np
import pytest
import torch

from distributed_sae.cli import is_user_error
from distributed_sae.harvest.job import repair
from distributed_sae.harvest.worker import write_unit_checked
from distributed_sae.store import (
    ActivationReader, ActivationStore, Damage, StoreDamagedError, commit_unit,
)
from distributed_sae.store.commits import record_path

HOOK = "blocks.1.hook_resid_post"
ACTS = f"acts/{HOOK}"
D, UNIT_ROWS, CHUNK, N_UNITS, CTX = 24, 64, 16, 4, 8


def unit_data(u: int) -> tuple[torch.Tensor, np.ndarray]:
    """Row r holds r * 32 + column; token id r % 50 (as contexts of CTX tokens)."""
    rows = torch.arange(u * UNIT_ROWS, (u + 1) * UNIT_ROWS, dtype=torch.float32)
    x = rows[:, None] * 32 + torch.arange(D, dtype=torch.float32)  # (unit_rows, D)
    return x, (rows.numpy().astype(np.int64) % 50).reshape(-1, CTX)


def write(store: ActivationStore, u: int, zeros: bool = False) -> None:
    """Write and commit unit u as a harvest does (actor's record, then the driver's commit)."""
    x, contexts = unit_data(u)
    record = write_unit_checked(store, u, {HOOK: x * 0 if zeros else x}, contexts,
                                np.array([0]), "test")
    commit_unit(store.path, u, record)


def make_store(path, compression: str = "none") -> ActivationStore:
    store = ActivationStore.create(
        path, hook_dims={HOOK: D}, n_units=N_UNITS, unit_rows=UNIT_ROWS, chunk_rows=CHUNK,
        dtype="float32", compression=compression,
        metadata={"context_size": CTX, "exclude_token_ids": [0]})
    for u in range(N_UNITS):
        write(store, u)
    return ActivationStore.open(path, mode="r+")  # r+: tests write units again


def flip_byte(path, at: int, mask: int = 0x10) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= mask
    path.write_bytes(bytes(data))


def truncate(path, n: int) -> None:
    """Drop the last n bytes of a file."""
    path.write_bytes(path.read_bytes()[:-n])


def reader(store: ActivationStore, **kw) -> ActivationReader:
    return ActivationReader(store, HOOK, range(N_UNITS * UNIT_ROWS), 16, buffer_chunks=2, **kw)


def assert_names_the_damage(err: pytest.ExceptionInfo, store: ActivationStore, unit: int,
                            file, problem: str) -> None:
    msg = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in msg
    assert msg.startswith(f"store {store.path} is damaged: unit {unit}: {file} {problem}")
    assert msg.endswith(f"run dsae-harvest store.path={store.path} (with the settings that made "
                        f"the store) to re-harvest the damaged unit(s)")


def test_commit_records_hold_each_shard_files_size_and_crc32c(tmp_path):
    store = make_store(tmp_path / "s")
    for u in range(N_UNITS):
        files = store.commits[u]["files"]
        assert set(files) == {ACTS, "token_ids"}
        for name, path in store.unit_files(u).items():
            data = path.read_bytes()
            assert files[name] == {"bytes": len(data), "crc32c": google_crc32c.value(data)}
    assert store.verify() == []
    # A unit of fill values only has no acts file (zarr writes none): recorded as 0 bytes, sound.
    write(store, 2, zeros=True)
    store.refresh()
    assert not store.unit_files(2)[ACTS].exists()
    assert store.commits[2]["files"][ACTS] == {"bytes": 0, "crc32c": 0}
    assert store.verify() == [] and not store.read(HOOK, 128, 192).any()


@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_missing_shard_file_stops_every_read_naming_the_unit(tmp_path, compression, prefetch):
    store = make_store(tmp_path / "s", compression)
    path = store.unit_files(2)[ACTS]
    whole = reader(store, prefetch=prefetch)
    assert len(list(whole.iter_epoch(0))) == N_UNITS * UNIT_ROWS // 16  # sound: reads
    path.unlink()  # until now this unit read as zeros
    problem = f"is missing (its commit record says {store.commits[2]['files'][ACTS]['bytes']} bytes)"
    with pytest.raises(StoreDamagedError) as err:
        list(whole.iter_epoch(1))  # the same reader: sizes are checked again each epoch
    assert_names_the_damage(err, store, 2, path, problem)
    with pytest.raises(StoreDamagedError) as err:
        list(reader(ActivationStore.open(store.path), prefetch=prefetch))
    assert_names_the_damage(err, store, 2, path, problem)
    with pytest.raises(StoreDamagedError, match="unit 2: "):
        store.read(HOOK, 100, 140)
    assert torch.equal(store.read(HOOK, 0, 128), torch.cat([unit_data(0)[0], unit_data(1)[0]]))
    assert [(d.unit, d.file) for d in store.verify()] == [(2, path)]


@pytest.mark.parametrize("name", [ACTS, "token_ids"])
def test_truncated_shard_file_stops_the_reads_of_its_array(tmp_path, name):
    store = make_store(tmp_path / "s")
    path = store.unit_files(1)[name]
    size = path.stat().st_size
    truncate(path, 4)
    problem = f"has {size - 4} bytes where its commit record says {size}"
    with pytest.raises(StoreDamagedError) as err:
        store.read(HOOK, 0, 128) if name == ACTS else store.tokens(0, 128)
    assert_names_the_damage(err, store, 1, path, problem)
    with pytest.raises(StoreDamagedError) as err:  # token ids are read for excluded tokens
        list(reader(store, exclude_token_ids=[0]))
    assert_names_the_damage(err, store, 1, path, problem)
    other = store.read(HOOK, 0, 128) if name == "token_ids" else store.tokens(0, 128)
    assert len(other) == 128  # the other array of the unit is sound and reads
    assert store.verify() == [Damage(1, path, problem)]


def test_flipped_byte_is_found_by_verify(tmp_path):
    store = make_store(tmp_path / "s")
    path = store.unit_files(3)[ACTS]
    flip_byte(path, 100)  # inside the first chunk's values, not the index
    # Reads check sizes only (a checksum per read would cost a second pass over every byte).
    assert not torch.equal(store.read(HOOK, 192, 256), unit_data(3)[0])
    (damage,) = store.verify()
    assert (damage.unit, damage.file) == (3, path) and "has crc32c 0x" in damage.problem
    assert store.verify(units=[0, 1, 2]) == []
    with pytest.raises(StoreDamagedError, match=r"unit 3: .*/c/3/0 has crc32c .*dsae-harvest"):
        raise damage.error(store.path)


@pytest.mark.parametrize("text,problem", [
    ('{"unit": 1, "stats": {"blocks', "is not valid JSON (Unterminated string"),
    ("", "is not valid JSON (Expecting value at byte 0)"),
    ('{"unit": 3, "stats": {}}', "is not the commit record of unit 1 (its unit: 3)"),
    ('{"unit": 1, "files": {"token_ids": {"bytes": "12"}}}', 'has a malformed "files" entry'),
])
def test_damaged_commit_record_is_a_one_line_error(tmp_path, text, problem):
    store = make_store(tmp_path / "s")
    rec = record_path(store.path, 1)
    rec.write_text(text)
    with pytest.raises(StoreDamagedError) as err:
        ActivationStore.open(store.path).commits
    assert not isinstance(err.value, json.JSONDecodeError)
    assert_names_the_damage(err, store, 1, rec, problem)
    with pytest.raises(StoreDamagedError, match="unit 1: "):  # one record read on its own
        ActivationStore.open(store.path).read(HOOK, 64, 65)
    with pytest.raises(StoreDamagedError, match="unit 1: "):
        list(reader(ActivationStore.open(store.path), follow=True, follow_timeout=30))
    (damage,) = ActivationStore.open(store.path).verify()
    assert (damage.unit, damage.file) == (1, rec) and damage.problem.startswith(problem)
    assert is_user_error(err.value)  # the CLI prints it as one line, no traceback


def test_records_without_checksums_still_read(tmp_path):
    """Stores written before records held files: nothing to check, all reads as before; a
    record with sizes but no checksums is checked by size, by verify() too."""
    store = ActivationStore.create(
        tmp_path / "s", hook_dims={HOOK: D}, n_units=2, unit_rows=UNIT_ROWS, chunk_rows=CHUNK,
        dtype="float32", compression="none", metadata={"context_size": CTX})
    for u in range(2):
        x, contexts = unit_data(u)
        files = store.write_unit(u, {HOOK: x}, contexts.reshape(-1))
        sizes = {k: {"bytes": v["bytes"]} for k, v in files.items()}
        commit_unit(store.path, u, {"stats": {}, **({"files": sizes} if u else {})})
    store = ActivationStore.open(tmp_path / "s")
    rows = torch.cat([unit_data(u)[0] for u in range(2)])
    assert torch.equal(torch.cat(list(ActivationReader(store, HOOK, range(128), 16,
                                                       shuffle=False))), rows)
    assert store.verify() == []
    path = store.unit_files(1)[ACTS]
    flip_byte(path, 100)
    assert store.verify() == []  # no checksum recorded: a flipped byte goes unseen
    truncate(path, 8)
    assert [d.unit for d in store.verify()] == [1]  # but a size is checked
    with pytest.raises(StoreDamagedError, match="unit 1: "):
        store.read(HOOK, 64, 128)


def test_repair_uncommits_exactly_the_damaged_units_and_rewriting_them_restores_the_rows(
        tmp_path, caplog):
    """The job's repair step on the real store code: every kind of damage at once."""
    clean = make_store(tmp_path / "clean")
    store = make_store(tmp_path / "s")
    store.unit_files(0)[ACTS].unlink()
    truncate(store.unit_files(1)["token_ids"], 1)
    flip_byte(store.unit_files(2)[ACTS], 7, 0xFF)
    record_path(store.path, 3).write_text('{"unit": 3, "st')
    stray = store.path / "_commits" / "ufoo.json"
    stray.write_text("{}")
    caplog.set_level(logging.WARNING)
    assert repair(store) == [0, 1, 2, 3]
    for u in range(4):
        assert f"unit {u}: " in caplog.text
        assert not record_path(store.path, u).exists()
        assert not any(p.exists() for p in store.unit_files(u).values())
    assert "un-committed damaged unit(s) [0, 1, 2, 3]" in caplog.text
    assert not stray.exists() and store.commits == {}
    for u in range(4):  # what the harvest does next with the uncommitted units
        write(store, u)
    store.refresh()
    assert store.verify() == [] and store.is_complete
    assert repair(store) == []
    total = N_UNITS * UNIT_ROWS
    assert torch.equal(store.read(HOOK, 0, total), clean.read(HOOK, 0, total))
    assert np.array_equal(store.tokens(0, total), clean.tokens(0, total))
    assert store.commits == clean.commits
