"""Tokenise documents and pack them into fixed-length contexts for the harvest forward passes.

The documents become one token stream, each followed by an EOS token, with no padding: every
position of every context is real text, so every harvested activation is a useful training row.
The stream is cut into rows of `context_size` tokens (or BOS + `context_size - 1` stream tokens,
since models trained with a BOS token behave oddly at position 0 without one).
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import Any, Iterable, Iterator, List, Tuple

import numpy as np

from distributed_sae.config.errors import ConfigError
from distributed_sae.config.schema import DataConfig
from distributed_sae.data.corpora import iter_documents

logger = logging.getLogger(__name__)

# A tokenizer call gets at most this many documents / characters: batches amortise the per-call
# overhead of the fast tokenizer (~10x faster than one call per document), while the character
# cap keeps a few huge documents (whole .txt files) from being tokenised long after we have enough.
_BATCH_DOCS = 256
_BATCH_CHARS = 1_000_000


def n_contexts_for(cfg: DataConfig) -> int:
    """Contexts needed to hold `cfg.n_tokens` tokens (rounded up to a whole context)."""
    return math.ceil(cfg.n_tokens / cfg.context_size)


def load_contexts(cfg: DataConfig, tokenizer: Any, n_contexts: int) -> np.ndarray:
    """`n_contexts` packed contexts of the corpus `cfg`: int64 (n_contexts, cfg.context_size)."""
    return pack_contexts(
        iter_documents(cfg), tokenizer, cfg.context_size, n_contexts,
        prepend_bos=cfg.prepend_bos, source=f"data.name={cfg.name!r}",
    )


def pack_contexts(
    docs: Iterable[str],
    tokenizer: Any,
    context_size: int,
    n_contexts: int,
    prepend_bos: bool = True,
    *,
    source: str = "the documents",
) -> np.ndarray:
    """Pack `docs` into an int64 array (n_contexts, context_size) of token ids.

    The stream is doc0 EOS doc1 EOS ...; with `prepend_bos` each row is BOS followed by the next
    `context_size - 1` stream tokens. Documents are read only until the contexts are full; a corpus
    that runs out first is cycled over again (with a warning), since repeating a small corpus is
    more useful than failing (the 'cpython' corpus holds ~560 k SmolLM2 tokens).
    `source` names the corpus in messages.
    """
    if context_size < (2 if prepend_bos else 1):
        raise ValueError(f"context_size={context_size} leaves no room for text after the BOS token")
    if n_contexts < 0:
        raise ValueError(f"n_contexts must be >= 0, got {n_contexts}")
    bos, eos = bos_eos_ids(tokenizer)
    per_row = context_size - 1 if prepend_bos else context_size
    needed = n_contexts * per_row
    if needed == 0:
        return np.zeros((n_contexts, context_size), dtype=np.int64)

    stream = _token_stream(docs, tokenizer, eos, needed)  # (<= needed + one batch,)
    if stream.size == 0:
        raise ConfigError(f"{source} yielded no text to tokenise: check data.name and data.text_field")
    if stream.size < needed:
        passes = math.ceil(needed / stream.size)
        logger.warning(
            "%s holds only %d tokens but %d contexts need %d: cycling over it %d times "
            "(the contexts repeat; use a larger corpus for more variety)",
            source, stream.size, n_contexts, needed, passes,
        )
        stream = np.resize(stream, needed)  # np.resize repeats the array to fill the new size
    body = stream[:needed].reshape(n_contexts, per_row)  # (n_contexts, per_row)
    return _with_bos(body, bos, prepend_bos)  # (n_contexts, context_size)


def iter_unit_contexts(
    cfg: DataConfig, tokenizer: Any, contexts_per_unit: int, n_units: int
) -> Iterator[np.ndarray]:
    """Yield `n_units` blocks of packed contexts, int64 (contexts_per_unit, cfg.context_size) each.

    Streaming: only about one block of tokens is held at a time, so a harvest of billions of
    tokens never materialises its whole token array (1B tokens are 8 GB as int64). Block u holds
    contexts [u * contexts_per_unit, (u + 1) * contexts_per_unit) of exactly what
    `load_contexts` returns: the corpus is cycled over by reading it again from the start.
    """
    bos, eos = bos_eos_ids(tokenizer)
    per_row = cfg.context_size - 1 if cfg.prepend_bos else cfg.context_size
    need = contexts_per_unit * per_row  # stream tokens per block
    buf, emitted, passes = np.zeros(0, dtype=np.int64), 0, 0
    while emitted < n_units:
        got = 0
        for batch in _batches(iter_documents(cfg)):
            ids = [seq for seq in tokenize_batch(tokenizer, batch) if seq]
            flat = itertools.chain.from_iterable(itertools.chain(seq, (eos,)) for seq in ids)
            chunk = np.fromiter(flat, dtype=np.int64, count=sum(len(seq) + 1 for seq in ids))
            got += chunk.size
            buf = np.concatenate([buf, chunk])
            while buf.size >= need and emitted < n_units:
                yield _with_bos(buf[:need].reshape(contexts_per_unit, per_row), bos, cfg.prepend_bos)
                buf, emitted = buf[need:], emitted + 1
            if emitted == n_units:
                return
        if got == 0:
            raise ConfigError(f"data.name={cfg.name!r} yielded no text to tokenise: check "
                              "data.name and data.text_field")
        passes += 1
        logger.warning("data.name=%r ran out after %d of %d units: reading it again (pass %d)",
                       cfg.name, emitted, n_units, passes + 1)


def _with_bos(body: np.ndarray, bos: int, prepend_bos: bool) -> np.ndarray:
    """(n, per_row) stream tokens -> (n, context_size) contexts, BOS first when asked."""
    if not prepend_bos:
        return np.ascontiguousarray(body)
    contexts = np.empty((body.shape[0], body.shape[1] + 1), dtype=np.int64)
    contexts[:, 0] = bos
    contexts[:, 1:] = body
    return contexts


def bos_eos_ids(tokenizer: Any) -> Tuple[int, int]:
    """(BOS, EOS) ids of `tokenizer`: its own where it has them; else an encoder's [CLS] / [SEP]
    (BERT's tokenizer has no BOS or EOS, and [CLS] ... [SEP] is how it frames a text); else each
    the other's (GPT-2 and GPT-NeoX have only <|endoftext|>, which then starts and ends rows)."""
    bos = _first_id(tokenizer, "bos_token_id", "cls_token_id")
    eos = _first_id(tokenizer, "eos_token_id", "sep_token_id")
    if bos is None and eos is None:
        raise ConfigError(
            f"tokenizer {type(tokenizer).__name__} has no BOS, EOS, CLS or SEP token, so "
            "documents cannot be separated: add one to the model folder's tokenizer_config.json "
            '(e.g. "eos_token": "<|endoftext|>") or use a model whose tokenizer defines one')
    bos = eos if bos is None else bos
    eos = bos if eos is None else eos
    return int(bos), int(eos)


def _first_id(tokenizer: Any, *attrs: str) -> int | None:
    for attr in attrs:
        token_id = getattr(tokenizer, attr, None)
        if token_id is not None:
            return int(token_id)
    return None


def special_token_mask(token_ids: np.ndarray, tokenizer: Any) -> np.ndarray:
    """Boolean array shaped like `token_ids`, True at special tokens (BOS, EOS, padding, ...).

    Activations at these positions are outliers (the BOS row is often 10-100x the norm of others),
    so training and eval drop them when data.exclude_special_tokens is set.
    """
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token_id = getattr(tokenizer, attr, None)
        if token_id is not None:  # the BOS/EOS fallbacks above may use ids not listed as special
            special.add(int(token_id))
    ids = np.fromiter(sorted(special), dtype=np.int64, count=len(special))  # (n_special,)
    return np.isin(np.asarray(token_ids), ids)


def tokenize_batch(tokenizer: Any, texts: List[str]) -> List[List[int]]:
    """Token ids of each text, with no BOS/EOS added and special-token strings kept as text.

    `split_special_tokens` stops a literal '<|endoftext|>' inside a document from becoming a
    control token; `verbose=False` silences the 'longer than the model's maximum' warning, which
    does not apply because we cut the stream into contexts ourselves.
    """
    encoded = tokenizer(
        texts, add_special_tokens=False, split_special_tokens=True, verbose=False,
        return_attention_mask=False,
    )
    return encoded["input_ids"]


def _token_stream(docs: Iterable[str], tokenizer: Any, eos: int, needed: int) -> np.ndarray:
    """doc0 EOS doc1 EOS ... as int64, stopping once at least `needed` tokens are there."""
    chunks: List[np.ndarray] = []
    total = 0
    for batch in _batches(docs):
        ids = [seq for seq in tokenize_batch(tokenizer, batch) if seq]  # empty docs add no EOS
        flat = itertools.chain.from_iterable(itertools.chain(seq, (eos,)) for seq in ids)
        chunk = np.fromiter(flat, dtype=np.int64, count=sum(len(seq) + 1 for seq in ids))
        chunks.append(chunk)
        total += chunk.size
        if total >= needed:
            break
    if not chunks:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(chunks)


def _batches(docs: Iterable[str]) -> Iterator[List[str]]:
    """Group documents into tokenizer calls of <= _BATCH_DOCS docs and ~_BATCH_CHARS characters."""
    batch: List[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch
