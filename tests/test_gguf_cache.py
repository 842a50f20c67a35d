"""The de-quantised GGUF cache (models/gguf_cache.py) on the real SmolLM2 GGUF file.

The weights read back from the cache must equal, bit for bit, the weights de-quantised from
the GGUF, and so must the logits. A cache that cannot be written must not stop a load. Two
writers that miss together must leave one whole entry.
"""

from __future__ import annotations

import logging
import socket
import subprocess
from pathlib import Path

import torch

from distributed_sae.config.schema import ModelConfig
from distributed_sae.models import gguf_cache
from distributed_sae.models.registry import _smollm2_gguf, load_model, load_tokenizer


def _entries(cache: Path) -> list[Path]:
    return sorted((cache / "gguf").iterdir()) if (cache / "gguf").is_dir() else []


def test_cached_weights_tokenizer_and_logits_equal_the_gguf_ones(tmp_path: Path, caplog):
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="distributed_sae")
    fresh = load_model(ModelConfig(cache_dir=str(cache)))  # miss: de-quantised, then written
    [entry] = _entries(cache)
    assert gguf_cache.cached(entry) and (entry / "model.safetensors").is_file()
    assert "cached the de-quantised weights" in caplog.text
    again = load_model(ModelConfig(cache_dir=str(cache)))  # hit: read back
    assert _entries(cache) == [entry]  # no second entry, no leftover tmp folder
    a, b = fresh.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "cached weights differ from the GGUF's"
    plain = load_model(ModelConfig(cache_dir=""))  # no cache at all: the GGUF path itself
    assert all(torch.equal(a[k], v) for k, v in plain.model.state_dict().items())
    text = "def f(x):\n    return x + 1  # the cache must not change a token"
    ids = fresh.tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(ids, again.tokenizer(text, return_tensors="pt").input_ids)
    tok = load_tokenizer(ModelConfig(cache_dir=str(cache)))  # tokenizer alone, from the entry
    assert tok(text).input_ids == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(fresh.model(ids).logits, again.model(ids).logits)
    assert (fresh.n_layers, fresh.d_model, fresh.d_mlp) == (again.n_layers, 576, 1536)
    weights = entry / "model.safetensors"  # damaged behind the marker's back: read, refused,
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # and rebuilt
    caplog.clear()
    rebuilt = load_model(ModelConfig(cache_dir=str(cache)))
    assert "cannot be read" in caplog.text and gguf_cache.cached(entry)
    assert all(torch.equal(a[k], v) for k, v in rebuilt.model.state_dict().items())
    assert weights.stat().st_size > 2 * 10**8  # whole again: 135M float32 weights


def test_unwritable_cache_warns_and_loads(tmp_path: Path, caplog):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder would go\n")
    loaded = load_model(ModelConfig(cache_dir=str(blocker)))
    assert loaded.d_model == 576
    assert "could not cache the de-quantised weights" in caplog.text
    assert "model.cache_dir" in caplog.text


def _tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=2, tie_word_embeddings=True))


def test_second_writer_and_torn_entries(tmp_path: Path):
    directory, gguf = _smollm2_gguf()
    entry = gguf_cache.entry_dir(str(tmp_path), f"{directory}/{gguf}")
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs: a writer of this host killed mid-write
    torn = entry.with_name(f"{entry.name}.tmp-{socket.gethostname()}-{dead.pid}")
    remote = entry.with_name(entry.name + ".tmp-otherhost-1")  # another host's: not ours to judge
    for folder in (torn, remote):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_text("half")
    assert not gguf_cache.cached(entry)
    first = _tiny_llama(0)
    gguf_cache.write_entry(entry, first, None, gguf)
    assert gguf_cache.cached(entry) and (entry / "model.safetensors").is_file()
    assert not torn.exists() and remote.is_dir()
    # A second process that missed at the same time: its rename fails, its folder goes.
    gguf_cache.write_entry(entry, _tiny_llama(1), None, gguf)
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(entry).state_dict()  # the first writer's
    assert all(torch.equal(v, back[k]) for k, v in first.state_dict().items())
    leftovers = [p.name for p in entry.parent.iterdir() if p not in (entry, remote)]
    assert leftovers == []
