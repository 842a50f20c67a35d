#!/usr/bin/env python
"""Benchmark the activation reader against a memmap and against SAE training.

    python scripts/bench_reader.py --tokens 1000000 [--no-training] [--cold]

Builds a store of synthetic activations in a temporary folder (project defaults: float16,
1024-row chunks, 4096-row units, no compression) and the same bytes as a raw np.memmap. Every side
reads the same bytes, the on-disk dtype (float16: 2 bytes a value), from the warm page cache, and
every GB/s below counts those bytes. What each delivers:
  (a) the reader: shuffled (batch, d) float32 torch batches (chunk order shuffled, rows shuffled in
      a 16-chunk buffer, prefetch threads on), one whole epoch;
  (b) the memmap, sequential `batch`-row slices, three ways: new float32 torch tensors with
      torch's default threads and with 1 thread (the same deliverable as the reader minus the
      shuffle; the faster of the two is the target's baseline), and a raw copy into one reused
      float16 array without a cast (the bare cost of reading the bytes);
  (c) training: one TopK SAE (width 16 d, k = 32) with an Adam step per batch;
  (d) training fed by the reader, to show that prefetching hides the reads.
With --cold every pass starts with the store's and the memmap's files evicted from the page cache
(posix_fadvise DONTNEED; the memmap is mapped afresh for each pass), so both read from the disk:
the case of a store larger than memory, which a store of billions of tokens is (1e9 tokens of
d 576 in float16 are 1.15 TB). Passes are interleaved and medians reported, each also as GB per CPU-second of this process (all
threads), which is less sensitive to other jobs than wall-clock GB/s. It prints reader rate /
training rate (target >= 5x) and reader / memmap (target >= 50% of GB/s).

Measured on the 2-core build machine (AMD EPYC, 32 MB L3; torch 2 threads; --tokens 1000000;
load average 6-8 from others' jobs; median of 3 runs of 5-pass medians): (a) 527 batches/s,
2.48 GB/s, 2.51 GB per CPU-s (the previous reader in the same conditions: 1.96 GB/s, 1.56 GB per
CPU-s); (b) float32, 2 threads 0.60 GB/s (OpenMP teams oversubscribe the busy cores), 1 thread
11.8 GB/s; raw copy 22.8 GB/s. Reader / memmap float32: 19% of GB/s (17-22%), 21% per CPU-s;
reader / raw copy 10%. (c) 0.67 steps/s; (d) 99% of (c); reader / training 693x (that run).
The reader moves each byte three times (pread into the buffer, a shuffled row gather, the cast
into a batch that leaves the cache) where the memmap pass casts once into an array that stays in
the cache, so it needs ~4.5x the CPU per byte; on 2 loaded cores it gets about one core in all.
--cold on the same machine (load average ~1; two runs of 5-pass medians): reader 1.29 / 1.43 GB/s,
memmap float32 2.48 / 2.48 GB/s: 52% / 58% (0.94 GB/s, 41%, before the reader hinted its reads).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from distributed_sae.store import ActivationReader, ActivationStore, commit_unit

HOOK = "blocks.15.hook_resid_post"
READER = "reader"


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
        files = store.write_unit(u, {HOOK: x}, tokens)  # the reader checks their sizes
        commit_unit(store.path, u, {"stats": {}, "files": files})
        mm[u * a.unit_rows:(u + 1) * a.unit_rows] = x.numpy()
    mm.flush()
    # Copy-on-write mapping: writable for torch.from_numpy, the file is never changed.
    return ActivationStore.open(store.path), np.memmap(root / "acts.bin", dtype=np_dtype,
                                                       mode="c", shape=(rows, a.d))


def evict(root: Path) -> None:
    """Drop every file under root from the page cache (they are clean: written and synced)."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed(run: Callable[[], int]) -> tuple[float, float]:
    """(GB/s, GB per CPU-second of this process, all threads) of `run`, which returns bytes."""
    t0, c0 = time.perf_counter(), time.process_time()
    nbytes = run()
    return nbytes / (time.perf_counter() - t0) / 1e9, nbytes / (time.process_time() - c0) / 1e9


def reader_pass(reader: ActivationReader, epoch: int, row_bytes: int) -> int:
    """Storage bytes of one shuffled epoch, delivered as float32 torch batches."""
    rows = 0
    for x in reader.iter_epoch(epoch):  # (batch, d) float32
        rows += len(x)
    return rows * row_bytes


