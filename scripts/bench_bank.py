"""A bank trained together against its members trained one after another, and a plain loop.

    python scripts/bench_bank.py --store runs/demo/store --widths 1152 2304 4608 9216 --steps 40

Measures on one store, in one run:
  1. the bank: every batch read once and fed to all members (BankTrainer);
  2. the same members one after another, each re-reading the store (same seeds, same batches);
     their weights must equal the bank's, bit for bit;
  3. a plain dense PyTorch TopK loop (encoder matmul, topk, scatter, decoder matmul, Adam) for
     the width given by --plain-width, on the same batches: our per-member tokens/s against it.
Prints wall times and the ratios. Make a store first with `dsae-harvest` (or scripts/demo.sh).
"""

from __future__ import annotations

import argparse
import time

import torch
from plain_topk import plain_dense_step, plain_params  # the baseline loop

from distributed_sae.config import HarvestConfig, RunConfig, SAEConfig, StoreConfig, TrainConfig
from distributed_sae.sae import MemberSpec, sae_member
from distributed_sae.store import ActivationReader, ActivationStore, split_rows
from distributed_sae.train import BankTrainer, input_scale


def batches(cfg: RunConfig, store: ActivationStore, scale: float, steps: int) -> list[torch.Tensor]:
    rows, _ = split_rows(store, cfg.train.holdout_fraction)
    reader = ActivationReader(store, cfg.sae_hook, rows, cfg.train.batch_size, seed=0, scale=scale,
                              exclude_token_ids=store.metadata["exclude_token_ids"])
    it = reader.iter_batches()
    return [next(it) for _ in range(steps)]


def run_bank(cfg: RunConfig, specs: list[MemberSpec], store: ActivationStore, steps: int,
             d: int, mean: torch.Tensor, scale: float) -> tuple[float, BankTrainer]:
    """Wall seconds of reading `steps` batches (from the store) and training `specs` on them."""
    start = time.perf_counter()
    data = batches(cfg, store, scale, steps)
    bank = BankTrainer(cfg, specs, d, mean, steps)
    for x in data:
        bank.step(x)
    return time.perf_counter() - start, bank


def plain_topk_loop(data: list[torch.Tensor], width: int, k: int, lr: float) -> float:
    """Seconds of a textbook dense TopK SAE loop over `data` (the baseline of the SAE issue)."""
    params = plain_params(data[0].shape[1], width)
    opt = torch.optim.Adam(params, lr=lr)
    start = time.perf_counter()
    for x in data:
        plain_dense_step(params, opt, x, k)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--hook", default=None, help="default: the store's first hook")
    ap.add_argument("--widths", type=int, nargs="+", default=[1152, 2304, 4608, 9216])
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--plain-width", type=int, default=4608)
    args = ap.parse_args()
    store = ActivationStore.open(args.store)
    hook = args.hook or store.hook_points[0]
    unit_contexts = store.unit_rows // store.context_size
    cfg = RunConfig(harvest=HarvestConfig(hooks=[hook], contexts_per_unit=unit_contexts),
                    store=StoreConfig(path=args.store, chunk_tokens=store.chunk_rows),
                    sae=SAEConfig(widths=args.widths, k=args.k),
                    train=TrainConfig(batch_size=args.batch, lr=1e-3, warmup_steps=5))
    cfg.data.context_size = store.context_size
    scale, mean = input_scale(store, hook)
    d = store.d(hook)
    specs = [sae_member(hook, "topk", w, seed=i, k=args.k) for i, w in enumerate(args.widths)]
    print(f"torch threads {torch.get_num_threads()}, store {args.store}, hook {hook}, "
          f"batch {args.batch}, {args.steps} steps, widths {args.widths}, k {args.k}")
    run_bank(cfg, specs, store, 3, d, mean, scale)  # warm-up: allocator, thread pools, page cache
    bank_s, bank = run_bank(cfg, specs, store, args.steps, d, mean, scale)
    seq_s, same = 0.0, True
    for spec, member in zip(specs, bank.members):
        s, alone = run_bank(cfg, [spec], store, args.steps, d, mean, scale)
        seq_s += s
        same &= all(torch.equal(a, b) for a, b in zip(member.sae.state_dict().values(),
                                                      alone.members[0].sae.state_dict().values()))
    print(f"bank together: {bank_s:7.2f} s   one after another: {seq_s:7.2f} s   "
          f"ratio {bank_s / seq_s:.3f}   identical weights per member: {same}")
    data = batches(cfg, store, scale, args.steps)
    plain_s = plain_topk_loop(data, args.plain_width, args.k, 1e-3)
    spec = sae_member(hook, "topk", args.plain_width, seed=0, k=args.k)
    ours = BankTrainer(cfg, [spec], d, mean, args.steps)
    start = time.perf_counter()
    for x in data:
        ours.step(x)
    ours_s = time.perf_counter() - start
    tokens = args.steps * args.batch
    print(f"width {args.plain_width}: plain loop {tokens / plain_s:8.0f} tok/s, ours "
          f"{tokens / ours_s:8.0f} tok/s, ratio ours/plain {plain_s / ours_s:.3f} (same batches, "
          f"data already in memory)")


if __name__ == "__main__":
    main()
