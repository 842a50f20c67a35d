#!/usr/bin/env python
"""Benchmark the activation reader against a memmap and against SAE training.

    python scripts/bench_reader.py --tokens 1000000

Builds a store of synthetic activations in a temporary folder (project defaults: float16,
1024-row chunks, 4096-row units, no compression) and the same bytes as a raw np.memmap, then
measures:
  (a) the reader: shuffled batches per second and GB/s (storage-dtype bytes), prefetch on;
  (b) the memmap: sequential 4096-row slices converted to float32 torch tensors (page cache warm);
  (c) training: one TopK SAE (width 16 d, k = 32) with an Adam step per batch;
  (d) training fed by the reader, to show that prefetching hides the reads.
and prints reader rate / training rate (target >= 5x) and reader GB/s / memmap GB/s (>= 50%).

Measured on the 2-core build machine (torch 2 threads, --tokens 1000000, best of 5 with others'
jobs sharing the machine): (a) 581 batches/s, 2.74 GB/s (median 2.29; the previous reader: 58
batches/s, 0.27 GB/s); (b) 22.2 GB/s (median 16.9); (c) 0.60 steps/s; (d) 97% of (c). Reader /
training 968x; reader / memmap 12% (medians 14%): the memmap pass only casts, while the reader
also copies the file bytes and gathers shuffled rows, and memory bandwidth is the limit here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distributed_sae.sae import TopKSAE
from distributed_sae.store import ActivationReader, ActivationStore, commit_unit

HOOK = "blocks.15.hook_resid_post"


def build(root: Path, a: argparse.Namespace) -> tuple[ActivationStore, np.memmap]:
    """The store and a memmap holding the same rows (a whole number of units)."""
    n_units = max(1, a.tokens // a.unit_rows)
    rows = n_units * a.unit_rows
    store = ActivationStore.create(
        root / "store", hook_dims={HOOK: a.d}, n_units=n_units, unit_rows=a.unit_rows,
        chunk_rows=a.chunk_rows, dtype=a.dtype, compression=a.compression,
        metadata={"context_size": 128, "exclude_token_ids": []})
    # numpy has no bfloat16: its memmap holds float16, the same bytes per value.
    np_dtype = np.float32 if a.dtype == "float32" else np.float16
    mm = np.memmap(root / "acts.bin", dtype=np_dtype, mode="w+", shape=(rows, a.d))
    gen = torch.Generator().manual_seed(0)
    tokens = np.arange(a.unit_rows, dtype=np.int64) % 1000 + 1
    for u in range(n_units):
        x = torch.randn(a.unit_rows, a.d, generator=gen)  # (unit_rows, d)
        store.write_unit(u, {HOOK: x}, tokens)
        commit_unit(store.path, u, {"stats": {}})
        mm[u * a.unit_rows:(u + 1) * a.unit_rows] = x.numpy()
    mm.flush()
    # Copy-on-write mapping: writable for torch.from_numpy, the file is never changed.
    return ActivationStore.open(store.path), np.memmap(root / "acts.bin", dtype=np_dtype,
                                                       mode="c", shape=(rows, a.d))


def reader_pass(reader: ActivationReader, epoch: int, row_bytes: int) -> tuple[float, float]:
    """(batches/s, storage GB/s) of one shuffled epoch."""
    t0, n, rows = time.perf_counter(), 0, 0
    for x in reader.iter_epoch(epoch):  # (batch, d) float32
        n, rows = n + 1, rows + len(x)
    dt = time.perf_counter() - t0
    return n / dt, rows * row_bytes / dt / 1e9


def memmap_pass(mm: np.memmap, batch: int) -> float:
    """Storage GB/s of sequential `batch`-row slices -> float32 torch tensors."""
    t0 = time.perf_counter()
    for s in range(0, len(mm), batch):
        x = torch.from_numpy(mm[s:s + batch]).float()  # (batch, d)
    del x
    return mm.nbytes / (time.perf_counter() - t0) / 1e9


def bench_io(store: ActivationStore, mm: np.memmap, a: argparse.Namespace
             ) -> tuple[list[tuple[float, float]], list[float]]:
    """Reader epochs and memmap passes, interleaved so that both see the same machine load.

    The first of each warms the page cache, the memmap's page tables and malloc; it is not timed.
    """
    rows = range(0, int(store.metadata["total_rows"]))
    reader = ActivationReader(store, HOOK, rows, a.batch, buffer_chunks=a.buffer_chunks,
                              prefetch=a.prefetch)
    row_bytes = mm.shape[1] * mm.itemsize
    reader_pass(reader, 0, row_bytes)
    memmap_pass(mm, a.batch)
    reads, maps = [], []
    for epoch in range(1, 1 + a.repeats):
        reads.append(reader_pass(reader, epoch, row_bytes))
        maps.append(memmap_pass(mm, a.batch))
    return reads, maps


def bench_training(a: argparse.Namespace, batches=None) -> float:
    """Optimiser steps per second of one TopK SAE, on a fixed batch or on `batches`."""
    sae = TopKSAE(a.d, a.width, k=a.k)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    fixed = torch.randn(a.batch, a.d)

    def step(x: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        sae.loss(x).loss.backward()
        opt.step()

    step(fixed if batches is None else next(batches))  # warm-up
    t0 = time.perf_counter()
    for _ in range(a.train_steps):
        step(fixed if batches is None else next(batches))
    return a.train_steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--chunk-rows", type=int, default=1024)
    p.add_argument("--unit-rows", type=int, default=4096)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--compression", default="none", choices=["none", "zstd", "blosc"])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--buffer-chunks", type=int, default=16)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--width", type=int, default=None, help="SAE width (default 16 d)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5, help="timed passes; the best is reported")
    p.add_argument("--dir", default=None, help="where to build the data (default: a temp dir)")
    a = p.parse_args()
    a.width = a.width or 16 * a.d
    root = Path(tempfile.mkdtemp(prefix="bench_reader_", dir=a.dir))
    try:
        t0 = time.perf_counter()
        store, mm = build(root, a)
        rows = len(mm)
        print(f"data: {rows} rows x d={a.d} {a.dtype} ({mm.nbytes / 1e9:.2f} GB), chunks "
              f"{a.chunk_rows}, units {a.unit_rows}, compression {a.compression}; built in "
              f"{time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}")
        reads, maps = bench_io(store, mm, a)
        r_bps, r_gbs = max(reads)
        m_gbs = max(maps)
        t_sps, fed = 0.0, 0.0
        for _ in range(2):  # interleaved as well; the best of each
            t_sps = max(t_sps, bench_training(a))
            reader = ActivationReader(store, HOOK, range(rows), a.batch,
                                      buffer_chunks=a.buffer_chunks, prefetch=a.prefetch)
            batches = reader.iter_batches()
            fed = max(fed, bench_training(a, batches))
            batches.close()
        med = float(np.median([g for _, g in reads])), float(np.median(maps))
        print(f"(a) reader, shuffled, prefetch={a.prefetch}, batch {a.batch}: "
              f"{r_bps:.1f} batches/s, {r_gbs:.2f} GB/s (median of {a.repeats}: {med[0]:.2f})")
        print(f"(b) memmap, sequential {a.batch}-row slices -> float32: {m_gbs:.2f} GB/s "
              f"(median {med[1]:.2f})")
        print(f"(c) training TopK d_sae={a.width} k={a.k} batch {a.batch}: {t_sps:.3f} steps/s "
              f"({t_sps * a.batch:.0f} tokens/s)")
        print(f"(d) training fed by the reader: {fed:.3f} steps/s ({fed / t_sps:.0%} of (c))")
        print(f"reader rate / training rate = {r_bps / t_sps:.1f}x (target >= 5x)")
        print(f"reader GB/s / memmap GB/s = {r_gbs / m_gbs:.0%} best, {med[0] / med[1]:.0%} "
              f"median (target >= 50%)")
        print(f"load average at the end: {os.getloadavg()[0]:.2f} (other processes skew timings)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
