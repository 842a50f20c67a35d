"""An order-independent digest of the store rows a reader has yielded: (count, 64-bit sum).

A ledger is (rows, digest): the number of rows and the sum mod 2**64 of splitmix64(row) over
their global store row indices. A sum does not depend on the order rows came in, nor on how they
were split into batches, epochs, resumes or data-parallel ranks, so two runs trained on the same
multiset of rows have equal ledgers, and a row lost or read twice changes the digest (splitmix64
scatters indices over all 64 bits: a collision needs a 2**-64 coincidence, not a near miss of
indices). It is a check, not a cryptographic hash.

Ledgers are JSON-safe as (int, 16-digit lower-case hex string): JSON numbers above 2**53 lose
digits in many parsers.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

__all__ = ["MASK", "combine_ledgers", "digest_hex", "parse_digest", "rows_digest", "row_sum",
           "splitmix64"]

MASK = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 of every element: (n,) any integer dtype -> (n,) uint64, wrapping arithmetic.

    In place on one copy (two temporaries in all): the reader calls it once per batch.
    """
    z = np.asarray(x).astype(np.uint64)  # a copy: the caller's array is never changed
    t = np.empty_like(z)
    with np.errstate(over="ignore"):  # wrapping mod 2**64 is the point
        z += _GOLDEN
        z ^= np.right_shift(z, 30, out=t)
        z *= _MUL1
        z ^= np.right_shift(z, 27, out=t)
        z *= _MUL2
        z ^= np.right_shift(z, 31, out=t)
    return z


def row_sum(rows: np.ndarray) -> int:
    """sum of splitmix64(rows) mod 2**64, as a Python int in [0, 2**64)."""
    if len(rows) == 0:
        return 0
    return int(splitmix64(rows).sum(dtype=np.uint64))  # uint64 sums wrap: the mod is free


def digest_hex(digest: int) -> str:
    """The JSON form of a digest: 16 lower-case hex digits."""
    return f"{digest & MASK:016x}"


def parse_digest(text: str) -> int:
    """A digest from digest_hex() (ValueError if it is not 1-16 hex digits)."""
    if not isinstance(text, str) or not 0 < len(text) <= 16:
        raise ValueError(f"a rows digest is 16 hex digits, got {text!r}")
    return int(text, 16)


def rows_digest(rows: np.ndarray) -> tuple[int, str]:
    """The ledger (count, digest hex) of these global row indices (any order, repeats count)."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)  # (n,)
    return len(rows), digest_hex(row_sum(rows))


def combine_ledgers(ledgers: Iterable[tuple[int, str]]) -> tuple[int, str]:
    """The ledger of several readers' rows together (e.g. the data-parallel ranks' shares):
    counts add, digests add mod 2**64."""
    count, digest = 0, 0
    for n, text in ledgers:
        count += int(n)
        digest = (digest + parse_digest(text)) & MASK
    return count, digest_hex(digest)
