"""The text side of the data path: corpora of documents and their packing into token contexts."""

from distributed_sae.data.corpora import CPYTHON, cpython_documents, iter_documents, local_files
from distributed_sae.data.packing import (
    bos_eos_ids,
    iter_unit_contexts,
    load_contexts,
    n_contexts_for,
    pack_contexts,
    special_token_mask,
    tokenize_batch,
)

__all__ = [
    "CPYTHON", "bos_eos_ids", "cpython_documents", "iter_documents", "iter_unit_contexts", "load_contexts",
    "local_files", "n_contexts_for", "pack_contexts", "special_token_mask", "tokenize_batch",
]
