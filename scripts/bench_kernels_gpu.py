"""The GPU half of scripts/bench_kernels.py (`--gpu`): the Triton kernels against dense bf16.

1. Ceilings measured here: a bf16 8192^3 matmul (TFLOP/s) and a 1 GiB device copy (GB/s, bytes
   read + written), the roofline every figure below is set against.
2. A tile sweep of each Triton kernel at the issue's target shape (n 131072, d 4096, k 32, batch
   4096); every variant is checked against the default tiles before it is timed, and the fastest
   is used for the rest of the run (kernels/triton_sparse.CONFIG holds the committed choice).
3. The grid n x d x k (batch 4096, bf16): each kernel, the decoder forward + backward through its
   autograd.Function, and one whole training step (bank_trainer.train_step: loss, backward,
   parallel-gradient removal, fused Adam, renorm), each against its dense counterpart, with the
   bound of moving the bytes the sparse op must move and the peak memory of the steps.

Times are medians of triton.testing.do_bench (CUDA events; L2 flushed before each call). The grid
stops starting new points after --deadline seconds so that one lease of the device covers it; the
JSON is rewritten after every point, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable

import torch

from distributed_sae.kernels import sparse_decode, use_backend
from distributed_sae.sae import TopKSAE, sae_member
from distributed_sae.train.bank_trainer import Member, train_step

# A dry run (--dry-run: CPU tensors under TRITON_INTERPRET=1, fp32, tiny shapes; the test suite
# runs it) swaps these three, so every line of the script is exercised without a GPU.
DEV, BF16, BATCH = "cuda", torch.bfloat16, 4096
TARGET = dict(n=131072, d=4096, k=32)  # the decoder target shape


def dry_run(batch: int = 48) -> None:
    global DEV, BF16, BATCH
    DEV, BF16, BATCH = "cpu", torch.float32, batch


def bench(fn: Callable[[], Any]) -> float:
    """Median ms of fn over ~100 ms of calls (CUDA events, L2 flushed before each)."""
    if DEV != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=60, return_mode="median"))


def _reset_memory() -> None:
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else 0.0


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.float(), ref.float()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-12))


def gpu_peaks() -> dict[str, float]:
    size = 8192 if DEV == "cuda" else 256
    a = torch.randn(size, size, device=DEV, dtype=BF16)
    src = torch.randn(2**29 if DEV == "cuda" else 2**20, device=DEV, dtype=BF16)  # 1 GiB >> L2
    dst = torch.empty_like(src)
    mm, copy = bench(lambda: a @ a), bench(lambda: dst.copy_(src))
    return {"tflops": 2 * size**3 / mm / 1e9, "gbps": 2 * src.nbytes / copy / 1e6}


def inputs(n: int, d: int, k: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """bf16 codes with distinct latents per token (the top-k of random scores), W (n, d), g."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    scores = torch.rand(BATCH, n, device=DEV, generator=g)
    indices = scores.topk(k, dim=1).indices  # (batch, k)
    del scores
    return {"values": torch.rand(BATCH, k, device=DEV, generator=g).to(BF16),
            "indices": indices,
            "w": (torch.randn(n, d, device=DEV, generator=g) / d**0.5).to(BF16),
            "g": torch.randn(BATCH, d, device=DEV, generator=g).to(BF16)}


def kernel_calls(t: dict[str, torch.Tensor]) -> dict[str, Callable[[], Any]]:
    from distributed_sae.kernels import triton_sparse as ts

    v, idx, w, g = t["values"], t["indices"], t["w"], t["g"]
    n = w.shape[0]
    return {"decode": lambda: ts.decode_rows(v, idx, w, None),
            "grad_values": lambda: ts.gather_dot(g, w, idx),
            "grad_rows": lambda: ts.segment_rows(idx, v, g, n)[0],
            # grad W_enc's (d, n) layout, viewed back as (n, d) to compare
            "grad_rows_T": lambda: ts.segment_rows(idx, v, g, n, transposed=True)[0].t()}


# (BLOCK_L, BLOCK_D, num_warps) of the latent-tile segment kernel
TILE_SWEEP = [(32, 128, 4), (64, 128, 4), (64, 64, 4), (128, 64, 8), (32, 256, 8), (64, 256, 8),
              (16, 256, 4), (128, 128, 8)]
