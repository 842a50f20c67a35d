"""One TopK member sharded by latents over 1 and 2 workers: step time, memory, bytes per step.

    python scripts/bench_scale.py                                # CPU, gloo, 1 and 2 workers
    python scripts/bench_scale.py --d 4096 --widths 131072 262144 --batch 4096   # GPUs, NCCL

Each configuration spawns `shards` processes (torch.multiprocessing; gloo on CPU, NCCL with one
GPU per worker when there are enough GPUs) that train one member with LatentShardedSAE and Adam.
Per worker it reports
  * state MB: the bytes of the parameters, gradients and Adam moments this worker holds, counted
    tensor by tensor (weights + grads + 2 moments = 4 x the parameters' bytes): must halve with
    2 shards (b_dec, d floats, is replicated);
  * peak RSS MB (CPU) or peak CUDA memory (GPU) of the worker, activations included;
  * step ms: mean wall time of a training step after 2 warm-up steps;
  * bytes/step: what this worker hands to collectives per step (ShardComm's counter), plain and
    with AuxK on (half the latents marked dead): independent of the width, O(batch·(k·R + d)).
Run with two widths to see the memory double and the bytes stay put.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes of parameters + gradients + optimiser state held by this worker."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        if p.grad is not None:
            total += p.grad.numel() * p.grad.element_size()
        for v in opt.state.get(p, {}).values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _measure(args: argparse.Namespace, width: int, comm, device: torch.device) -> dict:
    from distributed_sae.parallel import LatentShardedSAE
    from distributed_sae.parallel.latent_shard import train_step

    model = LatentShardedSAE.build("topk", args.d, width, comm, k=args.k).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.d, generator=g).to(device)  # the batch every shard shares
    dead = torch.zeros(model.stop - model.start, dtype=torch.bool, device=device)
    dead[::2] = True  # half the latents dead: AuxK on
    for _ in range(2):  # warm-up: Adam's moments exist after the first step
        train_step(model, opt, x)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    comm.barrier()
    sync()
    comm.stats.reset()
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(model, opt, x)
    sync()
    step_s = (time.perf_counter() - start) / args.steps
    plain = comm.stats.payload_bytes / args.steps
    wire = comm.stats.wire_bytes / args.steps
    comm.stats.reset()
    train_step(model, opt, x, dead=dead)
    return {"width": width, "state_mb": _state_bytes(model, opt) / 2**20,
            "peak_mb": _peak_mb(device), "step_ms": 1e3 * step_s, "bytes": plain,
            "wire": wire, "bytes_auxk": comm.stats.payload_bytes,
            "by_op": dict(comm.stats.by_op)}


def _worker(rank: int, shards: int, port: int, width: int, args: argparse.Namespace,
            out: str) -> None:
    from distributed_sae.parallel import ShardComm

    use_gpu = torch.cuda.device_count() >= shards and not args.cpu
    device = torch.device(f"cuda:{rank}" if use_gpu else "cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    else:  # the machine's cores split over the workers, as separate processes would get them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // shards))
    dist.init_process_group("nccl" if use_gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=shards,
                            timeout=datetime.timedelta(seconds=600))
    try:
        res = _measure(args, width, ShardComm(None) if shards > 1 else ShardComm.single(), device)
        res.update(shards=shards, rank=rank, device=str(device),
                   backend=dist.get_backend(), threads=torch.get_num_threads())
        with open(os.path.join(out, f"w{width}_s{shards}_r{rank}.json"), "w") as f:
            json.dump(res, f)
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--widths", type=int, nargs="+", default=[16384, 32768])
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--cpu", action="store_true", help="gloo on CPU even when GPUs are present")
    args = ap.parse_args()
    from distributed_sae.parallel import free_port

    rows = []
    with tempfile.TemporaryDirectory() as out:
        for width in args.widths:
            for shards in args.shards:
                mp.spawn(_worker, args=(shards, free_port(), width, args, out), nprocs=shards,
                         join=True)
                for r in range(shards):
                    with open(os.path.join(out, f"w{width}_s{shards}_r{r}.json")) as f:
                        rows.append(json.load(f))
    print(f"d={args.d} k={args.k} batch={args.batch} steps={args.steps} (after 2 warm-up), "
          f"TopK, fp32; bytes = payload this worker hands to collectives per step")
    print("| width | shards | rank | device | threads | state MB | peak MB | step ms | "
          "bytes/step | wire bytes/step | bytes/step AuxK |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['width']} | {r['shards']} | {r['rank']} | {r['device']} ({r['backend']}) | "
              f"{r['threads']} | {r['state_mb']:.1f} | {r['peak_mb']:.0f} | {r['step_ms']:.1f} | "
              f"{r['bytes']:.0f} | {r['wire']:.0f} | {r['bytes_auxk']:.0f} |")
    for r in rows:
        if r["shards"] > 1 and r["rank"] == 0:
            print(f"width {r['width']}, {r['shards']} shards, bytes by op (AuxK step): "
                  f"{r['by_op']}")


if __name__ == "__main__":
    main()
