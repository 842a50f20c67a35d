"""The 'cpython' corpus kept on disk (data.cache_dir): written once, read back by later
processes without parsing the standard library, rebuilt when the file is damaged, and a folder
that cannot be written costs a warning only."""

from __future__ import annotations

import json
import logging

import pytest

from distributed_sae.config import DataConfig
from distributed_sae.data import corpora
from distributed_sae.data.corpora import cpython_documents, iter_documents


@pytest.fixture(autouse=True)
def fresh_disk_cache():
    corpora._cpython_documents_on_disk.cache_clear()  # as in a new process
    yield
    corpora._cpython_documents_on_disk.cache_clear()


def _no_parsing(monkeypatch) -> None:
    def refuse():
        raise AssertionError("the standard library was parsed again")

    monkeypatch.setattr(corpora, "_cpython_documents_cached", refuse)


def test_written_once_then_read_without_parsing(tmp_path, monkeypatch) -> None:
    built = cpython_documents()
    docs = cpython_documents(str(tmp_path))
    assert docs == built
    (file,) = (tmp_path / "corpora").iterdir()
    assert file.name.startswith("cpython-") and json.loads(file.read_text()) == list(built)
    assert not [p for p in file.parent.iterdir() if p.name.endswith(".tmp")]
    corpora._cpython_documents_on_disk.cache_clear()
    _no_parsing(monkeypatch)
    assert cpython_documents(str(tmp_path)) == built
    # The config path: iter_documents reads data.cache_dir, same seeded order as without it.
    corpora._cpython_documents_on_disk.cache_clear()
    cfg = DataConfig(seed=3, cache_dir=str(tmp_path))
    monkeypatch.undo()
    assert list(iter_documents(cfg)) == list(iter_documents(DataConfig(seed=3, cache_dir="")))


@pytest.mark.parametrize("damage", ["{not json", "[]", '{"a": 1}', "[1, 2]"])
def test_damaged_file_is_rebuilt(tmp_path, caplog, damage: str) -> None:
    built = cpython_documents()
    cpython_documents(str(tmp_path))
    (file,) = (tmp_path / "corpora").iterdir()
    file.write_text(damage)
    corpora._cpython_documents_on_disk.cache_clear()
    with caplog.at_level(logging.WARNING, logger="distributed_sae.data.corpora"):
        assert cpython_documents(str(tmp_path)) == built
    assert "building the corpus again" in caplog.text and file.name in caplog.text
    assert json.loads(file.read_text()) == list(built)  # repaired on disk too


def test_unwritable_folder_is_a_warning(tmp_path, caplog) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="distributed_sae.data.corpora"):
        assert cpython_documents(str(blocked)) == cpython_documents()
    assert "set data.cache_dir to a writable folder" in caplog.text


def test_key_follows_the_recipe(monkeypatch) -> None:
    key = corpora._cpython_key()
    assert key == corpora._cpython_key()  # stable within one interpreter and library
    monkeypatch.setattr(corpora, "_CORPUS_FORMAT", corpora._CORPUS_FORMAT + 1)
    assert corpora._cpython_key() != key