# (table entry, tiles) variants per op; the first run on an H100 (docs/kernels.md) swept wider.
SWEEP = {
    "decode": [("decode", dict(BLOCK_B=b, BLOCK_D=bd, num_warps=nw))
               for b, bd, nw in [(16, 128, 4), (32, 128, 4), (8, 256, 4)]],
    "grad_values": [("gather_dot", dict(BLOCK_R=r, BLOCK_D=bd, num_warps=nw))
                    for r, bd, nw in [(16, 128, 4), (32, 128, 4), (32, 256, 4)]],
    "grad_rows": [("segment_rows", dict(BLOCK_P=p, BLOCK_D=bd, LATENTS=lat, num_warps=nw))
                  for p, bd, lat, nw in [(4, 512, 4, 4), (8, 512, 1, 4), (8, 512, 16, 4)]]
    + [("segment_tile", dict(BLOCK_L=bl, BLOCK_D=bd, num_warps=nw)) for bl, bd, nw in TILE_SWEEP],
}


def _use(entry: str, cfg: dict[str, int]) -> None:
    """Put tiles `cfg` in force for table entry `entry` (a segment entry also picks its kernel)."""
    from distributed_sae.kernels import triton_sparse as ts

    ts.tile_table()[entry] = cfg
    if entry.startswith("segment_"):
        ts.SEGMENT_KERNEL = entry.removeprefix("segment_")
        ts._TILE_FAILED = False  # a tile size that does not compile must not hide the next


