"""Benchmarks of the sparse SAE kernels (distributed_sae.kernels) against the dense paths.

    python scripts/bench_kernels.py --cpu [--json out.json]   # the CPU figures of docs/kernels.md
    python scripts/bench_kernels.py --gpu [--json out.json]   # the GPU grid (needs CUDA + triton)

CPU: (1) the torch sparse decoder against a dense one (scatter to (batch, n) + matmul) at
n=16384, k=32, d=576, batch 4096, forward and forward+backward; (2) one whole TopK training
step (bank_trainer.train_step: loss, backward, parallel-gradient removal, Adam, renorm) at
width 4608, k=32, d=576, batch 4096, against the encoder matmul alone and against a plain dense
PyTorch TopK loop (the one of scripts/bench_bank.py), all measured interleaved in one run.
GPU (scripts/bench_kernels_gpu.py): a tile sweep at n 131072, d 4096, k 32, then n in {16384,
131072, 1048576} x d in {576, 2304, 4096} x k in {32, 128}, batch 4096, bf16: each Triton kernel
and the decoder forward + backward against dense, against the bound of the bytes they must move
(at the copy bandwidth measured there), and the train step sparse vs dense with peak memory.
CPU times are the minimum over --repeats (the build machine is shared); GPU times are medians.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Callable

import torch
from plain_topk import plain_dense_step  # scripts/plain_topk.py: the baseline loop

from distributed_sae.kernels import sparse_decode, use_backend
from distributed_sae.sae import TopKSAE, sae_member
from distributed_sae.train.bank_trainer import Member, train_step


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_all(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Min seconds of each function, the functions interleaved round by round so that a load
    change on a shared machine hits all of them alike."""
    best = {name: float("inf") for name in fns}
    for name, fn in fns.items():  # warm-up (allocator, Adam state, triton compile)
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def codes(batch: int, n: int, k: int, device: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(batch, k, generator=g).to(device, dtype)
    indices = torch.rand(batch, n, generator=g).topk(k, dim=1).indices.to(device)  # distinct
    return values, indices


def dense_decode(values: torch.Tensor, indices: torch.Tensor, w: torch.Tensor,
                 b: torch.Tensor) -> torch.Tensor:
    f = torch.zeros(values.shape[0], w.shape[0], dtype=w.dtype, device=w.device)
    return f.scatter(1, indices, values) @ w + b  # (batch, d) through a dense (batch, n)


# ---- CPU ---------------------------------------------------------------------------------------
def cpu_decoder(batch: int, n: int, d: int, k: int, repeats: int) -> dict[str, Any]:
    values, indices = codes(batch, n, k, "cpu", torch.float32)
    w = torch.randn(n, d) / d**0.5
    b = torch.zeros(d)
    vr, wr, br = (t.clone().requires_grad_() for t in (values, w, b))
    grad = torch.randn(batch, d)

    def fwd_bwd(fn: Callable) -> Callable[[], Any]:
        return lambda: torch.autograd.grad(fn(vr, indices, wr, br), (vr, wr, br), grad)

    with use_backend("torch"):
        t = time_all({"sparse_fwd": lambda: sparse_decode(values, indices, w, b),
                      "dense_fwd": lambda: dense_decode(values, indices, w, b),
                      "sparse_fwd_bwd": fwd_bwd(sparse_decode),
                      "dense_fwd_bwd": fwd_bwd(dense_decode)}, repeats)
    return {"shape": dict(batch=batch, n=n, d=d, k=k), "ms": {k_: v * 1e3 for k_, v in t.items()},
            "speedup_fwd": t["dense_fwd"] / t["sparse_fwd"],
            "speedup_fwd_bwd": t["dense_fwd_bwd"] / t["sparse_fwd_bwd"]}


def cpu_step(batch: int, width: int, d: int, k: int, repeats: int) -> dict[str, Any]:
    x = torch.randn(batch, d, generator=torch.Generator().manual_seed(1))
    sae = TopKSAE(d, width, k=k, seed=0)
    # The trainer's optimiser (bank_trainer builds Adam(fused=True) outside ZeRO-2).
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, betas=(0.9, 0.999), fused=True)
    member = Member(sae_member("h", "topk", width, seed=0, k=k), sae, opt,
                    torch.zeros(width, dtype=torch.long))
    plain = [torch.nn.Parameter(p.detach().clone()) for p in
             (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]
    plain_opt = torch.optim.Adam(plain, lr=1e-4)
    w_enc = sae.W_enc.detach()
    out = torch.empty(batch, width)

    def fwd_bwd() -> None:
        sae.zero_grad(set_to_none=True)
        sae.loss(x).loss.backward()

    with use_backend("torch"):
        t = time_all({"encoder_matmul": lambda: x @ w_enc,
                      # the same matmul into a reused buffer: no page faults, its lower bound
                      "encoder_matmul_inplace": lambda: torch.mm(x, w_enc, out=out),
                      "topk_alone": lambda: out.topk(k, dim=-1, sorted=False),
                      "step": lambda: train_step(member, x, 1e-4, 1.0, 10**9),
                      "loss_fwd": lambda: sae.loss(x),
                      "loss_fwd_bwd": fwd_bwd,
                      "adam_only": opt.step,
                      "plain_dense_step": lambda: plain_dense_step(plain, plain_opt, x, k)},
                     repeats)
    ms = {k_: v * 1e3 for k_, v in t.items()}
    return {"shape": dict(batch=batch, width=width, d=d, k=k), "ms": ms,
            "step_over_matmul": t["step"] / t["encoder_matmul"],
            "step_over_matmul_inplace": t["step"] / t["encoder_matmul_inplace"],
            "plain_dense_over_step": t["plain_dense_step"] / t["step"],
            "matmul_gflops": 2 * batch * d * width / t["encoder_matmul"] / 1e9}


def run_cpu(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    dec = cpu_decoder(4096, 16384, 576, 32, args.repeats)
    print(f"CPU, {torch.get_num_threads()} threads; times are min of {args.repeats} (ms)")
    print("| decoder n=16384 k=32 d=576 batch=4096 | sparse | dense | speed-up |")
    for what in ("fwd", "fwd_bwd"):
        print(f"| {what} | {dec['ms']['sparse_' + what]:.1f} | {dec['ms']['dense_' + what]:.1f} "
              f"| {dec['speedup_' + what]:.1f}x |")
    step = cpu_step(4096, 4608, 576, 32, args.repeats)
    print("| train step width=4608 k=32 d=576 batch=4096 | ms |")
    for name, value in step["ms"].items():
        print(f"| {name} | {value:.1f} |")
    print(f"step / encoder matmul = {step['step_over_matmul']:.2f} (in place: "
          f"{step['step_over_matmul_inplace']:.2f}); plain dense step / step = "
          f"{step['plain_dense_over_step']:.2f}; matmul {step['matmul_gflops']:.0f} GFLOP/s")
    return {"device": "cpu", "threads": torch.get_num_threads(), "decoder": dec, "step": step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="the CPU benchmarks")
    ap.add_argument("--gpu", action="store_true", help="the GPU grid (CUDA + triton)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--n", type=int, nargs="+", default=[16384, 131072, 1048576])
    ap.add_argument("--d", type=int, nargs="+", default=[576, 2304, 4096])
    ap.add_argument("--k", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--deadline", type=float, default=1e9,
                    help="GPU: start no new grid point after this many seconds")
    ap.add_argument("--no-sweep", action="store_true", help="GPU: keep the committed tiles")
    ap.add_argument("--dry-run", action="store_true",
                    help="run the GPU script on CPU tensors under TRITON_INTERPRET=1, fp32, tiny "
                         "shapes (checks the script; its times mean nothing)")
    args = ap.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
        import bench_kernels_gpu

        bench_kernels_gpu.dry_run()
        args.gpu, args.cpu = True, False
        if args.n == ap.get_default("n"):
            args.n, args.d, args.k = [100, 300], [40], [4, 1]
    if not (args.cpu or args.gpu):
        args.gpu = torch.cuda.is_available()
        args.cpu = not args.gpu
    results = {}
    if args.cpu:
        results["cpu"] = run_cpu(args)
    if args.gpu:
        from bench_kernels_gpu import run_gpu  # scripts/bench_kernels_gpu.py

        results["gpu"] = run_gpu(args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
