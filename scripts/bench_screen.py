"""The TopK encoder's bf16 screen against the exact fp32 selection (train.topk_screen, issue 18).

    dsae-harvest out_dir=runs/bench440 data.n_tokens=450560      # once
    python scripts/bench_screen.py --store runs/bench440/store --json docs/results/cpu_screen.json

For each k x width, one TopK member (the default optimiser) trains with the exact fp32 selection
over --batches batches of SmolLM2 layer 15's residual; then, on held-out rows:
  * rows whose screened top k (kernels/select.py: screened_topk, for each --margins) is not the
    exact fp32 top k, and the largest difference of the selected values, at the start weights
    and at the trained ones (trained codes are peakier, so the two can differ);
  * the whole training step (encoder, decoder, backward, optimiser, decoder norm) with the
    screen off and on (margin SCREEN_MARGIN), the best of --repeats steps from the trained
    weights, and the encoder GEMM alone in fp32 and in bf16.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_frontier import HOOK, gemm_seconds
from bench_vs_plain import train_batches

from distributed_sae.config import HarvestConfig, RunConfig, SAEConfig, StoreConfig, TrainConfig
from distributed_sae.kernels import torch_sparse
from distributed_sae.kernels.select import grouped_topk, screened_topk
from distributed_sae.sae import sae_member
from distributed_sae.store import ActivationStore, split_rows
from distributed_sae.train import BankTrainer, input_scale
from distributed_sae.train.bank_trainer import SCREEN_MARGIN


def bank_of(data: list[torch.Tensor], width: int, k: int, mean: torch.Tensor, store: str
            ) -> BankTrainer:
    cfg = RunConfig(harvest=HarvestConfig(hooks=[HOOK]), store=StoreConfig(path=store),
                    sae=SAEConfig(widths=[width], k=k),
                    train=TrainConfig(batch_size=data[0].shape[0], topk_screen="off"),
                    out_dir="unused")
    return BankTrainer(cfg, [sae_member(HOOK, "topk", width, seed=0, k=k)], data[0].shape[1],
                       mean, len(data))


@torch.no_grad()
def agreement(sae, rows: list[torch.Tensor], margins: list[int]) -> dict[str, dict]:
    """Per margin: the fraction of rows whose screened top-k set differs from fp32's, and the
    largest |difference| of the sorted selected values."""
    out = {str(m): {"rows_differ": 0, "max_value_diff": 0.0} for m in margins}
    total = 0
    for x in rows:
        x_c = x - sae.b_dec
        exact, idx = grouped_topk(torch.addmm(sae.b_enc, x_c, sae.W_enc), sae.k)  # (batch, k)
        ref = torch.zeros(x.shape[0], sae.d_sae, dtype=torch.bool).scatter_(1, idx, True)
        for m in margins:
            v, i = screened_topk(x_c, sae.W_enc, sae.b_enc, sae.k, m, torch_sparse.gather_dot)
            got = torch.zeros_like(ref).scatter_(1, i, True)
            out[str(m)]["rows_differ"] += int((got != ref).any(1).sum())
            diff = (v.sort(1).values - exact.sort(1).values).abs().max()
            out[str(m)]["max_value_diff"] = max(out[str(m)]["max_value_diff"], float(diff))
        total += x.shape[0]
    for m in out.values():
        m["rows_differ"] /= total
    return out


def step_seconds(bank: BankTrainer, data: list[torch.Tensor], screen: int, repeats: int
                 ) -> float:
    bank.members[0].sae.screen = screen
    best = float("inf")
    for x in data[:repeats + 1]:  # the first step warms the buffers up
        start = time.perf_counter()
        bank.step(x, record=False)
        best = min(best, time.perf_counter() - start)
    return best


def run_point(data, held, width, k, mean, store, args) -> dict:
    bank = bank_of(data, width, k, mean, store)
    sae = bank.members[0].sae
    point: dict = {"k": k, "width": width, "at_start": agreement(sae, held, args.margins)}
    for x in data[:args.batches]:
        bank.step(x, record=False)
    opt = bank.members[0].opt
    if hasattr(opt, "eval"):
        opt.eval()  # schedule-free: the averaged weights, which are what is saved
    point["trained"] = agreement(sae, held, args.margins)
    if hasattr(opt, "train"):
        opt.train()
    off = step_seconds(bank, data, 0, args.repeats)
    on = step_seconds(bank, data, SCREEN_MARGIN, args.repeats)
    x = data[0]
    point.update(step_off_s=off, step_on_s=on, speedup=off / on,
                 gemm_fp32_s=gemm_seconds(x, width),
                 gemm_bf16_s=gemm_seconds(x.bfloat16(), width))
    point["step_on_over_gemm_fp32"] = on / point["gemm_fp32_s"]
    t = point["trained"][str(SCREEN_MARGIN)]
    print(f"k{k} w{width}: step off {off * 1e3:.0f} ms, on {on * 1e3:.0f} ms ({off / on:.2f}x); "
          f"GEMM fp32 {point['gemm_fp32_s'] * 1e3:.0f} ms, bf16 {point['gemm_bf16_s'] * 1e3:.0f}"
          f" ms; trained rows differing at margin {SCREEN_MARGIN}: {t['rows_differ']:.2e}",
          flush=True)
    return point


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--ks", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--widths", type=int, nargs="+", default=[2304, 4608, 9216])
    ap.add_argument("--margins", type=int, nargs="+", default=[0, 4, 8, 16])
    ap.add_argument("--batches", type=int, default=60, help="training batches before measuring")
    ap.add_argument("--held-out", type=int, default=4, help="held-out batches of 4096 rows")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    store = ActivationStore.open(args.store)
    train_rows, held_rows = split_rows(store, args.held_out * 4096 / store.n_tokens)
    scale, mean = input_scale(store, HOOK)
    data = train_batches(store, train_rows, 4096, scale)
    held = train_batches(store, held_rows, 4096, scale)
    points = [run_point(data, held, w, k, mean, args.store, args)
              for k in args.ks for w in args.widths]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "threads": torch.get_num_threads(),
                       "margin": SCREEN_MARGIN, "points": points}, fh, indent=1)


if __name__ == "__main__":
    main()