def sweep_tiles(n: int, d: int, k: int) -> dict[str, Any]:
    """Time every SWEEP variant of each op (checked against the tiles in force first); put the
    fastest in force and return the table."""
    from distributed_sae.kernels import triton_sparse as ts

    calls = kernel_calls(inputs(n, d, k))
    out: dict[str, Any] = {}
    for op, variants in SWEEP.items():
        ref = calls[op]()
        ops = [op, op + "_T"] if op == "grad_rows" else [op]  # both layouts count
        rows = []
        for entry, cfg in variants:
            _use(entry, cfg)
            try:
                err = max(rel_err(calls[o](), ref) for o in ops)
                if ts._TILE_FAILED:  # fell back to the per-latent kernel: not this variant
                    raise RuntimeError("the tile kernel did not compile")
                ms = sum(bench(calls[o]) for o in ops) if err < 1e-2 else float("nan")
            except Exception as exc:  # a tile too big for shared memory / registers
                err, ms = float("nan"), float("nan")
                print(f"  {op} {entry} {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
            rows.append({"entry": entry, "config": cfg, "ms": ms, "rel_err": err})
        timed = [r for r in rows if r["ms"] == r["ms"]] or rows[:1]
        best = min(timed, key=lambda r: r["ms"])
        _use(best["entry"], best["config"])
        out[op] = {"best": best, "variants": rows}
        print(f"sweep {op}: " + ", ".join(f"{r['entry']}{tuple(r['config'].values())} "
                                          f"{r['ms']:.3f}" for r in rows)
              + f" -> {best['entry']} {best['config']}")
    out["topk_group"] = sweep_topk(n, k)
    return out


def sweep_topk(n: int, k: int) -> dict[str, Any]:
    """torch.topk (group 1) against select.grouped_topk's group sizes on (batch, n) bf16; the
    fastest that returns the same values goes in force (select._GROUP_CUDA)."""
    from distributed_sae.kernels import select

    pre = torch.randn(BATCH, n, device=DEV, dtype=BF16)
    want = pre.topk(k, dim=-1).values.sort(-1).values
    ms = {}
    for group in (1, 8, 16, 32, 64):
        call = (lambda g=group: select.grouped_topk(pre, k, group=g))
        if torch.equal(call()[0].sort(-1).values, want):
            ms[group] = bench(call)
    best = min(ms, key=ms.get)
    select._GROUP_CUDA = best if DEV == "cuda" else select._GROUP_CUDA
    print("sweep topk groups: " + ", ".join(f"{g} {t:.3f}" for g, t in ms.items())
          + f" -> {best}")
    return {"ms": ms, "best": best}


def kernel_point(n: int, d: int, k: int) -> dict[str, Any]:
    """Each kernel, its dense counterpart, the decoder fwd+bwd, bytes-moved bounds (GB/s)."""
    t = inputs(n, d, k, seed=1)
    v, idx, w, g = t["values"], t["indices"], t["w"], t["g"]
    f = torch.zeros(BATCH, n, device=DEV, dtype=BF16).scatter_(1, idx, v)  # (batch, n)
    calls = kernel_calls(t)
    dense = {"decode": lambda: f @ w, "grad_values": lambda: (g @ w.t()).gather(1, idx),
             "grad_rows": lambda: f.t() @ g, "grad_rows_T": lambda: g.t() @ f}
    # against cuBLAS's bf16 matmul (fp32 accumulation): an fp32 copy of W would not fit at n 2^20
    row: dict[str, Any] = {"decode_rel_err_vs_dense": rel_err(calls["decode"](), f @ w)}
    # Bytes each sparse op must move: k rows of W (or of g) per token, plus its output.
    rows_bytes = BATCH * k * d * 2
    moved = {"decode": rows_bytes + BATCH * d * 2, "grad_values": rows_bytes + BATCH * d * 2,
             "grad_rows": rows_bytes + n * d * 2, "grad_rows_T": rows_bytes + n * d * 2}
    for name in calls:
        ms = bench(calls[name])
        row[name] = {"ms": ms, "dense_ms": bench(dense[name]), "bytes": moved[name]}
    del f
    row["decoder_fwd_bwd"] = decoder_fwd_bwd(v, idx, w, g)
    row["decoder_fwd_bwd"]["bytes"] = sum(moved[o] for o in ("decode", "grad_values", "grad_rows"))
    return row


def decoder_fwd_bwd(v: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                    g: torch.Tensor) -> dict[str, float]:
    """sparse_decode forward + backward (grads of values, W_dec, b_dec) vs the dense decoder."""
    b = torch.zeros(w.shape[1], device=DEV, dtype=BF16, requires_grad=True)
    vr, wr = v.clone().requires_grad_(), w.clone().requires_grad_()
    n = w.shape[0]

    def dense(vv, ii, ww, bb):
        f = torch.zeros(vv.shape[0], n, device=DEV, dtype=BF16)
        return f.scatter(1, ii, vv) @ ww + bb  # (batch, d) through a dense (batch, n)

    def step(fn, backend):
        def run():
            with use_backend(backend):
                return torch.autograd.grad(fn(vr, idx, wr, b), (vr, wr, b), g)
        return run

    out = {"ms": bench(step(sparse_decode, "triton")), "dense_ms": bench(step(dense, "dense"))}
    out["speedup"] = out["dense_ms"] / out["ms"]
    return out


def sae_on_gpu(d: int, n: int, k: int) -> TopKSAE:
    """A bf16 TopKSAE built on the GPU: TopKSAE's own init draws on the CPU, which takes tens
    of seconds and 32 GiB of host memory at n = 2^20, d = 4096. Same init rule (unit decoder
    rows, encoder their transpose, zero biases)."""
    sae = TopKSAE(d, 1, k=1)
    w = torch.randn(n, d, device=DEV)
    w /= w.norm(dim=1, keepdim=True)
    sae.d_sae, sae.k = n, k
    sae.W_dec = torch.nn.Parameter(w.to(BF16))  # (n, d)
    sae.W_enc = torch.nn.Parameter(w.t().contiguous().to(BF16))  # (d, n)
    sae.b_enc = torch.nn.Parameter(torch.zeros(n, device=DEV, dtype=BF16))
    sae.b_dec = torch.nn.Parameter(torch.zeros(d, device=DEV, dtype=BF16))
    return sae


def step_point(n: int, d: int, k: int) -> dict[str, Any]:
    """One train_step, sparse (triton) vs dense, with the step's parts for scale."""
    from distributed_sae.kernels import select

    sae = sae_on_gpu(d, n, k)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)  # as bank_trainer builds it
    member = Member(sae_member("h", "topk", n, seed=0, k=k), sae, opt,
                    torch.zeros(n, dtype=torch.long, device=DEV))
    x = torch.randn(BATCH, d, device=DEV, dtype=BF16)
    out: dict[str, Any] = {}
    for backend in ("triton", "dense"):
        _reset_memory()
        try:
            with use_backend(backend):
                ms = bench(lambda: train_step(member, x, 1e-4, 1.0, 10**9))
            out[backend] = {"ms": ms, "peak_gib": _peak_gib()}
        except torch.OutOfMemoryError:
            out[backend] = {"ms": None, "peak_gib": "OOM"}
    w_enc = sae.W_enc.detach()
    pre = x @ w_enc  # (batch, n)
    out["encoder_matmul_ms"] = bench(lambda: x @ w_enc)
    out["torch_topk_ms"] = bench(lambda: pre.topk(k, dim=-1, sorted=False))
    out["grouped_topk_ms"] = bench(lambda: select.grouped_topk(pre, k))  # what the step runs
    out["adam_ms"] = bench(opt.step)
    if out["dense"]["ms"] and out["triton"]["ms"]:
        out["speedup"] = out["dense"]["ms"] / out["triton"]["ms"]
    return out