def memmap_float32(mm: np.memmap, batch: int, threads: int) -> int:
    """Sequential `batch`-row slices -> new float32 torch tensors (the reader's deliverable,
    minus the shuffle), with `threads` torch threads; returns the storage bytes read."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for s in range(0, len(mm), batch):
            x = torch.from_numpy(mm[s:s + batch]).float()  # (batch, d)
        del x
        return mm.nbytes
    finally:
        torch.set_num_threads(before)


def memmap_raw(mm: np.memmap, batch: int) -> int:
    """Sequential `batch`-row slices copied as they are (no cast) into one reused numpy array:
    the bare cost of reading the bytes; returns the storage bytes read."""
    out = np.empty((batch, mm.shape[1]), dtype=mm.dtype)  # (batch, d) storage dtype
    for s in range(0, len(mm), batch):
        np.copyto(out[:len(mm) - s], mm[s:s + batch])
    return mm.nbytes


def gather_ceiling(a: argparse.Namespace, repeats: int = 20) -> tuple[float, float, float]:
    """GB per CPU-second (one torch thread) of the reader's shuffled gather + cast alone, on a
    16-chunk buffer already in memory: (np.take of 1024-row tiles + cast, np.take alone, cast
    alone). No reading, no threads, no consumer: a ceiling for any reader that shuffles rows."""
    rows = a.buffer_chunks * a.chunk_rows
    np_dtype = np.float32 if a.dtype == "float32" else np.float16
    raw = np.random.default_rng(0).standard_normal((rows, a.d), dtype=np.float32).astype(np_dtype)
    tile = np.empty((1024, a.d), dtype=np_dtype)  # (1024, d) gather target
    tile_t, out = torch.from_numpy(tile), torch.empty(a.batch, a.d)  # out: (batch, d) float32
    perm = np.random.default_rng(1).permutation(rows)

    def take(i: np.ndarray, lo: int) -> None:
        np.take(raw, i, axis=0, out=tile[:len(i)], mode="wrap")

    def cast(i: np.ndarray, lo: int) -> None:
        out[lo:lo + len(i)].copy_(tile_t[:len(i)])

    def both(i: np.ndarray, lo: int) -> None:
        take(i, lo), cast(i, lo)

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rates = []
        for step in (both, take, cast):
            c0 = time.process_time()
            for _ in range(repeats):
                for b in range(0, rows - a.batch + 1, a.batch):
                    for lo in range(0, a.batch, 1024):
                        step(perm[b + lo:b + min(lo + 1024, a.batch)], lo)
            rates.append(repeats * (rows // a.batch) * a.batch * raw.itemsize * a.d
                         / (time.process_time() - c0) / 1e9)
        return rates[0], rates[1], rates[2]
    finally:
        torch.set_num_threads(before)


def bench_io(store: ActivationStore, mm: np.memmap, a: argparse.Namespace, root: Path
             ) -> dict[str, list[tuple[float, float]]]:
    """(GB/s, GB per CPU-second) of reader epochs and memmap passes, interleaved so that all see
    the same machine load. The first of each warms the page cache, page tables and malloc; with
    --cold the files are evicted before every timed pass instead."""
    rows = range(0, int(store.metadata["total_rows"]))
    reader = ActivationReader(store, HOOK, rows, a.batch, buffer_chunks=a.buffer_chunks,
                              prefetch=a.prefetch)
    row_bytes = mm.shape[1] * mm.itemsize

    def fresh() -> np.memmap:  # cold: a new mapping, so no page stays mapped between passes
        return np.memmap(mm.filename, dtype=mm.dtype, mode="c", shape=mm.shape) if a.cold else mm

    epoch = iter(range(1 + a.repeats))
    passes: dict[str, Callable[[], int]] = {
        READER: lambda: reader_pass(reader, next(epoch), row_bytes),
        f"float32, {torch.get_num_threads()} torch threads":
            lambda: memmap_float32(fresh(), a.batch, torch.get_num_threads()),
        "float32, 1 torch thread": lambda: memmap_float32(fresh(), a.batch, 1),
        "raw copy, no cast": lambda: memmap_raw(fresh(), a.batch)}
    for run in passes.values():
        run()
    if a.cold:
        os.sync()
    out: dict[str, list[tuple[float, float]]] = {name: [] for name in passes}
    for _ in range(a.repeats):
        for name, run in passes.items():
            if a.cold:
                evict(root)
            out[name].append(timed(run))
    return out


def bench_training(a: argparse.Namespace, batches=None) -> float:
    """Optimiser steps per second of one TopK SAE, on a fixed batch or on `batches`."""
    from distributed_sae.sae import TopKSAE  # here: the I/O benchmark needs no SAE code
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


def train(store: ActivationStore, rows: int, a: argparse.Namespace, r_bps: float) -> None:
    """(c) and (d): training alone and fed by the reader, interleaved; the best of each."""
    t_sps, fed = 0.0, 0.0
    for _ in range(2):
        t_sps = max(t_sps, bench_training(a))
        reader = ActivationReader(store, HOOK, range(rows), a.batch,
                                  buffer_chunks=a.buffer_chunks, prefetch=a.prefetch)
        batches = reader.iter_batches()
        fed = max(fed, bench_training(a, batches))
        batches.close()
    print(f"(c) training TopK d_sae={a.width} k={a.k} batch {a.batch}: {t_sps:.3f} steps/s "
          f"({t_sps * a.batch:.0f} tokens/s)")
    print(f"(d) training fed by the reader: {fed:.3f} steps/s ({fed / t_sps:.0%} of (c))")
    print(f"reader rate / training rate = {r_bps / t_sps:.1f}x (target >= 5x)")


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
    p.add_argument("--repeats", type=int, default=5, help="timed passes; medians are reported")
    p.add_argument("--no-training", action="store_true", help="skip (c) and (d)")
    p.add_argument("--dir", default=None, help="where to build the data (default: a temp dir)")
    p.add_argument("--cold", action="store_true",
                   help="evict the files from the page cache before every pass (disk reads)")
    a = p.parse_args()
    a.width = a.width or 16 * a.d
    root = Path(tempfile.mkdtemp(prefix="bench_reader_", dir=a.dir))
    try:
        t0 = time.perf_counter()
        store, mm = build(root, a)
        rows = len(mm)
        print(f"data: {rows} rows x d={a.d} {a.dtype} ({mm.nbytes / 1e9:.2f} GB), chunks "
              f"{a.chunk_rows}, units {a.unit_rows}, compression {a.compression}, "
              f"{'cold (page cache evicted before each pass)' if a.cold else 'warm'}; built in "
              f"{time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}")
        res = bench_io(store, mm, a, root)
        med = {name: np.median(np.asarray(v), axis=0) for name, v in res.items()}  # (2,)
        r_gbs, r_cpu = med.pop(READER)
        r_bps = r_gbs * 1e9 / (a.batch * a.d * mm.itemsize)
        print(f"(a) reader, shuffled float32 batches, prefetch={a.prefetch}, batch {a.batch}: "
              f"{r_bps:.1f} batches/s, {r_gbs:.2f} GB/s, {r_cpu:.2f} GB per CPU-s "
              f"(medians of {a.repeats})")
        for name, (gbs, cpu) in med.items():
            print(f"(b) memmap, sequential {a.batch}-row slices, {name}: {gbs:.2f} GB/s, "
                  f"{cpu:.2f} GB per CPU-s")
        # The target's baseline: the faster float32 memmap pass (same bytes in, same dtype out).
        base = max((v for name, v in med.items() if name.startswith("float32")),
                   key=lambda v: v[0])
        if not a.no_training:
            train(store, rows, a, r_bps)
        raw = med["raw copy, no cast"]
        print(f"reader / memmap float32 (the faster): {r_gbs / base[0]:.0%} of GB/s, "
              f"{r_cpu / base[1]:.0%} of GB per CPU-s (target >= 50% of GB/s)")
        print(f"reader / memmap raw copy: {r_gbs / raw[0]:.0%} of GB/s, "
              f"{r_cpu / raw[1]:.0%} of GB per CPU-s")
        both, take, cast = gather_ceiling(a)
        print(f"(e) ceiling: the shuffled gather + cast alone, buffer in memory, one thread: "
              f"{both:.2f} GB per CPU-s (np.take {take:.2f}, cast {cast:.2f}); the target needs "
              f"{0.5 * base[0] / both:.2f} cores of it")
        print(f"load average at the end: {os.getloadavg()[0]:.2f} (other processes skew timings)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