def _ms(ms: float | None) -> str:
    return "OOM" if ms is None else f"{ms:.3f}"


def _fmt_kernels(n: int, d: int, k: int, kern: dict[str, Any], peaks: dict[str, float]) -> None:
    for name in ("decode", "grad_values", "grad_rows", "grad_rows_T", "decoder_fwd_bwd"):
        r = kern[name]
        gbps = r["bytes"] / r["ms"] / 1e6
        bound_ms = r["bytes"] / peaks["gbps"] / 1e6
        print(f"| {n} | {d} | {k} | {name} | {r['ms']:.3f} | {r['dense_ms']:.3f} | "
              f"{r['dense_ms'] / r['ms']:.1f}x | {gbps:.0f} ({100 * gbps / peaks['gbps']:.0f}%) | "
              f"{r['ms'] / bound_ms:.2f} |")


def run_gpu(args: argparse.Namespace) -> dict[str, Any]:
    start = time.time()
    peaks = gpu_peaks()
    name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (dry run)"
    print(f"{name}: {peaks['tflops']:.0f} TFLOP/s bf16 matmul, "
          f"{peaks['gbps']:.0f} GB/s copy (read + write)")
    results: dict[str, Any] = {"device": name, "peaks": peaks,
                               "batch": BATCH, "dtype": "bf16", "grid": []}
    target = (args.n[0], args.d[0], args.k[0]) if DEV != "cuda" else tuple(TARGET.values())
    if not args.no_sweep:
        try:
            results["sweep"] = sweep_tiles(*target)
        except Exception as exc:  # keep the committed tiles and go on to the grid
            results["sweep"] = repr(exc)
            print(f"sweep failed: {exc!r}")
    print("| n | d | k | op | ms | dense ms | speed-up | GB/s (% copy peak) | time / bound |")
    points = [(n, d, k) for n in args.n for d in args.d for k in args.k]
    points.sort(key=lambda p: p != target)  # the target shape first
    for n, d, k in points:
        if time.time() - start > args.deadline:
            results["grid"].append({"n": n, "d": d, "k": k, "skipped": "deadline"})
            continue
        row: dict[str, Any] = {"n": n, "d": d, "k": k}
        try:
            row["kernels"] = kernel_point(n, d, k)
            _fmt_kernels(n, d, k, row["kernels"], peaks)
        except Exception as exc:  # OOM at the largest shapes; record and go on
            row["kernels"] = repr(exc)[:300]
            print(f"| {n} | {d} | {k} | kernels | {row['kernels'][:100]} |")
        _reset_memory()
        try:
            row["step"] = step_point(n, d, k)
            s = row["step"]
            print(f"| {n} | {d} | {k} | train step | {_ms(s['triton']['ms'])} | "
                  f"{_ms(s['dense']['ms'])} | "
                  f"{s.get('speedup', 0):.2f}x | peak GiB {s['triton']['peak_gib']} vs "
                  f"{s['dense']['peak_gib']}; matmul {s['encoder_matmul_ms']:.2f} torch.topk "
                  f"{s['torch_topk_ms']:.2f} grouped {s['grouped_topk_ms']:.2f} adam "
                  f"{s['adam_ms']:.2f} | |")
        except Exception as exc:
            row["step"] = repr(exc)[:300]
            print(f"| {n} | {d} | {k} | train step | {row['step'][:100]} |")
        _reset_memory()
        results["grid"].append(row)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"gpu": results}, fh, indent=1, default=str)
    return results
